# Hard links with their counts, symlinks to files and directories, dangling links.
echo "original content" > orig.txt
ln orig.txt hard1.txt
ln orig.txt hard2.txt
stat -c '%n %h %s' orig.txt hard1.txt hard2.txt
echo "more" >> hard1.txt
cat orig.txt
rm orig.txt
stat -c '%n %h' hard1.txt hard2.txt
cat hard2.txt
mkdir dir
echo inside > dir/inner.txt
ln -s hard1.txt sym_file
ln -s dir sym_dir
ln -s nowhere dangling
readlink sym_file sym_dir dangling
cat sym_file
cat sym_dir/inner.txt
ls sym_dir/
cat dangling 2>&1 | sed 's/^cat: //' || true
stat -c '%n %F' sym_file sym_dir dangling
# A directory's size is each filesystem's own (4096 on ext4, 0 or entry-dependent elsewhere).
stat -L -c '%n %F %s' sym_file
stat -L -c '%n %F' sym_dir
ln hard1.txt dir/linked_in_dir.txt
mv dir renamed_dir
stat -c '%n %h' hard1.txt renamed_dir/linked_in_dir.txt
ls -l sym_dir 2>&1 | sed 's/ -> .*//' | awk '{print $1, $NF}'
ln renamed_dir hardlink_to_dir 2>&1 | sed 's/^ln: //' || true
