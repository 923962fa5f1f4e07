# The packages of one image, resolved by nixeryd's naming rules.
#
#   nix-build build.nix --argstr source '<json>' --argstr packages '<json list>' --argstr system x86_64-linux
#
# Evaluates to the list of outputs to install for every package; nix-build
# builds them and prints their store paths. When a name is not found,
# evaluation fails with one line naming every missing package:
#   nixeryd-not-found: ["name", ...]
{ source, packages, system }:

let
  pkgs = import ./load-pkgs.nix { src = builtins.fromJSON source; inherit system; };
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

  isSet = value: (builtins.tryEval (builtins.isAttrs value)).value or false;

  # Dotted names select nested sets, matched exactly below the top level.
  lookup = name:
    let
      parts = builtins.filter builtins.isString (builtins.split "\\." name);
      top = topLevel (builtins.head parts);
      walk = value: rest:
        if rest == [ ] then value
        else if isSet value && builtins.hasAttr (builtins.head rest) value
        then walk value.${builtins.head rest} (builtins.tail rest)
        else null;
    in
    if top == null then null else walk pkgs.${top} (builtins.tail parts);

  isDerivation = value: value != null && isSet value && (value.type or null) == "derivation";

  found = map (name: { inherit name; value = lookup name; }) names;
  missing = map (f: f.name) (builtins.filter (f: !(isDerivation f.value)) found);

  outputsOf = drv:
    let
      wanted = drv.meta.outputsToInstall or [ "out" ];
      present = builtins.filter (o: builtins.hasAttr o drv) wanted;
    in
    if present == [ ] then [ drv ] else map (o: drv.${o}) present;
in
if missing != [ ] then
  throw "nixeryd-not-found: ${builtins.toJSON missing}"
else
  builtins.concatLists (map (f: outputsOf f.value) found)
