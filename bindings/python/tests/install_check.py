"""The test 'python_install': the binding installed the way a user installs
it, against an installed libduplex.

Usage: install_check.py MESON BUILD_ROOT BINDING_DIR

1. `meson install --destdir` puts the build into a temporary root under
   the build directory (the configured prefix inside it; nothing is
   rebuilt).
2. `python3 -m venv` makes a fresh virtual environment (Debian: package
   python3-venv; without it the test is skipped, exit 77).
3. `pip install --no-index BINDING_DIR` into it: the in-tree build backend
   needs nothing from PyPI, also with build isolation.
4. A small echo program (threads and asyncio) runs with the venv's Python
   from outside the source tree, with DUPLEX_LIBRARY and PYTHONPATH unset:
   first with LD_LIBRARY_PATH at the installed library (the loader's own
   way to a non-standard prefix), then, where a private mount namespace
   can be had (root, unshare), with the installed tree mounted on the
   prefix itself and no variable at all: the default lookup must find it.
The program checks that `duplex` comes from the venv and libduplex from
the installed tree.
"""
import glob
import os
import shutil
import subprocess
import sys

PROGRAM = r'''
import asyncio, importlib.metadata, os, sys, threading
import duplex, duplex.aio

want_lib = sys.argv[1]
assert duplex.__file__.startswith(sys.prefix), duplex.__file__
with open("/proc/self/maps") as f:
    libs = {line.split()[-1] for line in f if "libduplex.so" in line}
assert libs == {want_lib}, (libs, want_lib)

with duplex.Loop() as loop:                       # threads
    def echo(conn):
        conn.on_read = lambda c, data: c.write(data)
        conn.on_eof = lambda c: c.shutdown()
    server = duplex.listen_tcp(loop, "127.0.0.1", 0, on_accept=echo)
    got = []
    conn = duplex.connect_tcp(loop, "127.0.0.1", server.port,
                              on_read=lambda c, data: got.append(data))
    conn.sendall(b"hello, installed libduplex\n")
    conn.shutdown()
    assert conn.wait_closed(30) is None
    assert b"".join(got) == b"hello, installed libduplex\n", got

async def main():                                 # asyncio
    async def handle(r, w):
        w.write(await r.readline())
        w.close()
    server = await duplex.aio.start_server(handle, "127.0.0.1", 0)
    r, w = await duplex.aio.open_connection(
        *server.sockets[0].getsockname())
    w.write(b"over asyncio\n")
    line = await r.readline()
    w.close()
    await w.wait_closed()
    server.close()
    await server.wait_closed()
    return line

assert asyncio.run(asyncio.wait_for(main(), 30)) == b"over asyncio\n"
print("libduplex", importlib.metadata.version("libduplex"), "from",
      os.path.dirname(duplex.__file__), "with", duplex.version_string(),
      "ok")
'''


def run(what, cmd, **kw):
    print("==", what, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       **kw)
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0:
        print(out)
        raise SystemExit(f"install_check: {what} failed "
                         f"(exit {r.returncode})")
    return out


def main():
    meson, build, binding = sys.argv[1:4]
    state = os.path.join(build, "bindings", "python", "installed")
    shutil.rmtree(state, ignore_errors=True)
    os.makedirs(state)
    root = os.path.join(state, "root")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DUPLEX_LIBRARY", "PYTHONPATH", "LD_LIBRARY_PATH",
                        "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing into the source tree
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INDEX"] = "1"

    run(f"meson install --destdir {root}",
        [meson, "install", "-C", build, "--no-rebuild", "--destdir", root],
        env=env)
    found = glob.glob(os.path.join(root, "**", "libduplex.so.0"),
                      recursive=True)
    if len(found) != 1:
        raise SystemExit(f"install_check: libduplex.so.0 installed {found}")
    lib = found[0]
    libdir = os.path.dirname(lib)
    print("installed", os.path.relpath(lib, root))

    venv = os.path.join(state, "venv")
    r = subprocess.run([sys.executable, "-m", "venv", venv],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       env=env)
    if r.returncode != 0:
        print(r.stdout.decode(errors="replace"))
        print("python3 -m venv failed: on Debian install python3-venv")
        sys.exit(77)
    python = os.path.join(venv, "bin", "python")
    print(run("pip install " + binding,
              [python, "-m", "pip", "install", "--no-cache-dir", binding],
              env=env).strip().splitlines()[-1])

    prog = os.path.join(state, "echo_installed.py")
    with open(prog, "w") as f:
        f.write(PROGRAM)
    print(run("echo program, LD_LIBRARY_PATH at the installed library",
              [python, prog, os.path.realpath(lib)], cwd=state,
              env=dict(env, LD_LIBRARY_PATH=libdir)).strip())

    # The default lookup: the installed tree on the prefix itself
    # (root/usr/local on /usr/local), without LD_LIBRARY_PATH. ld.so's
    # cache does not know the library, so this finds it by the binding's
    # own search of the standard directories.
    rel = os.path.relpath(os.path.realpath(lib), root)
    unshare = shutil.which("unshare")
    if not rel.startswith("usr/local/") or os.geteuid() != 0 or \
            unshare is None:
        print("(the check without variables needs a /usr/local prefix, "
              "root and unshare; skipped)")
        return
    r = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" /usr/local && shift && exec "$@"', "sh",
         os.path.join(root, "usr", "local"), python, prog, "/" + rel],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=state, env=env)
    out = r.stdout.decode(errors="replace").strip()
    if r.returncode != 0 and "libduplex" not in out:
        print(f"(no private mount namespace here: {out}; skipped)")
        return
    print(f"== echo program, {root}/usr/local mounted on /usr/local, "
          "no variable")
    print(out)
    if r.returncode != 0:
        raise SystemExit("install_check: the default lookup failed")


if __name__ == "__main__":
    main()
