{
  description = "DFS: a fault-tolerant distributed filesystem (Rust, FUSE) and the lab that proves it";

  # One input: fewer inputs, fewer things to lock. `flake.lock` is written by the first online run
  # (see README).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAll = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;

      # Every binary, with the lab's workloads, scenarios, targets and golden outputs in share/dfs.
      dfsFor =
        pkgs:
        pkgs.rustPlatform.buildRustPackage {
          pname = "dfs";
          inherit version;
          src = self;
          cargoLock.lockFile = ./Cargo.lock;
          # The generated RPC bindings are committed, so only the schema freshness test needs capnp.
          nativeCheckInputs = [ pkgs.capnproto ];
          # Tests that need /dev/fuse or root skip in the build sandbox, and say so.
          postInstall = ''
            mkdir -p $out/share/dfs
            cp -r lab golden $out/share/dfs/
          '';
          meta = {
            description = "A fault-tolerant distributed filesystem mounted with FUSE, and its lab";
            license = lib.licenses.mit;
            platforms = lib.platforms.linux;
            mainProgram = "dfs-lab";
          };
        };

      # dfs-lab with the tools its workloads use first on PATH, and fuse3 last, so that a host's
      # setuid fusermount3 wins over the store's copy (which cannot be setuid).
      labFor =
        pkgs: dfs:
        pkgs.writeShellScriptBin "dfs-lab" ''
          export PATH=${
            lib.makeBinPath (
              with pkgs;
              [
                coreutils
                bash
                diffutils
                findutils
                gnused
                gnugrep
                gawk
                gnutar
              ]
            )
          }:$PATH:${pkgs.fuse3}/bin
          export DFS_LAB_DIR="''${DFS_LAB_DIR:-${dfs}/share/dfs/lab}"
          exec ${dfs}/bin/dfs-lab "$@"
        '';

      app = program: description: {
        type = "app";
        inherit program;
        meta.description = description;
      };
    in
    {
      packages = forAll (pkgs: rec {
        dfs = dfsFor pkgs;
        lab = labFor pkgs dfs;
        default = dfs;
      });

      apps = forAll (
        pkgs:
        let
          pkg = self.packages.${pkgs.stdenv.hostPlatform.system};
          labApp = app "${pkg.lab}/bin/dfs-lab" "Run the DFS acceptance suite (clusters, workloads, faults, golden diffs)";
        in
        {
          lab = labApp;
          default = labApp;
          metaserver = app "${pkg.dfs}/bin/metaserver" "The DFS metaserver";
          dataserver = app "${pkg.dfs}/bin/dataserver" "A DFS dataserver";
          distributedfs = app "${pkg.dfs}/bin/distributedfs" "Mount a DFS cluster with FUSE";
          dfsctl = app "${pkg.dfs}/bin/dfsctl" "Inspect and operate a DFS cluster";
        }
      );

      checks = forAll (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          dfs = self.packages.${system}.dfs;
          lab = self.packages.${system}.lab;
        in
        {
          # The package build runs `cargo test`.
          package = dfs;
          clippy = pkgs.rustPlatform.buildRustPackage {
            pname = "dfs-clippy";
            inherit version;
            src = self;
            cargoLock.lockFile = ./Cargo.lock;
            nativeBuildInputs = [ pkgs.clippy ];
            buildPhase = "cargo clippy --all-targets --offline -- -D warnings";
            installPhase = "touch $out";
            doCheck = false;
          };
          rustfmt = pkgs.runCommand "dfs-rustfmt" { nativeBuildInputs = [ pkgs.rustfmt ]; } ''
            cd ${self}
            rustfmt --check src/lib.rs src/bin/*.rs src/bin/dfs-lab/main.rs tests/*.rs bench/*.rs
            touch $out
          '';
          # A VM with FUSE runs the lab's quick suite (needs KVM).
          lab-vm = pkgs.testers.runNixOSTest {
            name = "dfs-lab-quick";
            nodes.machine = {
              environment.systemPackages = [
                lab
                pkgs.fuse3
              ];
              boot.kernelModules = [ "fuse" ];
              virtualisation = {
                cores = 2;
                memorySize = 3072;
                diskSize = 4096;
              };
            };
            testScript = ''
              machine.wait_for_unit("multi-user.target")
              machine.succeed("cd /tmp && dfs-lab --quick --results /tmp/lab-results >&2")
            '';
          };
        }
      );

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            capnproto
            fuse3
            pkg-config
          ];
        };
      });

      formatter = forAll (pkgs: pkgs.nixfmt);
    };
}
