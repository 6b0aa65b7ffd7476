"""Raw ctypes declarations of libduplex (core/include/duplex.h).

Nothing here is Pythonic: the classes in duplex._core wrap it. The
structures mirror the header field for field; each carries its own
ctypes.sizeof() in `size`, so the library can tell which version we were
written against (see docs/abi.md). We never call the *_opts_init()
functions: they write the library's own sizeof, which could be larger
than the structure declared here.

Every object is a reference (the ownership model of docs/design.md): the
binding drops each one it was handed with the matching *_unref(), which a
library from before that model lacks; loading one fails here, at import.
"""
import ctypes
import ctypes.util
import errno
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char, c_char_p, c_int,
                    c_longlong, c_size_t, c_ubyte, c_uint, c_uint16,
                    c_uint32, c_uint64, c_void_p)


def _standard_dirs():
    """Where `meson install` puts the library for the usual prefixes
    (/usr/local, /usr, this Python's prefix), for when the dynamic loader
    does not know it yet (ldconfig not run after the install)."""
    import sys
    import sysconfig
    multiarch = sysconfig.get_config_var("MULTIARCH")  # x86_64-linux-gnu
    dirs = []
    for prefix in ("/usr/local", "/usr", sys.prefix, sys.base_prefix):
        if multiarch:
            dirs.append(os.path.join(prefix, "lib", multiarch))
        dirs += [os.path.join(prefix, "lib64"), os.path.join(prefix, "lib")]
    seen = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def _candidates():
    """Names and paths to try, best first: the soname through the dynamic
    loader (LD_LIBRARY_PATH, its cache, /lib and /usr/lib), what
    ctypes.util.find_library() finds, the soname in the standard
    directories, then unversioned names."""
    import sys
    if sys.platform == "darwin":
        soname, other = "libduplex.0.dylib", ["libduplex.dylib"]
    elif sys.platform == "win32":
        soname, other = "duplex.dll", ["libduplex.dll"]
    else:
        soname, other = "libduplex.so.0", ["libduplex.so"]
    yield soname
    found = ctypes.util.find_library("duplex")
    if found:
        yield found
    for d in _standard_dirs():
        path = os.path.join(d, soname)
        if os.path.exists(path):
            yield path
    yield from other


def _load():
    path = os.environ.get("DUPLEX_LIBRARY")
    if path:
        return ctypes.CDLL(path)
    errors = []
    for name in _candidates():
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise ImportError("libduplex not found: install it (meson install; "
                      "the loader must find libduplex.so.0, e.g. in "
                      "/usr/local/lib or through LD_LIBRARY_PATH) or set "
                      "DUPLEX_LIBRARY to its path (" + "; ".join(errors)
                      + ")")


lib = _load()

# ---- callback types (all run on the loop thread) ---------------------------
# Pointers arrive as plain ints (or None for NULL): c_void_p arguments.
post_cb = CFUNCTYPE(None, c_void_p, c_int, c_void_p)
open_cb = CFUNCTYPE(None, c_void_p, c_void_p)
# on_read's bytes come as a char pointer: slicing one copies them into a
# bytes object much faster than ctypes.string_at().
read_cb = CFUNCTYPE(None, c_void_p, POINTER(c_char), c_size_t, c_void_p)
eof_cb = CFUNCTYPE(None, c_void_p, c_void_p)
backpressure_cb = CFUNCTYPE(None, c_void_p, c_size_t, c_void_p)
writable_cb = CFUNCTYPE(None, c_void_p, c_void_p)
close_cb = CFUNCTYPE(None, c_void_p, c_int, c_void_p)
write_cb = CFUNCTYPE(None, c_void_p, c_int, c_void_p)
release_cb = CFUNCTYPE(None, c_void_p, c_size_t, c_int, c_void_p)
frame_fn = CFUNCTYPE(c_longlong, c_void_p, c_size_t, POINTER(c_size_t),
                     c_void_p)
listen_error_cb = CFUNCTYPE(None, c_void_p, c_int, c_void_p)
channel_cb = CFUNCTYPE(None, c_void_p, c_void_p, c_size_t, c_void_p)
channel_close_cb = CFUNCTYPE(None, c_void_p, c_int, c_void_p)
timer_cb = CFUNCTYPE(None, c_void_p, c_void_p)


class _Versioned(Structure):
    """A versioned struct: zero-filled, `size` set to our sizeof."""

    def __init__(self, **fields):
        super().__init__(**fields)
        self.size = ctypes.sizeof(self)


class loop_opts(_Versioned):
    _fields_ = [("size", c_size_t), ("flags", c_uint),
                ("read_buffer_size", c_uint32)]


class buf(Structure):
    _fields_ = [("base", c_void_p), ("len", c_size_t)]


class conn_cbs(_Versioned):
    _fields_ = [("size", c_size_t), ("on_open", open_cb),
                ("on_read", read_cb), ("on_eof", eof_cb),
                ("on_backpressure", backpressure_cb),
                ("on_writable", writable_cb), ("on_close", close_cb)]


class framing(_Versioned):
    _fields_ = [("size", c_size_t), ("kind", c_int), ("flags", c_uint),
                ("delimiter", c_ubyte * 4), ("delimiter_len", c_uint),
                ("prefix_bytes", c_uint), ("max_frame", c_size_t),
                ("custom", frame_fn), ("custom_user", c_void_p)]


class conn_opts(_Versioned):
    _fields_ = [("size", c_size_t), ("cbs", POINTER(conn_cbs)),
                ("user", c_void_p), ("high_watermark", c_size_t),
                ("low_watermark", c_size_t), ("hard_limit", c_size_t),
                ("flags", c_uint), ("framing", POINTER(framing)),
                ("connect_timeout_ms", c_uint32),
                ("idle_timeout_ms", c_uint32),
                ("read_timeout_ms", c_uint32),
                ("flush_timeout_ms", c_uint32),
                ("local_host", c_char_p), ("local_port", c_uint16),
                ("tls", c_void_p), ("tls_host", c_char_p)]


class listener_opts(_Versioned):
    _fields_ = [("size", c_size_t), ("conn_opts", POINTER(conn_opts)),
                ("on_error", listen_error_cb), ("user", c_void_p),
                ("backlog", c_int), ("flags", c_uint), ("mode", c_uint),
                ("tls", c_void_p)]


class tls_config(_Versioned):
    _fields_ = [("size", c_size_t), ("role", c_int),
                ("cert_file", c_char_p), ("cert_pem", c_char_p),
                ("cert_pem_len", c_size_t),
                ("key_file", c_char_p), ("key_pem", c_char_p),
                ("key_pem_len", c_size_t),
                ("ca_file", c_char_p), ("ca_dir", c_char_p),
                ("ca_pem", c_char_p), ("ca_pem_len", c_size_t),
                ("system_ca", c_int), ("verify", c_int),
                ("alpn", POINTER(c_char_p)), ("alpn_count", c_size_t),
                ("min_version", c_int), ("max_version", c_int),
                ("session_cache", c_int), ("keylog_file", c_char_p),
                ("handshake_timeout_ms", c_uint32)]


class tls_info(_Versioned):
    _fields_ = [("size", c_size_t), ("version", c_int),
                ("version_name", c_char * 16), ("cipher", c_char * 64),
                ("alpn", c_char * 256), ("sni", c_char * 256),
                ("peer_subject", c_char * 256), ("resumed", c_int),
                ("peer_cert", c_int)]


class loop_stats(_Versioned):
    _fields_ = [("size", c_size_t), ("conns", c_uint64),
                ("queued", c_uint64), ("accepted", c_uint64)]


class group_opts(_Versioned):
    _fields_ = [("size", c_size_t), ("loops", c_uint), ("flags", c_uint),
                ("loop_opts", POINTER(loop_opts))]


class channel_opts(_Versioned):
    _fields_ = [("size", c_size_t), ("on_message", channel_cb),
                ("on_close", channel_close_cb), ("user", c_void_p),
                ("capacity", c_size_t), ("flags", c_uint)]


# ---- constants from the header ----------------------------------------------
RUN_DEFAULT, RUN_ONCE, RUN_NOWAIT = 0, 1, 2
CONN_NAGLE, CONN_START_PAUSED, CONN_KEEPALIVE = 0x1, 0x2, 0x4
CLOSE_GRACEFUL, CLOSE_ABORT = 0, 1
LISTEN_IPV6ONLY = 0x1
LISTEN_REUSEPORT = 0x2
GROUP_PIN = 0x1
GROUP_MAX_LOOPS = 1024
TIMEOUT_KINDS = {"connect": 0, "idle": 1, "read": 2, "flush": 3}
WRITE_MAX = 1 << 30
WRITE_OVERHEAD = 64  # what each queued write costs beyond its payload
TLS_CLIENT, TLS_SERVER = 1, 2
TLS_VERIFY_DEFAULT, TLS_VERIFY_NONE = 0, 1
TLS_VERIFY_REQUIRE, TLS_VERIFY_OPTIONAL = 2, 3
TLS_V1_2, TLS_V1_3 = 0x0303, 0x0304

# ---- prototypes ---------------------------------------------------------------
_vp, _pp = c_void_p, POINTER(c_void_p)
_PROTOS = {
    "duplex_strerror": (c_char_p, [c_int]),
    "duplex_err_name": (c_char_p, [c_int]),
    "duplex_version": (c_uint, []),
    "duplex_version_string": (c_char_p, []),
    "duplex_loop_new": (c_int, [_pp, POINTER(loop_opts)]),
    "duplex_loop_run": (c_int, [_vp, c_uint]),
    "duplex_loop_start": (c_int, [_vp]),
    "duplex_loop_stop": (c_int, [_vp]),
    "duplex_loop_post": (c_int, [_vp, post_cb, _vp]),
    "duplex_loop_on_thread": (c_int, [_vp]),
    "duplex_loop_free": (c_int, [_vp]),
    "duplex_loop_ref": (c_int, [_vp]),
    "duplex_loop_unref": (c_int, [_vp]),
    "duplex_loop_get_stats": (c_int, [_vp, POINTER(loop_stats)]),
    "duplex_loop_get_group": (c_int, [_vp, _pp, POINTER(c_uint)]),
    "duplex_group_new": (c_int, [_pp, POINTER(group_opts)]),
    "duplex_group_start": (c_int, [_vp]),
    "duplex_group_stop": (c_int, [_vp]),
    "duplex_group_free": (c_int, [_vp]),
    "duplex_group_ref": (c_int, [_vp]),
    "duplex_group_unref": (c_int, [_vp]),
    "duplex_group_get_count": (c_int, [_vp, POINTER(c_uint)]),
    "duplex_group_get_loop": (c_int, [_vp, c_uint, _pp]),
    "duplex_group_pick": (c_int, [_vp, _pp]),
    "duplex_group_listen_tcp": (c_int, [_pp, _vp, c_char_p, c_uint16,
                                        POINTER(listener_opts)]),
    "duplex_group_listen_unix": (c_int, [_pp, _vp, c_char_p,
                                         POINTER(listener_opts)]),
    "duplex_conn_connect_tcp": (c_int, [_pp, _vp, c_char_p, c_uint16,
                                        POINTER(conn_opts)]),
    "duplex_conn_connect_unix": (c_int, [_pp, _vp, c_char_p,
                                         POINTER(conn_opts)]),
    "duplex_conn_adopt": (c_int, [_pp, _vp, c_int, POINTER(conn_opts)]),
    "duplex_conn_adopt_pair": (c_int, [_pp, _vp, c_int, c_int,
                                       POINTER(conn_opts)]),
    "duplex_conn_ref": (c_int, [_vp]),
    "duplex_conn_unref": (c_int, [_vp]),
    "duplex_conn_write": (c_int, [_vp, _vp, c_size_t, write_cb, _vp]),
    "duplex_conn_writev": (c_int, [_vp, POINTER(buf), c_size_t, write_cb,
                                   _vp]),
    "duplex_conn_write_zc": (c_int, [_vp, _vp, c_size_t, release_cb, _vp]),
    "duplex_conn_shutdown": (c_int, [_vp, write_cb, _vp]),
    "duplex_conn_close": (c_int, [_vp, c_uint]),
    "duplex_conn_set_timeout": (c_int, [_vp, c_int, c_uint32]),
    "duplex_conn_pause": (c_int, [_vp]),
    "duplex_conn_resume": (c_int, [_vp]),
    "duplex_conn_wait_writable": (c_int, [_vp, c_int]),
    "duplex_conn_wait_room": (c_int, [_vp, c_size_t, c_int]),
    "duplex_conn_get_queued": (c_int, [_vp, POINTER(c_size_t)]),
    "duplex_conn_set_user": (c_int, [_vp, _vp]),
    "duplex_conn_get_peer": (c_int, [_vp, c_char_p, c_size_t]),
    "duplex_conn_get_local": (c_int, [_vp, c_char_p, c_size_t]),
    "duplex_listener_tcp": (c_int, [_pp, _vp, c_char_p, c_uint16,
                                    POINTER(listener_opts)]),
    "duplex_listener_unix": (c_int, [_pp, _vp, c_char_p,
                                     POINTER(listener_opts)]),
    "duplex_listener_get_port": (c_int, [_vp, POINTER(c_uint16)]),
    "duplex_listener_get_address": (c_int, [_vp, c_char_p, c_size_t]),
    "duplex_listener_close": (c_int, [_vp]),
    "duplex_listener_ref": (c_int, [_vp]),
    "duplex_listener_unref": (c_int, [_vp]),
    "duplex_channel_new": (c_int, [_pp, _vp, POINTER(channel_opts)]),
    "duplex_channel_send_ptr": (c_int, [_vp, _vp, c_size_t, release_cb, _vp,
                                        c_int]),
    "duplex_channel_close": (c_int, [_vp]),
    "duplex_channel_get_pending": (c_int, [_vp, POINTER(c_size_t)]),
    "duplex_channel_unref": (c_int, [_vp]),
    "duplex_timer_new": (c_int, [_pp, _vp, timer_cb, _vp]),
    "duplex_timer_start": (c_int, [_vp, c_uint64, c_uint64]),
    "duplex_timer_stop": (c_int, [_vp]),
    "duplex_timer_close": (c_int, [_vp]),
    "duplex_timer_ref": (c_int, [_vp]),
    "duplex_timer_unref": (c_int, [_vp]),
}

# TLS (duplex.h, "TLS"; @since 0.2). A library built without TLS has them
# and answers DUPLEX_ENOTSUP; one from before them lacks them: stand-ins
# that answer the same keep the rest of the binding working.
_TLS_PROTOS = {
    "duplex_tls_new": (c_int, [_pp, POINTER(tls_config), c_char_p,
                               c_size_t]),
    "duplex_tls_ref": (c_int, [_vp]),
    "duplex_tls_unref": (c_int, [_vp]),
    "duplex_tls_backend": (c_char_p, []),
    "duplex_conn_start_tls": (c_int, [_vp, _vp, c_char_p, write_cb, _vp]),
    "duplex_conn_get_tls_info": (c_int, [_vp, POINTER(tls_info)]),
    "duplex_conn_get_tls_error": (c_int, [_vp, c_char_p, c_size_t]),
}
HAVE_TLS_SYMBOLS = True
_ENOTSUP = -errno.ENOTSUP if os.name == "posix" else -4049

for _name, (_res, _args) in _TLS_PROTOS.items():
    try:
        _fn = getattr(lib, _name)
        _fn.restype = _res
        _fn.argtypes = _args
    except AttributeError:
        HAVE_TLS_SYMBOLS = False
        _fn = ((lambda *a: None) if _name == "duplex_tls_backend"
               else (lambda *a: _ENOTSUP))
    globals()[_name[len("duplex_"):]] = _fn

for _name, (_res, _args) in _PROTOS.items():
    try:
        _fn = getattr(lib, _name)
    except AttributeError:
        raise ImportError(f"{lib._name} has no {_name}: too old for this "
                          "binding, which needs the reference-counted "
                          "timers, listeners and loops and the loop groups "
                          "(duplex.h, @since 0.2)") from None
    _fn.restype = _res
    _fn.argtypes = _args
    globals()[_name[len("duplex_"):]] = _fn
del _name, _res, _args, _fn
