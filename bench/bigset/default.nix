# A package set that costs to evaluate what a large one does, for bench/known.py: `size`
# packages in every stage of a bootstrap chain `depth` stages long, each stage a fixpoint
# over every package of the one before it, with an overlay applied to all of them (as
# nixpkgs' stdenv stages are), and each package depending on its stage's stdenv and a few
# other packages. Builders are the host's /bin/sh (the sandbox is off); nothing is
# fetched. Not used by the tests.
{ size ? 100000, depth ? 8, ... }:

let
  inherit (builtins) listToAttrs genList mapAttrs foldl' toString elemAt;

  mk = name: deps: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" "mkdir -p $out/bin && echo '${name}' > $out/bin/${name} && echo $deps > $out/deps" ];
    PATH = "/usr/bin:/bin";
    deps = deps;
  };

  stage = previous: number:
    let
      self = listToAttrs (genList (i: {
        name = "p${toString i}";
        value = mk "p${toString i}-s${toString number}" (
          [ self.stdenv ] ++ (if i > 2 then [ self."p${toString (i / 2)}" self."p${toString (i / 3)}" ] else [ ])
        );
      }) size) // {
        stdenv = mk "stdenv-s${toString number}" (if previous == null then [ ] else [ previous.stdenv previous.p1 ]);
      };
      # An overlay over every package, as each stage of nixpkgs' bootstrap applies one.
      overlaid = mapAttrs (name: value: value) self;
    in
    overlaid;

  final = foldl' stage null (genList (n: n) depth);
in
final // {
  cacert = final.p0;
  iana-etc = final.p1;
}
