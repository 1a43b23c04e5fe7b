# Files with known content for the fault scenarios (each spans many blocks of any size tested).
seq 1 50000 > numbers.txt
yes "redundancy matters" | head -c 300000 > words.txt
mkdir sub
seq 1000 3000 > sub/more.txt
printf 'small\n' > sub/small.txt
wc -c numbers.txt words.txt sub/more.txt sub/small.txt
sha256sum numbers.txt words.txt sub/more.txt
