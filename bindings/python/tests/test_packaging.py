"""The in-tree build backend (backend/duplex_build.py) and how the binding
finds an installed library. The real install (meson install, venv, pip)
is the separate test 'python_install' (install_check.py)."""
import base64
import csv
import hashlib
import importlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unittest
import zipfile

from duplex import _ffi

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "backend"))
backend = importlib.import_module("duplex_build")
sys.path.pop(0)


def meson_version():
    with open(os.path.join(HERE, os.pardir, os.pardir, "meson.build")) as f:
        return re.search(r"version\s*:\s*'([^']+)'", f.read()).group(1)


def record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(
        hashlib.sha256(data).digest()).rstrip(b"=").decode()


class BackendTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def check_wheel(self, path, version):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            files = {n: zf.read(n) for n in names}
        info = f"libduplex-{version}.dist-info/"
        modules = sorted(n for n in names if not n.startswith(info))
        self.assertEqual(modules, sorted(
            f"duplex/{m}" for m in os.listdir(os.path.join(HERE, "duplex"))
            if m.endswith(".py")))
        meta = files[info + "METADATA"].decode()
        self.assertIn("\nName: libduplex\n", meta)
        self.assertIn(f"\nVersion: {version}\n", meta)
        self.assertIn("\nRequires-Python: >=3.9\n", meta)
        self.assertIn("Tag: py3-none-any", files[info + "WHEEL"].decode())
        self.assertIn("MIT License", files[info + "LICENSE"].decode())
        rows = list(csv.reader(io.StringIO(files[info + "RECORD"].decode())))
        self.assertEqual(sorted(r[0] for r in rows), sorted(names))
        for name, digest, size in rows:
            if name == info + "RECORD":
                self.assertEqual((digest, size), ("", ""))
            else:
                self.assertEqual(digest, record_hash(files[name]), name)
                self.assertEqual(int(size), len(files[name]))
        return files

    def test_wheel(self):
        version = meson_version()
        name = backend.build_wheel(self.tmp.name)
        self.assertEqual(name, f"libduplex-{version}-py3-none-any.whl")
        path = os.path.join(self.tmp.name, name)
        files = self.check_wheel(path, version)
        for module in ("__init__.py", "aio.py"):
            with open(os.path.join(HERE, "duplex", module), "rb") as f:
                self.assertEqual(files["duplex/" + module], f.read())
        with open(path, "rb") as f:
            first = f.read()
        os.remove(path)
        backend.build_wheel(self.tmp.name)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), first)  # reproducible

    def test_metadata_hook_matches_the_wheel(self):
        dist_info = backend.prepare_metadata_for_build_wheel(self.tmp.name)
        self.assertEqual(dist_info, f"libduplex-{meson_version()}.dist-info")
        with open(os.path.join(self.tmp.name, dist_info, "METADATA")) as f:
            meta = f.read()
        self.assertIn("Name: libduplex", meta)
        self.assertEqual(backend.get_requires_for_build_wheel(), [])
        self.assertEqual(backend.get_requires_for_build_sdist(), [])

    def test_editable_wheel_points_here(self):
        name = backend.build_editable(self.tmp.name)
        with zipfile.ZipFile(os.path.join(self.tmp.name, name)) as zf:
            pth = [n for n in zf.namelist() if n.endswith(".pth")]
            self.assertEqual(len(pth), 1)
            self.assertEqual(zf.read(pth[0]).decode().strip(), HERE)

    def test_sdist_builds_the_same_wheel(self):
        version = meson_version()
        name = backend.build_sdist(self.tmp.name)
        self.assertEqual(name, f"libduplex-{version}.tar.gz")
        with tarfile.open(os.path.join(self.tmp.name, name)) as tf:
            members = tf.getnames()
            for want in ("pyproject.toml", "PKG-INFO", "LICENSE",
                         "README.md", "backend/duplex_build.py",
                         "duplex/__init__.py", "tests/test_aio.py"):
                self.assertIn(f"libduplex-{version}/{want}", members)
            self.assertFalse([m for m in members if "__pycache__" in m])
            if hasattr(tarfile, "data_filter"):
                tf.extractall(self.tmp.name, filter="data")
            else:
                tf.extractall(self.tmp.name)
        # Out of the tree, the version comes from PKG-INFO.
        src = os.path.join(self.tmp.name, f"libduplex-{version}")
        out = os.path.join(self.tmp.name, "out")
        os.mkdir(out)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        wheel = subprocess.run(
            [sys.executable, "-c",
             "import sys; sys.path.insert(0, 'backend'); import duplex_build;"
             f" print(duplex_build.build_wheel({out!r}))"],
            cwd=src, env=env, check=True,
            stdout=subprocess.PIPE).stdout.decode().strip()
        self.check_wheel(os.path.join(out, wheel), version)

    def test_toml_subset_reads_pyproject_as_tomllib(self):
        with open(os.path.join(HERE, "pyproject.toml")) as f:
            text = f.read()
        data = backend._parse_toml_subset(text)
        self.assertEqual(data["build-system"]["requires"], [])
        self.assertEqual(data["build-system"]["backend-path"], ["backend"])
        self.assertEqual(data["project"]["name"], "libduplex")
        try:
            import tomllib
        except ImportError:
            return
        self.assertEqual(data, tomllib.loads(text))


class LibraryLookupTest(unittest.TestCase):
    def test_standard_directories(self):
        import sysconfig
        dirs = _ffi._standard_dirs()
        multiarch = sysconfig.get_config_var("MULTIARCH")
        for d in ("/usr/local/lib", "/usr/lib"):
            self.assertIn(d, dirs)
            if multiarch:
                self.assertIn(f"{d}/{multiarch}", dirs)
        self.assertLess(dirs.index("/usr/local/lib"), dirs.index("/usr/lib"))

    def test_the_soname_comes_first(self):
        if sys.platform.startswith("linux"):
            self.assertEqual(next(_ffi._candidates()), "libduplex.so.0")


if __name__ == "__main__":
    unittest.main()
