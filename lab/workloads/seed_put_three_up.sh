# A PUT with three of the four servers up (row 5 of the report's table).
printf 'file4, written with three servers up\n' > file4
seq 5000 -1 1 > countdown
cat file4
sha256sum file4 countdown
