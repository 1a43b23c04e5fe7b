# Many small appends (echo >> in a loop): each is its own open, write, close.
for i in $(seq 1 300); do echo "line $i of the log" >> log.txt; done
wc -l log.txt
tail -3 log.txt
sha256sum log.txt
for i in $(seq 1 50); do printf '%s' "$i," >> csv.txt; done
cat csv.txt; echo
