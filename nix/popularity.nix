# Every top-level derivation of a package set, for `nixeryd popularity`.
#
#   nix-instantiate popularity.nix --argstr source '<json>' --argstr system x86_64-linux
#
# Attributes that fail to evaluate, or are not derivations, are skipped.
{ source, system }:

let
  inherit (import ./load-pkgs.nix { src = builtins.fromJSON source; inherit system; }) pkgs;
  usable = name:
    let attempt = builtins.tryEval (
      let value = pkgs.${name}; in
      builtins.isAttrs value && (value.type or null) == "derivation" && builtins.isString value.drvPath
    );
    in attempt.success && attempt.value;
in
map (name: pkgs.${name}) (builtins.filter usable (builtins.attrNames pkgs))
