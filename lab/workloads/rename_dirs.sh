# Renames of directories with contents, across directories, with POSIX's replace rules.
mkdir -p src/inner/deeper dst empty full
echo one > src/inner/one.txt
echo two > src/inner/deeper/two.txt
echo keep > full/keep.txt
mv src/inner dst/moved
find . | LC_ALL=C sort
cat dst/moved/deeper/two.txt
mv dst/moved empty 2>&1 || true
ls empty
mkdir target_empty
mv empty target_empty_renamed
mv dst target_empty
find . | LC_ALL=C sort
mv target_empty full 2>&1 | sed 's/^mv: //' || true
mkdir x && mkdir x/y
mv x x/y/z 2>&1 | sed 's/^mv: //' || true
echo f > plainfile
mv x plainfile 2>&1 | sed 's/^mv: //' || true
mv plainfile x/y
stat -c '%n %h' . x x/y full target_empty
find . | LC_ALL=C sort
