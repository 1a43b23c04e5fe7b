# truncate up and down, through block boundaries.
printf 'abcdefghijklmnopqrstuvwxyz0123456789' > t.txt
for size in 40 30 8 9 7 0 1 100 513 511 512 70000 65536 65537 3; do
  truncate -s $size t.txt
  printf '%s ' "$(stat -c %s t.txt)"
  od -A d -c t.txt | tail -3 | tr -s ' ' | head -c 200
  echo
done
printf 'XYZ' >> t.txt
od -A d -c t.txt
sha256sum t.txt
