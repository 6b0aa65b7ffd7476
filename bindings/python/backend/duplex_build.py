"""A PEP 517 build backend for the `libduplex` distribution, standard
library only, so that `pip install ./bindings/python` needs nothing from
PyPI (pyproject.toml: requires = [], backend-path = ["backend"]).

The package is pure Python: a wheel is the `duplex/` directory plus the
`.dist-info` metadata, a source distribution is this directory. Nothing is
ever written into the source tree. Builds are reproducible: entries are
sorted and dated SOURCE_DATE_EPOCH (or 1980-01-01).

Hooks: build_wheel, build_sdist, build_editable (PEP 660: a .pth file that
points at this directory), prepare_metadata_for_build_wheel /
_for_build_editable, and the get_requires_* hooks (nothing).
"""
import base64
import gzip
import hashlib
import io
import os
import re
import tarfile
import time
import zipfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "duplex"


# ---- pyproject.toml -------------------------------------------------------

def _parse_toml_subset(text):
    """The part of TOML pyproject.toml uses, for Pythons without tomllib
    (3.9, 3.10): [tables], and keys whose values are "strings", [arrays of
    strings] (over several lines too) or {inline = "tables"}."""
    data, table = {}, None
    lines = iter(text.splitlines())
    string = r'"((?:[^"\\]|\\.)*)"'

    def strings(s):
        return [re.sub(r"\\(.)", r"\1", m) for m in re.findall(string, s)]

    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[([A-Za-z0-9_.-]+)\]", line)
        if m:
            table = data
            for part in m.group(1).split("."):
                table = table.setdefault(part, {})
            continue
        key, sep, value = line.partition("=")
        if not sep or table is None:
            raise ValueError(f"pyproject.toml: cannot read {line!r}")
        key, value = key.strip(), value.strip()
        if value.startswith("["):
            while not re.search(r"\]\s*(#.*)?$", value):
                value += " " + next(lines).strip()
            table[key] = strings(value)
        elif value.startswith("{"):
            table[key] = {k: v for k, v in re.findall(
                r"([A-Za-z0-9_-]+)\s*=\s*" + string, value)}
        else:
            found = strings(value)
            if len(found) != 1:
                raise ValueError(f"pyproject.toml: cannot read {line!r}")
            table[key] = found[0]
    return data


def _pyproject():
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        return _parse_toml_subset(text)
    return tomllib.loads(text)


def _version():
    # A source distribution carries PKG-INFO; in the libduplex tree the
    # version is the C library's, in the top-level meson.build.
    pkg_info = os.path.join(HERE, "PKG-INFO")
    if os.path.exists(pkg_info):
        with open(pkg_info, encoding="utf-8") as f:
            m = re.search(r"^Version: *(\S+)", f.read(), re.M)
    else:
        meson = os.path.join(HERE, os.pardir, os.pardir, "meson.build")
        try:
            with open(meson, encoding="utf-8") as f:
                m = re.search(r"project\([^)]*?version\s*:\s*'([^']+)'",
                              f.read(), re.S)
        except FileNotFoundError:
            m = None
    if not m:
        raise RuntimeError("libduplex: no version (neither PKG-INFO nor the "
                           "libduplex tree's meson.build was found)")
    return m.group(1)


class _Project:
    def __init__(self):
        p = _pyproject()["project"]
        self.name = p["name"]
        self.version = _version()
        self.summary = p.get("description", "")
        self.requires_python = p.get("requires-python")
        self.license = p.get("license", {}).get("text")
        self.classifiers = p.get("classifiers", [])
        self.readme = p.get("readme")
        # Wheel and sdist file names use the normalized name (PEP 427/625).
        self.dist = re.sub(r"[-_.]+", "_", self.name).lower()
        self.dist_info = f"{self.dist}-{self.version}.dist-info"

    def metadata(self):
        lines = ["Metadata-Version: 2.1", f"Name: {self.name}",
                 f"Version: {self.version}"]
        if self.summary:
            lines.append(f"Summary: {self.summary}")
        if self.license:
            lines.append(f"License: {self.license}")
        if self.requires_python:
            lines.append(f"Requires-Python: {self.requires_python}")
        lines += [f"Classifier: {c}" for c in self.classifiers]
        text = "\n".join(lines) + "\n"
        if self.readme:
            with open(os.path.join(HERE, self.readme), encoding="utf-8") as f:
                readme = f.read()
            text += ("Description-Content-Type: text/markdown\n\n" + readme)
        return text.encode("utf-8")

    def license_file(self):
        """(name, bytes) of the license text, or None."""
        for path in (os.path.join(HERE, "LICENSE"),
                     os.path.join(HERE, os.pardir, os.pardir, "LICENSE")):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    return "LICENSE", f.read()
        return None

    def dist_info_files(self, tag="py3-none-any"):
        files = {"METADATA": self.metadata(),
                 "WHEEL": ("Wheel-Version: 1.0\n"
                           "Generator: libduplex duplex_build\n"
                           "Root-Is-Purelib: true\n"
                           f"Tag: {tag}\n").encode(),
                 "top_level.txt": f"{PACKAGE}\n".encode()}
        lic = self.license_file()
        if lic:
            files[lic[0]] = lic[1]
        return files


# ---- archives ---------------------------------------------------------------

def _epoch():
    return max(int(os.environ.get("SOURCE_DATE_EPOCH", "315532800")),
               315532800)  # zip cannot date before 1980


def _package_files():
    """(archive name, path) of every module of the package, sorted."""
    out = []
    root = os.path.join(HERE, PACKAGE)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py") or name == "py.typed":
                path = os.path.join(dirpath, name)
                out.append((os.path.relpath(path, HERE).replace(os.sep, "/"),
                            path))
    return out


def _record_hash(data):
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _write_wheel(wheel_directory, project, contents):
    """contents: [(archive name, bytes)] outside .dist-info."""
    name = f"{project.dist}-{project.version}-py3-none-any.whl"
    entries = list(contents)
    entries += [(f"{project.dist_info}/{n}", data)
                for n, data in sorted(project.dist_info_files().items())]
    record_name = f"{project.dist_info}/RECORD"
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in entries)
    record += f"{record_name},,\n"
    entries.append((record_name, record.encode()))
    date = time.gmtime(_epoch())[:6]
    path = os.path.join(wheel_directory, name)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in entries:
            info = zipfile.ZipInfo(n, date_time=date)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return name


def _read(path):
    with open(path, "rb") as f:
        return f.read()


# ---- PEP 517 hooks ----------------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory,
                                     config_settings=None):
    project = _Project()
    target = os.path.join(metadata_directory, project.dist_info)
    os.makedirs(target, exist_ok=True)
    for n, data in project.dist_info_files().items():
        with open(os.path.join(target, n), "wb") as f:
            f.write(data)
    return project.dist_info


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory, config_settings=None,
                metadata_directory=None):
    project = _Project()
    return _write_wheel(wheel_directory, project,
                        [(n, _read(p)) for n, p in _package_files()])


def build_editable(wheel_directory, config_settings=None,
                   metadata_directory=None):
    # A .pth line puts this directory on sys.path: `import duplex` then
    # imports the files here, edits included.
    project = _Project()
    pth = (HERE + "\n").encode()
    return _write_wheel(wheel_directory, project,
                        [(f"_{project.dist}_editable.pth", pth)])


def build_sdist(sdist_directory, config_settings=None):
    project = _Project()
    base = f"{project.dist}-{project.version}"
    files = [("pyproject.toml", os.path.join(HERE, "pyproject.toml")),
             ("backend/duplex_build.py", os.path.abspath(__file__))]
    if project.readme:
        files.append((project.readme, os.path.join(HERE, project.readme)))
    files += _package_files()
    for sub in ("examples", "tests"):
        root = os.path.join(HERE, sub)
        if os.path.isdir(root):
            files += [(f"{sub}/{n}", os.path.join(root, n))
                      for n in sorted(os.listdir(root)) if n.endswith(".py")]
    entries = [(n, _read(p)) for n, p in files]
    lic = project.license_file()
    if lic:
        entries.append(lic)
    entries.append(("PKG-INFO", project.metadata()))
    name = base + ".tar.gz"
    mtime = _epoch()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for n, data in sorted(entries):
            info = tarfile.TarInfo(f"{base}/{n}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tf.addfile(info, io.BytesIO(data))
    with open(os.path.join(sdist_directory, name), "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f,
                           mtime=mtime) as gz:
            gz.write(raw.getvalue())
    return name
