#!/bin/sh
# Compress the accounting files Postlane has closed, and delete compressed ones older than
# KEEP_DAYS. Run daily (cron or a systemd timer) as the node's user:
#   accounting-archive.sh /var/lib/postlane/accounting 400
# A file a position file (*.position.json) names under "files" is being written and is left
# alone (its "closed" entries are files closed for good: those are compressed). A position
# file that cannot be read stops the script before it compresses anything.
set -eu
dir=${1:-/var/lib/postlane/accounting}
keep=${2:-400}
cd "$dir"
open=$(python3 -c '
import json, os, sys
for path in sys.argv[1:]:
    if not os.path.exists(path):  # no position file: the glob stayed as written
        continue
    with open(path) as fh:
        for name, _size in json.load(fh).get("files", {}).values():
            print(os.path.basename(name))
' ./*.position.json)
for file in acct-*.csv acct-*.jsonl; do
    [ -f "$file" ] || continue
    if printf '%s\n' "$open" | grep -qxF "$file"; then
        continue
    fi
    gzip -9 "$file"
done
find . -maxdepth 1 -name 'acct-*.gz' -mtime +"$keep" -delete
