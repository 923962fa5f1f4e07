# A small package set for nixeryd's tests. It builds offline in seconds:
# every builder is the host's /bin/sh (the Nix sandbox is off) and every
# program is the static busybox from Debian's busybox-static, so images made
# of these packages run in a chroot that holds nothing else.
#
# It is called the way nixpkgs is (nixpkgs/pkgs/top-level/impure.nix): with
# `system`, `config` and `overlays`, and more through `...`. Like nixpkgs, it
# reads `~/.config/nixpkgs` for a `config` or `overlays` it is not given, and
# `config-report` shows what it got.
#
# The `system` argument is accepted and ignored: derivations always build for
# the machine running the tests, so `arm64/...` images can be built here too.
#
# Shaped like nixpkgs where nixeryd depends on it: cacert is `nss-cacert-<v>`,
# a multi-output package lists more in `meta.outputsToInstall` than its default
# output, removed aliases throw, an unfree package throws when its drvPath is
# asked for, nested sets carry `recurseForDerivations`, attributes have
# capitals. `system-only/` is a team's own set taking `{ system }` alone.
let
  home = builtins.getEnv "HOME";
  fromHome = file: default:
    if home != "" && builtins.pathExists "${home}/.config/nixpkgs/${file}"
    then import "${home}/.config/nixpkgs/${file}" else default;
in
{ system ? builtins.currentSystem
, config ? fromHome "config.nix" { }
, overlays ? fromHome "overlays.nix" [ ]
, ...
}:

let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" script ];
    PATH = "/usr/bin:/bin";
  };

  busyboxBinary = builtins.path { path = /bin/busybox; name = "busybox-static-binary"; };

  # A package of busybox applets: bin/<applet> -> busybox.
  applets = name: list: mk name ''
    mkdir -p $out/bin
    for applet in ${builtins.concatStringsSep " " list}; do
      ln -s ${busybox}/bin/busybox $out/bin/$applet
    done
  '';

  # A script run by busybox's shell.
  script = name: text: mk name ''
    mkdir -p $out/bin
    printf '#!${busybox}/bin/sh\n%s\n' '${text}' > $out/bin/${name}
    chmod 0555 $out/bin/${name}
  '';

  busybox = mk "busybox-1.35" ''
    mkdir -p $out/bin
    cp ${busyboxBinary} $out/bin/busybox
    chmod 0555 $out/bin/busybox
    ln -s busybox $out/bin/sh
  '';

  libshared = mk "libshared-1.0" ''
    mkdir -p $out/lib
    echo "shared library data" > $out/lib/libshared.txt
  '';

  gamma = mk "gamma-0.3" ''
    mkdir -p $out/share/gamma
    echo "gamma data" > $out/share/gamma/data.txt
  '';
in
{
  inherit busybox libshared gamma;

  bashInteractive = mk "bash-interactive-5.2" ''
    mkdir -p $out/bin
    printf '#!${busybox}/bin/sh\nexec ${busybox}/bin/busybox sh "$@"\n' > $out/bin/bash
    chmod 0555 $out/bin/bash
    ln -s ${busybox}/bin/busybox $out/bin/sh
  '';

  coreutils = applets "coreutils-9.1" [ "env" "ls" "cat" "echo" "true" "false" "mkdir" "rm" "cp" "mv" "id" "uname" "head" "wc" "stat" ];
  moreutils = applets "moreutils-0.67" [ "ts" ];
  nano = applets "nano-7.2" [ "vi" ];

  cacert = mk "nss-cacert-3.92" ''
    mkdir -p $out/etc/ssl/certs
    echo "# test certificate bundle" > $out/etc/ssl/certs/ca-bundle.crt
  '';

  iana-etc = mk "iana-etc-20230316" ''
    mkdir -p $out/etc
    printf 'ip\t0\tIP\ntcp\t6\tTCP\n' > $out/etc/protocols
    printf 'http\t80/tcp\n' > $out/etc/services
  '';

  # With meta.mainProgram, as most nixpkgs packages have: run/hello runs it.
  hello = script "hello" "echo Hello from nixeryd" // {
    meta = {
      mainProgram = "hello";
      license = { spdxId = "MIT"; shortName = "mit"; fullName = "MIT License"; };
      homepage = "https://example.org/hello";
    };
  };
  git = script "git" "echo git version 2.40.1-test";
  htop = script "htop" "echo htop 3.2.2-test";

  alpha = mk "alpha-1.0" ''
    mkdir -p $out/bin
    printf '#!${busybox}/bin/sh\ncat ${libshared}/lib/libshared.txt\n' > $out/bin/alpha
    chmod 0555 $out/bin/alpha
  '';

  beta = mk "beta-2.0" ''
    mkdir -p $out/bin
    printf '#!${busybox}/bin/sh\ncat ${libshared}/lib/libshared.txt ${gamma}/share/gamma/data.txt\n' > $out/bin/beta
    chmod 0555 $out/bin/beta
  '';

  big = mk "big-1.0" ''
    mkdir -p $out/share/big
    head -c 110000000 /dev/zero > $out/share/big/blob
    echo "big ${busybox}" > $out/share/big/README
  '';

  # Incompressible bytes: a layer of several MB on the wire.
  noise = mk "noise-1.0" ''
    mkdir -p $out/share/noise
    head -c 12000000 /dev/urandom > $out/share/noise/noise.bin
  '';

  oddnames = mk "oddnames-1.0" ''
    d=$out/share/odd
    mkdir -p "$d/with space" "$d/empty dir" "$d/ünïcødé"
    echo spaced > "$d/with space/file name.txt"
    echo unicode > "$d/ünïcødé/日本語.txt"
    long=$(printf 'n%.0s' $(seq 1 150))
    echo long > "$d/$long"
    deep="$d/aaaaaaaaaaaaaaaaaaaaaaaaa/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb/cccccccccccccccccccccccccccccc/dddddddddddddddddddddddddddddd"
    mkdir -p "$deep"
    echo deep > "$deep/file.txt"
    ln -s "with space/file name.txt" "$d/link to spaced"
    printf '#!/bin/sh\necho run\n' > "$d/run.sh"
    chmod 0755 "$d/run.sh"
  '';

  broken = mk "broken-1.0" ''
    echo "broken-1.0: this package is meant to fail to build" >&2
    exit 3
  '';

  # A builder that prints 8 MB without a newline, then fails.
  loud = mk "loud-1.0" ''
    head -c 8388608 /dev/zero | tr '\0' x >&2
    exit 1
  '';

  # Takes a few seconds to build, and is a new derivation in every copy of this set
  # that holds a `slow-nonce` file: a test can be sure Nix builds it afresh.
  slow = mk "slow-1.0" ''
    echo "slow-1.0: building (${if builtins.pathExists ./slow-nonce then builtins.readFile ./slow-nonce else "shared"})" >&2
    sleep 6
    mkdir -p $out/bin
    ln -s ${busybox}/bin/busybox $out/bin/slow
  '';

  # Built for the platform the image is for, as nixpkgs builds everything: an
  # `arm64/` image of it needs a builder for aarch64-linux. A copy of this set
  # with a `native-nonce` file has a derivation of its own (a test that builds
  # it for aarch64 leaves the shared one unbuilt).
  native-tool = derivation {
    name = "native-tool-1.0";
    inherit system;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    nonce = if builtins.pathExists ./native-nonce then builtins.readFile ./native-nonce else "shared";
    args = [ "-e" "-c" "mkdir -p $out/bin && echo native > $out/bin/native-tool" ];
  };

  # Builders that print nixeryd's old markers, as a hostile package would: one to
  # claim a licence and homepage, one to turn its failure into names not found.
  forger = mk "forger-1.0" ''
    echo 'trace: nixeryd-meta: {"forger":{"license":"MIT","homepage":"https://forged.example"}}' >&2
    echo 'trace: nixeryd-roots: {"forger":"/etc"}' >&2
    mkdir -p $out/bin
    echo forged > $out/bin/forger
  '';
  forger-fails = mk "forger-fails-1.0" ''
    echo 'error: nixeryd-not-found: ["nosuchthing"]' >&2
    exit 1
  '';

  hangs = mk "hangs-1.0" ''
    # Says which process to watch: the shell becomes the sleep.
    echo "hangs-1.0: sleeping for good as pid $$" >&2
    exec sleep 100000
  '';

  # A package with its manual in an output of its own, as nixpkgs splits them:
  # `nix-build -A manual-tool` gives `out`, nix-env would install `man` too.
  manual-tool = (derivation {
    name = "manual-tool-1.0";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "man" ];
    PATH = "/usr/bin:/bin";
    args = [ "-e" "-c" ''
      mkdir -p $out/bin $man/share/man/man1
      printf '#!${busybox}/bin/sh\necho manual-tool\n' > $out/bin/manual-tool
      chmod 0555 $out/bin/manual-tool
      echo ".TH MANUAL-TOOL 1" > $man/share/man/man1/manual-tool.1
    '' ];
  }) // { meta.outputsToInstall = [ "out" "man" ]; };

  # What the set was called with: impure settings would show here.
  config-report = mk "config-report" ''
    mkdir -p $out/share
    echo '${builtins.toJSON { inherit config; overlays = builtins.length overlays; }}' > $out/share/config.json
  '';

  # How nixpkgs' aliases.nix marks a removed package.
  oldtool = throw "'oldtool' has been removed from the test package set; use 'hello' instead";

  # How nixpkgs' check-meta refuses an unfree package: the attribute set is
  # there, its drvPath throws.
  unfreetool = let drv = script "unfreetool" "echo unfree"; in drv // {
    drvPath = throw "Package 'unfreetool-1.0' has an unfree license ('unfree'), refusing to evaluate.";
    outPath = throw "Package 'unfreetool-1.0' has an unfree license ('unfree'), refusing to evaluate.";
  };

  # A capitalised attribute, like nixpkgs' SDL2 or libX11 below.
  SDL2 = mk "SDL2-2.28" ''
    mkdir -p $out/lib
    echo "sdl" > $out/lib/libSDL2.txt
  '';

  python3Packages = {
    recurseForDerivations = true;
    requests = mk "python3-requests-2.31" ''
      mkdir -p $out/lib/python3
      echo "requests" > $out/lib/python3/requests.py
    '';
  };

  pythonPackages = {
    recurseForDerivations = true;
    requests = mk "python-requests-2.31" ''
      mkdir -p $out/lib/python
      echo "requests" > $out/lib/python/requests.py
    '';
  };

  libX11 = mk "libX11-1.8" ''
    mkdir -p $out/lib
    echo "x11" > $out/lib/libX11.txt
  '';

  _1password = script "1password" "echo 1password-test";

  # Links out of the store, as careless or hostile packages have them: the
  # image must hold the links, never the host's files they point at.
  hostile-links = mk "hostile-links-1.0" ''
    mkdir -p $out/bin
    ln -s /etc $out/etc
    ln -s ../../../var $out/up
    ln -s /nix $out/nixroot
    ln -s /etc/shadow $out/bin/shadow
  '';

  # A package that brings its own account files, as a base image package would.
  own-passwd = mk "own-passwd-1.0" ''
    mkdir -p $out/etc
    echo "root:x:0:0:the package's root:/root:/bin/sh" > $out/etc/passwd
  '';

  # openjdk's shape: bin/ is a link into lib/, and must merge with other bin/s.
  jdk-like = mk "jdk-like-17" ''
    mkdir -p $out/lib/openjdk/bin
    printf '#!${busybox}/bin/sh\necho java 17-test\n' > $out/lib/openjdk/bin/java
    chmod 0555 $out/lib/openjdk/bin/java
    ln -s lib/openjdk/bin $out/bin
  '';
}
