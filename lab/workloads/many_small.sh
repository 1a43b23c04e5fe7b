# Many small files in one directory.
mkdir many
for i in $(seq 1 1000); do echo "file number $i" > many/f$i; done
ls many | wc -l
cat many/f1 many/f500 many/f1000
cat many/* | sha256sum
rm many/f1*
ls many | wc -l
ls many | LC_ALL=C sort | head -5
