// Echo: a TCP (or UNIX socket) echo server on the duplex Go binding.
// Usage: echo [-n conns] [tcp|unix] [addr]   (default tcp 127.0.0.1:7000)
// It prints "listening on ADDR" first (port 0 picks a free port), and with
// -n it exits after serving that many connections.
package main

import (
	"flag"
	"fmt"
	"log"
	"sync"

	"github.com/libduplex/libduplex/bindings/go/duplex"
)

func main() {
	n := flag.Int("n", 0, "exit after this many connections (0: never)")
	flag.Parse()
	network, addr := "tcp", "127.0.0.1:7000"
	if flag.NArg() > 0 {
		network = flag.Arg(0)
	}
	if flag.NArg() > 1 {
		addr = flag.Arg(1)
	}
	loop, err := duplex.NewLoop()
	if err != nil {
		log.Fatal(err)
	}
	defer loop.Close()
	ln, err := loop.Listen(network, addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening on", ln.Addr())

	var wg sync.WaitGroup
	for i := 0; *n == 0 || i < *n; i++ {
		conn, err := ln.AcceptConn()
		if err != nil {
			log.Fatal(err)
		}
		wg.Add(1)
		go func() { // one goroutine per conn: echo until the peer's EOF
			defer wg.Done()
			for b := range conn.Recv() {
				if _, err := conn.Write(b); err != nil {
					break
				}
			}
			conn.CloseWrite() // the conn closes once our side is flushed
			<-conn.Done()
		}()
	}
	wg.Wait()
}
