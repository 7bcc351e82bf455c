#!/bin/sh
# Compress the accounting files Postlane has closed, and delete compressed ones older than
# KEEP_DAYS. Run daily (cron or a systemd timer) as the node's user:
#   accounting-archive.sh /var/lib/postlane/accounting 400
# A file named in a position file (*.position.json) is being written and is left alone.
set -eu
dir=${1:-/var/lib/postlane/accounting}
keep=${2:-400}
cd "$dir"
open=$(cat ./*.position.json 2>/dev/null | tr ',[]{}"' '\n\n\n\n\n\n' | grep '/acct-' \
       | sed 's|.*/||' || true)
for file in acct-*.csv acct-*.jsonl; do
    [ -f "$file" ] || continue
    if printf '%s\n' "$open" | grep -qxF "$file"; then
        continue
    fi
    gzip -9 "$file"
done
find . -maxdepth 1 -name 'acct-*.gz' -mtime +"$keep" -delete
