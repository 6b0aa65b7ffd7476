// Scenario: copy messages that other goroutines send on a channel to a
// socket, and print whatever the socket receives. One select covers both
// directions: no reader goroutine, no lock. Usage: scenario [host:port]
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"sync"

	"github.com/libduplex/libduplex/bindings/go/duplex"
)

func main() {
	addr := "localhost:7000"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	loop, err := duplex.NewLoop()
	if err != nil {
		log.Fatal(err)
	}
	defer loop.Close()
	conn, err := loop.Dial(context.Background(), "tcp", addr)
	if err != nil {
		log.Fatal(err)
	}

	msgs := make(chan string) // the source: any goroutine may send
	var wg sync.WaitGroup
	for p := 0; p < 4; p++ {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				msgs <- fmt.Sprintf("goroutine %d says %d\n", p, i)
			}
		}(p)
	}
	go func() { wg.Wait(); close(msgs) }()

	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				conn.CloseWrite() // half-close once the writes are flushed
				msgs = nil        // a nil channel never fires again
			} else if _, err := conn.Write([]byte(m)); err != nil {
				log.Fatal(err)
			}
		case b, ok := <-conn.Recv():
			if !ok { // the peer finished, or the conn failed
				if err := conn.Err(); err != io.EOF {
					log.Fatal(err)
				}
				return
			}
			os.Stdout.Write(b)
		}
	}
}
