"""Test certificates made with the openssl command, for the Python end-to-end
tests of TLS (tests/duplexcat_test.py, examples/tls_examples_test.py).

    certs = tls_certs.make(directory)   # {"ca": path, "server": path, ...}

Files in directory (PEM): ca.pem, otherca.pem (a CA no client here
trusts), server.pem / server.key (CN=localhost, SAN DNS:localhost and
IP:127.0.0.1, signed by ca), client.pem / client.key (CN=client,
clientAuth, by ca), untrusted.pem / untrusted.key (like server, by
otherca). The returned dict maps "ca", "otherca", "server", "server_key",
"client", "client_key", "untrusted", "untrusted_key" to paths.

The openssl command is $OPENSSL_PROG (meson sets it), else the one on PATH;
openssl() returns it, or None when there is none.
"""
import os
import shutil
import subprocess

EXTENSIONS = """\
[server_ext]
basicConstraints = CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client_ext]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
"""


def openssl():
    prog = os.environ.get("OPENSSL_PROG") or shutil.which("openssl")
    return prog if prog and os.path.exists(prog) else None


def make(directory):
    prog = openssl()
    if prog is None:
        raise RuntimeError("no openssl command")

    def run(*args):
        r = subprocess.run([prog] + list(args), cwd=directory,
                           capture_output=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("openssl %s failed: %s"
                               % (args[0], r.stderr.decode(errors="replace")))

    def key(name):
        run("genpkey", "-algorithm", "EC", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-out", name + ".key")

    def ca(name, cn):
        key(name)
        run("req", "-x509", "-new", "-key", name + ".key", "-subj",
            "/CN=" + cn, "-days", "3650",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", name + ".pem")

    def leaf(name, cn, issuer, ext):
        key(name)
        run("req", "-new", "-key", name + ".key", "-subj", "/CN=" + cn,
            "-out", name + ".csr")
        run("x509", "-req", "-in", name + ".csr", "-CA", issuer + ".pem",
            "-CAkey", issuer + ".key", "-CAcreateserial", "-days", "3650",
            "-extfile", "ext.cnf", "-extensions", ext, "-out", name + ".pem")

    with open(os.path.join(directory, "ext.cnf"), "w") as f:
        f.write(EXTENSIONS)
    ca("ca", "duplex test CA")
    ca("otherca", "duplex other CA")
    leaf("server", "localhost", "ca", "server_ext")
    leaf("client", "client", "ca", "client_ext")
    leaf("untrusted", "localhost", "otherca", "server_ext")
    p = lambda f: os.path.join(directory, f)
    return {
        "ca": p("ca.pem"), "otherca": p("otherca.pem"),
        "server": p("server.pem"), "server_key": p("server.key"),
        "client": p("client.pem"), "client_key": p("client.key"),
        "untrusted": p("untrusted.pem"), "untrusted_key": p("untrusted.key"),
    }
