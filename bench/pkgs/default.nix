# Package set for the benchmarks: store paths made of data found on any Debian
# machine (documentation, locales, the Python standard library, shared
# libraries) so that packing meets real-world compressibility, plus a layer of
# incompressible bytes for blob throughput. Builders copy from the host: the
# Nix sandbox is off on these machines. Not used by the tests.
{ ... }:

let
  copy = name: source: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" "mkdir -p $out && cp -a ${source}/. $out/ 2>/dev/null || true" ];
    PATH = "/usr/bin:/bin";
  };
in
{
  docs = copy "bench-docs" "/usr/share/doc";
  locales = copy "bench-locales" "/usr/share/locale";
  pystdlib = copy "bench-pystdlib" "/usr/lib/python3.11";
  libs = copy "bench-libs" "/usr/lib/x86_64-linux-gnu";

  random120 = derivation {
    name = "bench-random120";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" "mkdir -p $out && head -c 125829120 /dev/urandom > $out/random.bin" ];
    PATH = "/usr/bin:/bin";
  };

  # Eight images of 60 MB of incompressible bytes each, cold, for bench/isolation.py.
  noise60 = builtins.listToAttrs (map (i: {
    name = "n${toString i}";
    value = derivation {
      name = "bench-noise60-${toString i}";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-e" "-c" "mkdir -p $out && head -c 62914560 /dev/urandom > $out/noise.bin" ];
      PATH = "/usr/bin:/bin";
    };
  }) [ 1 2 3 4 5 6 7 8 ]);

  # The base packages every image gets.
  cacert = derivation {
    name = "nss-cacert-bench";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" "mkdir -p $out/etc/ssl/certs && echo bench > $out/etc/ssl/certs/ca-bundle.crt" ];
    PATH = "/usr/bin:/bin";
  };
  iana-etc = derivation {
    name = "iana-etc-bench";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" "mkdir -p $out/etc && echo bench > $out/etc/protocols" ];
    PATH = "/usr/bin:/bin";
  };
}
