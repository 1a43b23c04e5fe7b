# Permissions and ownership (run as root).
umask 022
echo data > f
mkdir d
stat -c '%a %u %g %n' f d
for m in 000 400 644 755 600 1777 2755 4755; do chmod $m f; stat -c '%a %A %n' f; done
chmod u+x,g-r f; stat -c '%a %n' f
chown 1234:5678 f; stat -c '%u %g %n' f
chown 4321 d; stat -c '%u %g %n' d
chmod 2775 d; chgrp 999 d
mkdir d/sub; echo x > d/file
stat -c '%a %g %n' d d/sub d/file
umask 077; echo y > private; mkdir privdir; stat -c '%a %n' private privdir
mkdir -m 700 m700; stat -c '%a %n' m700
chmod 1777 d; stat -c '%a %A %n' d
