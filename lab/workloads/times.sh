# Times a program sets must survive the flush of buffered writes: cp -p, cp -rp, tar -c/-x,
# touch -d on a file still open with buffered writes, rsync -a where installed (cp -a otherwise;
# the output is the same). Only times chosen here are printed: epoch seconds, and dates years
# before the run, which the normalizer keeps.
mkdir src src/sub
echo one > src/a
for i in $(seq 1 2000); do echo "line $i"; done > src/b
echo three > src/sub/c
touch -d '2001-02-03 04:05:06 UTC' src/a
touch -m -d '1999-12-31 23:59:59 UTC' src/b
touch -a -d '2002-01-01 00:00:00 UTC' src/b
touch -d '2003-03-03 03:03:03 UTC' src/sub/c src/sub
touch -d '2004-04-04 04:04:04 UTC' src
cp -p src/a a_copy
cp -rp src tree_copy
tar -cf t.tar src
mkdir x
tar -xf t.tar -C x
rm t.tar
if command -v rsync >/dev/null; then rsync -a src/ r; else cp -a src r; fi
exec 3> open_file
echo buffered >&3
touch -d '2005-05-05 05:05:05 UTC' open_file
exec 3>&-
touch -t 200606060606.06 stamped
echo "mtimes:"
find a_copy tree_copy x/src r open_file stamped | LC_ALL=C sort | xargs stat -c '%n %Y'
# Only a copy whose source nothing read before: reads move atimes on some filesystems.
echo "atime of a copy:"
stat -c '%n %X' a_copy
echo "as ls shows them:"
ls -l --time-style=long-iso tree_copy | tail -n +2 | awk '{print $6, $7, $8}'
ls -l x/src | tail -n +2 | awk '{print $6, $7, $8, $9}'
