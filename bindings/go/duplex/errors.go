package duplex

// #include "shim.h"
import "C"

import (
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
)

// Errno is a libduplex error code (a negative DUPLEX_E* value). Every error
// the library reports wraps one: test for a code with errors.Is(err,
// duplex.ECLOSED) or extract it with errors.As.
type Errno int

// The library's error codes (see DUPLEX_ERRNO_MAP in duplex.h).
const (
	EINVAL        Errno = C.DUPLEX_EINVAL
	ENOMEM        Errno = C.DUPLEX_ENOMEM
	EWOULDBLOCK   Errno = C.DUPLEX_EWOULDBLOCK
	ECANCELED     Errno = C.DUPLEX_ECANCELED
	EBUSY         Errno = C.DUPLEX_EBUSY
	EBADF         Errno = C.DUPLEX_EBADF
	EMSGSIZE      Errno = C.DUPLEX_EMSGSIZE
	ENOTSUP       Errno = C.DUPLEX_ENOTSUP
	ENOTSOCK      Errno = C.DUPLEX_ENOTSOCK
	ETIMEDOUT     Errno = C.DUPLEX_ETIMEDOUT
	ESHUTDOWN     Errno = C.DUPLEX_ESHUTDOWN
	EPIPE         Errno = C.DUPLEX_EPIPE
	ECONNRESET    Errno = C.DUPLEX_ECONNRESET
	ECONNREFUSED  Errno = C.DUPLEX_ECONNREFUSED
	ECONNABORTED  Errno = C.DUPLEX_ECONNABORTED
	ENOTCONN      Errno = C.DUPLEX_ENOTCONN
	EADDRINUSE    Errno = C.DUPLEX_EADDRINUSE
	EADDRNOTAVAIL Errno = C.DUPLEX_EADDRNOTAVAIL
	EAFNOSUPPORT  Errno = C.DUPLEX_EAFNOSUPPORT
	ENETUNREACH   Errno = C.DUPLEX_ENETUNREACH
	EHOSTUNREACH  Errno = C.DUPLEX_EHOSTUNREACH
	EACCES        Errno = C.DUPLEX_EACCES
	EPERM         Errno = C.DUPLEX_EPERM
	ENOENT        Errno = C.DUPLEX_ENOENT
	ENAMETOOLONG  Errno = C.DUPLEX_ENAMETOOLONG
	EMFILE        Errno = C.DUPLEX_EMFILE
	ENFILE        Errno = C.DUPLEX_ENFILE
	ENOBUFS       Errno = C.DUPLEX_ENOBUFS
	EINTR         Errno = C.DUPLEX_EINTR
	EIO           Errno = C.DUPLEX_EIO
	EPROTO        Errno = C.DUPLEX_EPROTO
	ENOSPC        Errno = C.DUPLEX_ENOSPC
	EAI_NONAME    Errno = C.DUPLEX_EAI_NONAME
	EAI_AGAIN     Errno = C.DUPLEX_EAI_AGAIN
	EAI_FAIL      Errno = C.DUPLEX_EAI_FAIL
	EAI_NODATA    Errno = C.DUPLEX_EAI_NODATA
	EAI_FAMILY    Errno = C.DUPLEX_EAI_FAMILY
	EAI_OTHER     Errno = C.DUPLEX_EAI_OTHER
	ECLOSED       Errno = C.DUPLEX_ECLOSED
	EVERSION      Errno = C.DUPLEX_EVERSION
	EWRONGTHREAD  Errno = C.DUPLEX_EWRONGTHREAD
	EDEADLK       Errno = C.DUPLEX_EDEADLK
	EUNKNOWN      Errno = C.DUPLEX_EUNKNOWN
	ETLS          Errno = C.DUPLEX_ETLS
	ETLSVERIFY    Errno = C.DUPLEX_ETLSVERIFY
	ETLSTRUNC     Errno = C.DUPLEX_ETLSTRUNC
	ETLSCONFIG    Errno = C.DUPLEX_ETLSCONFIG
)

// Error returns the library's message for the code (duplex_strerror).
func (e Errno) Error() string { return C.GoString(C.duplex_strerror(C.int(e))) }

// Name returns the symbolic name, e.g. "DUPLEX_ECLOSED" (duplex_err_name).
func (e Errno) Name() string { return C.GoString(C.duplex_err_name(C.int(e))) }

// Is lets errors.Is match the standard library's sentinels: ECLOSED is
// net.ErrClosed, ETIMEDOUT is os.ErrDeadlineExceeded, ETLSTRUNC (a TLS
// stream cut without close_notify) is io.ErrUnexpectedEOF, and on Unix a
// system code is its syscall.Errno (ECONNREFUSED is syscall.ECONNREFUSED,
// EDEADLK is syscall.EDEADLK, ...).
func (e Errno) Is(target error) bool {
	switch target {
	case net.ErrClosed:
		return e == ECLOSED
	case os.ErrDeadlineExceeded:
		return e == ETIMEDOUT
	case io.ErrUnexpectedEOF:
		return e == ETLSTRUNC
	}
	if t, ok := target.(syscall.Errno); ok {
		n, sys := e.sysErrno()
		return sys && n == t
	}
	return false
}

// sysErrno returns the errno a system code carries, and whether it is
// one. On Unix every system code is -errno (DUPLEX_EDEADLK included: it is
// -EDEADLK, no longer a library code); name-resolution codes (EAI_*, the
// -3000s) and library codes (ECLOSED and the others, -30000 and below) are
// not. On Windows the codes are libuv's own values: none is reported.
func (e Errno) sysErrno() (syscall.Errno, bool) {
	if runtime.GOOS == "windows" || e >= 0 || e <= -3000 {
		return 0, false
	}
	return syscall.Errno(-e), true
}

// As lets errors.As extract the syscall.Errno of a system code on Unix:
//
//	var errno syscall.Errno
//	if errors.As(err, &errno) { ... } // e.g. syscall.ECONNRESET
func (e Errno) As(target any) bool {
	if p, ok := target.(*syscall.Errno); ok {
		if n, sys := e.sysErrno(); sys {
			*p = n
			return true
		}
	}
	return false
}

// Timeout reports whether the code is ETIMEDOUT (net.Error style).
func (e Errno) Timeout() bool { return e == ETIMEDOUT }

// Conn and Listener operations fail with a *net.OpError, as the net
// package's do: Op is "dial", "listen", "accept", "read", "write", "close",
// "starttls" or "set" (a deadline), Net the network ("tcp", "unix", ...),
// Source and Addr the local and remote addresses (the target for "dial",
// the bound address for "listen" and "accept"), and Err the cause: an
// Errno, a *CertificateVerificationError or *TLSError for TLS failures,
// os.ErrDeadlineExceeded for a passed deadline, or a context's error.

// TLSError is why TLS failed on a conn, or why NewTLSConfig failed: Code
// is ETLS (a protocol error or an alert), ETLSTRUNC (the transport closed
// without close_notify: never a clean EOF; errors.Is(err,
// io.ErrUnexpectedEOF) holds), ETLSCONFIG (a certificate, key or CA that
// would not load), ETIMEDOUT (the handshake took too long) or EINVAL (a
// configuration NewTLSConfig refuses); Reason is the TLS library's own
// words, e.g. "alert received: handshake failure" ("" when it has none).
// errors.Is(err, duplex.ETLS) and the like match through Unwrap.
type TLSError struct {
	Code   Errno
	Reason string
}

func (e *TLSError) Error() string {
	if e.Reason == "" {
		return e.Code.Error()
	}
	return e.Code.Error() + ": " + e.Reason
}

// Unwrap returns the Errno.
func (e *TLSError) Unwrap() error { return e.Code }

// Timeout reports whether the handshake timed out (net.Error style).
func (e *TLSError) Timeout() bool { return e.Code == ETIMEDOUT }

// CertificateVerificationError is a TLS peer certificate that did not
// verify (ETLSVERIFY): an unknown issuer, an expired certificate, a host
// name that does not match, or no client certificate where one is
// required. Reason is the TLS library's words, e.g. "certificate verify
// failed: unable to get local issuer certificate (depth 0, CN=localhost)".
// It unwraps to ETLSVERIFY. (Go's crypto/tls has a type of this name from
// Go 1.20 on; this one carries text, not certificates.)
type CertificateVerificationError struct {
	Reason string
}

func (e *CertificateVerificationError) Error() string {
	if e.Reason == "" {
		return ETLSVERIFY.Error()
	}
	return ETLSVERIFY.Error() + ": " + e.Reason
}

// Unwrap returns ETLSVERIFY.
func (e *CertificateVerificationError) Unwrap() error { return ETLSVERIFY }

// tlsCause is the error for a conn that closed with code on TLS, with the
// TLS library's reason: a *CertificateVerificationError for ETLSVERIFY, a
// *TLSError for the other TLS codes or when there is a reason, else the
// Errno itself.
func tlsCause(code Errno, reason string) error {
	switch {
	case code == ETLSVERIFY:
		return &CertificateVerificationError{Reason: reason}
	case code == ETLS || code == ETLSTRUNC || code == ETLSCONFIG || reason != "":
		return &TLSError{Code: code, Reason: reason}
	}
	return code
}

// loopError is the error of a Loop operation: NewLoop, Loop.Close.
func loopError(op string, rc C.int) error {
	if rc == 0 {
		return nil
	}
	return fmt.Errorf("duplex: %s: %w", op, Errno(rc))
}
