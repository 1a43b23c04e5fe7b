# A STAND-IN FOR NIXPKGS — NOT NIXPKGS.
#
# It provides only the handful of attributes DFS's flake.nix uses, so that the flake can be evaluated
# (`nix flake check --no-build`) and its lab run (`nix run .#lab -- --quick`) on a machine where
# nixpkgs cannot be fetched and Nix is 2.8 (Debian's nix-bin), as CI does with
#   --override-input nixpkgs path:./tests/nix/nixpkgs-stand-in
# Its "packages" are the host's own tools, and its buildRustPackage runs the host's cargo, so it needs
# `sandbox = false` and `build-users-group =` (builds as the invoking user). It proves the flake's
# structure and wiring, not a reproducible build: that takes the real nixpkgs (see README).
{
  description = "Stand-in for the few nixpkgs attributes DFS's flake uses (offline CI only; not nixpkgs)";

  outputs =
    { self }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
      lib = {
        inherit genAttrs;
        makeBinPath = pkgs: builtins.concatStringsSep ":" (map (p: "${p}/bin") pkgs);
        licenses.mit = "MIT";
        platforms.linux = systems;
      };
      pkgsFor =
        system:
        let
          sh = "/bin/sh";
          # Builders start with an empty PATH; the stand-in's builders use the host's tools.
          PATH = "/usr/bin:/bin";
          # A host tool set: $out/bin points at the host's /usr/bin.
          host =
            name:
            derivation {
              name = "stand-in-host-${name}";
              inherit system PATH;
              builder = sh;
              args = [
                "-c"
                "mkdir -p $out && ln -s /usr/bin $out/bin"
              ];
            };
          unbuildable =
            name: why:
            derivation {
              name = "stand-in-${name}";
              inherit system PATH;
              builder = sh;
              args = [
                "-c"
                "echo 'stand-in: ${why}' >&2; exit 1"
              ];
            };
        in
        {
          stdenv.hostPlatform.system = system;
          coreutils = host "coreutils";
          bash = host "bash";
          diffutils = host "diffutils";
          findutils = host "findutils";
          gnused = host "gnused";
          gnugrep = host "gnugrep";
          gawk = host "gawk";
          gnutar = host "gnutar";
          fuse3 = host "fuse3";
          capnproto = host "capnproto";
          pkg-config = host "pkg-config";
          cargo = host "cargo";
          rustc = host "rustc";
          clippy = host "clippy";
          rustfmt = host "rustfmt";
          nixfmt = host "nixfmt";

          writeShellScriptBin =
            name: text:
            derivation {
              inherit name system text PATH;
              builder = sh;
              args = [
                "-c"
                ''mkdir -p $out/bin && { echo '#!/bin/bash'; echo "$text"; } > $out/bin/${name} && chmod +x $out/bin/${name}''
              ];
            };

          runCommand =
            name: env: script:
            derivation (
              builtins.removeAttrs env [ "nativeBuildInputs" ]
              // {
                inherit name system PATH;
                builder = sh;
                args = [
                  "-c"
                  script
                ];
              }
            );

          # The host's cargo builds the source; the attributes DFS's flake passes are honoured where
          # they shape the result (buildPhase, installPhase, postInstall); tests run in CI instead.
          rustPlatform.buildRustPackage =
            args:
            derivation {
              name = "${args.pname}-${args.version}";
              inherit system;
              builder = "/bin/bash";
              args = [ ./build-rust-package.sh ];
              src = args.src;
              customBuildPhase = args.buildPhase or "";
              customInstallPhase = args.installPhase or "";
              postInstall = args.postInstall or "";
            };

          mkShell = args: unbuildable "shell" "dev shells need the real nixpkgs";
          testers.runNixOSTest =
            args: unbuildable "nixos-test-${args.name}" "the NixOS VM test needs the real nixpkgs and KVM";
        };
    in
    {
      inherit lib;
      legacyPackages = genAttrs systems pkgsFor;
    };
}
