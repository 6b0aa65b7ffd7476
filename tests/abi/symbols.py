#!/usr/bin/env python3
"""The shared library exports exactly the duplex_* functions duplex.h
declares: nothing internal leaks (dpx_*, libuv) and nothing is missing.
Usage: symbols.py LIBDUPLEX_SO DUPLEX_H
$NM names the nm to use (a cross build's, for a foreign library)."""
import os
import re
import subprocess
import sys

lib, header = sys.argv[1], sys.argv[2]
out = subprocess.run([os.environ.get("NM") or "nm", "-D", "--defined-only", lib], check=True,
                     capture_output=True, text=True).stdout
exported = set()
for line in out.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[1] in "TtWDdBbRr":
        exported.add(parts[2].split("@")[0])
exported.discard("DUPLEX_0")  # the version node itself
text = open(header).read()
declared = set(re.findall(r"DUPLEX_API\s[^;(]*?\b(duplex_\w+)\s*\(", text))
bad = False
extra = sorted(s for s in exported if s not in declared)
missing = sorted(declared - exported)
if extra:
    print("exported but not declared in duplex.h:", " ".join(extra))
    bad = True
if missing:
    print("declared in duplex.h but not exported:", " ".join(missing))
    bad = True
print(f"{len(declared)} functions declared, {len(exported)} symbols exported")
sys.exit(1 if bad else 0)
