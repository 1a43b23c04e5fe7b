#!/bin/bash
# MooseFS beside DFS on one machine, for `dfs-lab bench --compare`: one master and four
# chunkservers (goal 3) from Debian's moosefs-* packages, mounted on $MNT (default /mnt/mfs), their
# data under $MFS_DIR (default /var/tmp/mfs). Run as root.
#
#   bench/moosefs.sh setup   # a new, empty MooseFS (deletes $MFS_DIR), started and mounted
#   bench/moosefs.sh down    # unmount and stop every process of it, data kept
#   bench/moosefs.sh up      # start it again and mount it
#
#   dfs-lab bench --compare /mnt/mfs --peer-start 'bench/moosefs.sh up' --peer-stop 'bench/moosefs.sh down'
set -euo pipefail
B=${MFS_DIR:-/var/tmp/mfs}
MNT=${MNT:-/mnt/mfs}
IP=$(hostname -I | awk '{print $1}')

running() {
  local n
  for n in mfsmaster mfschunkserver mfsmount; do pgrep -r RSDT -x "$n"; done | grep -q .
}

up() {
  mfsmaster -c "$B/mfsmaster.cfg" start >/dev/null 2>&1
  for i in 0 1 2 3; do mfschunkserver -c "$B/cs$i/mfschunkserver.cfg" start >/dev/null 2>&1; done
  # The chunkservers register with the master before the mount's first write needs three of them.
  sleep 3
  mkdir -p "$MNT"
  mfsmount "$MNT" -H "$IP" >/dev/null 2>&1
  for _ in $(seq 50); do mountpoint -q "$MNT" && return 0; sleep 0.1; done
  echo "MooseFS did not mount on $MNT" >&2
  return 1
}

down() {
  umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
  for i in 0 1 2 3; do mfschunkserver -c "$B/cs$i/mfschunkserver.cfg" stop >/dev/null 2>&1 || true; done
  mfsmaster -c "$B/mfsmaster.cfg" stop >/dev/null 2>&1 || true
  for _ in $(seq 100); do running || return 0; sleep 0.2; done
  echo "MooseFS processes still running" >&2
  return 1
}

setup() {
  down
  rm -rf "$B"
  mkdir -p "$B/master"
  cp /usr/share/doc/moosefs-master/examples/mfsexports.cfg "$B/mfsexports.cfg"
  cp /var/lib/mfs/metadata.mfs.empty "$B/master/metadata.mfs"
  cat >"$B/mfsmaster.cfg" <<C
WORKING_USER = root
DATA_PATH = $B/master
EXPORTS_FILENAME = $B/mfsexports.cfg
SYSLOG_IDENT = mfsmaster-bench
C
  for i in 0 1 2 3; do
    mkdir -p "$B/cs$i/data" "$B/cs$i/hdd"
    echo "$B/cs$i/hdd" >"$B/cs$i/mfshdd.cfg"
    cat >"$B/cs$i/mfschunkserver.cfg" <<C
WORKING_USER = root
DATA_PATH = $B/cs$i/data
HDD_CONF_FILENAME = $B/cs$i/mfshdd.cfg
MASTER_HOST = $IP
CSSERV_LISTEN_PORT = $((9422 + 10 * i))
SYSLOG_IDENT = mfscs$i
C
  done
  up
  mfssetgoal -r 3 "$MNT" >/dev/null
}

case "${1:-}" in
  setup) setup ;;
  up) up ;;
  down) down ;;
  *) echo "usage: $0 setup|up|down" >&2; exit 2 ;;
esac
