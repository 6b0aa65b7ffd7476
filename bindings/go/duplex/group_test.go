package duplex_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/libduplex/libduplex/bindings/go/duplex"
)

// newGroup starts a group of n loops that the test's cleanup closes (if
// the test did not), checking then that every handle, listener reference
// and room waiter is gone. Loops a test makes besides must be closed by a
// cleanup registered after this one (cleanups run last-in first-out).
func newGroup(t *testing.T, n int, opts ...duplex.GroupOption) *duplex.LoopGroup {
	t.Helper()
	g, err := duplex.NewLoopGroup(n, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil && !errors.Is(err, duplex.ECLOSED) {
			t.Errorf("group close: %v", err)
		}
		checkNothingLive(t, "LoopGroup.Close")
	})
	return g
}

func checkNothingLive(t *testing.T, after string) {
	t.Helper()
	if n := duplex.LiveHandles(); n != 0 {
		t.Errorf("%d cgo handles live after %s", n, after)
	}
	if n := duplex.LiveRefs(); n != 0 {
		t.Errorf("%d listener references held after %s", n, after)
	}
	if !roomWaitersGone() {
		t.Errorf("%d room waiters still run after %s", duplex.LiveRoomWaiters(), after)
	}
}

// clientLoop is a loop of its own for the clients of a group's server; it
// is closed before newGroup's cleanup checks.
func clientLoop(t *testing.T) *duplex.Loop {
	t.Helper()
	loop, err := duplex.NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loop.Close() })
	return loop
}

// serveEcho accepts until ln closes; each conn sends back what it receives
// and half-closes at the peer's EOF. accepted gets each conn.
func serveEcho(ln *duplex.Listener, accepted chan<- *duplex.Conn) {
	for {
		c, err := ln.AcceptConn()
		if err != nil {
			return
		}
		if accepted != nil {
			accepted <- c
		}
		go func() {
			for b := range c.Recv() {
				if _, err := c.Write(b); err != nil {
					return
				}
			}
			c.CloseWrite()
		}()
	}
}

// echoOnce sends msg over c, half-closes and reads back everything.
func echoOnce(c *duplex.Conn, msg string) error {
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	if err := c.CloseWrite(); err != nil {
		return err
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(got) != msg {
		return fmt.Errorf("echoed %q, sent %q", got, msg)
	}
	return nil
}

// spread checks that the figures of the loops are within one of each
// other and add up to total.
func spread(t *testing.T, what string, figs []int64, total int64) {
	t.Helper()
	lo, hi, sum := figs[0], figs[0], int64(0)
	for _, n := range figs {
		if n < lo {
			lo = n
		}
		if n > hi {
			hi = n
		}
		sum += n
	}
	if sum != total || hi-lo > 1 {
		t.Fatalf("%s per loop %v: sum %d (want %d), spread %d (want at most 1)", what, figs, sum, total, hi-lo)
	}
}

func groupFigures(t *testing.T, g *duplex.LoopGroup) (conns, accepted []int64) {
	t.Helper()
	st, err := g.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st {
		conns = append(conns, int64(s.Conns))
		accepted = append(accepted, s.Accepted)
	}
	return conns, accepted
}

// 30 clients over a group listener on 3 loops: the conns spread evenly
// (each loop's share, from Stats, within one of the others) and every conn
// is echoed.
func TestGroupListenerSpreadsConnsAndEchoes(t *testing.T) {
	const loops, clients = 3, 30
	g := newGroup(t, loops)
	if n := len(g.Loops()); n != loops {
		t.Fatalf("%d loops, want %d", n, loops)
	}
	ln, err := g.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan *duplex.Conn, clients)
	go serveEcho(ln, accepted)
	cl := clientLoop(t)

	conns := make([]*duplex.Conn, clients)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range conns {
		wg.Add(1)
		go func(i int) { // a burst: the dials race each other
			defer wg.Done()
			c, err := cl.Dial(context.Background(), "tcp", ln.Addr().String())
			conns[i] = c
			if err != nil {
				errs <- err
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i := 0; i < clients; i++ {
		select {
		case <-accepted:
		case <-time.After(10 * time.Second):
			t.Fatalf("accepted %d of %d conns", i, clients)
		}
	}
	live, acc := groupFigures(t, g)
	spread(t, "accepted", acc, clients)
	spread(t, "live conns", live, clients)
	for i, l := range g.Loops() { // the same figures through each Loop
		st, err := l.Stats()
		if err != nil || st.Accepted != acc[i] {
			t.Fatalf("loop %d: Stats %+v, %v; group Stats said %d accepted", i, st, err, acc[i])
		}
	}

	errs = make(chan error, clients)
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c *duplex.Conn) {
			defer wg.Done()
			if err := echoOnce(c, fmt.Sprintf("client %d says hello", i)); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
			}
			<-c.Done()
		}(i, c)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	// Every conn finished on both sides: the loops' live counts go to 0,
	// the accepted totals stay.
	waitNoLiveConns(t, g)
	_, acc = groupFigures(t, g)
	spread(t, "accepted", acc, clients)
}

// waitNoLiveConns waits (up to 5 s) until no loop of g has a live conn: a
// conn counts until its on_close has returned, a moment after Done.
func waitNoLiveConns(t *testing.T, g *duplex.LoopGroup) {
	t.Helper()
	for i := 0; ; i++ {
		live, _ := groupFigures(t, g)
		if sum(live) == 0 {
			return
		}
		if i == 500 {
			t.Fatalf("live conns per loop %v after every conn finished", live)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func sum(v []int64) (s int64) {
	for _, n := range v {
		s += n
	}
	return s
}

// Dialling through Pick places each conn on the least-loaded loop: 30
// sequential dials from a group of 3 give 10 conns per loop.
func TestGroupPickSpreadsDials(t *testing.T) {
	const loops, clients = 3, 30
	g := newGroup(t, loops)
	srv := clientLoop(t) // the server, on a loop of its own
	ln, err := srv.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go serveEcho(ln, nil)

	member := map[*duplex.Loop]int{}
	for i, l := range g.Loops() {
		member[l] = i
	}
	var conns []*duplex.Conn
	for i := 0; i < clients; i++ {
		var c *duplex.Conn
		if i%2 == 0 {
			l := g.Pick()
			if _, ok := member[l]; !ok {
				t.Fatal("Pick returned a loop that is not one of Loops()")
			}
			c, err = l.Dial(context.Background(), "tcp", ln.Addr().String())
		} else {
			c, err = g.Dial(context.Background(), "tcp", ln.Addr().String()) // Pick().Dial
		}
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	live, _ := groupFigures(t, g)
	spread(t, "live conns", live, clients)
	for i, c := range conns {
		if err := echoOnce(c, fmt.Sprintf("dial %d", i)); err != nil {
			t.Fatal(err)
		}
		<-c.Done()
	}
	waitNoLiveConns(t, g)
	ln.Close()
}

// Closing the group with live conns whose writers wait at the hard limit
// (the peers never read) returns, every Write returns an error matching
// net.ErrClosed, every conn ends, and nothing is left.
func TestGroupCloseWithLiveConnsAndPendingWrites(t *testing.T) {
	const loops, clients, writers = 3, 6, 3
	g := newGroup(t, loops)
	ln, err := g.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var servers []*duplex.Conn // accepted, never read
	lim := duplex.WithWatermarks(16<<10, 4<<10, 64<<10)
	var conns []*duplex.Conn
	for i := 0; i < clients; i++ { // clients on the group too
		c, err := g.Dial(context.Background(), "tcp", ln.Addr().String(), lim)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		s, err := ln.AcceptConn()
		if err != nil {
			t.Fatal(err)
		}
		servers = append(servers, s)
	}
	var wg sync.WaitGroup
	errs := make(chan error, clients*writers)
	for _, c := range conns {
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func(c *duplex.Conn) {
				defer wg.Done()
				chunk := make([]byte, 32<<10)
				for {
					if _, err := c.Write(chunk); err != nil {
						errs <- err
						return
					}
				}
			}(c)
		}
	}
	// Wait until every client conn has writers waiting for room.
	for i := 0; ; i++ {
		waiting := 0
		for _, c := range conns {
			if running, n := c.RoomWaiting(); running && n > 0 {
				waiting++
			}
		}
		if waiting == clients {
			break
		}
		if i == 1000 {
			t.Fatalf("only %d of %d conns have writers waiting", waiting, clients)
		}
		time.Sleep(10 * time.Millisecond)
	}
	st, err := g.Stats()
	if err != nil {
		t.Fatal(err)
	}
	var queued int64
	for _, s := range st {
		queued += s.Queued
	}
	if queued == 0 {
		t.Fatalf("nothing queued with every writer waiting: %+v", st)
	}

	closed := make(chan error, 1)
	go func() { closed <- g.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("LoopGroup.Close hangs with live conns and pending writes")
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("writers still blocked after LoopGroup.Close")
	}
	close(errs)
	n := 0
	for err := range errs {
		n++
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("writer after LoopGroup.Close: %v", err)
		}
	}
	if n != clients*writers {
		t.Fatalf("%d writers returned, want %d", n, clients*writers)
	}
	// Each conn ends with ECANCELED, or with the reset its peer's end
	// (on a loop of the same group, freed first) sent meanwhile.
	for _, c := range append(conns, servers...) {
		<-c.Done()
		if err := c.CloseErr(); !errors.Is(err, duplex.ECANCELED) &&
			!errors.Is(err, duplex.ECONNRESET) && !errors.Is(err, duplex.EPIPE) {
			t.Fatalf("CloseErr after LoopGroup.Close: %v", err)
		}
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after LoopGroup.Close: %v", err)
	}
	checkNothingLive(t, "LoopGroup.Close")
}

// After Close every call on the group, its loops, listeners and conns
// returns an error (matching net.ErrClosed), and nothing panics.
func TestGroupUseAfterClose(t *testing.T) {
	g, err := duplex.NewLoopGroup(2)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := g.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	go serveEcho(ln, nil)
	c, err := g.Dial(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	single, err := g.Loops()[1].Listen("tcp", "127.0.0.1:0") // one loop's own listener
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	closedErr := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, net.ErrClosed) || !errors.Is(err, duplex.ECLOSED) {
			t.Fatalf("%s after LoopGroup.Close: %v", what, err)
		}
	}
	closedErr("second Close", g.Close())
	_, err = g.Listen("tcp", "127.0.0.1:0")
	closedErr("Listen", err)
	_, err = g.Stats()
	closedErr("Stats", err)
	p := g.Pick()
	if p == nil {
		t.Fatal("Pick after Close returned nil")
	}
	_, err = p.Dial(context.Background(), "tcp", addr)
	closedErr("Pick().Dial", err)
	_, err = g.Dial(context.Background(), "tcp", addr)
	closedErr("Dial", err)
	_, err = g.DialFunc()(context.Background(), "tcp", addr)
	closedErr("DialFunc", err)
	for i, l := range g.Loops() {
		_, err = l.Stats()
		closedErr(fmt.Sprintf("loop %d Stats", i), err)
		closedErr(fmt.Sprintf("loop %d Close", i), l.Close())
		_, err = l.Listen("tcp", "127.0.0.1:0")
		closedErr(fmt.Sprintf("loop %d Listen", i), err)
	}
	for _, l := range []*duplex.Listener{ln, single} {
		_, err = l.Accept()
		closedErr("Accept", err)
		closedErr("Listener.Close", l.Close())
		if l.Addr() == nil {
			t.Fatal("Addr after LoopGroup.Close is nil")
		}
	}
	_, err = c.Write([]byte("x"))
	closedErr("Write", err)
	<-c.Done()
	if err := c.CloseErr(); !errors.Is(err, duplex.ECANCELED) {
		t.Fatalf("CloseErr: %v", err)
	}
	checkNothingLive(t, "LoopGroup.Close")
}

// Loop.Close on a loop of a group is refused (EBUSY) and the loop goes on
// serving.
func TestGroupLoopCloseIsRefused(t *testing.T) {
	g := newGroup(t, 2)
	l := g.Loops()[0]
	if err := l.Close(); !errors.Is(err, duplex.EBUSY) {
		t.Fatalf("Loop.Close on a group's loop: %v", err)
	}
	ln, err := l.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go serveEcho(ln, nil)
	c, err := g.Loops()[1].Dial(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := echoOnce(c, "still serving"); err != nil {
		t.Fatal(err)
	}
	// ln stays open: LoopGroup.Close retires it.
}

func TestNewLoopGroupArguments(t *testing.T) {
	if _, err := duplex.NewLoopGroup(-1); !errors.Is(err, duplex.EINVAL) {
		t.Fatalf("NewLoopGroup(-1): %v", err)
	}
	if _, err := duplex.NewLoopGroup(1025); !errors.Is(err, duplex.EINVAL) {
		t.Fatalf("NewLoopGroup(1025): %v", err)
	}
	g := newGroup(t, 0)
	if runtime.GOOS == "linux" {
		// Both count the CPUs of the process's affinity mask.
		if n := len(g.Loops()); n != runtime.NumCPU() {
			t.Fatalf("NewLoopGroup(0) has %d loops, NumCPU is %d", n, runtime.NumCPU())
		}
	}
	g.Close()
	pinned, err := duplex.NewLoopGroup(2, duplex.WithCPUPinning())
	if runtime.GOOS != "linux" {
		if !errors.Is(err, duplex.ENOTSUP) {
			t.Fatalf("pinning off Linux: %v", err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	ln, err := pinned.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go serveEcho(ln, nil)
	c, err := pinned.Dial(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := echoOnce(c, "pinned"); err != nil {
		t.Fatal(err)
	}
	if err := pinned.Close(); err != nil {
		t.Fatal(err)
	}
	checkNothingLive(t, "LoopGroup.Close")
}

// WithReusePort: one SO_REUSEPORT socket per loop (Linux, TCP). The
// kernel spreads clients by hash, so only the total is checked.
func TestGroupListenReusePort(t *testing.T) {
	const clients = 30
	g := newGroup(t, 3)
	ln, err := g.Listen("tcp", "127.0.0.1:0", duplex.WithReusePort())
	if runtime.GOOS != "linux" {
		if !errors.Is(err, duplex.ENOTSUP) {
			t.Fatalf("WithReusePort off Linux: %v", err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	go serveEcho(ln, nil)
	cl := clientLoop(t)
	for i := 0; i < clients; i++ {
		c, err := cl.Dial(context.Background(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if err := echoOnce(c, fmt.Sprintf("reuseport %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, acc := groupFigures(t, g); sum(acc) != clients {
		t.Fatalf("accepted per loop %v, want %d in all", acc, clients)
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("a reuseport socket still accepts after Close")
	}
	// Not for "unix", nor for a single loop's listener.
	_, err = g.Listen("unix", filepath.Join(t.TempDir(), "s"), duplex.WithReusePort())
	if !errors.Is(err, duplex.ENOTSUP) {
		t.Fatalf("unix with WithReusePort: %v", err)
	}
	_, err = g.Loops()[0].Listen("tcp", "127.0.0.1:0", duplex.WithReusePort())
	if !errors.Is(err, duplex.EINVAL) {
		t.Fatalf("Loop.Listen with WithReusePort: %v", err)
	}
}

func TestGroupListenUnix(t *testing.T) {
	const clients = 4
	g := newGroup(t, 2)
	ln, err := g.Listen("unix", filepath.Join(t.TempDir(), "group.sock"))
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan *duplex.Conn, clients)
	go serveEcho(ln, accepted)
	cl := clientLoop(t)
	var conns []*duplex.Conn
	for i := 0; i < clients; i++ {
		c, err := cl.Dial(context.Background(), "unix", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		<-accepted
	}
	_, acc := groupFigures(t, g)
	spread(t, "accepted", acc, clients)
	for i, c := range conns {
		if err := echoOnce(c, fmt.Sprintf("unix %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
}

// Closing a group listener while clients keep connecting: Close returns,
// Accept then fails, the conns accepted but not taken are aborted, and
// no handle or reference is left (a late accept on another loop would
// use the listener's handle after it was deleted).
func TestGroupListenerCloseUnderConnectStorm(t *testing.T) {
	g := newGroup(t, 3)
	for round := 0; round < 10; round++ {
		ln, err := g.Listen("tcp", "127.0.0.1:0", duplex.WithBacklog(16))
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for i := 0; i < 4; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					// Short: a SYN in flight when the socket closes is
					// retried only after a second.
					c, err := net.DialTimeout("tcp", ln.Addr().String(), 100*time.Millisecond)
					if err == nil {
						c.Close()
					}
				}
			}()
		}
		for i := 0; i < 5; i++ { // take a few, leave the rest queued
			c, err := ln.AcceptConn()
			if err != nil {
				t.Fatal(err)
			}
			c.Abort()
		}
		if err := ln.Close(); err != nil {
			t.Fatal(err)
		}
		close(stop)
		wg.Wait()
		if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v", err)
		}
		for i := 0; ; i++ {
			live, _ := groupFigures(t, g)
			if sum(live) == 0 && duplex.LiveHandles() == 0 {
				break
			}
			if i == 500 {
				t.Fatalf("round %d: live conns per loop %v, %d handles after the listener closed", round, live, duplex.LiveHandles())
			}
			time.Sleep(10 * time.Millisecond)
		}
		if n := duplex.LiveRefs(); n != 0 {
			t.Fatalf("round %d: %d listener references held", round, n)
		}
	}
}

// Listener.Close racing LoopGroup.Close: the listener is retired once, and
// nothing hangs.
func TestGroupListenerCloseRacesGroupClose(t *testing.T) {
	for i := 0; i < 20; i++ {
		g, err := duplex.NewLoopGroup(3)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := g.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() { errc <- ln.Close() }()
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil && !errors.Is(err, duplex.ECLOSED) {
			t.Fatalf("Close racing LoopGroup.Close: %v", err)
		}
		if err := ln.Close(); !errors.Is(err, duplex.ECLOSED) {
			t.Fatalf("Close after both: %v", err)
		}
		if n := duplex.LiveRefs(); n != 0 || duplex.LiveHandles() != 0 {
			t.Fatalf("round %d: %d references, %d handles", i, n, duplex.LiveHandles())
		}
	}
}

// net/http over a group: the server on a group listener, the client
// dialling through the group's DialFunc.
func TestGroupServesHTTP(t *testing.T) {
	g := newGroup(t, 2)
	ln, err := g.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.URL.Path)
	})}
	go srv.Serve(ln)
	tr := &http.Transport{DialContext: g.DialFunc()}
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := 0; i < 4; i++ {
		resp, err := client.Get(fmt.Sprintf("http://%s/%d", ln.Addr(), i))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprintf("hello /%d", i); !bytes.Equal(body, []byte(want)) {
			t.Fatalf("got %q, want %q", body, want)
		}
	}
	tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
}
