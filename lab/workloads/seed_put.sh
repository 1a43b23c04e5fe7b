# The report's first PUT, with all four servers up: a one-block file and one of many blocks.
printf 'This is file1\n' > file1
seq 1 3000 > numbers
cat file1
sha256sum file1 numbers
