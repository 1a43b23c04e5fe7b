# Two writers append 200 lines each to one file, every append under flock(1); with two mounts
# ($OTHER is this directory through the second one) each writer goes through its own mount. No
# line may be lost, doubled or cut into another.
other=${OTHER:-.}
: > log
writer() {
    for i in $(seq -w 1 200); do
        flock "$1/log" -c "printf '%s %s %s\n' $2 $i 0123456789abcdefghijklmnopqrstuvwxyz >> '$1/log'"
    done
}
writer . A &
writer "$other" B &
wait
wc -l < log
grep -c '^A ' log
grep -c '^B ' log
echo "lines not whole: $(grep -cvE '^[AB] [0-9]{3} 0123456789abcdefghijklmnopqrstuvwxyz$' log)"
echo "A in order: $(grep '^A ' log | sort -c && echo yes)"
echo "B in order: $(grep '^B ' log | sort -c && echo yes)"
sort log | sha256sum
# The order of the two writers' lines varies from run to run; what is left at rest does not.
sort -o log log
