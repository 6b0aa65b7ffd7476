// echo_go_tls: TLS echo server on Go's crypto/tls, for the TLS benchmarks.
// Usage: echo_go_tls PORT CERT.pem KEY.pem (127.0.0.1; prints nothing).
// Built by bench/run with `go build echo_tls.go` (standard library only, no
// modules), like echo.go.
//
// One goroutine per connection, as in echo.go: tls.Listen's conns do the
// handshake on their first Read, then read into the conn's own 16 KiB
// buffer and write back what came. The config is Go's default (session
// tickets on, Go's cipher preference) with TLS 1.2 as the minimum.
package main

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"strconv"
)

func serve(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 16384)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		if _, err := c.Write(buf[:n]); err != nil {
			return
		}
	}
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintf(os.Stderr, "usage: %s PORT CERT.pem KEY.pem\n", os.Args[0])
		os.Exit(2)
	}
	port, err := strconv.Atoi(os.Args[1])
	if err != nil || port < 1 || port > 65535 {
		fmt.Fprintf(os.Stderr, "usage: %s PORT CERT.pem KEY.pem\n", os.Args[0])
		os.Exit(2)
	}
	cert, err := tls.LoadX509KeyPair(os.Args[2], os.Args[3])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert},
		MinVersion: tls.VersionTLS12}
	inner, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	l := tls.NewListener(inner, cfg)
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		go serve(c) // TCP_NODELAY is Go's default
	}
}
