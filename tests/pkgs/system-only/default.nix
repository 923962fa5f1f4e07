# A team's own package set, written the short way: a function of `{ system }`
# alone, without `...`, so it refuses any other argument (nixpkgs' `config`
# and `overlays` among them). It takes a few packages from the main test set.
{ system }:

let
  main = import ../default.nix { inherit system; config = { }; overlays = [ ]; };
in
{
  inherit (main) cacert iana-etc busybox hello;

  team-tool = derivation {
    name = "team-tool-0.1";
    # Built for the machine running the tests, whatever image system is asked for.
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-e" "-c" ''
      mkdir -p $out/bin
      printf '#!${main.busybox}/bin/sh\necho team-tool for ${system}\n' > $out/bin/team-tool
      chmod 0555 $out/bin/team-tool
    '' ];
  };
}
