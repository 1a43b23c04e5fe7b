# A deep tree: files at every level, listing, partial removal.
mkdir -p a/b/c/d/e/f/g/h/i/j/k/l
p=.
for d in a b c d e f g h i j k l; do
  p=$p/$d
  echo "level $d" > "$p/file_$d.txt"
  mkdir "$p/side_$d"
done
find . | LC_ALL=C sort
cat a/b/c/d/e/f/g/h/i/j/k/l/file_l.txt
ls -lR a/b/c/d/e/f/g/h/i/j | head -40
rm -r a/b/c/d/e/f
find . -type f | LC_ALL=C sort
stat -c '%n %h' a a/b a/b/c a/b/c/d a/b/c/d/e
