#!/usr/bin/env python3
"""Layout guards for the public structs of duplex.h.

  layout_check.py HEADER GUARDS.c...
      every public struct and field in HEADER has a guard (SIZE_IS / AT)
      in each GUARDS file (layout_lp64.c, layout_ilp32.c)
  layout_check.py --print HEADER INCLUDE_DIR... -- CC [ARG...]
      compile a probe with CC (e.g. i686-linux-gnu-gcc, or gcc -m32), run
      it, and print the guard lines for every struct of HEADER as that
      target lays it out: paste them into the GUARDS file of that ABI after
      checking that a change is deliberate. INCLUDE_DIRs must hold duplex.h
      and duplex/version.h (core/include and BUILD/core/include). Foreign
      binaries run through $EXE_WRAPPER if set (e.g. "qemu-s390x").
"""
import os
import re
import shlex
import subprocess
import sys
import tempfile


def structs(header_text):
    """[(struct, [field, ...])] in header order."""
    out = []
    for m in re.finditer(r"typedef struct (duplex_\w+) \{(.*?)\} \1;",
                         header_text, re.S):
        name, body = m.group(1), re.sub(r"/\*.*?\*/", "", m.group(2), flags=re.S)
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            fields.append(re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl).group(1))
        out.append((name, fields))
    return out


def check(header, guard_files):
    found = structs(open(header, encoding="utf-8").read())
    bad = False
    for path in guard_files:
        guards = open(path, encoding="utf-8").read()
        missing = []
        for name, fields in found:
            if f"SIZE_IS({name}," not in guards:
                missing.append(name)
            missing += [f"{name}.{f}" for f in fields
                        if f"AT({name}, {f}," not in guards]
        if missing:
            print(f"{os.path.basename(path)}: no layout guard for:",
                  ", ".join(missing))
            bad = True
        else:
            print(f"{os.path.basename(path)}: every public struct and field "
                  f"({len(found)} structs) has a layout guard")
    return 1 if bad else 0


def emit(header, include_dirs, cc):
    lines = ['#include <duplex.h>', '#include <stddef.h>', '#include <stdio.h>',
             'int main(void) {']
    for name, fields in structs(open(header, encoding="utf-8").read()):
        lines.append(f'  printf("\\nSIZE_IS({name}, %zu, %zu);\\n", '
                     f'sizeof({name}), _Alignof({name}));')
        for f in fields:
            lines.append(f'  printf("AT({name}, {f}, %zu);\\n", '
                         f'offsetof({name}, {f}));')
    lines += ['  return 0;', '}']
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
        with open(src, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        subprocess.run(cc + ["-std=c11", "-o", exe, src] +
                       [f"-I{d}" for d in include_dirs], check=True)
        wrapper = shlex.split(os.environ.get("EXE_WRAPPER", ""))
        out = subprocess.run(wrapper + [exe], check=True, capture_output=True,
                             text=True).stdout
    sys.stdout.write(out.lstrip("\n"))
    return 0


def main(argv):
    if argv and argv[0] == "--print":
        if "--" not in argv or argv.index("--") < 3:
            sys.exit(__doc__)
        sep = argv.index("--")
        return emit(argv[1], argv[2:sep], argv[sep + 1:])
    if len(argv) < 2:
        sys.exit(__doc__)
    return check(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
