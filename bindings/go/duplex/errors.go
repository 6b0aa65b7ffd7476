package duplex

// #include "shim.h"
import "C"

import (
	"fmt"
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
// package's do: Op is "dial", "listen", "accept", "read", "write", "close"
// or "set" (a deadline), Net the network ("tcp", "unix", ...), Source and
// Addr the local and remote addresses (the target for "dial", the bound
// address for "listen" and "accept"), and Err the cause: an Errno, or
// os.ErrDeadlineExceeded for a passed deadline, or a context's error.

// loopError is the error of a Loop operation: NewLoop, Loop.Close.
func loopError(op string, rc C.int) error {
	if rc == 0 {
		return nil
	}
	return fmt.Errorf("duplex: %s: %w", op, Errno(rc))
}
