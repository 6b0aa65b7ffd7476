package duplex

// #include <stdlib.h>
// #include "shim.h"
import "C"

import (
	"context"
	"io"
	"net"
	"os"
	"runtime/cgo"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// A Conn is one libduplex connection (TCP or UNIX socket). It is a
// net.Conn. Incoming bytes arrive on Recv(), a channel, so reading can be a
// select case; Read reads the same stream. Every method may be called from
// any goroutine at any time, also after the conn has ended (calls that
// need it then return an error wrapping ECLOSED, which matches
// net.ErrClosed).
type Conn struct {
	life sync.RWMutex   // read-held around every C call through ptr
	ptr  *C.duplex_conn // our reference; nil once the conn has closed

	h       cgo.Handle
	network string // as given to Dial or Listen
	recv    chan []byte
	open    chan struct{} // closed by on_open
	done    chan struct{} // closed by on_close
	quit    chan struct{} // closed by Close/Abort: stop delivering reads
	stop    sync.Once

	mu          sync.Mutex
	pending     [][]byte // chunks that did not fit in recv; reading is paused
	flushing    bool     // a goroutine is delivering pending
	ended       bool     // EOF or closed: recv closes once pending is out
	recvClosed  bool
	opened      bool
	readErr     error                  // why recv closed
	reason      Errno                  // why the conn closed (0: asked for, or finished)
	writable    chan struct{}          // closed and replaced at each on_writable
	roomWaits   map[*roomWait]struct{} // writers waiting for room (WriteContext)
	roomWaiting bool                   // the room waiter runs (waitRoom)
	laddr       net.Addr               // set by on_open
	raddr       net.Addr
	tls         bool     // speaks TLS (or an upgrade was asked for)
	tlsInfo     *TLSInfo // what the handshake negotiated, once done
	tlsReason   string   // the TLS library's words when TLS failed

	rmu  sync.Mutex // Read's leftover
	rbuf []byte

	rdl, wdl *deadline // SetReadDeadline, SetWriteDeadline
}

var _ net.Conn = (*Conn)(nil)

func newConn(network string, cfg config) *Conn {
	return &Conn{
		network:  network,
		recv:     make(chan []byte, cfg.recvQueue),
		open:     make(chan struct{}),
		done:     make(chan struct{}),
		quit:     make(chan struct{}),
		writable: make(chan struct{}),
		rdl:      newDeadline(),
		wdl:      newDeadline(),
		tls:      cfg.tls != nil,
	}
}

// opError is the *net.OpError of a failed operation on c.
func (c *Conn) opError(op string, err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.opErrorLocked(op, err)
}

func (c *Conn) opErrorLocked(op string, err error) error {
	return &net.OpError{Op: op, Net: c.network, Source: c.laddr, Addr: c.raddr, Err: err}
}

// causeLocked is why the conn closed: its Errno, or for a TLS failure the
// error carrying the TLS library's reason (see tlsCause).
func (c *Conn) causeLocked() error {
	if c.tls {
		return tlsCause(c.reason, c.tlsReason)
	}
	return c.reason
}

// codeError is opError for a C return code; nil for 0.
func (c *Conn) codeError(op string, rc C.int) error {
	if rc == 0 {
		return nil
	}
	return c.opError(op, Errno(rc))
}

func splitHostPort(addr string) (string, C.uint16_t, error) {
	host, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil {
		return "", 0, &net.AddrError{Err: "invalid port", Addr: addr}
	}
	return host, C.uint16_t(port), nil
}

// splitNetworkAddr maps (network, addr) to the C library's host and port:
// "host:port" for the tcp networks, the socket path (port 0) for "unix".
func splitNetworkAddr(op, network, addr string) (string, C.uint16_t, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
		host, port, err := splitHostPort(addr)
		if err != nil {
			return "", 0, &net.OpError{Op: op, Net: network, Err: err}
		}
		return host, port, nil
	case "unix":
		return addr, 0, nil
	}
	return "", 0, &net.OpError{Op: op, Net: network, Err: net.UnknownNetworkError(network)}
}

// Dial connects to addr: network "tcp" (also "tcp4", "tcp6") with
// "host:port", where host is a name or an address that libduplex resolves
// without blocking its loop, or "unix" with a socket path. It returns once
// the conn is open, or a *net.OpError (Op "dial") with the reason it could
// not open (an Errno such as ECONNREFUSED or EAI_NONAME), or with ctx's
// error if ctx ends first.
//
// With WithTLS the conn speaks TLS: Dial returns once the handshake is
// done, and a failed handshake is the dial error (a
// *CertificateVerificationError when the server's certificate does not
// verify, a *TLSError otherwise).
func (l *Loop) Dial(ctx context.Context, network, addr string, opts ...Option) (*Conn, error) {
	dialErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: network, Addr: makeAddr(network, addr), Err: err}
	}
	if err := ctx.Err(); err != nil {
		return nil, dialErr(err)
	}
	host, port, err := splitNetworkAddr("dial", network, addr)
	if err != nil {
		return nil, err
	}
	cfg := newConfig(opts)
	c := newConn(network, cfg)
	chost := C.CString(host)
	defer C.free(unsafe.Pointer(chost))
	var ctlsHost *C.char
	if cfg.serverName != "" {
		ctlsHost = C.CString(cfg.serverName)
		defer C.free(unsafe.Pointer(ctlsHost))
	}
	c.h = newHandle(c)

	l.mu.RLock()
	if l.ptr == nil {
		l.mu.RUnlock()
		deleteHandle(c.h)
		return nil, dialErr(ECLOSED)
	}
	// Hold life so that on_close (which may come at once, e.g. for a name
	// that does not resolve) sees ptr set; connecting never waits for the
	// loop, so the loop thread waits here only briefly.
	c.life.Lock()
	rc := cfg.tls.lend(false, func(tp *C.duplex_tls) C.int {
		if network == "unix" {
			return C.dpxgo_connect_unix(&c.ptr, l.ptr, chost, C.uintptr_t(c.h), cfg.lim, tp, ctlsHost)
		}
		return C.dpxgo_connect_tcp(&c.ptr, l.ptr, chost, port, C.uintptr_t(c.h), cfg.lim, tp, ctlsHost)
	})
	c.life.Unlock()
	l.mu.RUnlock()
	if rc != 0 {
		deleteHandle(c.h) // no callback will come
		return nil, dialErr(Errno(rc))
	}
	select {
	case <-c.open:
		return c, nil
	case <-c.done:
		c.mu.Lock()
		var err error = ECLOSED
		if c.reason != 0 {
			err = c.causeLocked()
		}
		c.mu.Unlock()
		return nil, dialErr(err)
	case <-ctx.Done():
		c.Abort()
		<-c.done
		return nil, dialErr(ctx.Err())
	}
}

// DialUnix connects to the UNIX-domain socket at path.
func (l *Loop) DialUnix(ctx context.Context, path string, opts ...Option) (*Conn, error) {
	return l.Dial(ctx, "unix", path, opts...)
}

// DialFunc returns Dial with opts as a function of the shape the standard
// library's dial hooks take, for example
//
//	client := &http.Client{Transport: &http.Transport{DialContext: loop.DialFunc()}}
//
// It returns a nil net.Conn (not a nil *Conn) with an error.
func (l *Loop) DialFunc(opts ...Option) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := l.Dial(ctx, network, addr, opts...)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// Recv returns the channel on which received bytes arrive, one chunk per
// receive, in order; each chunk is the receiver's own copy. The channel is
// closed when the peer finished sending (Err returns io.EOF) or the conn
// ended (Err says why). If the chunks are not taken, the conn stops reading
// from the socket once the channel is full, and goes on when there is room
// again: memory stays bounded and the peer's sends are held back by TCP.
func (c *Conn) Recv() <-chan []byte { return c.recv }

// Err returns nil while Recv is open. Once it is closed: io.EOF if the
// peer finished sending, an error matching net.ErrClosed (wrapping
// ECLOSED) if the conn was closed on this side first (Close or Abort), or
// the error that ended it (a *net.OpError, Op "read", wrapping the Errno:
// ECONNRESET, ECANCELED when the loop was closed, ...).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.recvClosed {
		return nil
	}
	return c.readErr
}

// Done returns a channel closed when the conn has closed completely: by
// Close or Abort, by an error, when the loop was closed, or once both sides
// have finished (CloseWrite was flushed and the peer's EOF arrived).
func (c *Conn) Done() <-chan struct{} { return c.done }

// CloseErr returns, once Done is closed, nil if the conn was closed with
// Close or finished normally, an error wrapping ECONNABORTED after Abort
// (the library's close reason for an abort), or else the error that closed
// it (a *net.OpError, Op "close").
func (c *Conn) CloseErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reason == 0 {
		return nil
	}
	return c.opErrorLocked("close", c.causeLocked())
}

// LocalAddr returns the conn's own address: a *net.TCPAddr, or a
// *net.UnixAddr (with an empty Name for an unnamed end, such as a UNIX
// client). It still answers after the conn has closed.
func (c *Conn) LocalAddr() net.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.laddr
}

// RemoteAddr returns the peer's address: a *net.TCPAddr, or a
// *net.UnixAddr (the path a UNIX client dialled, or an empty Name for an
// unnamed peer). It still answers after the conn has closed.
func (c *Conn) RemoteAddr() net.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.raddr
}

// Read reads from the same stream as Recv (io.Reader, net.Conn). Use
// either Read or Recv on one conn, not both. It returns io.EOF after the
// peer's EOF; an error matching net.ErrClosed once Close or Abort was
// called, also if bytes were still waiting; and an error matching
// os.ErrDeadlineExceeded (a net.Error whose Timeout is true) once the read
// deadline has passed, also while Read waits. A Read that fails on its
// deadline takes no bytes: after SetReadDeadline moves the deadline, Read
// goes on where the stream was.
func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if isClosed(c.quit) {
		return 0, c.opError("read", ECLOSED)
	}
	dl := c.rdl.done()
	if isClosed(dl) {
		return 0, c.opError("read", os.ErrDeadlineExceeded)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if len(c.rbuf) == 0 {
		select {
		case b, ok := <-c.recv:
			if !ok {
				return 0, c.Err()
			}
			c.rbuf = b
		case <-c.quit:
			return 0, c.opError("read", ECLOSED)
		case <-dl:
			return 0, c.opError("read", os.ErrDeadlineExceeded)
		}
	}
	n := copy(p, c.rbuf)
	c.rbuf = c.rbuf[n:]
	return n, nil
}

// SetDeadline sets the read and write deadlines (net.Conn): once the time
// has passed, Read, Write and WriteContext fail with an error matching
// os.ErrDeadlineExceeded, also calls that are waiting at that moment. A
// zero t means no deadline. Moving a deadline later lets calls wait again;
// the conn itself is not closed by a deadline. After Close it returns an
// error matching net.ErrClosed.
func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.checkOpen(); err != nil {
		return err
	}
	c.rdl.set(t)
	c.wdl.set(t)
	return nil
}

// SetReadDeadline sets the deadline for Read (see SetDeadline). It does not
// concern Recv, which is a channel: select on a timer instead.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if err := c.checkOpen(); err != nil {
		return err
	}
	c.rdl.set(t)
	return nil
}

// SetWriteDeadline sets the deadline for Write and WriteContext (see
// SetDeadline): a write waiting for room in the queue gives up then, and
// nothing of it was queued.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	if err := c.checkOpen(); err != nil {
		return err
	}
	c.wdl.set(t)
	return nil
}

// checkOpen returns an error once Close or Abort was called or the conn
// has closed.
func (c *Conn) checkOpen() error {
	if isClosed(c.quit) || isClosed(c.done) {
		return c.opError("set", ECLOSED)
	}
	return nil
}

// call runs f with our reference, or returns ECLOSED once the conn closed.
func (c *Conn) call(f func(p *C.duplex_conn) C.int) C.int {
	c.life.RLock()
	defer c.life.RUnlock()
	if c.ptr == nil {
		return C.int(ECLOSED)
	}
	return f(c.ptr)
}

// Write queues b whole (it is copied before Write returns) and returns
// len(b). It is WriteContext without a context: when the write queue is
// past its hard limit it waits until there is room, the write deadline
// passes or the conn is closed.
func (c *Conn) Write(b []byte) (int, error) {
	return c.WriteContext(context.Background(), b)
}

// WriteContext queues b as one write: it is copied, never split, and
// reaches the wire after every write this goroutine made before (writes of
// different goroutines interleave only at write boundaries). If the queue
// is past its hard limit (backpressure: the peer reads more slowly than we
// write), it waits until the queue drains, ctx ends or the write deadline
// (SetWriteDeadline) passes; then it returns 0 and an error wrapping
// ctx.Err() or os.ErrDeadlineExceeded, and nothing of b was queued. Once
// Close or Abort was called it returns an error matching net.ErrClosed.
func (c *Conn) WriteContext(ctx context.Context, b []byte) (int, error) {
	for {
		if isClosed(c.quit) {
			return 0, c.opError("write", ECLOSED)
		}
		dl := c.wdl.done()
		if isClosed(dl) {
			return 0, c.opError("write", os.ErrDeadlineExceeded)
		}
		if err := ctx.Err(); err != nil {
			return 0, c.opError("write", err)
		}
		c.mu.Lock()
		writable := c.writable
		c.mu.Unlock()
		rc := c.call(func(p *C.duplex_conn) C.int {
			var data unsafe.Pointer
			if len(b) > 0 {
				data = unsafe.Pointer(&b[0]) // borrowed for the call only
			}
			return C.duplex_conn_write(p, data, C.size_t(len(b)), nil, nil)
		})
		if rc == 0 {
			return len(b), nil
		}
		if Errno(rc) != EWOULDBLOCK {
			return 0, c.codeError("write", rc)
		}
		// Wait for room: duplex_conn_wait_room, on the conn's room waiter
		// (see waitRoom), tells when a write of this size fits; the
		// refusal also marks the conn congested, so on_writable comes once
		// the queue is back at the low watermark. Whichever is first.
		w := &roomWait{need: len(b), wake: make(chan struct{})}
		c.addRoomWait(w)
		select {
		case <-w.wake:
		case <-writable:
		case <-c.done:
		case <-c.quit:
		case <-dl:
		case <-ctx.Done():
		}
		c.mu.Lock()
		delete(c.roomWaits, w)
		rc = w.rc
		c.mu.Unlock()
		if rc != 0 && Errno(rc) != ECLOSED { // ECLOSED: the retry says so
			return 0, c.codeError("write", rc)
		}
	}
}

// A roomWait is a writer waiting for room for need bytes. The room waiter
// sets rc (under c.mu) and closes wake.
type roomWait struct {
	need int
	wake chan struct{}
	rc   C.int // 0: the write may fit now; else why the wait ended
}

// roomSlice bounds each duplex_conn_wait_room call of the room waiter, in
// milliseconds: between calls it picks up writers that came or went, and
// it ends this long at most after the last writer stopped waiting.
const roomSlice = 100

// liveRoomWaiters counts room waiters running (each holds a reference).
var liveRoomWaiters atomic.Int64

// addRoomWait registers w and starts the conn's room waiter if none runs.
func (c *Conn) addRoomWait(w *roomWait) {
	c.mu.Lock()
	if c.roomWaits == nil {
		c.roomWaits = map[*roomWait]struct{}{}
	}
	c.roomWaits[w] = struct{}{}
	start := !c.roomWaiting
	c.roomWaiting = true
	c.mu.Unlock()
	if start {
		liveRoomWaiters.Add(1)
		go c.waitRoom()
	}
}

// waitRoom is the conn's room waiter: one goroutine per conn, running
// while writers wait for room. duplex_conn_wait_room blocks its thread (a
// cgo call), so the conn's writers share it, however many they are: it
// waits for the smallest of their writes to fit, then wakes them all to
// retry (a bigger write that still does not fit waits again). It holds a
// conn reference of its own and not c.life, so on_close never waits for
// it; a close ends its wait at once (ECLOSED).
func (c *Conn) waitRoom() {
	defer liveRoomWaiters.Add(-1)
	rc := C.int(ECLOSED)
	c.life.RLock()
	p := c.ptr
	if p != nil {
		C.duplex_conn_ref(p)
	}
	c.life.RUnlock()
	if p != nil {
		defer C.duplex_conn_unref(p)
	}
	for {
		c.mu.Lock()
		if len(c.roomWaits) == 0 {
			c.roomWaiting = false
			c.mu.Unlock()
			return
		}
		need := -1
		for w := range c.roomWaits {
			if need < 0 || w.need < need {
				need = w.need
			}
		}
		c.mu.Unlock()
		if p != nil {
			rc = C.duplex_conn_wait_room(p, C.size_t(need), roomSlice)
		}
		if Errno(rc) == ETIMEDOUT {
			continue
		}
		// Room (0): every waiting writer retries. Closed or failed: they
		// learn why, and no later writer needs this waiter.
		c.mu.Lock()
		for w := range c.roomWaits {
			w.rc = rc
			close(w.wake)
			delete(c.roomWaits, w)
		}
		if rc != 0 {
			c.roomWaiting = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
	}
}

// CloseWrite half-closes: once every write queued before it is flushed,
// the write side is shut down and the peer sees EOF. Receiving goes on
// until the peer's EOF. Later writes fail with ESHUTDOWN.
func (c *Conn) CloseWrite() error {
	return c.codeError("close", c.call(func(p *C.duplex_conn) C.int {
		return C.duplex_conn_shutdown(p, nil, nil)
	}))
}

// Close closes the conn after flushing the writes queued before it. It does
// not wait: Done is closed when the conn has closed (against a peer that
// never reads, the flush never ends: use Abort). Reading stops: Read,
// Write and WriteContext, also waiting ones, return an error matching
// net.ErrClosed; chunks already in Recv can still be taken, later ones are
// dropped, and Recv closes once the conn has closed. A second Close
// returns an error wrapping ECLOSED.
func (c *Conn) Close() error {
	c.stopReading()
	return c.codeError("close", c.call(func(p *C.duplex_conn) C.int {
		return C.duplex_conn_close(p, C.DUPLEX_CLOSE_GRACEFUL)
	}))
}

// Abort closes the conn now: pending writes are discarded, a TCP peer sees
// a reset (ECONNRESET, not EOF), and CloseErr reports ECONNABORTED. Calls
// fail as after Close.
func (c *Conn) Abort() error {
	c.stopReading()
	return c.codeError("close", c.call(func(p *C.duplex_conn) C.int {
		return C.duplex_conn_close(p, C.DUPLEX_CLOSE_ABORT)
	}))
}

func (c *Conn) stopReading() {
	c.stop.Do(func() { close(c.quit) })
}

// ---- from the loop thread ---------------------------------------------------

// The callbacks below run on the loop thread and must not block: they copy,
// do non-blocking channel operations and take mutexes that are only ever
// held briefly.

// onOpen learns both addresses. On the loop thread neither call waits.
func (c *Conn) onOpen(p *C.duplex_conn) {
	var buf [1024]C.char
	c.mu.Lock()
	peer, local := "", ""
	if C.duplex_conn_get_peer(p, &buf[0], C.size_t(len(buf))) == 0 {
		peer = C.GoString(&buf[0])
	}
	if C.duplex_conn_get_local(p, &buf[0], C.size_t(len(buf))) == 0 {
		local = C.GoString(&buf[0])
	}
	c.raddr = makeAddr(c.network, peer)
	c.laddr = makeAddr(c.network, local)
	if c.tls && c.tlsInfo == nil {
		c.tlsInfo = readTLSInfo(p)
	}
	if !c.opened {
		c.opened = true
		close(c.open)
	}
	c.mu.Unlock()
}

func (c *Conn) onRead(p *C.duplex_conn, b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended || isClosed(c.quit) {
		return // Close asked not to deliver any more
	}
	if !c.flushing {
		select {
		case c.recv <- b:
			return
		default:
		}
		// recv is full: keep this chunk, stop reading (on the loop thread
		// this takes effect at once), and let a goroutine deliver it and
		// resume once the receiver has made room.
		c.flushing = true
		go c.flush()
	}
	c.pending = append(c.pending, b)
	C.duplex_conn_pause(p)
}

// flush delivers pending chunks in order, then resumes reading.
func (c *Conn) flush() {
	for {
		c.mu.Lock()
		if len(c.pending) == 0 || isClosed(c.quit) {
			c.pending = nil
			c.flushing = false
			c.closeRecvLocked()
			resume := !c.ended && !isClosed(c.quit)
			c.mu.Unlock()
			if resume {
				c.call(func(p *C.duplex_conn) C.int { return C.duplex_conn_resume(p) })
			}
			return
		}
		b := c.pending[0]
		c.mu.Unlock()
		select {
		case c.recv <- b:
		case <-c.quit:
		}
		c.mu.Lock()
		c.pending = c.pending[1:]
		c.mu.Unlock()
	}
}

// closeRecvLocked closes recv once the conn has ended and nothing waits to
// be delivered.
func (c *Conn) closeRecvLocked() {
	if c.ended && !c.flushing && !c.recvClosed {
		c.recvClosed = true
		close(c.recv)
	}
}

func (c *Conn) onEOF() {
	c.mu.Lock()
	if !c.ended {
		c.ended = true
		c.readErr = io.EOF
		c.closeRecvLocked()
	}
	c.mu.Unlock()
}

func (c *Conn) onWritable() {
	c.mu.Lock()
	close(c.writable)
	c.writable = make(chan struct{})
	c.mu.Unlock()
}

func (c *Conn) onClose(p *C.duplex_conn, reason C.int) {
	c.mu.Lock()
	c.reason = Errno(reason)
	if c.tls && reason != 0 {
		c.tlsReason = readTLSError(p)
	}
	if !c.ended {
		c.ended = true
		// Closed on this side: by Close (reason 0) or Abort (ECONNABORTED).
		local := reason == 0 || (c.reason == ECONNABORTED && isClosed(c.quit))
		if local {
			c.readErr = c.opErrorLocked("read", ECLOSED)
		} else {
			c.readErr = c.opErrorLocked("read", c.causeLocked())
		}
		c.closeRecvLocked()
	}
	c.mu.Unlock()

	// Drop our reference; later calls return ECLOSED. Memory goes after
	// this callback returns at the earliest.
	c.life.Lock()
	if c.ptr != nil {
		C.duplex_conn_unref(c.ptr)
		c.ptr = nil
	}
	c.life.Unlock()
	close(c.done)
	deleteHandle(c.h) // on_close is the last callback with this handle
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
