# The packages of one image, resolved by nixeryd's naming rules.
#
#   nix-instantiate --eval --strict --json --read-write-mode build.nix -A info \
#     --argstr source '<json>' --argstr packages '<json list>' --argstr system x86_64-linux
#
# Gives three attributes: `info` (what nixeryd reads, as JSON), `explain` (the error
# of the first package whose attribute throws, how nixpkgs marks removed aliases) and
# `packages` (the default outputs, what `nix-build -A name` gives: no man pages or
# other extra outputs).
{ source, packages, system }:

let
  loaded = import ./load-pkgs.nix { src = builtins.fromJSON source; inherit system; };
  pkgs = loaded.pkgs;
  names = builtins.fromJSON packages;

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # Registry names are lowercase and cannot start with `_`: find the
  # top-level attribute a name stands for, or null.
  topLevel = name:
    let
      underscored = if builtins.match "[0-9].*" name != null then "_" + name else name;
      folded = toLower underscored;
      matches = builtins.filter (attr: toLower attr == folded) (builtins.attrNames pkgs);
    in
    if builtins.hasAttr name pkgs then name
    else if builtins.hasAttr underscored pkgs then underscored
    else if matches != [ ] then builtins.head matches
    else null;

  partsOf = name: builtins.filter builtins.isString (builtins.split "\\." name);

  # Everything nix-build will evaluate of a package: whether it is a
  # derivation, and its paths.
  check = value:
    builtins.seq (builtins.isAttrs value && (value.type or null) == "derivation")
      (builtins.seq value.drvPath value.outPath);

  # { status = "ok"; value; } | { status = "missing"; } | { status = "throws"; }
  # Dotted names select nested sets, matched exactly below the top level.
  resolve = name:
    let
      parts = partsOf name;
      top = topLevel (builtins.head parts);
      walk = value: rest:
        let forced = builtins.tryEval value; in
        if !forced.success then { status = "throws"; }
        else if rest == [ ] then asPackage forced.value
        else if builtins.isAttrs forced.value && builtins.hasAttr (builtins.head rest) forced.value
        then walk forced.value.${builtins.head rest} (builtins.tail rest)
        else { status = "missing"; };
      asPackage = value:
        let isDrv = builtins.tryEval (builtins.isAttrs value && (value.type or null) == "derivation"); in
        if !isDrv.success then { status = "throws"; }
        else if !isDrv.value then { status = "missing"; }
        else if !(builtins.tryEval (check value)).success then { status = "throws"; }
        else { status = "ok"; inherit value; };
    in
    if top == null then { status = "missing"; } else walk pkgs.${top} (builtins.tail parts);

  # The same walk without tryEval: evaluating it raises the package's own error.
  force = name:
    let parts = partsOf name; in
    check (builtins.foldl' (value: attr: value.${attr}) pkgs.${topLevel (builtins.head parts)} (builtins.tail parts));

  revision = loaded.revision;
  resolved = map (name: resolve name // { inherit name; }) names;
  unresolved = builtins.filter (r: r.status != "ok") resolved;
  throwing = builtins.filter (r: r.status == "throws") resolved;
  notFound = "nixeryd-not-found: ${builtins.toJSON (map (r: r.name) unresolved)}";
  roots = builtins.listToAttrs (map (r: { inherit (r) name; value = r.value.outPath; }) resolved);
  mainProgram = value:
    let found = builtins.tryEval (value.meta.mainProgram or null); in
    if found.success && builtins.isString found.value then found.value else null;
  programs = builtins.listToAttrs (map (r: { inherit (r) name; value = mainProgram r.value; }) resolved);
  safe = f: value: let found = builtins.tryEval (f value); in if found.success then found.value else null;
  spdx = license:
    if builtins.isAttrs license && license ? spdxId then license.spdxId
    else if builtins.isList license then
      let ids = builtins.filter builtins.isString (map spdx license); in
      if ids == [ ] then null else builtins.concatStringsSep " AND " ids
    else null;
  about = value: {
    license = safe (v: let id = spdx (v.meta.license or null); in if builtins.isString id then id else null) value;
    homepage = safe (v: let h = v.meta.homepage or null; in if builtins.isString h then h else null) value;
  };
  metas = builtins.listToAttrs (map (r: { inherit (r) name; value = about r.value; }) resolved);
in
{
  # What nixeryd reads, as JSON on standard output (`nix-instantiate --eval --strict
  # --json --read-write-mode -A info`): a channel no builder can write to, unlike
  # standard error, where builders' logs go. With every name resolved: each name's
  # default output and derivation (written to the store, to be realised next; by name, so
  # a path this host lacks can be built again from it without evaluating anything), the
  # package set's git revision, each package's main program, licence and homepage.
  # Otherwise the names not found, and those whose attributes throw.
  info = builtins.seq pkgs (
    if unresolved == [ ] then {
      notFound = [ ];
      throwing = [ ];
      inherit roots revision programs;
      meta = metas;
      drvs = map (r: r.value.drvPath) resolved;
      derivers = builtins.listToAttrs (map (r: { inherit (r) name; value = r.value.drvPath; }) resolved);
    } else {
      notFound = map (r: r.name) unresolved;
      throwing = map (r: r.name) throwing;
      roots = { };
      inherit revision;
      programs = { };
      meta = { };
      drvs = [ ];
      derivers = { };
    });

  # Evaluating it raises the first throwing package's own error: Nix's message for it.
  explain = if throwing == [ ] then null else force (builtins.head throwing).name;

  # What `nix-build -A packages` builds: every package's default output.
  packages = if unresolved == [ ] then map (r: r.value) resolved else throw notFound;
}
