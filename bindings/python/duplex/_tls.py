"""TLS: TLSConfig (duplex_tls) and TLSInfo (duplex_tls_info).

A TLSConfig is the library's immutable, shared TLS configuration: made
once (it reads its files then), given to any number of conns and
listeners on any loops (``tls=``), each of which takes its own C
reference. The object holds one more, dropped by close() or when it is
collected, so it may go as soon as the conns that use it exist.
"""
import ctypes
import dataclasses
import math
import os
import threading
from ctypes import byref, c_char_p, c_void_p

from . import _ffi
from .errors import CODES, error

_ECLOSED = CODES["ECLOSED"]
_EINVAL = CODES["EINVAL"]

_ROLES = {"client": _ffi.TLS_CLIENT, "server": _ffi.TLS_SERVER}
_VERIFY = {"default": _ffi.TLS_VERIFY_DEFAULT, "none": _ffi.TLS_VERIFY_NONE,
           "require": _ffi.TLS_VERIFY_REQUIRE,
           "optional": _ffi.TLS_VERIFY_OPTIONAL}
_VERSIONS = {"TLSv1.2": _ffi.TLS_V1_2, "TLSv1.3": _ffi.TLS_V1_3}

TLS_CLIENT, TLS_SERVER = _ffi.TLS_CLIENT, _ffi.TLS_SERVER
TLS_VERIFY_DEFAULT, TLS_VERIFY_NONE = (_ffi.TLS_VERIFY_DEFAULT,
                                       _ffi.TLS_VERIFY_NONE)
TLS_VERIFY_REQUIRE, TLS_VERIFY_OPTIONAL = (_ffi.TLS_VERIFY_REQUIRE,
                                           _ffi.TLS_VERIFY_OPTIONAL)
TLS_V1_2, TLS_V1_3 = _ffi.TLS_V1_2, _ffi.TLS_V1_3


def tls_backend():
    """The TLS library the loaded libduplex uses, e.g. "OpenSSL 3.0.15 3
    Sep 2024", or None when it was built without TLS."""
    name = _ffi.tls_backend()
    return name.decode() if name else None


def _path(value, what):
    if value is None:
        return None
    b = os.fsencode(value)
    if not b or b"\0" in b:
        raise error(_EINVAL, f"TLSConfig: {what}: empty or NUL in path")
    return b


def _pem(value, what):
    """(pointer argument, length) of PEM text given as str or bytes."""
    if value is None:
        return None, 0
    b = value.encode("ascii") if isinstance(value, str) else bytes(value)
    if not b:
        raise error(_EINVAL, f"TLSConfig: {what}: empty")
    return b, len(b)


def _choice(value, table, what):
    if isinstance(value, str):
        try:
            return table[value]
        except KeyError:
            raise ValueError(f"TLSConfig: {what} {value!r}: one of "
                             f"{', '.join(map(repr, table))}") from None
    if isinstance(value, int) and not isinstance(value, bool) and \
            value in table.values():
        return int(value)
    raise ValueError(f"TLSConfig: {what} {value!r}: one of "
                     f"{', '.join(map(repr, table))}")


def _version(value, what):
    if value is None:
        return 0
    return _choice(value, _VERSIONS, what)  # ssl.TLSVersion members are ints


class TLSConfig:
    """An immutable TLS configuration (``duplex_tls_new``).

    ``role`` is ``"client"`` (the default) or ``"server"``. Keyword
    arguments, all optional:

    - ``cert_file``/``key_file`` or ``cert_pem``/``key_pem`` (str or bytes):
      our certificate chain (leaf first) and its unencrypted private key,
      PEM. A server needs them; a client only for mutual TLS.
    - ``ca_file``, ``ca_dir`` (a hashed directory, as ``c_rehash`` makes),
      ``ca_pem``: whom to trust when verifying the peer. With none of the
      three the system store is used; ``system_ca=True`` adds it to them.
    - ``verify``: ``"default"`` (a client verifies the server's chain and
      host name; a server asks for no certificate), ``"none"`` (a client
      accepts any certificate: testing only), ``"require"`` (a server
      requires a valid client certificate: mutual TLS), ``"optional"`` (a
      server asks for one and verifies it if sent).
    - ``alpn``: protocol names in preference order (str or bytes).
    - ``min_version``/``max_version``: ``"TLSv1.2"``, ``"TLSv1.3"``, or
      ``ssl.TLSVersion.TLSv1_2``/``TLSv1_3``; default TLS 1.2 up to the
      highest.
    - ``session_cache``: client sessions kept for resumption: None (the
      library's default, 64), a number, or 0/False for none.
    - ``keylog_file``: append NSS key-log lines (SSLKEYLOGFILE format) to
      this file, for debugging with Wireshark; off by default.
    - ``handshake_timeout``: seconds a handshake may take before the conn
      closes with ETIMEDOUT (None: the library's 10 s).

    Files are read here, on the calling thread: make configurations at
    start-up, not inside a loop callback. A certificate, key or CA that
    does not load raises :class:`duplex.errors.TLSConfigError` (an
    ``ssl.SSLError``) with the TLS library's reason; bad combinations
    (a server without a certificate, ``verify="require"`` on a client)
    raise DuplexError EINVAL with the reason; a libduplex built without
    TLS raises DuplexError ENOTSUP.

    Give it to ``connect_tcp(..., tls=cfg)`` (client role), the listen
    functions (``tls=``, server role), ``Conn.start_tls()`` or
    ``duplex.aio`` (``ssl=``). Conns and listeners hold their own
    reference: ``close()`` (or collecting the object) may come at once.
    """

    _p = None

    def __init__(self, role="client", *, cert_file=None, key_file=None,
                 cert_pem=None, key_pem=None, ca_file=None, ca_dir=None,
                 ca_pem=None, system_ca=False, verify="default", alpn=(),
                 min_version=None, max_version=None, session_cache=None,
                 keylog_file=None, handshake_timeout=None):
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        role_code = _choice(role, _ROLES, "role")
        self.role = "server" if role_code == _ffi.TLS_SERVER else "client"
        verify_code = _choice(verify, _VERIFY, "verify")
        self.verify = {v: k for k, v in _VERIFY.items()}[verify_code]
        if isinstance(alpn, (str, bytes)):
            raise TypeError("TLSConfig: alpn is a list of protocol names")
        names = [a.encode("ascii") if isinstance(a, str) else bytes(a)
                 for a in alpn]
        for n in names:
            if not 1 <= len(n) <= 255 or b"\0" in n:
                raise error(_EINVAL, f"TLSConfig: ALPN name {n!r}: 1 to 255 "
                            "bytes, no NUL")
        self.alpn = tuple(n.decode("ascii", "replace") for n in names)
        if session_cache is None:
            cache = 0
        elif session_cache is False or session_cache == 0:
            cache = -1
        elif isinstance(session_cache, int) and session_cache > 0:
            cache = min(int(session_cache), 2**31 - 1)
        else:
            raise ValueError("TLSConfig: session_cache: None, 0/False or a "
                             "positive number")
        if handshake_timeout is None:
            timeout_ms = 0
        elif handshake_timeout <= 0:
            raise ValueError("TLSConfig: handshake_timeout must be > 0 or "
                             "None")
        else:
            timeout_ms = min(int(math.ceil(handshake_timeout * 1000)),
                             2**32 - 1)
        cert, cert_len = _pem(cert_pem, "cert_pem")
        key, key_len = _pem(key_pem, "key_pem")
        ca, ca_len = _pem(ca_pem, "ca_pem")
        alpn_arr = (c_char_p * max(len(names), 1))(*names)
        cfg = _ffi.tls_config(
            role=role_code, cert_file=_path(cert_file, "cert_file"),
            cert_pem=cert, cert_pem_len=cert_len,
            key_file=_path(key_file, "key_file"), key_pem=key,
            key_pem_len=key_len, ca_file=_path(ca_file, "ca_file"),
            ca_dir=_path(ca_dir, "ca_dir"), ca_pem=ca, ca_pem_len=ca_len,
            system_ca=1 if system_ca else 0, verify=verify_code,
            alpn=alpn_arr if names else None, alpn_count=len(names),
            min_version=_version(min_version, "min_version"),
            max_version=_version(max_version, "max_version"),
            session_cache=cache,
            keylog_file=_path(keylog_file, "keylog_file"),
            handshake_timeout_ms=timeout_ms)
        out = c_void_p()
        msg = ctypes.create_string_buffer(512)
        rc = _ffi.tls_new(byref(out), byref(cfg), msg, len(msg))
        if rc != 0:
            raise error(rc, "TLSConfig", msg.value.decode(errors="replace"))
        self._p = out.value
        self.min_version = min_version
        self.max_version = max_version
        self.handshake_timeout = handshake_timeout

    @classmethod
    def client(cls, **kw):
        """``TLSConfig("client", **kw)``."""
        return cls("client", **kw)

    @classmethod
    def server(cls, cert_file=None, key_file=None, **kw):
        """``TLSConfig("server", cert_file=..., key_file=..., **kw)``."""
        return cls("server", cert_file=cert_file, key_file=key_file, **kw)

    @property
    def server_side(self):
        return self.role == "server"

    # -- lending the pointer to a call that makes a conn or a listener --
    class _Use:
        __slots__ = ("cfg", "what")

        def __init__(self, cfg, what):
            self.cfg, self.what = cfg, what

        def __enter__(self):
            cfg = self.cfg
            if cfg is None:
                return None
            with cfg._lock:
                if cfg._closed:
                    raise error(_ECLOSED, f"{self.what}: the TLSConfig was "
                                "closed")
                cfg._users += 1
                return cfg._p

        def __exit__(self, *exc):
            if self.cfg is not None:
                self.cfg._give_back()

    def _use(self, what):
        return TLSConfig._Use(self, what)

    def _give_back(self):
        with self._lock:
            self._users -= 1
            p = None
            if self._closed and self._users == 0:
                p, self._p = self._p, None
        if p is not None:
            _ffi.tls_unref(p)

    @property
    def closed(self):
        return self._closed

    def close(self):
        """Drop this object's reference. Conns and listeners made with it
        keep theirs; new ones can no longer be made with it (ECLOSED).
        Idempotent."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._closed:
                return
            self._closed = True
            p = None
            if self._users == 0:
                p, self._p = self._p, None
        if p is not None:
            _ffi.tls_unref(p)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self):
        state = " closed" if self._closed else ""
        alpn = f" alpn={list(self.alpn)!r}" if self.alpn else ""
        return (f"<duplex.TLSConfig {self.role} verify={self.verify!r}"
                f"{alpn}{state}>")


def use(tls, role, what):
    """The guard lending ``tls``'s pointer for one call (None: no TLS)."""
    if tls is None:
        return TLSConfig._Use(None, what)
    if not isinstance(tls, TLSConfig):
        hint = ""
        if type(tls).__module__ == "ssl":
            hint = (" (libduplex speaks TLS itself: build a "
                    "duplex.TLSConfig; an ssl.SSLContext cannot be used)")
        raise TypeError(f"{what}: tls must be a duplex.TLSConfig, not "
                        f"{type(tls).__name__}{hint}")
    if tls.role != role:
        raise error(_EINVAL, f"{what}: needs a {role}-role TLSConfig, got a "
                    f"{tls.role}-role one")
    return tls._use(what)


@dataclasses.dataclass(frozen=True)
class TLSInfo:
    """What a TLS conn negotiated (``Conn.tls_info()``)."""

    version: str
    """"TLSv1.2" or "TLSv1.3" (as ``ssl.SSLSocket.version()``)."""
    version_number: int
    """0x0303 or 0x0304 (``ssl.TLSVersion`` values)."""
    cipher: str
    """The cipher suite, e.g. "TLS_AES_256_GCM_SHA384"."""
    alpn_protocol: "str | None"
    """The ALPN protocol agreed on, or None."""
    server_name: "str | None"
    """Server side: the name the client asked for (SNI), or None."""
    peer_subject: "str | None"
    """The peer certificate's subject (RFC 2253), or None without one."""
    peer_cert: bool
    """Whether the peer presented a certificate."""
    session_reused: bool
    """Whether the session was resumed."""


def info_of(conn_p):
    """duplex_conn_get_tls_info(): (rc, TLSInfo or None)."""
    out = _ffi.tls_info()
    rc = _ffi.conn_get_tls_info(conn_p, byref(out))
    if rc != 0:
        return rc, None

    def text(field):
        return field.decode("utf-8", "replace")

    return 0, TLSInfo(
        version=text(out.version_name), version_number=out.version,
        cipher=text(out.cipher), alpn_protocol=text(out.alpn) or None,
        server_name=text(out.sni) or None,
        peer_subject=text(out.peer_subject) or None,
        peer_cert=bool(out.peer_cert), session_reused=bool(out.resumed))


def error_text(conn_p):
    """duplex_conn_get_tls_error(): the TLS library's words, or None."""
    buf = ctypes.create_string_buffer(512)
    rc = _ffi.conn_get_tls_error(conn_p, buf, len(buf))
    if rc not in (0, CODES.get("ENOBUFS")):
        return None
    return buf.value.decode("utf-8", "replace") or None
