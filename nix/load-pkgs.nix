# Loads the package set that images are built from.
#
# `src` is the decoded source description nixeryd passes in:
#   { type = "channel"; channel = "nixos-unstable"; url = "<tarball URL>"; }
#     or  { type = "channel"; rev = "<40 hex>"; url = "<tarball URL>"; }
#   { type = "git"; url = "..."; } with an optional `rev` or `ref`
#   { type = "path"; path = "/absolute/path"; }
#   { type = "flake"; ref = "<flake reference>"; }: names are looked up in the
#     flake's packages.<system>, then its legacyPackages.<system>
# Only Nix builtins are used, so this works for nixpkgs and for small package sets.
#
# Gives { pkgs; revision; }: the package set, and the git revision it came
# from where one is known (null otherwise).
{ src, system }:

let
  archive = name: "https://github.com/NixOS/nixpkgs/archive/${name}.tar.gz";

  # Without a ref, Nix 2.8 fetches `master` from a remote repository, whatever its default
  # branch: `HEAD` is the default branch.
  git = builtins.fetchGit (
    { url = src.url; }
    // (if src ? rev then { rev = src.rev; allRefs = true; } else { })
    // (if src ? ref then { ref = src.ref; } else if src ? rev then { } else { ref = "HEAD"; })
  );

  flake = builtins.getFlake src.ref;
  # What a flake offers for `system`: its packages before its legacyPackages (nixpkgs'
  # own flake keeps the whole set there).
  flakePackages = (flake.legacyPackages.${system} or { }) // (flake.packages.${system} or { });

  fetched =
    if src.type == "channel" then
      builtins.fetchTarball (src.url or (archive (src.rev or src.channel)))
    else if src.type == "git" then
      git
    else if src.type == "path" then
      /. + src.path
    else
      throw "nixeryd: unknown package source type '${src.type}'";

  revision =
    if src.type == "git" then git.rev
    else if src.type == "channel" then src.rev or null
    else if src.type == "flake" then flake.rev or null
    else null;

  # What a package set may be given. nixpkgs takes all three (and pure
  # settings keep the host's ~/.config/nixpkgs out of the build); a team's
  # own set may take `{ system }` alone, without `...`, and is handed only
  # the arguments its function names. A set that is not a function is used
  # as it is.
  offered = {
    inherit system;
    config = { };
    overlays = [ ];
  };
  imported = import fetched;
  pkgs =
    if src.type == "flake" then flakePackages
    else if builtins.isFunction imported
    then imported (builtins.intersectAttrs (builtins.functionArgs imported) offered)
    else imported;
in
{ inherit pkgs revision; }
