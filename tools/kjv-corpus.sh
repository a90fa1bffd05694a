#!/bin/sh
# Writes the King James Bible as plain text, the corpus of FrugalLM's bundled model: one verse per line
# (reference prefixes removed), a blank line between chapters. Source: Debian's bible-kjv (public domain).
#   tools/kjv-corpus.sh [OUT]        default OUT: data/kjv.txt
set -eu
out=${1:-data/kjv.txt}
if ! command -v bible >/dev/null 2>&1; then
    echo "error: the 'bible' program is missing: apt-get install bible-kjv" >&2
    exit 2
fi
mkdir -p "$(dirname "$out")"
bible -f Gen1:1-Rev22:21 </dev/null | awk '
    { ref = $1; sub(/^[^ ]+ /, ""); split(ref, part, ":");
      if (NR > 1 && part[1] != chapter) print "";
      chapter = part[1]; print }' > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(wc -l < "$out") lines)"
