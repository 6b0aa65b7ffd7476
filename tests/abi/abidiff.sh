#!/bin/sh
# abidiff BASELINE LIBRARY HEADERS_DIR...: the library's ABI against the
# committed baseline (tests/abi/libduplex.abi). Any change to an existing
# function or public type fails; added functions are allowed (they only
# extend the ABI) but are listed. Regenerate the baseline on purpose with
# tools/abi-update. Exit 77 (skip) when abidiff is not installed.
# The baseline keeps source locations: abidiff needs them to tell public
# types (declared under the header dirs) from private ones; moved lines
# alone are not reported.
set -u
baseline=$1
lib=$2
shift 2
if ! command -v abidiff >/dev/null 2>&1; then
  echo "abidiff not found (Debian package abigail-tools): skipped"
  exit 77
fi
hdrs=""
for d in "$@"; do hdrs="$hdrs --headers-dir2 $d"; done
# shellcheck disable=SC2086
abidiff --no-added-syms --drop-private-types $hdrs "$baseline" "$lib"
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "abidiff exit $rc: the ABI differs from $baseline" \
       "(1 error, 2 usage, 4 change, 8 incompatible change)"
  exit 1
fi
# shellcheck disable=SC2086
added=$(abidiff --drop-private-types $hdrs "$baseline" "$lib" | grep -c "^  \[A\]" || true)
echo "ABI matches the baseline ($added added function(s))"
