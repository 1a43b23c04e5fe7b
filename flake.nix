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
          # Man pages and shell completions come from each program's own command-line definition.
          postInstall = ''
            mkdir -p $out/share/dfs
            cp -r lab golden $out/share/dfs/
            mkdir -p $out/share/man/man1 $out/share/bash-completion/completions \
              $out/share/zsh/site-functions $out/share/fish/vendor_completions.d
            for b in metaserver dataserver distributedfs dfsctl dfs-lab; do
              $out/bin/$b --generate-man > $out/share/man/man1/$b.1
              $out/bin/$b --generate-completions bash > $out/share/bash-completion/completions/$b
              $out/bin/$b --generate-completions zsh > $out/share/zsh/site-functions/_$b
              $out/bin/$b --generate-completions fish > $out/share/fish/vendor_completions.d/$b.fish
            done
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

      # The NixOS module: metaservers, dataservers and mounts as systemd services. A metaserver
      # with `members` set is member `id` of that group; without, it runs on its own.
      nixosModule =
        {
          config,
          lib,
          pkgs,
          ...
        }:
        let
          cfg = config.services.dfs;
          inherit (lib) mkOption types;
          secretArgs = lib.optionals (cfg.secretFile != null) [
            "--secret-file"
            (toString cfg.secretFile)
          ];
          metricsArgs =
            m:
            lib.optionals (m != null) [
              "--metrics"
              m
            ];
          common = {
            extraArgs = mkOption {
              type = types.listOf types.str;
              default = [ ];
              description = "More command-line arguments (see the program's --help).";
            };
            metrics = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "127.0.0.1:9100";
              description = "Serve Prometheus metrics at http://ADDR/metrics.";
            };
          };
          groupFile =
            name: members:
            pkgs.writeText "dfs-group-${name}.conf" (
              lib.concatStringsSep "\n" (
                [ "M: ${toString (builtins.length members)}" ]
                ++ lib.imap0 (i: a: "metadata${toString i}: ${a}") members
              )
              + "\n"
            );
          service = args: {
            wantedBy = [ "multi-user.target" ];
            after = [ "network-online.target" ];
            wants = [ "network-online.target" ];
            serviceConfig = {
              ExecStart = lib.escapeShellArgs args;
              Restart = "on-failure";
              RestartSec = 2;
            };
          };
          dataUnits = lib.mapAttrsToList (n: _: "dfs-dataserver-${n}.service") cfg.dataservers;
          metaUnits = lib.mapAttrsToList (n: _: "dfs-metaserver-${n}.service") cfg.metaservers;
        in
        {
          options.services.dfs = {
            package = mkOption {
              type = types.package;
              default = self.packages.${pkgs.stdenv.hostPlatform.system}.dfs;
              description = "The DFS package.";
            };
            secretFile = mkOption {
              type = types.nullOr types.path;
              default = null;
              description = "The cluster secret every server and mount proves (needed off loopback).";
            };
            metaservers = mkOption {
              default = { };
              description = "Metaservers on this machine, by name.";
              type = types.attrsOf (
                types.submodule (
                  { name, ... }:
                  {
                    options = common // {
                      listen = mkOption {
                        type = types.str;
                        default = "127.0.0.1:9000";
                        description = "Where a metaserver on its own listens (a group member listens at its line).";
                      };
                      members = mkOption {
                        type = types.listOf types.str;
                        default = [ ];
                        description = "The group's members' HOST:PORTs, in id order (empty: no group).";
                      };
                      id = mkOption {
                        type = types.int;
                        default = 0;
                        description = "This member's id: its position in `members`.";
                      };
                      dataDir = mkOption {
                        type = types.str;
                        default = "/var/lib/dfs/meta-${name}";
                        description = "Where the metadata store lives.";
                      };
                    };
                  }
                )
              );
            };
            dataservers = mkOption {
              default = { };
              description = "Dataservers on this machine, by name.";
              type = types.attrsOf (
                types.submodule (
                  { name, ... }:
                  {
                    options = common // {
                      index = mkOption {
                        type = types.int;
                        description = "This server's position in the ring.";
                      };
                      ring = mkOption {
                        type = types.listOf types.str;
                        description = "Every dataserver's HOST:PORT, in ring order.";
                      };
                      dataDir = mkOption {
                        type = types.str;
                        default = "/var/lib/dfs/data-${name}";
                        description = "Where the block store lives.";
                      };
                    };
                  }
                )
              );
            };
            mounts = mkOption {
              default = { };
              description = "Mounts of a cluster on this machine, by name.";
              type = types.attrsOf (
                types.submodule {
                  options = common // {
                    mountPoint = mkOption {
                      type = types.str;
                      description = "Where to mount (created if missing).";
                    };
                    meta = mkOption {
                      type = types.str;
                      description = "The metaserver's HOST:PORT, or a group's members, comma-separated.";
                    };
                    dataservers = mkOption {
                      type = types.listOf types.str;
                      description = "Every dataserver's HOST:PORT, in ring order.";
                    };
                  };
                }
              );
            };
          };

          config = lib.mkIf (cfg.metaservers != { } || cfg.dataservers != { } || cfg.mounts != { }) {
            environment.systemPackages = [ cfg.package ];
            boot.kernelModules = lib.mkIf (cfg.mounts != { }) [ "fuse" ];
            systemd.services =
              lib.mapAttrs' (
                n: m:
                lib.nameValuePair "dfs-metaserver-${n}" (
                  service (
                    [
                      "${cfg.package}/bin/metaserver"
                      "--data-dir"
                      m.dataDir
                    ]
                    ++ secretArgs
                    ++ metricsArgs m.metrics
                    ++ m.extraArgs
                    ++ (
                      if m.members == [ ] then
                        [ m.listen ]
                      else
                        [
                          "--config"
                          "${groupFile n m.members}"
                          (toString m.id)
                        ]
                    )
                  )
                )
              ) cfg.metaservers
              // lib.mapAttrs' (
                n: d:
                lib.nameValuePair "dfs-dataserver-${n}" (
                  service (
                    [
                      "${cfg.package}/bin/dataserver"
                      "--data-dir"
                      d.dataDir
                    ]
                    ++ secretArgs
                    ++ metricsArgs d.metrics
                    ++ d.extraArgs
                    ++ [ (toString d.index) ]
                    ++ d.ring
                  )
                  // {
                    after = [ "network-online.target" ] ++ metaUnits;
                  }
                )
              ) cfg.dataservers
              // lib.mapAttrs' (
                n: m:
                lib.nameValuePair "dfs-mount-${n}" (
                  lib.recursiveUpdate
                    (service (
                      [ "${cfg.package}/bin/distributedfs" ]
                      ++ secretArgs
                      ++ metricsArgs m.metrics
                      ++ m.extraArgs
                      ++ [
                        m.mountPoint
                        m.meta
                      ]
                      ++ m.dataservers
                    ))
                    {
                      # The servers first; the mount unmounts itself on SIGTERM.
                      after = [ "network-online.target" ] ++ metaUnits ++ dataUnits;
                      wants = [ "network-online.target" ] ++ metaUnits ++ dataUnits;
                      serviceConfig.ExecStartPre = "${pkgs.coreutils}/bin/mkdir -p ${lib.escapeShellArg m.mountPoint}";
                    }
                )
              ) cfg.mounts;
          };
        };

      app = program: description: {
        type = "app";
        inherit program;
        meta.description = description;
      };
    in
    {
      nixosModules.default = nixosModule;

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
          # A VM with FUSE: a cluster of one metaserver, four dataservers and a mount, all from the
          # NixOS module, takes a file through the mount and dfsctl; then the lab's quick suite runs
          # (needs KVM).
          lab-vm = pkgs.testers.runNixOSTest {
            name = "dfs-lab-quick";
            nodes.machine =
              let
                ring = map (p: "127.0.0.1:${toString p}") [
                  9101
                  9102
                  9103
                  9104
                ];
              in
              {
                imports = [ self.nixosModules.default ];
                environment.systemPackages = [
                  lab
                  pkgs.fuse3
                  pkgs.curl
                ];
                services.dfs = {
                  metaservers.main = {
                    listen = "127.0.0.1:9100";
                    metrics = "127.0.0.1:9200";
                  };
                  dataservers = lib.listToAttrs (
                    lib.imap0 (i: _: {
                      name = "d${toString i}";
                      value = {
                        index = i;
                        inherit ring;
                      };
                    }) ring
                  );
                  mounts.main = {
                    mountPoint = "/mnt/dfs";
                    meta = "127.0.0.1:9100";
                    dataservers = ring;
                    metrics = "127.0.0.1:9201";
                  };
                };
                virtualisation = {
                  cores = 2;
                  memorySize = 3072;
                  diskSize = 4096;
                };
              };
            testScript = ''
              machine.wait_for_unit("multi-user.target")
              machine.wait_for_unit("dfs-mount-main.service")
              machine.wait_until_succeeds("mountpoint -q /mnt/dfs", timeout=60)
              machine.succeed("head -c 1000000 /dev/urandom > /tmp/f && cp /tmp/f /mnt/dfs/f && cmp /tmp/f /mnt/dfs/f")
              machine.succeed("dfsctl --meta 9100 get /f /tmp/g && cmp /tmp/f /tmp/g")
              machine.succeed("dfsctl --meta 9100 check /f")
              machine.succeed("curl -sf http://127.0.0.1:9201/metrics | grep -q 'dfs_bytes_total{op=.write.}'")
              machine.succeed("systemctl stop dfs-mount-main.service && ! mountpoint -q /mnt/dfs")
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
