# A holder takes a lock through the second mount ($OTHER) and keeps it; the lab then kills that
# mount's daemon (kill_other_mount). The lock must go with the dead client's session, and a waiter
# here gets it. Without a second mount (the golden's local run) the holder is killed here instead,
# which is what the lab's kill amounts to for the lock.
other=${OTHER:-}
: > lock
# flock -o: the lock is the flock process's alone (its command does not inherit it).
( flock -o "${other:-.}/lock" -c 'echo $$ > sleeper.pid; echo held > held; exec sleep 600' & echo $! > holder.pid; wait ) 2>/dev/null &
for _ in $(seq 1 300); do [ -s held ] && break; sleep 0.1; done
cat held
flock -n lock true && echo "free while held (wrong)" || echo "busy while held"
if [ -z "$other" ]; then kill -9 "$(cat holder.pid)"; fi
if flock -w 120 lock true; then echo "granted after its holder died"; else echo "still held after 120 s"; fi
kill -9 "$(cat holder.pid)" "$(cat sleeper.pid)" 2>/dev/null
wait
rm -f holder.pid sleeper.pid
echo done
