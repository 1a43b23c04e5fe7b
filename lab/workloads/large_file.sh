# One large file (64 MiB), compared by sha256, copied and compared again.
yes "the quick brown fox jumps over the lazy dog 0123456789" | head -c 67108864 > large.bin
stat -c %s large.bin
sha256sum large.bin
dd if=large.bin of=large_copy.bin bs=1M status=none
cmp large.bin large_copy.bin && echo same
sha256sum large_copy.bin
