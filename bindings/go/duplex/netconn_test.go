package duplex_test

// Conn as a net.Conn and Listener as a net.Listener: addresses, deadlines,
// errors in the net package's shape, and standard-library code (bufio,
// io.Copy, net/http) running over them.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/libduplex/libduplex/bindings/go/duplex"
)

// pair returns a dialled conn and the conn the duplex listener accepted for
// it, over TCP or a UNIX socket. Both are closed by the test's cleanup.
func pair(t *testing.T, loop *duplex.Loop, network string, opts ...duplex.Option) (client, server *duplex.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	ln, err := loop.Listen(network, addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = loop.Dial(context.Background(), network, ln.Addr().String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.AcceptConn()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Abort(); server.Abort() })
	return client, server
}

// isTimeout checks what net.Conn promises of a passed deadline.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) && errors.As(err, &ne) && ne.Timeout()
}

// opOf returns the *net.OpError in err's chain, or nil.
func opOf(err error) *net.OpError {
	var op *net.OpError
	if errors.As(err, &op) {
		return op
	}
	return nil
}

func TestConnAddressesOverTCP(t *testing.T) {
	loop := newLoop(t)
	c, s := pair(t, loop, "tcp")
	for _, a := range []net.Addr{c.LocalAddr(), c.RemoteAddr(), s.LocalAddr(), s.RemoteAddr()} {
		ta, ok := a.(*net.TCPAddr)
		if !ok || !ta.IP.Equal(net.IPv4(127, 0, 0, 1)) || ta.Port == 0 || a.Network() != "tcp" {
			t.Fatalf("address %#v, want a *net.TCPAddr on 127.0.0.1", a)
		}
	}
	if c.LocalAddr().String() != s.RemoteAddr().String() || c.RemoteAddr().String() != s.LocalAddr().String() {
		t.Fatalf("client %v -> %v, server %v <- %v", c.LocalAddr(), c.RemoteAddr(), s.LocalAddr(), s.RemoteAddr())
	}

	// Against the net package's own view of the same connection.
	std := peer(t)
	accepted := make(chan net.Conn, 1)
	go func() {
		sc, err := std.Accept()
		if err == nil {
			accepted <- sc
		}
		close(accepted)
	}()
	d := dial(t, loop, std.Addr().String())
	sc := <-accepted
	if sc == nil {
		t.Fatal("accept failed")
	}
	defer sc.Close()
	if d.LocalAddr().String() != sc.RemoteAddr().String() || d.RemoteAddr().String() != std.Addr().String() {
		t.Fatalf("duplex %v -> %v, net sees %v -> %v", d.LocalAddr(), d.RemoteAddr(), sc.RemoteAddr(), sc.LocalAddr())
	}
	// The addresses stay after the conn has closed.
	la, ra := d.LocalAddr().String(), d.RemoteAddr().String()
	d.Abort()
	<-d.Done()
	if d.LocalAddr().String() != la || d.RemoteAddr().String() != ra {
		t.Fatalf("after close: %v -> %v, was %s -> %s", d.LocalAddr(), d.RemoteAddr(), la, ra)
	}
}

func TestConnAddressesOverUnix(t *testing.T) {
	loop := newLoop(t)
	c, s := pair(t, loop, "unix")
	path := s.LocalAddr().String()
	if filepath.Base(path) != "s" {
		t.Fatalf("server's local address %q, want the socket path", path)
	}
	want := []struct {
		a    net.Addr
		name string
	}{{c.LocalAddr(), ""}, {c.RemoteAddr(), path}, {s.LocalAddr(), path}, {s.RemoteAddr(), ""}}
	for i, w := range want {
		ua, ok := w.a.(*net.UnixAddr)
		if !ok || ua.Name != w.name || ua.Net != "unix" {
			t.Fatalf("address %d: %#v, want a *net.UnixAddr named %q", i, w.a, w.name)
		}
	}
}

func TestListenerIsANetListener(t *testing.T) {
	loop := newLoop(t)
	ln, err := loop.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var nl net.Listener = ln
	if a, ok := nl.Addr().(*net.TCPAddr); !ok || a.Port == 0 {
		t.Fatalf("Addr() = %#v", nl.Addr())
	}
	go func() {
		c, err := net.Dial("tcp", nl.Addr().String())
		if err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	c, err := nl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*duplex.Conn); !ok {
		t.Fatalf("Accept returned a %T", c)
	}
	b, err := io.ReadAll(c)
	if string(b) != "hi" || err != nil {
		t.Fatalf("read %q, %v", b, err)
	}
	c.Close()
	if err := nl.Close(); err != nil {
		t.Fatal(err)
	}
	c, err = nl.Accept()
	if c != nil || !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, %v", c, err)
	}
	if op := opOf(err); op == nil || op.Op != "accept" || op.Net != "tcp" || op.Addr.String() != ln.Addr().String() {
		t.Fatalf("Accept after Close: %#v", op)
	}
}

// Read with a deadline: one in the past fails at once (also with bytes
// waiting), one that passes while Read waits wakes it, and none of this
// loses or reorders bytes.
func TestReadDeadline(t *testing.T) {
	loop := newLoop(t)
	c, s := pair(t, loop, "tcp")
	buf := make([]byte, 16)

	s.Write([]byte("first"))
	c.SetReadDeadline(time.Now().Add(-time.Second))
	for i := 0; i < 2; i++ { // the deadline stays passed
		n, err := c.Read(buf)
		if n != 0 || !isTimeout(err) {
			t.Fatalf("Read with a passed deadline: %d, %v", n, err)
		}
		if op := opOf(err); op == nil || op.Op != "read" || op.Net != "tcp" || op.Addr == nil || op.Source == nil {
			t.Fatalf("error %#v, want a *net.OpError for read", op)
		}
	}
	c.SetReadDeadline(time.Time{})
	if n, err := c.Read(buf); string(buf[:n]) != "first" || err != nil {
		t.Fatalf("Read after clearing the deadline: %q, %v", buf[:n], err)
	}

	// Passes while Read waits.
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	if n, err := c.Read(buf); n != 0 || !isTimeout(err) {
		t.Fatalf("Read past its deadline: %d, %v", n, err)
	}
	if d := time.Since(start); d < 40*time.Millisecond || d > 5*time.Second {
		t.Fatalf("Read gave up after %v, deadline 50ms", d)
	}

	// Moved later before it passes: Read keeps waiting for the bytes.
	c.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	go func() {
		time.Sleep(100 * time.Millisecond)
		s.Write([]byte("second"))
	}()
	if n, err := c.Read(buf); string(buf[:n]) != "second" || err != nil {
		t.Fatalf("Read with an extended deadline: %q, %v", buf[:n], err)
	}

	// Set to the past from another goroutine while Read waits.
	c.SetReadDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := c.Read(buf); errc <- err }()
	time.Sleep(20 * time.Millisecond)
	c.SetReadDeadline(time.Unix(1, 0))
	select {
	case err := <-errc:
		if !isTimeout(err) {
			t.Fatalf("waiting Read: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a deadline in the past did not wake a waiting Read")
	}
	c.SetReadDeadline(time.Time{})
	s.Write([]byte("third"))
	if n, err := c.Read(buf); string(buf[:n]) != "third" || err != nil {
		t.Fatalf("Read after the timeout: %q, %v", buf[:n], err)
	}
}

// Write with a deadline against a peer that does not read: the write that
// finds the queue at its hard limit gives up at the deadline and queues
// nothing; a deadline in the past fails every write at once; once cleared,
// writes go through and the peer gets exactly the accepted bytes.
func TestWriteDeadline(t *testing.T) {
	loop := newLoop(t)
	c, s := pair(t, loop, "tcp", duplex.WithWatermarks(64<<10, 16<<10, 256<<10), duplex.WithRecvQueue(1))
	chunk := bytes.Repeat([]byte("w"), 64<<10)
	sent := 0
	for {
		c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		n, err := c.Write(chunk)
		if err != nil {
			if n != 0 || !isTimeout(err) {
				t.Fatalf("Write at the hard limit: %d, %v", n, err)
			}
			if op := opOf(err); op == nil || op.Op != "write" {
				t.Fatalf("error %#v, want a *net.OpError for write", op)
			}
			break
		}
		sent += n
	}
	c.SetWriteDeadline(time.Now().Add(-time.Millisecond))
	if n, err := c.Write(nil); n != 0 || !isTimeout(err) {
		t.Fatalf("Write with a passed deadline: %d, %v", n, err)
	}
	c.SetDeadline(time.Time{})
	got := make(chan int, 1)
	go func() {
		n := 0
		for b := range s.Recv() {
			n += len(b)
		}
		got <- n
	}()
	if n, err := c.Write(chunk); n != len(chunk) || err != nil {
		t.Fatalf("Write after clearing the deadline: %d, %v", n, err)
	}
	sent += len(chunk)
	c.CloseWrite()
	if n := <-got; n != sent {
		t.Fatalf("peer got %d bytes, want %d", n, sent)
	}
}

// Close wakes a Read and a Write that wait, both with net.ErrClosed, also
// when its flush cannot finish; Read after Close fails even with bytes
// waiting; deadlines can no longer be set.
func TestCloseUnblocksReadAndWrite(t *testing.T) {
	loop := newLoop(t)
	c, s := pair(t, loop, "tcp", duplex.WithWatermarks(64<<10, 16<<10, 256<<10), duplex.WithRecvQueue(1))
	readErr := make(chan error, 1)
	go func() { _, err := s.Read(make([]byte, 8)); readErr <- err }() // c never writes
	writeErr := make(chan error, 1)
	go func() { // c never reads: s's writes block at the hard limit
		for {
			if _, err := s.Write(make([]byte, 64<<10)); err != nil {
				writeErr <- err
				return
			}
		}
	}()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-writeErr:
		t.Fatalf("the writer did not block: %v", err)
	case err := <-readErr:
		t.Fatalf("the reader did not block: %v", err)
	default:
	}
	s.Close() // graceful: its flush waits for c, which does not read
	for name, ch := range map[string]chan error{"Read": readErr, "Write": writeErr} {
		select {
		case err := <-ch:
			if !errors.Is(err, net.ErrClosed) || !errors.Is(err, duplex.ECLOSED) {
				t.Fatalf("waiting %s after Close: %v", name, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("Close did not wake a waiting %s", name)
		}
	}

	// Bytes c received wait in Recv: Read after Close still fails.
	c, s = pair(t, loop, "unix")
	s.Write([]byte("waiting"))
	for len(c.Recv()) == 0 {
		time.Sleep(time.Millisecond)
	}
	c.Close()
	if n, err := c.Read(make([]byte, 8)); n != 0 || !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read after Close: %d, %v", n, err)
	}
	if err := c.SetDeadline(time.Now()); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("SetDeadline after Close: %v", err)
	}
	if err := c.Close(); !errors.Is(err, net.ErrClosed) || opOf(err) == nil || opOf(err).Op != "close" {
		t.Fatalf("second Close: %v", err)
	}
}

// The net package's error shapes: *net.OpError with Op, Net and Addr, the
// syscall.Errno inside, io.EOF itself at a clean end.
func TestErrorsAreNetOpErrors(t *testing.T) {
	loop := newLoop(t)

	// dial: connection refused.
	std, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := std.Addr().String()
	std.Close()
	_, err = loop.Dial(context.Background(), "tcp", refused)
	var errno syscall.Errno
	op := opOf(err)
	if !errors.Is(err, syscall.ECONNREFUSED) || !errors.As(err, &errno) || errno != syscall.ECONNREFUSED ||
		op == nil || op.Op != "dial" || op.Net != "tcp" || op.Addr == nil || op.Addr.String() != refused {
		t.Fatalf("dial %s: %v (%#v)", refused, err, op)
	}
	if want := "dial tcp " + refused + ": connection refused"; err.Error() != want {
		t.Fatalf("dial error %q, want %q", err, want)
	}
	if c, err := loop.DialFunc()(context.Background(), "tcp", refused); c != nil || err == nil {
		t.Fatalf("DialFunc: %v (a %T), %v; want a nil net.Conn", c, c, err)
	}

	// listen: address in use.
	ln, err := loop.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = loop.Listen("tcp", ln.Addr().String())
	if op := opOf(err); !errors.Is(err, syscall.EADDRINUSE) || op == nil || op.Op != "listen" || op.Net != "tcp" {
		t.Fatalf("listen twice: %v", err)
	}

	// read: io.EOF itself at the peer's clean end; then ECONNRESET.
	c, s := pair(t, loop, "tcp")
	s.CloseWrite()
	if n, err := c.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Fatalf("Read at EOF: %d, %v; want io.EOF itself", n, err)
	}

	stdln := peer(t)
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		sc, err := stdln.Accept()
		if err == nil {
			accepted <- sc.(*net.TCPConn)
		}
		close(accepted)
	}()
	d := dial(t, loop, stdln.Addr().String())
	sc := <-accepted
	if sc == nil {
		t.Fatal("accept failed")
	}
	sc.SetLinger(0)
	sc.Close() // a reset
	_, err = d.Read(make([]byte, 8))
	op = opOf(err)
	if !errors.Is(err, syscall.ECONNRESET) || !errors.Is(err, duplex.ECONNRESET) || op == nil || op.Op != "read" ||
		op.Net != "tcp" || op.Addr.String() != stdln.Addr().String() || op.Source.String() != d.LocalAddr().String() {
		t.Fatalf("Read after a reset: %v (%#v)", err, op)
	}

	// write and close after Close: net.ErrClosed.
	c.Close()
	_, err = c.Write([]byte("x"))
	if op := opOf(err); !errors.Is(err, net.ErrClosed) || op == nil || op.Op != "write" || op.Net != "tcp" {
		t.Fatalf("Write after Close: %v", err)
	}
	if err := c.Close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Close after Close: %v", err)
	}
	if errors.As(duplex.ECLOSED, &errno) {
		t.Fatal("ECLOSED converts to a syscall.Errno")
	}
}

// bufio and io.Copy over a duplex pair: the server echoes with io.Copy
// (Read and Write of net.Conn) and half-closes; the client reads lines.
func TestBufioAndIOCopyOverConn(t *testing.T) {
	loop := newLoop(t)
	for _, network := range []string{"tcp", "unix"} {
		c, s := pair(t, loop, network)
		echoed := make(chan error, 1)
		go func() {
			_, err := io.Copy(s, s)
			s.CloseWrite()
			echoed <- err
		}()
		var want bytes.Buffer
		go func() {
			w := bufio.NewWriter(c)
			for i := 0; i < 2000; i++ {
				fmt.Fprintf(w, "line %d %s\n", i, strings.Repeat("x", i%300))
			}
			w.Flush()
			c.CloseWrite()
		}()
		for i := 0; i < 2000; i++ {
			fmt.Fprintf(&want, "line %d %s\n", i, strings.Repeat("x", i%300))
		}
		r := bufio.NewReader(c)
		var got bytes.Buffer
		for {
			line, err := r.ReadString('\n')
			got.WriteString(line)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", network, err)
			}
		}
		if !bytes.Equal(got.Bytes(), want.Bytes()) {
			t.Fatalf("%s: echoed %d bytes, want %d", network, got.Len(), want.Len())
		}
		if err := <-echoed; err != nil {
			t.Fatalf("%s: io.Copy: %v", network, err)
		}
	}
}

// net/http over the binding: an http.Server serving on a duplex Listener and
// an http.Client dialling with the loop, requests reusing one keep-alive
// conn. The server aborts its background read with a past read deadline
// after each request, so this also runs that net.Conn contract.
func TestHTTPOverDuplex(t *testing.T) {
	loop := newLoop(t)
	ln, err := loop.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	remotes := map[string]bool{}
	srv := &http.Server{
		ReadTimeout: 10 * time.Second, // SetReadDeadline on every request
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			remotes[r.RemoteAddr] = true
			mu.Unlock()
			body, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			fmt.Fprintf(w, "%s %s %d", r.Method, r.URL.Path, len(body))
		}),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	tr := &http.Transport{DialContext: loop.DialFunc(), MaxIdleConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	url := "http://" + ln.Addr().String()
	for i := 0; i < 20; i++ {
		var resp *http.Response
		var err error
		body := strings.Repeat("b", i*1000)
		if i%2 == 0 {
			resp, err = client.Get(fmt.Sprintf("%s/get/%d", url, i))
			body = ""
		} else {
			resp, err = client.Post(fmt.Sprintf("%s/post/%d", url, i), "text/plain", strings.NewReader(body))
		}
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		want := fmt.Sprintf("%s /%s/%d %d", map[bool]string{true: "GET", false: "POST"}[i%2 == 0],
			map[bool]string{true: "get", false: "post"}[i%2 == 0], i, len(body))
		if err != nil || resp.StatusCode != 200 || string(got) != want {
			t.Fatalf("request %d: %d %q, %v; want %q", i, resp.StatusCode, got, err, want)
		}
	}
	mu.Lock()
	n := len(remotes)
	mu.Unlock()
	if n != 1 {
		t.Fatalf("%d client conns, want 1 kept alive", n)
	}
	tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != http.ErrServerClosed {
		t.Fatalf("Serve: %v", err)
	}
}

// Checks in the spirit of golang.org/x/net/nettest, written for this
// binding: concurrent Read, Write, deadline changes and Close on one pair
// must neither race (go test -race) nor hang, and every call that fails
// after Close fails with net.ErrClosed.
func TestConcurrentMethodsAndClose(t *testing.T) {
	loop := newLoop(t)
	for round := 0; round < 20; round++ {
		c, s := pair(t, loop, "tcp")
		go io.Copy(io.Discard, s)
		var wg sync.WaitGroup
		fail := make(chan error, 16)
		wg.Add(4)
		go func() {
			defer wg.Done()
			b := make([]byte, 64)
			for {
				if _, err := c.Read(b); err != nil {
					if !errors.Is(err, net.ErrClosed) && !isTimeout(err) {
						fail <- fmt.Errorf("Read: %w", err)
					}
					if errors.Is(err, net.ErrClosed) {
						return
					}
				}
			}
		}()
		go func() {
			defer wg.Done()
			for {
				if _, err := c.Write([]byte("data")); err != nil {
					if !errors.Is(err, net.ErrClosed) && !isTimeout(err) {
						fail <- fmt.Errorf("Write: %w", err)
					}
					if errors.Is(err, net.ErrClosed) {
						return
					}
				}
			}
		}()
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				if err := c.SetDeadline(time.Now().Add(time.Duration(i%3) * time.Millisecond)); err != nil {
					return
				}
				c.LocalAddr()
				c.RemoteAddr()
				time.Sleep(time.Millisecond)
			}
		}()
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(round%5) * 5 * time.Millisecond)
			c.Close()
		}()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: calls still running 10 s after Close", round)
		}
		close(fail)
		for err := range fail {
			t.Fatalf("round %d: %v", round, err)
		}
		s.Close()
	}
}
