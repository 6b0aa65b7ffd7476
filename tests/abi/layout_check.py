#!/usr/bin/env python3
"""Every public struct and field in duplex.h has a guard in layout_lp64.c."""
import re
import sys

header, guards = (open(p, encoding="utf-8").read() for p in sys.argv[1:3])
missing = []
for m in re.finditer(r"typedef struct (duplex_\w+) \{(.*?)\} \1;", header, re.S):
    name, body = m.group(1), re.sub(r"/\*.*?\*/", "", m.group(2), flags=re.S)
    if f"SIZE_IS({name}," not in guards:
        missing.append(name)
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        field = re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl).group(1)
        if f"AT({name}, {field}," not in guards:
            missing.append(f"{name}.{field}")
if missing:
    print("no layout guard for:", ", ".join(missing))
    sys.exit(1)
print("every public struct and field has a layout guard")
