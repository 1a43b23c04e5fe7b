# One write of 1 MiB (used while a dataserver is down: it must wait for it).
head -c 1048576 /dev/zero | tr '\0' 'x' > blocked.txt
wc -c blocked.txt
sha256sum blocked.txt
