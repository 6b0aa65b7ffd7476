package duplex_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/libduplex/libduplex/bindings/go/duplex"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if n := duplex.LiveHandles(); n != 0 && code == 0 {
		fmt.Fprintf(os.Stderr, "%d cgo handles leaked\n", n)
		code = 1
	}
	if n := duplex.LiveRefs(); n != 0 && code == 0 {
		fmt.Fprintf(os.Stderr, "%d listener references leaked\n", n)
		code = 1
	}
	if n := duplex.LiveTLS(); n != 0 && code == 0 {
		fmt.Fprintf(os.Stderr, "%d TLSConfig references leaked\n", n)
		code = 1
	}
	os.Exit(code)
}

// newLoop starts a loop that the test's cleanup closes, checking that every
// cgo handle was deleted by then.
func newLoop(t *testing.T) *duplex.Loop {
	t.Helper()
	loop, err := duplex.NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := loop.Close(); err != nil {
			t.Errorf("loop close: %v", err)
		}
		if n := duplex.LiveHandles(); n != 0 {
			t.Errorf("%d cgo handles live after Loop.Close", n)
		}
		if n := duplex.LiveRefs(); n != 0 {
			t.Errorf("%d listener references held after Loop.Close", n)
		}
		if !roomWaitersGone() {
			t.Errorf("%d room waiters still run after Loop.Close", duplex.LiveRoomWaiters())
		}
	})
	return loop
}

// roomWaitersGone waits (up to 2 s) until no room waiter runs: a closed
// conn ends its waiter's wait at once, and one whose writers stopped
// waiting ends within its 100 ms slice.
func roomWaitersGone() bool {
	for i := 0; i < 200 && duplex.LiveRoomWaiters() != 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	return duplex.LiveRoomWaiters() == 0
}

// peer is a plain net.Listener (the standard library) on a free port.
func peer(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func dial(t *testing.T, loop *duplex.Loop, addr string, opts ...duplex.Option) *duplex.Conn {
	t.Helper()
	c, err := loop.Dial(context.Background(), "tcp", addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// echo serves one connection: copies it back, then half-closes.
func echo(ln net.Listener) {
	c, err := ln.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}

// recvAll drains c.Recv() until it closes and returns the bytes and Err.
func recvAll(c *duplex.Conn) ([]byte, error) {
	var buf bytes.Buffer
	for b := range c.Recv() {
		buf.Write(b)
	}
	return buf.Bytes(), c.Err()
}

// The docs/design.md scenario: producers send on a Go channel; one select
// copies that channel to the socket and prints what the socket receives.
func TestScenarioSelectOverSourceAndConn(t *testing.T) {
	loop := newLoop(t)
	ln := peer(t)
	go echo(ln)
	conn := dial(t, loop, ln.Addr().String())
	defer conn.Close()

	const producers, per = 4, 500
	msgs := make(chan string)
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			for i := 0; i < per; i++ {
				msgs <- fmt.Sprintf("producer %d says %d\n", p, i)
			}
		}(p)
	}
	go func() { wg.Wait(); close(msgs) }()

	var got bytes.Buffer
	for done := false; !done; {
		select {
		case m, ok := <-msgs:
			if !ok {
				if err := conn.CloseWrite(); err != nil {
					t.Fatal(err)
				}
				msgs = nil
				continue
			}
			if _, err := conn.Write([]byte(m)); err != nil {
				t.Fatal(err)
			}
		case b, ok := <-conn.Recv():
			if !ok {
				if err := conn.Err(); err != io.EOF {
					t.Fatalf("Err() = %v, want io.EOF", err)
				}
				done = true
				continue
			}
			got.Write(b)
		}
	}
	next := make([]int, producers)
	sc := bufio.NewScanner(&got)
	lines := 0
	for sc.Scan() {
		var p, i int
		if _, err := fmt.Sscanf(sc.Text(), "producer %d says %d", &p, &i); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		if i != next[p] {
			t.Fatalf("producer %d: got %d, want %d", p, i, next[p])
		}
		next[p]++
		lines++
	}
	if lines != producers*per {
		t.Fatalf("%d lines echoed, want %d", lines, producers*per)
	}
	<-conn.Done() // shut down and EOF: the conn finishes by itself
	if err := conn.CloseErr(); err != nil {
		t.Fatalf("CloseErr() = %v", err)
	}
}

// record: 'S', writer id, sequence, length, payload of byte(id), 'E'.
func record(id, seq, n int) []byte {
	b := make([]byte, 0, n+11)
	b = append(b, 'S', byte(id))
	b = binary.BigEndian.AppendUint32(b, uint32(seq))
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	b = append(b, bytes.Repeat([]byte{byte(id)}, n)...)
	return append(b, 'E')
}

func TestWritesFromManyGoroutinesKeepOrderAndAreNeverSplit(t *testing.T) {
	loop := newLoop(t)
	ln := peer(t)
	const writers, per = 8, 150
	sizes := []int{0, 1, 17, 1000, 4096, 65536, 200000}

	type result struct {
		counts []int
		bytes  int
		err    error
	}
	res := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			res <- result{err: err}
			return
		}
		defer c.Close()
		r := bufio.NewReaderSize(c, 1<<16)
		counts := make([]int, writers)
		total := 0
		hdr := make([]byte, 10)
		for {
			if _, err := io.ReadFull(r, hdr); err != nil {
				if err == io.EOF {
					break
				}
				res <- result{err: err}
				return
			}
			id, seq, n := int(hdr[1]), int(binary.BigEndian.Uint32(hdr[2:])), int(binary.BigEndian.Uint32(hdr[6:]))
			if hdr[0] != 'S' || id >= writers || seq != counts[id] || n > 200000 {
				res <- result{err: fmt.Errorf("bad header % x (writer %d expects seq %d)", hdr, id, counts[id])}
				return
			}
			body := make([]byte, n+1)
			if _, err := io.ReadFull(r, body); err != nil {
				res <- result{err: err}
				return
			}
			if body[n] != 'E' || bytes.Count(body[:n], []byte{byte(id)}) != n {
				res <- result{err: fmt.Errorf("writer %d record %d split or corrupted", id, seq)}
				return
			}
			counts[id]++
			total += len(hdr) + len(body)
		}
		res <- result{counts: counts, bytes: total}
	}()

	conn := dial(t, loop, ln.Addr().String())
	var wg sync.WaitGroup
	sent := make([]int, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < per; i++ {
				rec := record(w, i, sizes[(w+i)%len(sizes)])
				if _, err := conn.Write(rec); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				sent[w] += len(rec)
			}
		}(w)
	}
	wg.Wait()
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	want := 0
	for w := 0; w < writers; w++ {
		want += sent[w]
		if r.counts[w] != per {
			t.Errorf("writer %d: peer got %d records, want %d", w, r.counts[w], per)
		}
	}
	if r.bytes != want {
		t.Errorf("peer got %d bytes, want %d", r.bytes, want)
	}
	conn.Close()
	<-conn.Done()
}

func TestCloseWriteThenPeerSeesEOFWhileWeKeepReceiving(t *testing.T) {
	loop := newLoop(t)
	ln := peer(t)
	peerGot := make(chan []byte, 1)
	reply := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			peerGot <- nil
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c) // until our half-close
		peerGot <- b
		<-reply
		c.Write([]byte("reply after your EOF"))
	}()
	conn := dial(t, loop, ln.Addr().String())
	conn.Write([]byte("request"))
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got := <-peerGot; string(got) != "request" {
		t.Fatalf("peer got %q", got)
	}
	if _, err := conn.Write([]byte("late")); !errors.Is(err, duplex.ESHUTDOWN) {
		t.Fatalf("write after CloseWrite: %v, want ESHUTDOWN", err)
	}
	close(reply)
	got, err := recvAll(conn)
	if string(got) != "reply after your EOF" || err != io.EOF {
		t.Fatalf("received %q, %v", got, err)
	}
	<-conn.Done()
	if err := conn.CloseErr(); err != nil {
		t.Fatalf("CloseErr() = %v", err)
	}
	if err := conn.Close(); !errors.Is(err, duplex.ECLOSED) {
		t.Fatalf("Close after the conn finished: %v", err)
	}
}

func TestDialRefused(t *testing.T) {
	loop := newLoop(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nobody listens there now
	_, err = loop.Dial(context.Background(), "tcp", addr)
	var op *net.OpError
	if !errors.Is(err, duplex.ECONNREFUSED) || !errors.As(err, &op) || op.Op != "dial" {
		t.Fatalf("dial %s: %v, want ECONNREFUSED", addr, err)
	}
}

func TestDialUnresolvable(t *testing.T) {
	loop := newLoop(t)
	_, err := loop.Dial(context.Background(), "tcp", "no-such-host.invalid:80")
	var code duplex.Errno
	if !errors.As(err, &code) {
		t.Fatalf("dial: %v, want an Errno", err)
	}
	switch code {
	case duplex.EAI_NONAME, duplex.EAI_AGAIN, duplex.EAI_FAIL, duplex.EAI_NODATA:
	default:
		t.Fatalf("dial: %v (%s), want a name-resolution error", err, code.Name())
	}
}

func TestDialBadArguments(t *testing.T) {
	loop := newLoop(t)
	ctx := context.Background()
	if _, err := loop.Dial(ctx, "tcp", "no-port"); err == nil {
		t.Fatal("dial without a port succeeded")
	}
	if _, err := loop.Dial(ctx, "udp", "127.0.0.1:1"); err == nil {
		t.Fatal("dial udp succeeded")
	}
	if _, err := loop.Dial(ctx, "tcp", "127.0.0.1:0"); !errors.Is(err, duplex.EINVAL) {
		t.Fatalf("dial port 0: %v, want EINVAL", err)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := loop.Dial(canceled, "tcp", "127.0.0.1:1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("dial with a canceled context: %v", err)
	}
	if _, err := loop.DialUnix(ctx, filepath.Join(t.TempDir(), "nobody")); !errors.Is(err, duplex.ENOENT) && !errors.Is(err, duplex.ECONNREFUSED) {
		t.Fatalf("dial a missing UNIX socket: %v", err)
	}
}

func TestWriteAfterCloseWrapsECLOSED(t *testing.T) {
	loop := newLoop(t)
	ln := peer(t)
	go echo(ln)
	conn := dial(t, loop, ln.Addr().String())
	if err := conn.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := conn.Write([]byte("x"))
	var code duplex.Errno
	if !errors.Is(err, duplex.ECLOSED) || !errors.Is(err, net.ErrClosed) || !errors.As(err, &code) || code.Name() != "DUPLEX_ECLOSED" {
		t.Fatalf("write after Close: %v", err)
	}
	if err := conn.Close(); !errors.Is(err, duplex.ECLOSED) {
		t.Fatalf("second Close: %v", err)
	}
	<-conn.Done()
	if _, ok := <-conn.Recv(); ok {
		t.Fatal("Recv delivered after Close")
	}
	if err := conn.Err(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Err() after Close = %v", err)
	}
	if _, err := conn.Write([]byte("x")); !errors.Is(err, duplex.ECLOSED) {
		t.Fatalf("write after the conn closed: %v", err)
	}
}

// A peer that does not read: WriteContext blocks at the hard limit and gives
// up with the context; once the peer reads, the same write goes through,
// and the peer receives exactly the accepted writes.
func TestBackpressureWriteContextTimesOutThenSucceeds(t *testing.T) {
	loop := newLoop(t)
	ln := peer(t)
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	conn := dial(t, loop, ln.Addr().String(), duplex.WithWatermarks(64<<10, 16<<10, 256<<10))
	pc := <-accepted
	defer pc.Close()

	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	accepted_bytes := 0
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		n, err := conn.WriteContext(ctx, chunk)
		cancel()
		if err != nil {
			if !errors.Is(err, context.DeadlineExceeded) || n != 0 {
				t.Fatalf("WriteContext: %d, %v", n, err)
			}
			break // blocked: the kernel buffers and our queue are full
		}
		accepted_bytes += n
	}
	got := make(chan int64, 1)
	go func() { n, _ := io.Copy(io.Discard, pc); got <- n }() // the peer reads now
	n, err := conn.WriteContext(context.Background(), chunk)
	if err != nil || n != len(chunk) {
		t.Fatalf("WriteContext after the peer reads: %d, %v", n, err)
	}
	accepted_bytes += n
	conn.CloseWrite()
	if total := <-got; total != int64(accepted_bytes) {
		t.Fatalf("peer read %d bytes, want %d", total, accepted_bytes)
	}
	conn.Close()
	<-conn.Done()
}

// If Recv is not drained, the conn stops reading instead of buffering
// without bound, and loses nothing once drained.
func TestUndrainedRecvPausesReadingAndLosesNothing(t *testing.T) {
	loop := newLoop(t)
	ln := peer(t)
	const total = 16 << 20
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 1<<16)
		for off := 0; off < total; off += len(b) {
			for i := range b {
				b[i] = byte((off + i) % 251)
			}
			if _, err := c.Write(b); err != nil {
				return
			}
		}
	}()
	conn := dial(t, loop, ln.Addr().String(), duplex.WithRecvQueue(4))
	for {
		if paused, pending := conn.ReadPaused(); paused {
			if pending > 1 || len(conn.Recv()) > cap(conn.Recv()) {
				t.Fatalf("paused with %d chunks pending", pending)
			}
			break
		}
		time.Sleep(time.Millisecond) // wait for the channel to fill
	}
	off := 0
	for b := range conn.Recv() {
		for i, x := range b {
			if x != byte((off+i)%251) {
				t.Fatalf("byte %d is %d", off+i, x)
			}
		}
		off += len(b)
	}
	if off != total || conn.Err() != io.EOF {
		t.Fatalf("received %d bytes, %v; want %d, EOF", off, conn.Err(), total)
	}
	conn.Close()
	<-conn.Done()
}

func TestListenerAcceptAndDialOverTCPAndUnix(t *testing.T) {
	loop := newLoop(t)
	for _, nw := range []string{"tcp", "unix"} {
		addr := "127.0.0.1:0"
		if nw == "unix" {
			addr = filepath.Join(t.TempDir(), "s")
		}
		ln, err := loop.Listen(nw, addr)
		if err != nil {
			t.Fatal(err)
		}
		go func() { // a duplex echo server
			for {
				c, err := ln.AcceptConn()
				if err != nil {
					return
				}
				go func() {
					for b := range c.Recv() {
						c.Write(b)
					}
					c.CloseWrite()
				}()
			}
		}()
		conn, err := loop.Dial(context.Background(), nw, ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte("hello " + nw))
		conn.CloseWrite()
		got, err := io.ReadAll(conn) // the io.Reader side
		if string(got) != "hello "+nw || err != nil {
			t.Fatalf("%s: read %q, %v", nw, got, err)
		}
		<-conn.Done()
		if err := ln.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v", err)
		}
		if err := ln.Close(); !errors.Is(err, duplex.ECLOSED) {
			t.Fatalf("second Close: %v", err)
		}
		if n := duplex.LiveRefs(); n != 0 {
			t.Fatalf("%d listener references held after Close", n)
		}
	}
}

// A listener outlives its loop: Loop.Close closes it and drops its
// reference; every method stays safe, and Close reports ECLOSED.
func TestListenerOutlivesItsLoop(t *testing.T) {
	loop, err := duplex.NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := loop.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if n := duplex.LiveRefs(); n != 1 {
		t.Fatalf("%d listener references held, want 1", n)
	}
	if err := loop.Close(); err != nil {
		t.Fatal(err)
	}
	if n := duplex.LiveRefs(); n != 0 {
		t.Fatalf("%d listener references held after Loop.Close", n)
	}
	for i := 0; i < 2; i++ {
		if err := ln.Close(); !errors.Is(err, duplex.ECLOSED) || !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Close %d after Loop.Close: %v", i+1, err)
		}
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Loop.Close: %v", err)
	}
	if ln.Addr().String() != addr {
		t.Fatalf("Addr() = %q after Loop.Close, was %q", ln.Addr(), addr)
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("the socket still accepts after Loop.Close")
	}
	if n := duplex.LiveRefs(); n != 0 || duplex.LiveHandles() != 0 {
		t.Fatalf("%d references, %d handles", n, duplex.LiveHandles())
	}
}

// Listener.Close and Loop.Close racing: exactly one of them closes the
// listener, the reference is dropped once, and nothing hangs.
func TestListenerCloseRacesLoopClose(t *testing.T) {
	for i := 0; i < 50; i++ {
		loop, err := duplex.NewLoop()
		if err != nil {
			t.Fatal(err)
		}
		ln, err := loop.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() { errc <- ln.Close() }()
		if err := loop.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil && !errors.Is(err, duplex.ECLOSED) {
			t.Fatalf("Close racing Loop.Close: %v", err)
		}
		if err := ln.Close(); !errors.Is(err, duplex.ECLOSED) {
			t.Fatalf("Close after both: %v", err)
		}
		if n := duplex.LiveRefs(); n != 0 {
			t.Fatalf("round %d: %d listener references held", i, n)
		}
	}
}

func TestListenErrors(t *testing.T) {
	loop := newLoop(t)
	ln, err := loop.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := loop.Listen("tcp", ln.Addr().String()); !errors.Is(err, duplex.EADDRINUSE) {
		t.Fatalf("listen twice on %s: %v", ln.Addr(), err)
	}
	if _, err := loop.Listen("tcp", "example.org:0"); !errors.Is(err, duplex.EINVAL) {
		t.Fatalf("listen on a name: %v", err)
	}
	// ln stays open: Loop.Close retires it (and its handle).
}

// Closing the loop ends every conn: Recv closes with ECANCELED, later calls
// return ECLOSED, every handle (conns, listeners, accepted conns nobody
// took) is deleted, and a waiting writer's room waiter ends.
func TestLoopCloseEndsEverythingAndFreesHandles(t *testing.T) {
	loop, err := duplex.NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := loop.Listen("tcp", "127.0.0.1:0", duplex.WithWatermarks(1024, 256, 4096))
	if err != nil {
		t.Fatal(err)
	}
	var conns []*duplex.Conn
	for i := 0; i < 5; i++ { // accepted, never taken from Accept
		conns = append(conns, dial(t, loop, ln.Addr().String()))
	}
	server, err := ln.AcceptConn()
	if err != nil {
		t.Fatal(err)
	}
	// A writer blocked on a peer (conns[0]'s server side) that never reads.
	blocked := make(chan error, 1)
	go func() {
		big := make([]byte, 1<<20)
		for {
			if _, err := server.Write(big); err != nil {
				blocked <- err
				return
			}
		}
	}()
	if n := duplex.LiveHandles(); n < 7 {
		t.Fatalf("only %d live handles", n)
	}
	if err := loop.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-blocked; !errors.Is(err, duplex.ECLOSED) {
		t.Fatalf("blocked writer: %v", err)
	}
	for _, c := range append(conns, server) {
		<-c.Done()
		if _, ok := <-c.Recv(); ok {
			continue // data that arrived before the close may still be there
		}
		if err := c.Err(); !errors.Is(err, duplex.ECANCELED) {
			t.Fatalf("Err() = %v, want ECANCELED", err)
		}
		if _, err := c.Write([]byte("x")); !errors.Is(err, duplex.ECLOSED) {
			t.Fatalf("write after Loop.Close: %v", err)
		}
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Loop.Close: %v", err)
	}
	if _, err := loop.Dial(context.Background(), "tcp", "127.0.0.1:1"); !errors.Is(err, duplex.ECLOSED) {
		t.Fatalf("Dial after Loop.Close: %v", err)
	}
	if err := loop.Close(); !errors.Is(err, duplex.ECLOSED) {
		t.Fatalf("second Loop.Close: %v", err)
	}
	if n := duplex.LiveHandles(); n != 0 {
		t.Fatalf("%d handles live after Loop.Close", n)
	}
	if !roomWaitersGone() {
		t.Fatalf("%d room waiters run after Loop.Close", duplex.LiveRoomWaiters())
	}
}

func TestConnsComeAndGoWithoutLeakingHandles(t *testing.T) {
	loop := newLoop(t)
	ln, err := loop.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for i := 0; i < 50; i++ {
		c := dial(t, loop, ln.Addr().String())
		s, err := ln.AcceptConn()
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("ping"))
		if b := <-s.Recv(); string(b) != "ping" {
			t.Fatalf("got %q", b)
		}
		c.Close()
		if _, ok := <-s.Recv(); ok || s.Err() != io.EOF {
			t.Fatalf("server side: %v", s.Err())
		}
		s.Close()
		<-c.Done()
		<-s.Done()
	}
	ln.Close()
	if n := duplex.LiveHandles(); n != 0 {
		t.Fatalf("%d handles live with every conn and the listener closed", n)
	}
}

// Abort resets the conn: the peer sees ECONNRESET, CloseErr reports the
// library's close reason for an abort (ECONNABORTED), and Err, as for any
// close on this side, net.ErrClosed.
func TestAbortReportsECONNABORTED(t *testing.T) {
	loop := newLoop(t)
	ln := peer(t)
	peerErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			peerErr <- err
			return
		}
		defer c.Close()
		_, err = io.Copy(io.Discard, c)
		peerErr <- err
	}()
	conn := dial(t, loop, ln.Addr().String())
	if _, err := conn.Write([]byte("doomed")); err != nil {
		t.Fatal(err)
	}
	if err := conn.Abort(); err != nil {
		t.Fatal(err)
	}
	<-conn.Done()
	if err := conn.CloseErr(); !errors.Is(err, duplex.ECONNABORTED) {
		t.Fatalf("CloseErr() after Abort = %v, want ECONNABORTED", err)
	}
	for range conn.Recv() {
	}
	if err := conn.Err(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Err() after Abort = %v, want net.ErrClosed", err)
	}
	if err := <-peerErr; !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the peer read %v, want ECONNRESET", err)
	}
	if err := conn.Abort(); !errors.Is(err, duplex.ECLOSED) {
		t.Fatalf("second Abort: %v", err)
	}
}

// The first write fills the queue to the hard limit exactly (its payload
// plus the 64-byte per-write overhead), so the next one, however small, is
// refused and waits for room (duplex_conn_wait_room): it gives up with its
// context, its room waiter ends, and once the peer reads the same write
// goes through and nothing is lost.
func TestWriteAtTheHardLimitWaitsForRoom(t *testing.T) {
	const overhead = 64   // DUPLEX_WRITE_OVERHEAD
	const hard = 16 << 20 // more than the kernel takes while nobody reads
	loop := newLoop(t)
	ln := peer(t)
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	conn := dial(t, loop, ln.Addr().String(), duplex.WithWatermarks(64<<10, 16<<10, hard))
	pc := <-accepted
	defer pc.Close()
	first := bytes.Repeat([]byte("f"), hard-overhead)
	if _, err := conn.Write(first); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	n, err := conn.WriteContext(ctx, []byte("second"))
	cancel()
	if n != 0 || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WriteContext at the hard limit: %d, %v", n, err)
	}
	if !roomWaitersGone() {
		t.Fatal("the room waiter still runs after its writer gave up")
	}
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(pc); got <- b }()
	if _, err := conn.Write([]byte("second")); err != nil {
		t.Fatal(err)
	}
	conn.CloseWrite()
	if b := <-got; !bytes.Equal(b, append(first, "second"...)) {
		t.Fatalf("peer got %d bytes, want %d", len(b), len(first)+6)
	}
	conn.Close()
	<-conn.Done()
}

// Many writers waiting at the hard limit of one conn share one room
// waiter (one thread blocked in duplex_conn_wait_room, not one each); all
// of them get through once the peer reads, and the waiter ends.
func TestWritersAtTheHardLimitShareOneRoomWaiter(t *testing.T) {
	const writers, size = 16, 100 << 10
	loop := newLoop(t)
	ln := peer(t)
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	conn := dial(t, loop, ln.Addr().String(), duplex.WithWatermarks(64<<10, 16<<10, 256<<10))
	pc := <-accepted
	defer pc.Close()
	// Fill the kernel buffers and the queue until a write would wait.
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		_, err := conn.WriteContext(ctx, make([]byte, size))
		cancel()
		if err != nil {
			break
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for i := 0; i < writers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := conn.Write(make([]byte, size)); err != nil {
				errs <- err
			}
		}()
	}
	for i := 0; ; i++ {
		if running, waiting := conn.RoomWaiting(); running && waiting == writers {
			break
		}
		if i == 500 {
			running, waiting := conn.RoomWaiting()
			t.Fatalf("room waiter running %v with %d writers, want %d", running, waiting, writers)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := duplex.LiveRoomWaiters(); n != 1 {
		t.Fatalf("%d room waiters for one conn", n)
	}
	go io.Copy(io.Discard, pc)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if !roomWaitersGone() {
		t.Fatal("the room waiter still runs with no writer waiting")
	}
	conn.Close()
	<-conn.Done()
}

// DUPLEX_EDEADLK is -EDEADLK like the other errno-named codes (it was the
// library code -30004); system codes match their syscall.Errno.
func TestErrnoSystemCodes(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("libuv's own values on Windows")
	}
	if duplex.EDEADLK != duplex.Errno(-int(syscall.EDEADLK)) || duplex.EDEADLK.Name() != "DUPLEX_EDEADLK" {
		t.Fatalf("EDEADLK = %d (%s)", int(duplex.EDEADLK), duplex.EDEADLK.Name())
	}
	if name := duplex.Errno(-30004).Name(); name != "DUPLEX_UNKNOWN" {
		t.Fatalf("-30004 is %s", name)
	}
	for _, c := range []struct {
		code duplex.Errno
		sys  syscall.Errno
	}{{duplex.EDEADLK, syscall.EDEADLK}, {duplex.ECONNREFUSED, syscall.ECONNREFUSED},
		{duplex.EWOULDBLOCK, syscall.EAGAIN}, {duplex.ECONNABORTED, syscall.ECONNABORTED}} {
		err := error(&net.OpError{Op: "test", Err: c.code})
		if !errors.Is(err, c.sys) || errors.Is(err, syscall.EINVAL) {
			t.Fatalf("%s vs %v", c.code.Name(), c.sys)
		}
	}
	for _, code := range []duplex.Errno{duplex.ECLOSED, duplex.EWRONGTHREAD, duplex.EAI_NONAME} {
		if errors.Is(code, syscall.Errno(-code)) {
			t.Fatalf("%s matches a syscall.Errno", code.Name())
		}
	}
}

func TestErrnoStrings(t *testing.T) {
	if duplex.ECLOSED.Error() != "object is closed" || duplex.ECLOSED.Name() != "DUPLEX_ECLOSED" {
		t.Fatalf("%q %q", duplex.ECLOSED.Error(), duplex.ECLOSED.Name())
	}
	if !errors.Is(duplex.ETIMEDOUT, os.ErrDeadlineExceeded) || !duplex.ETIMEDOUT.Timeout() {
		t.Fatal("ETIMEDOUT is not a deadline error")
	}
	if duplex.Version() == "" {
		t.Fatal("no version")
	}
}
