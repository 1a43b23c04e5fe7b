# The stand-in's buildRustPackage (see flake.nix beside this file): the host's cargo, sandbox off.
set -euo pipefail
export PATH=/root/.cargo/bin:/usr/local/cargo/bin:/usr/local/bin:/usr/bin:/bin
export HOME=${HOME_FOR_CARGO:-/root}
# One target dir for every stand-in build, so that rebuilding after a change is incremental.
export CARGO_TARGET_DIR=/tmp/dfs-nix-stand-in-target
cp -r "$src" source
chmod -R u+w source
cd source
if [ -n "$customBuildPhase" ]; then
  eval "$customBuildPhase"
else
  cargo build --release --bins --locked
fi
if [ -n "$customInstallPhase" ]; then
  eval "$customInstallPhase"
else
  mkdir -p "$out/bin"
  find "$CARGO_TARGET_DIR/release" -maxdepth 1 -type f -executable -exec cp {} "$out/bin/" \;
fi
eval "$postInstall"
