#!/usr/bin/env bash
# Set up, then run every test project; ends with one summary line "N passed, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")"
tools/setup.sh || exit 1
log=$(mktemp)
dotnet test FrugalLM.slnx -c Release --no-build --nologo 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
read -r passed failed skipped < <(sed -n 's/.*Failed: *\([0-9]*\), Passed: *\([0-9]*\), Skipped: *\([0-9]*\).*/\2 \1 \3/p' "$log" \
    | awk '{p += $1; f += $2; s += $3} END {print p + 0, f + 0, s + 0}')
rm -f "$log"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
