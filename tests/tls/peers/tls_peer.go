// A TLS peer for tests/tls/conn_tls_test.cpp on Go's crypto/tls: a stack
// that shares no code with OpenSSL. Standard library only; built with
// `go build` (GO111MODULE=off) by tests/tls/meson.build.
//
// Usage:
//
//	tls_peer echo-server -cert C -key K [-ca CA -mtls] [-tls12] [-alpn P]
//	    listens on 127.0.0.1:0, prints "PORT <n>", serves one connection:
//	    echoes every byte; at the client's close_notify sends its own
//	    (CloseWrite) and prints "RESULT echoed=<n> end=clean" (crypto/tls
//	    takes a transport EOF at a record boundary for a clean end too, so
//	    this peer cannot tell a truncation there; end=truncated is one
//	    mid-record).
//	tls_peer echo-client -port P -ca CA [-host H] [-bytes N] [-tls12]
//	    sends N pattern bytes while reading, then close_notify (CloseWrite);
//	    reads the echo to the end and prints
//	    "RESULT bytes=<n> same=<0|1> end=clean|truncated".
//
// Both print "OPEN <version> <cipher> <alpn>" after the handshake, and one
// "RESULT fail <why>" line on any failure.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
)

func fail(format string, a ...interface{}) {
	fmt.Printf("RESULT fail "+format+"\n", a...)
	os.Exit(1)
}

// The byte stream of pattern_stream() in conn_tls_test.cpp (seed 7 there
// is the Python peer's reply; this peer uses seed 9).
func pattern(n int, seed int) []byte {
	b := make([]byte, n)
	for i := range b {
		j := i % 65536
		b[i] = byte(j*31 + seed*7 + (j >> 8))
	}
	return b
}

func versionName(v uint16) string {
	switch v {
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	}
	return fmt.Sprintf("0x%04x", v)
}

func opened(c *tls.Conn) {
	st := c.ConnectionState()
	alpn := st.NegotiatedProtocol
	if alpn == "" {
		alpn = "-"
	}
	fmt.Printf("OPEN %s %s %s\n", versionName(st.Version),
		tls.CipherSuiteName(st.CipherSuite), alpn)
}

func endOf(err error) string {
	if err == nil || errors.Is(err, io.EOF) {
		return "clean"
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return "truncated"
	}
	return "error:" + err.Error()
}

func loadPool(path string) *x509.CertPool {
	pem, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fail("no certificate in %s", path)
	}
	return pool
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: tls_peer echo-server|echo-client ...")
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	cert := fs.String("cert", "", "own certificate (PEM)")
	key := fs.String("key", "", "own key (PEM)")
	ca := fs.String("ca", "", "CA to trust (PEM)")
	mtls := fs.Bool("mtls", false, "server: require a client certificate")
	host := fs.String("host", "localhost", "client: the server name")
	port := fs.Int("port", 0, "client: the port to connect to")
	n := fs.Int("bytes", 1<<20, "client: bytes to send")
	tls12 := fs.Bool("tls12", false, "TLS 1.2 only")
	alpn := fs.String("alpn", "", "ALPN protocol to offer / accept")
	fs.Parse(os.Args[2:])

	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if *tls12 {
		cfg.MaxVersion = tls.VersionTLS12
	}
	if *alpn != "" {
		cfg.NextProtos = []string{*alpn}
	}
	if *cert != "" {
		kp, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			fail("%v", err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}

	switch mode {
	case "echo-server":
		if *mtls {
			cfg.ClientCAs = loadPool(*ca)
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fail("%v", err)
		}
		fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
		raw, err := ln.Accept()
		if err != nil {
			fail("%v", err)
		}
		ln.Close()
		c := tls.Server(raw, cfg)
		if err := c.Handshake(); err != nil {
			fail("handshake: %v", err)
		}
		opened(c)
		if st := c.ConnectionState(); len(st.PeerCertificates) > 0 {
			fmt.Printf("PEER %s\n", st.PeerCertificates[0].Subject.CommonName)
		}
		echoed, err := io.Copy(c, c)
		end := endOf(err)
		if end == "clean" {
			c.CloseWrite()
		}
		fmt.Printf("RESULT echoed=%d end=%s\n", echoed, end)
		c.Close()
	case "echo-client":
		cfg.RootCAs = loadPool(*ca)
		cfg.ServerName = *host
		c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", *port), cfg)
		if err != nil {
			fail("dial: %v", err)
		}
		opened(c)
		out := pattern(*n, 9)
		werr := make(chan error, 1)
		go func() {
			_, err := c.Write(out)
			if err == nil {
				err = c.CloseWrite()
			}
			werr <- err
		}()
		got, rerr := io.ReadAll(c)
		if err := <-werr; err != nil {
			fail("write: %v", err)
		}
		same := 0
		if bytes.Equal(got, out) {
			same = 1
		}
		fmt.Printf("RESULT bytes=%d same=%d end=%s\n", len(got), same, endOf(rerr))
		c.Close()
	default:
		fail("unknown mode %q", mode)
	}
}
