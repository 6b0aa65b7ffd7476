package duplex

// #include "shim.h"
import "C"

import (
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
)

// Error returns the library's message for the code (duplex_strerror).
func (e Errno) Error() string { return C.GoString(C.duplex_strerror(C.int(e))) }

// Name returns the symbolic name, e.g. "DUPLEX_ECLOSED" (duplex_err_name).
func (e Errno) Name() string { return C.GoString(C.duplex_err_name(C.int(e))) }

// Is lets errors.Is match the standard library's sentinels: ECLOSED is
// net.ErrClosed, ETIMEDOUT is os.ErrDeadlineExceeded, and on Unix a system
// code is its syscall.Errno (ECONNREFUSED is syscall.ECONNREFUSED, EDEADLK
// is syscall.EDEADLK, ...).
func (e Errno) Is(target error) bool {
	switch target {
	case net.ErrClosed:
		return e == ECLOSED
	case os.ErrDeadlineExceeded:
		return e == ETIMEDOUT
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

// Timeout reports whether the code is ETIMEDOUT (net.Error style).
func (e Errno) Timeout() bool { return e == ETIMEDOUT }

// OpError says which operation failed, on what address, and why. Err is an
// Errno for library failures, or a context error for a canceled wait.
type OpError struct {
	Op   string // "dial", "listen", "write", "close write", "close", ...
	Addr string // the address dialled or listened on, when there is one
	Err  error
}

func (e *OpError) Error() string {
	s := "duplex: " + e.Op
	if e.Addr != "" {
		s += " " + e.Addr
	}
	return s + ": " + e.Err.Error()
}

func (e *OpError) Unwrap() error { return e.Err }

func opErr(op, addr string, rc C.int) error {
	if rc == 0 {
		return nil
	}
	return &OpError{Op: op, Addr: addr, Err: Errno(rc)}
}
