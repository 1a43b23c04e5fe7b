# The shell script from the assignment's report ("Testing & Observation"), kept as written, with
# `|| true` where the report's own commands fail by design (rm of a directory, stat of a moved path).
echo hello > one.txt
echo world how are you >> one.txt
cat one.txt
echo four > four.txt
cp one.txt two.txt
mv two.txt three.txt
cat three.txt
stat .
mkdir folder_one
stat .
mv one.txt folder_one
ls folder_one
cd folder_one
cat one.txt
mkdir folder_two
stat .
stat folder_two
cd ..
rm folder_one || true
stat .
stat folder_one
cp -r folder_one folder_one_cpy
ls -LR
rmdir folder_one_cpy || true
rm -r folder_one_cpy
ls -LR
mkdir folder_four
mv folder_one folder_four
ls -LR
cat folder_four/folder_one/one.txt
rm three.txt
ls
mkdir st_mode
ls -LR
rmdir st_mode
