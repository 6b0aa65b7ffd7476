// A program that uses the binding from an installed libduplex: the test
// 'go-installed' (installed_test.sh) copies it into a fresh module whose
// go.mod points at bindings/go with a replace directive, and builds it
// with `go build` and pkg-config alone. It serves one HTTP request over a
// duplex Listener to an http.Client that dials with the same loop, and
// prints the library version and the reply.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"time"

	"github.com/libduplex/libduplex/bindings/go/duplex"
)

func main() {
	loop, err := duplex.NewLoop()
	if err != nil {
		log.Fatal(err)
	}
	defer loop.Close()
	ln, err := loop.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.URL.Path[1:])
	})}
	go srv.Serve(ln)

	tr := &http.Transport{DialContext: loop.DialFunc()}
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	resp, err := client.Get("http://" + ln.Addr().String() + "/duplex")
	if err != nil {
		log.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		log.Fatal(err)
	}
	tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("libduplex %s: %s\n", duplex.Version(), body)
}
