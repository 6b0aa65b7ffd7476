package duplex

// #include <stdlib.h>
// #include "shim.h"
import "C"

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// TLSVerify is how a TLS configuration verifies its peer.
type TLSVerify int

const (
	// VerifyDefault: a client verifies the server's chain and host name;
	// a server asks for no client certificate.
	VerifyDefault TLSVerify = C.DUPLEX_TLS_VERIFY_DEFAULT
	// VerifyNone: a client accepts any server certificate (testing only).
	VerifyNone TLSVerify = C.DUPLEX_TLS_VERIFY_NONE
	// VerifyRequire: a server requires a valid client certificate
	// (mutual TLS).
	VerifyRequire TLSVerify = C.DUPLEX_TLS_VERIFY_REQUIRE
	// VerifyOptional: a server asks for a client certificate and verifies
	// it if one is sent.
	VerifyOptional TLSVerify = C.DUPLEX_TLS_VERIFY_OPTIONAL
)

// TLSOptions is what NewTLSConfig makes a configuration from. The zero
// value of every field means the library's default.
type TLSOptions struct {
	// Server makes a server-role configuration (for Listen, or StartTLS
	// on the accepting side); otherwise it is a client's (for Dial).
	Server bool
	// Own certificate chain (leaf first) and its unencrypted private key,
	// PEM, from files or memory. A server needs them; a client only for
	// mutual TLS.
	CertFile, KeyFile string
	CertPEM, KeyPEM   []byte
	// Whom to trust when verifying the peer: a CA file, a hashed CA
	// directory (c_rehash), CA certificates in memory. With none of the
	// three the system store is used; SystemCA adds it to them.
	CAFile, CADir string
	CAPEM         []byte
	SystemCA      bool
	Verify        TLSVerify
	// ALPN protocol names in preference order. A server picks its first
	// one the client offers, and refuses a client that offers ALPN with
	// no match.
	ALPN []string
	// MinVersion and MaxVersion take crypto/tls's constants
	// (tls.VersionTLS12, tls.VersionTLS13): the values are the same.
	// 0: TLS 1.2 up to the highest supported.
	MinVersion, MaxVersion uint16
	// SessionCache is how many client sessions are kept for resumption
	// (each TLS 1.3 ticket is used once): 0 for the library's default
	// (64), negative for none.
	SessionCache int
	// KeyLogFile, if set, gets NSS key-log lines (SSLKEYLOGFILE format)
	// appended, for debugging with Wireshark. The file is created 0600.
	KeyLogFile string
	// HandshakeTimeout bounds a handshake, from the socket's open (or a
	// StartTLS reaching its turn); the conn then closes with ETIMEDOUT.
	// 0: 10 s.
	HandshakeTimeout time.Duration
}

// A TLSConfig is an immutable TLS configuration (duplex_tls), shared by
// any number of conns and listeners on any loops: pass it with WithTLS,
// or to StartTLS. Each conn and listener holds its own reference, so
// Close may come as soon as they exist; a TLSConfig nobody closed drops
// its reference when it is garbage collected.
type TLSConfig struct {
	mu     sync.RWMutex // read-held by every use of ptr; Close writes
	ptr    *C.duplex_tls
	server bool
}

// liveTLS counts the TLSConfig references the binding holds.
var liveTLS atomic.Int64

// NewTLSConfig makes a configuration. It reads the files named in o, so
// call it at start-up, not on a hot path. A certificate, key or CA that
// would not load gives an error wrapping a *TLSError with Code
// ETLSCONFIG and the TLS library's reason; a combination the library
// refuses (a server without a certificate, VerifyRequire on a client)
// one with Code EINVAL; a libduplex built without TLS ENOTSUP.
func NewTLSConfig(o TLSOptions) (*TLSConfig, error) {
	var cfg C.duplex_tls_config
	if rc := C.duplex_tls_config_init(&cfg); rc != 0 {
		return nil, loopError("new TLS config", rc)
	}
	var frees []unsafe.Pointer
	defer func() {
		for _, p := range frees {
			C.free(p)
		}
	}()
	cstr := func(s string) *C.char {
		if s == "" {
			return nil
		}
		p := C.CString(s)
		frees = append(frees, unsafe.Pointer(p))
		return p
	}
	cbytes := func(b []byte) (*C.char, C.size_t) {
		if len(b) == 0 {
			return nil, 0
		}
		p := C.CBytes(b)
		frees = append(frees, p)
		return (*C.char)(p), C.size_t(len(b))
	}
	cfg.role = C.DUPLEX_TLS_CLIENT
	if o.Server {
		cfg.role = C.DUPLEX_TLS_SERVER
	}
	cfg.cert_file = cstr(o.CertFile)
	cfg.key_file = cstr(o.KeyFile)
	cfg.cert_pem, cfg.cert_pem_len = cbytes(o.CertPEM)
	cfg.key_pem, cfg.key_pem_len = cbytes(o.KeyPEM)
	cfg.ca_file = cstr(o.CAFile)
	cfg.ca_dir = cstr(o.CADir)
	cfg.ca_pem, cfg.ca_pem_len = cbytes(o.CAPEM)
	if o.SystemCA {
		cfg.system_ca = 1
	}
	cfg.verify = C.int(o.Verify)
	if n := len(o.ALPN); n > 0 {
		arr := C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(uintptr(0))))
		frees = append(frees, arr)
		names := unsafe.Slice((**C.char)(arr), n)
		for i, name := range o.ALPN {
			if name == "" || len(name) > 255 {
				return nil, tlsConfigError(C.int(EINVAL), "ALPN name \""+name+"\": 1 to 255 bytes")
			}
			names[i] = cstr(name)
		}
		cfg.alpn = (**C.char)(arr)
		cfg.alpn_count = C.size_t(n)
	}
	cfg.min_version = C.int(o.MinVersion)
	cfg.max_version = C.int(o.MaxVersion)
	cfg.session_cache = C.int(o.SessionCache)
	cfg.keylog_file = cstr(o.KeyLogFile)
	if o.HandshakeTimeout < 0 {
		return nil, tlsConfigError(C.int(EINVAL), "negative handshake timeout")
	}
	if ms := (o.HandshakeTimeout + time.Millisecond - 1) / time.Millisecond; ms > 0xFFFFFFFF {
		cfg.handshake_timeout_ms = C.uint32_t(0xFFFFFFFF)
	} else {
		cfg.handshake_timeout_ms = C.uint32_t(ms)
	}

	var p *C.duplex_tls
	var msg [512]C.char
	if rc := C.duplex_tls_new(&p, &cfg, &msg[0], C.size_t(len(msg))); rc != 0 {
		return nil, tlsConfigError(rc, C.GoString(&msg[0]))
	}
	liveTLS.Add(1)
	t := &TLSConfig{ptr: p, server: o.Server}
	runtime.SetFinalizer(t, (*TLSConfig).Close)
	return t, nil
}

func tlsConfigError(rc C.int, reason string) error {
	var err error = Errno(rc)
	if reason != "" || Errno(rc) == ETLSCONFIG {
		err = &TLSError{Code: Errno(rc), Reason: reason}
	}
	return &opError{op: "new TLS config", err: err}
}

// opError is "duplex: op: err" around an error that is not a conn's.
type opError struct {
	op  string
	err error
}

func (e *opError) Error() string { return "duplex: " + e.op + ": " + e.err.Error() }
func (e *opError) Unwrap() error { return e.err }

// Server reports whether the configuration has the server role.
func (t *TLSConfig) Server() bool { return t.server }

// Close drops the configuration's reference. Conns and listeners made
// with it keep theirs; Dial, Listen and StartTLS with it then fail with
// an error wrapping ECLOSED. A second Close returns an error wrapping
// ECLOSED.
func (t *TLSConfig) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return &opError{op: "close TLS config", err: ECLOSED}
	}
	C.duplex_tls_unref(t.ptr)
	t.ptr = nil
	liveTLS.Add(-1)
	runtime.SetFinalizer(t, nil)
	return nil
}

// lend runs f with the C configuration (nil for t == nil), or returns
// ECLOSED once t was closed; role checks that t has it.
func (t *TLSConfig) lend(server bool, f func(p *C.duplex_tls) C.int) C.int {
	if t == nil {
		return f(nil)
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if t.ptr == nil {
		return C.int(ECLOSED)
	}
	if t.server != server {
		return C.int(EINVAL)
	}
	return f(t.ptr)
}

// TLSBackend returns the TLS library libduplex uses, e.g. "OpenSSL 3.0.15
// 3 Sep 2024", or "" when it was built without TLS.
func TLSBackend() string {
	p := C.duplex_tls_backend()
	if p == nil {
		return ""
	}
	return C.GoString(p)
}

// WithTLS makes Dial speak TLS with cfg (a client-role configuration;
// Dial returns once the handshake is done) or Listen serve TLS with it (a
// server-role one; Accept returns conns whose handshake is done, and
// conns whose handshake fails are closed without being seen). A cfg of
// the wrong role makes Dial or Listen fail with EINVAL.
func WithTLS(cfg *TLSConfig) Option {
	return func(c *config) { c.tls = cfg }
}

// WithServerName sets, for Dial with WithTLS, the name sent as SNI and
// checked against the server's certificate. Default: the host of a "tcp"
// address. A verifying client on "unix" needs it.
func WithServerName(name string) Option {
	return func(c *config) { c.serverName = name }
}

// TLSInfo is what a conn's TLS handshake negotiated.
type TLSInfo struct {
	// Version is tls.VersionTLS12 or tls.VersionTLS13 (crypto/tls's
	// values); VersionName "TLSv1.2" or "TLSv1.3".
	Version     uint16
	VersionName string
	// CipherSuite is the suite's name, e.g. "TLS_AES_256_GCM_SHA384".
	CipherSuite string
	// NegotiatedProtocol is the ALPN protocol agreed on, or "".
	NegotiatedProtocol string
	// ServerName is, on the server side, the name the client asked for
	// (SNI), or "".
	ServerName string
	// PeerSubject is the peer certificate's subject (RFC 2253), "" when
	// the peer sent none; PeerCertificate tells whether it sent one.
	PeerSubject     string
	PeerCertificate bool
	// DidResume reports whether the session was resumed.
	DidResume bool
}

// readTLSInfo reads what p negotiated; on the loop thread nothing waits.
func readTLSInfo(p *C.duplex_conn) *TLSInfo {
	var info C.duplex_tls_info
	info.size = C.size_t(unsafe.Sizeof(info))
	if C.duplex_conn_get_tls_info(p, &info) != 0 {
		return nil
	}
	return &TLSInfo{
		Version:            uint16(info.version),
		VersionName:        C.GoString(&info.version_name[0]),
		CipherSuite:        C.GoString(&info.cipher[0]),
		NegotiatedProtocol: C.GoString(&info.alpn[0]),
		ServerName:         C.GoString(&info.sni[0]),
		PeerSubject:        C.GoString(&info.peer_subject[0]),
		PeerCertificate:    info.peer_cert != 0,
		DidResume:          info.resumed != 0,
	}
}

// readTLSError reads why TLS failed on p ("" if it did not).
func readTLSError(p *C.duplex_conn) string {
	var buf [512]C.char
	rc := C.duplex_conn_get_tls_error(p, &buf[0], C.size_t(len(buf)))
	if rc != 0 && Errno(rc) != ENOBUFS {
		return ""
	}
	return C.GoString(&buf[0])
}

// TLSInfo returns what the conn's TLS handshake negotiated. It answers
// once the handshake is done (a conn from Dial or Accept with TLS, or
// after StartTLS returned nil) and still after the conn closed. Otherwise
// it returns an error wrapping ENOTSUP (the conn does not speak TLS) or
// ENOTCONN (the handshake is not done).
func (c *Conn) TLSInfo() (TLSInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tlsInfo != nil {
		return *c.tlsInfo, nil
	}
	if !c.tls {
		return TLSInfo{}, c.opErrorLocked("tlsinfo", ENOTSUP)
	}
	return TLSInfo{}, c.opErrorLocked("tlsinfo", ENOTCONN)
}

// A tlsStart is a StartTLS waiting for its callback (goOnTLSDone).
type tlsStart struct {
	c    *Conn
	done chan error // buffered: the callback never waits
}

// StartTLS upgrades a plaintext conn (STARTTLS) and waits for the
// handshake: once every write this goroutine queued before is flushed,
// the conn speaks TLS with cfg in its role (a client-role cfg on a
// dialled conn, a server-role one on an accepted conn); writes made after
// StartTLS is called are encrypted after the handshake, in order. Bytes
// already received stay as they were; everything received afterwards is
// decrypted. serverName is what a client checks ("": the host it
// dialled; a verifying client on "unix" needs one). It returns nil once
// the handshake is done, or a *net.OpError (Op "starttls") wrapping why
// it failed (a *CertificateVerificationError, a *TLSError, EBUSY when the
// conn speaks TLS already or an upgrade is under way, ECLOSED), in which
// case the conn closes. If ctx ends first, the conn is aborted and the
// error wraps ctx.Err().
func (c *Conn) StartTLS(ctx context.Context, cfg *TLSConfig, serverName string) error {
	if cfg == nil {
		return c.opError("starttls", EINVAL)
	}
	if err := ctx.Err(); err != nil {
		return c.opError("starttls", err)
	}
	var chost *C.char
	if serverName != "" {
		chost = C.CString(serverName)
		defer C.free(unsafe.Pointer(chost))
	}
	w := &tlsStart{c: c, done: make(chan error, 1)}
	h := newHandle(w)
	c.mu.Lock()
	wasTLS := c.tls
	c.tls = true // so on_close reads the TLS error text
	c.mu.Unlock()
	rc := c.call(func(p *C.duplex_conn) C.int {
		return cfg.lend(cfg.server, func(tp *C.duplex_tls) C.int {
			return C.dpxgo_start_tls(p, tp, chost, C.uintptr_t(h))
		})
	})
	if rc != 0 {
		deleteHandle(h) // no callback will come
		c.mu.Lock()
		c.tls = wasTLS
		c.mu.Unlock()
		return c.codeError("starttls", rc)
	}
	select {
	case err := <-w.done:
		if err != nil {
			return c.opError("starttls", err)
		}
		return nil
	case <-ctx.Done():
		c.Abort()
		return c.opError("starttls", ctx.Err())
	}
}

// onTLSDone runs on the loop thread once a StartTLS finished: status 0,
// or the error that closed the conn.
func (w *tlsStart) onTLSDone(p *C.duplex_conn, status C.int) {
	var err error
	if status == 0 {
		info := readTLSInfo(p)
		w.c.mu.Lock()
		w.c.tlsInfo = info
		w.c.mu.Unlock()
	} else {
		err = tlsCause(Errno(status), readTLSError(p))
	}
	w.done <- err
}
