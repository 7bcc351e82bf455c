#!/bin/sh
# Compress the accounting files Postlane has closed, and delete compressed ones older than
# KEEP_DAYS. Run daily (cron or a systemd timer) as the node's user:
#   accounting-archive.sh /var/lib/postlane/accounting 400
# A file a position file (*.position.json) names under "files" is being written and is left
# alone, and so is every file newer than it: a rotation (or a start) makes the new files a
# moment before the position names them. Older files are closed for good and compressed
# (`postlane audit verify --files` reads the .gz files too). A position file that cannot be
# read stops the script before it compresses anything.
set -eu
dir=${1:-/var/lib/postlane/accounting}
keep=${2:-400}
cd "$dir"
closed=$(python3 -c '
import glob, json, os, re
name = re.compile(r"acct-(\d{8}-\d{6})(?:-(\d+))?\.(?:csv|jsonl)")
def order(file):  # as Postlane names them: the time made, then the number within a second
    found = name.fullmatch(file)
    return (found[1], int(found[2] or 0))
writing = []
for path in glob.glob("*.position.json"):
    with open(path) as fh:
        writing += [os.path.basename(f) for f, _size in json.load(fh).get("files", {}).values()]
writing = [order(f) for f in writing if name.fullmatch(f)]
for file in sorted(f for f in glob.glob("acct-*") if name.fullmatch(f)):
    if not writing or order(file) < min(writing):
        print(file)
')
for file in $closed; do
    [ -f "$file" ] || continue
    gzip -9 "$file"
done
find . -maxdepth 1 -name 'acct-*.gz' -mtime +"$keep" -delete
