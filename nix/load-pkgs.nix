# Loads the package set that images are built from.
#
# `src` is the decoded source description nixeryd passes in:
#   { type = "channel"; channel = "nixos-unstable"; }  or  { type = "channel"; rev = "<40 hex>"; }
#   { type = "git"; url = "..."; } with an optional `rev` or `ref`
#   { type = "path"; path = "/absolute/path"; }
# Only Nix builtins are used, so this works for nixpkgs and for small package sets.
{ src, system }:

let
  archive = name: "https://github.com/NixOS/nixpkgs/archive/${name}.tar.gz";

  fetched =
    if src.type == "channel" then
      builtins.fetchTarball (archive (src.rev or src.channel))
    else if src.type == "git" then
      builtins.fetchGit (
        { url = src.url; }
        // (if src ? rev then { rev = src.rev; allRefs = true; } else { })
        // (if src ? ref then { ref = src.ref; } else { })
      )
    else if src.type == "path" then
      /. + src.path
    else
      throw "nixeryd: unknown package source type '${src.type}'";
in
import fetched {
  inherit system;
  config = { };
  overlays = [ ];
}
