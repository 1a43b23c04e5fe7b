# A PUT with only two of the four servers up (row 3 of the report's table): with a write quorum of
# two it succeeds. The file is written, then overwritten (a truncate and a write), then appended to.
printf 'first version of file3\n' > file3
printf 'THIS IS FILE3, written with two servers up\n' > file3
seq 1 2000 | sed 's/^/row3 /' >> file3
wc -l file3
sha256sum file3
