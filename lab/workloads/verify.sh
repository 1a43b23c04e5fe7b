# Run after a workload (and after faults): the whole tree (modes, owners, links, sizes), then every
# file's sha256. Directory sizes are left out: they are each filesystem's own business.
find . -mindepth 1 \( -type d -printf 'd %m %U:%G %n %P\n' \) -o \( -type l -printf 'l %U:%G %P -> %l\n' \) \
  -o \( -type f -printf 'f %m %U:%G %n %s %P\n' \) -o -printf '%y %m %U:%G %P\n' | LC_ALL=C sort
find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
