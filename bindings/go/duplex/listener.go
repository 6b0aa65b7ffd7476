package duplex

// #include <stdlib.h>
// #include "shim.h"
import "C"

import (
	"context"
	"net"
	"runtime/cgo"
	"sync"
	"sync/atomic"
	"unsafe"
)

// A Listener accepts conns on a TCP address or a UNIX socket path. It is a
// net.Listener. Accepted conns queue (up to the backlog, WithBacklog) until
// Accept takes them; beyond that, new ones are aborted. Accepted conns start reading at once;
// what they receive waits in their Recv channel (flow control as for Dial).
//
// The Listener holds the reference duplex_listener_tcp/_unix handed out and
// drops it (duplex_listener_unref) exactly once, when it is retired: after
// Close, or when its loop is closed. Any method may be called after either.
type Listener struct {
	loop     *Loop      // registered with it; a group listener's is loop 0
	group    *LoopGroup // set by LoopGroup.Listen
	h        cgo.Handle
	cfg      config
	network  string
	addr     net.Addr
	accepted chan *Conn
	closed   chan struct{} // closed once the listener is gone

	mu       sync.Mutex
	ptr      *C.duplex_listener // our reference; nil once finished
	closing  bool
	finished bool

	// A group listener's Close: barrier posts still to run, plus one
	// held by Close until every post was made.
	barriers atomic.Int32
}

// Listen listens on network "tcp" (also "tcp4", "tcp6") at "host:port",
// where host is a numeric address, "localhost", or empty for every IPv4
// address, and port 0 picks a free port (see Addr); or on network "unix" at
// a socket path (a stale socket file is replaced, and the file is removed
// on Close). The socket is listening when Listen returns. With WithTLS
// (a server-role configuration) every conn speaks TLS: Accept returns it
// once its handshake is done, and a conn whose handshake fails is closed
// without being seen.
func (l *Loop) Listen(network, addr string, opts ...Option) (*Listener, error) {
	return listen(l, nil, network, addr, opts)
}

// listen is Loop.Listen (g nil) and LoopGroup.Listen (l is the group's
// loop 0, with which the listener registers).
func listen(l *Loop, g *LoopGroup, network, addr string, opts []Option) (*Listener, error) {
	host, port, err := splitNetworkAddr("listen", network, addr)
	if err != nil {
		return nil, err
	}
	cfg := newConfig(opts)
	chost := C.CString(host)
	defer C.free(unsafe.Pointer(chost))
	listenErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: network, Addr: makeAddr(network, addr), Err: err}
	}

	ln := &Listener{
		loop:     l,
		group:    g,
		cfg:      cfg,
		network:  network,
		accepted: make(chan *Conn, cfg.backlog),
		closed:   make(chan struct{}),
	}
	ln.h = newHandle(ln)
	// The group's lock keeps every loop of it alive, as the loop's does
	// for one loop.
	owner := &l.mu
	if g != nil {
		owner = &g.mu
	}
	owner.RLock()
	if (g == nil && l.ptr == nil) || (g != nil && g.ptr == nil) {
		owner.RUnlock()
		deleteHandle(ln.h)
		return nil, listenErr(ECLOSED)
	}
	// The loop may accept (and call back with ln.h) before this returns:
	// hold ln.mu so that it finds ptr set.
	ln.mu.Lock()
	var rc C.int
	backlog, flags, user := C.int(cfg.backlog), C.unsigned(cfg.listenFlags), C.uintptr_t(ln.h)
	rc = cfg.tls.lend(true, func(tp *C.duplex_tls) C.int {
		switch {
		case g != nil && network == "unix":
			return C.dpxgo_group_listen_unix(&ln.ptr, g.ptr, chost, backlog, flags, user, cfg.lim, tp)
		case g != nil:
			return C.dpxgo_group_listen_tcp(&ln.ptr, g.ptr, chost, port, backlog, flags, user, cfg.lim, tp)
		case network == "unix":
			return C.dpxgo_listen_unix(&ln.ptr, l.ptr, chost, backlog, flags, user, cfg.lim, tp)
		}
		return C.dpxgo_listen_tcp(&ln.ptr, l.ptr, chost, port, backlog, flags, user, cfg.lim, tp)
	})
	if rc == 0 {
		liveRefs.Add(1)
		var buf [1024]C.char
		bound := ""
		if C.duplex_listener_get_address(ln.ptr, &buf[0], C.size_t(len(buf))) == 0 {
			bound = C.GoString(&buf[0])
		}
		ln.addr = makeAddr(network, bound)
		l.lmu.Lock()
		l.listeners[ln] = struct{}{}
		l.lmu.Unlock()
	}
	ln.mu.Unlock()
	owner.RUnlock()
	if rc != 0 {
		deleteHandle(ln.h)
		return nil, listenErr(Errno(rc))
	}
	return ln, nil
}

var _ net.Listener = (*Listener)(nil)

// Addr returns the bound address, a *net.TCPAddr ("127.0.0.1:4000",
// "[::1]:4000"; after listening on port 0, with the chosen port) or a
// *net.UnixAddr (the socket path). It still answers after Close.
func (ln *Listener) Addr() net.Addr { return ln.addr }

// Accept waits for the next conn and returns it as a net.Conn (a *Conn).
// After Close it returns an error wrapping ECLOSED (errors.Is(err,
// net.ErrClosed) holds).
func (ln *Listener) Accept() (net.Conn, error) {
	c, err := ln.AcceptConn()
	if err != nil {
		return nil, err
	}
	return c, nil
}

// AcceptConn is Accept returning the *Conn.
func (ln *Listener) AcceptConn() (*Conn, error) {
	return ln.AcceptContext(context.Background())
}

// AcceptContext is AcceptConn that gives up when ctx ends.
func (ln *Listener) AcceptContext(ctx context.Context) (*Conn, error) {
	select {
	case c, ok := <-ln.accepted:
		if !ok {
			return nil, ln.opError("accept", ECLOSED)
		}
		return c, nil
	case <-ctx.Done():
		return nil, ln.opError("accept", ctx.Err())
	}
}

func (ln *Listener) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: ln.network, Addr: ln.addr, Err: err}
}

// Close stops listening and waits until the loop has closed the socket.
// Conns accepted but not yet taken by Accept are aborted; conns already
// taken are not affected. A second Close, or a Close after the loop was
// closed (which closed the listener), returns an error wrapping ECLOSED.
func (ln *Listener) Close() error {
	ln.mu.Lock()
	if ln.closing || ln.finished {
		ln.mu.Unlock()
		return ln.opError("close", ECLOSED)
	}
	ln.closing = true
	ln.mu.Unlock()
	if ln.group != nil {
		return ln.closeGroup()
	}

	ln.loop.mu.RLock()
	var rc C.int
	if ln.loop.ptr != nil {
		// Close on the loop thread: there no accept can follow, so the
		// handle can go right after (from another thread the library
		// only queues the close, and an accept could still come).
		rc = C.dpxgo_post_listener_close(ln.loop.ptr, C.uintptr_t(ln.h))
	}
	ln.loop.mu.RUnlock()
	if rc != 0 {
		ln.mu.Lock()
		ln.closing = false
		ln.mu.Unlock()
		return ln.opError("close", Errno(rc))
	}
	<-ln.closed // the loop was freed meanwhile: Loop.Close finished us
	return nil
}

// closeGroup is Close for a group listener. Its accepts run on several
// loop threads (loop 0 hands sockets to the others; with WithReusePort
// each loop accepts on its own socket), so closing on one loop thread does
// not settle them all. duplex_listener_close, from any thread, makes every
// accept and hand-off that has not checked yet drop its socket; one that
// checked before may still be opening its conn on its loop. A barrier
// posted to every loop after the close runs once each such opening has
// called back, and the last one retires the listener (and its handle).
func (ln *Listener) closeGroup() error {
	g := ln.group
	g.mu.RLock()
	if g.ptr == nil {
		g.mu.RUnlock()
		<-ln.closed // LoopGroup.Close finishes us
		return nil
	}
	// ptr stays set: only finish clears it, and it runs after the
	// barriers (not posted yet) or in LoopGroup.Close (excluded by g.mu).
	ln.mu.Lock()
	p := ln.ptr
	ln.mu.Unlock()
	C.duplex_listener_close(p)
	ln.barriers.Store(int32(len(g.cloops)) + 1) // +1: ours, until all are posted
	var rc C.int
	for _, lp := range g.cloops {
		if rc = C.dpxgo_post_listener_barrier(lp, C.uintptr_t(ln.h)); rc != 0 {
			break
		}
	}
	g.mu.RUnlock()
	if rc != 0 {
		// Not every loop got its barrier: keep the handle (a late accept
		// may still use it) until LoopGroup.Close retires the listener.
		// The sockets are closed already.
		return ln.opError("close", Errno(rc))
	}
	ln.onBarrier() // drop ours
	<-ln.closed
	return nil
}

// onBarrier runs on each loop thread of a group listener's group after its
// Close (or, with ECANCELED, in LoopGroup.Close), and once in closeGroup.
func (ln *Listener) onBarrier() {
	if ln.barriers.Add(-1) == 0 {
		ln.finish()
	}
}

// onAccept runs on the loop thread for each accepted conn (for a group
// listener, on the thread of the loop the conn opens on).
func (ln *Listener) onAccept(p *C.duplex_conn) {
	c := newConn(ln.network, ln.cfg)
	C.duplex_conn_ref(p)
	c.ptr = p
	c.h = newHandle(c)
	C.dpxgo_set_user(p, C.uintptr_t(c.h)) // later callbacks go to c
	c.onOpen(p)

	ln.mu.Lock()
	ok := !ln.closing && !ln.finished
	if ok {
		select {
		case ln.accepted <- c:
		default:
			ok = false // backlog full
		}
	}
	ln.mu.Unlock()
	if !ok {
		c.Abort() // on_close will come for c and free it
	}
}

// onClosed runs on the loop thread (status 0) or in Loop.Close (ECANCELED)
// after Close posted it.
func (ln *Listener) onClosed(status C.int) {
	ln.mu.Lock()
	if status == 0 && ln.ptr != nil {
		// On the loop thread: no accept after this. ECLOSED would mean the
		// loop let go of it already, which it does only when freed.
		C.duplex_listener_close(ln.ptr)
	}
	ln.mu.Unlock()
	ln.finish()
}

// finish retires the listener exactly once: no accept can come any more
// (it was closed on the loop thread, or the loop was freed), so our
// reference goes. The close does not drop it; the loop's own reference
// keeps the memory until the loop has let go of the socket.
func (ln *Listener) finish() {
	ln.mu.Lock()
	if ln.finished {
		ln.mu.Unlock()
		return
	}
	ln.finished = true
	if ln.ptr != nil {
		C.duplex_listener_unref(ln.ptr)
		ln.ptr = nil
		liveRefs.Add(-1)
	}
	close(ln.accepted)
	ln.mu.Unlock()
	for c := range ln.accepted {
		c.Abort()
	}
	ln.loop.lmu.Lock()
	delete(ln.loop.listeners, ln)
	if ln.cfg.tls != nil {
		// A TLS listener's accepted conns carry its handle until their
		// handshake is done (on_open), and closing the listener does not
		// end handshakes under way: their on_open or on_close may still
		// come. The handle stays until the loop (or group) is freed, when
		// no callback can come any more (see Loop.finishListeners).
		ln.loop.parked = append(ln.loop.parked, ln.h)
		ln.loop.lmu.Unlock()
	} else {
		ln.loop.lmu.Unlock()
		deleteHandle(ln.h)
	}
	close(ln.closed)
}
