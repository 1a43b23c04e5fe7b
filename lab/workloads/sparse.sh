# Sparse files and writes at offsets around block boundaries (8, 512, 65536 and 1 MiB).
for off in 0 7 8 9 511 512 513 4095 4096 65535 65536 65537 1048575 1048576 1048577; do
  printf 'W' | dd of=sparse.bin bs=1 seek=$off conv=notrunc status=none
done
stat -c %s sparse.bin
od -A d -c sparse.bin | head -30
sha256sum sparse.bin
printf 'hole at the end' | dd of=far.bin bs=1 seek=3000000 status=none
truncate -s 4000000 far.bin
stat -c %s far.bin
sha256sum far.bin
dd if=far.bin bs=1 skip=2999990 count=30 status=none | od -A d -c
