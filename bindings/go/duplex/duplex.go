// Package duplex is the Go binding of libduplex: connections owned by an
// event loop running on its own thread, read through a Go channel and
// written from any goroutine.
//
//	loop, _ := duplex.NewLoop()
//	defer loop.Close()
//	conn, _ := loop.Dial(ctx, "tcp", "localhost:7000")
//	defer conn.Close()
//	for {
//		select {
//		case msg := <-outgoing:
//			conn.Write(msg)
//		case b, ok := <-conn.Recv():
//			if !ok {
//				return conn.Err() // io.EOF, or why the conn ended
//			}
//			os.Stdout.Write(b)
//		}
//	}
//
// Threading: the loop's thread (started by libduplex) runs every callback;
// the binding's callbacks copy data into Go and never block it. Every
// exported method may be called from any goroutine. See docs/go.md.
package duplex

// #include "shim.h"
import "C"

import (
	"fmt"
	"runtime/cgo"
	"sync"
	"sync/atomic"
)

// Version returns the version string of the loaded libduplex.
func Version() string { return C.GoString(C.duplex_version_string()) }

// ---- handles ---------------------------------------------------------------

// liveHandles counts cgo handles not yet deleted: each conn and listener
// owns one, deleted exactly once by its last callback.
var liveHandles atomic.Int64

// liveRefs counts the library references the binding holds on listeners
// (each dropped exactly once with duplex_listener_unref). Conns drop
// theirs in on_close, the loop's goes with duplex_loop_free.
var liveRefs atomic.Int64

func newHandle(v any) cgo.Handle {
	liveHandles.Add(1)
	return cgo.NewHandle(v)
}

func deleteHandle(h cgo.Handle) {
	h.Delete()
	liveHandles.Add(-1)
}

// ---- options ----------------------------------------------------------------

type config struct {
	recvQueue   int
	backlog     int
	listenFlags uint // DUPLEX_LISTEN_*
	lim         C.dpxgo_limits
	tls         *TLSConfig // WithTLS
	serverName  string     // WithServerName
}

func newConfig(opts []Option) config {
	cfg := config{recvQueue: 16, backlog: 128}
	for _, o := range opts {
		o(&cfg)
	}
	return cfg
}

// An Option changes how Dial and Listen set up connections.
type Option func(*config)

// WithRecvQueue sets how many received chunks (each at most the loop's
// 64 KiB read buffer) wait in Recv() before the conn stops reading from its
// socket. Default 16; at least 1.
func WithRecvQueue(n int) Option {
	return func(c *config) {
		if n < 1 {
			n = 1
		}
		c.recvQueue = n
	}
}

// WithWatermarks sets the write queue limits in bytes (0 keeps the
// library's default): high and low watermarks, and the hard limit past
// which a write waits (see Conn.WriteContext).
func WithWatermarks(high, low, hard int) Option {
	return func(c *config) {
		c.lim = C.dpxgo_limits{high: C.size_t(high), low: C.size_t(low), hard: C.size_t(hard)}
	}
}

// WithBacklog sets, for Listen, the listen backlog and how many accepted
// conns wait for Accept before newer ones are refused (default 128).
func WithBacklog(n int) Option {
	return func(c *config) {
		if n < 1 {
			n = 1
		}
		c.backlog = n
	}
}

// WithReusePort makes LoopGroup.Listen open one SO_REUSEPORT socket per
// loop of the group, each accepting onto its own loop, instead of one
// socket whose conns loop 0 hands to the least-loaded loop. The kernel
// spreads clients by a hash of their addresses, so the shares are uneven
// with few clients. Linux and TCP only: elsewhere, and for "unix", Listen
// returns an error wrapping ENOTSUP; Loop.Listen refuses it (EINVAL).
func WithReusePort() Option {
	return func(c *config) { c.listenFlags |= C.DUPLEX_LISTEN_REUSEPORT }
}

// ---- loop --------------------------------------------------------------------

// A Loop is one libduplex event loop running on a thread of its own. Every
// conn and listener belongs to one loop. Close frees it, except for the
// loops of a LoopGroup, which the group frees (see LoopGroup.Loops).
type Loop struct {
	mu    sync.RWMutex // held for reading by every use of ptr; Close writes
	ptr   *C.duplex_loop
	group *LoopGroup // the group that owns it, or nil

	lmu       sync.Mutex
	listeners map[*Listener]struct{}
	parked    []cgo.Handle // retired TLS listeners' handles, deleted once freed
}

// NewLoop creates a loop and starts its thread.
func NewLoop() (*Loop, error) {
	var p *C.duplex_loop
	if rc := C.duplex_loop_new(&p, nil); rc != 0 {
		return nil, loopError("new loop", rc)
	}
	if rc := C.duplex_loop_start(p); rc != 0 {
		C.duplex_loop_free(p)
		return nil, loopError("start loop", rc)
	}
	return &Loop{ptr: p, listeners: map[*Listener]struct{}{}}, nil
}

// Close stops the loop and closes everything on it: every conn ends (its
// Recv channel closes, Err reports ECANCELED unless it had ended before),
// pending writes are canceled, listeners close (and drop their
// references). It returns when all of that is done; later calls on the
// loop's conns and listeners return ECLOSED. A second Close returns an
// error wrapping ECLOSED.
//
// A loop of a LoopGroup is not closed by itself: while the group is open,
// Close returns an error wrapping EBUSY and changes nothing (close the
// group instead); after LoopGroup.Close it returns an error wrapping
// ECLOSED, as a second Close does.
func (l *Loop) Close() error {
	if l.group != nil {
		l.mu.RLock()
		open := l.ptr != nil
		l.mu.RUnlock()
		if !open {
			return loopError("close loop", C.int(ECLOSED))
		}
		return fmt.Errorf("duplex: close loop: it belongs to a LoopGroup (close the group): %w", EBUSY)
	}
	l.mu.Lock()
	p := l.ptr
	if p == nil {
		l.mu.Unlock()
		return loopError("close loop", C.int(ECLOSED))
	}
	// The teardown callbacks run on this goroutine's thread, inside this
	// call; none of them takes l.mu.
	rc := C.duplex_loop_free(p)
	if rc == 0 {
		l.ptr = nil
	}
	l.mu.Unlock()
	if rc != 0 {
		return loopError("close loop", rc)
	}
	l.finishListeners()
	return nil
}

// finishListeners retires the listeners registered with l once it has
// been freed.
func (l *Loop) finishListeners() {
	l.lmu.Lock()
	rest := make([]*Listener, 0, len(l.listeners))
	for ln := range l.listeners {
		rest = append(rest, ln)
	}
	l.lmu.Unlock()
	for _, ln := range rest {
		ln.finish()
	}
	// Freed: no callback can use a retired TLS listener's handle now.
	l.lmu.Lock()
	parked := l.parked
	l.parked = nil
	l.lmu.Unlock()
	for _, h := range parked {
		deleteHandle(h)
	}
}
