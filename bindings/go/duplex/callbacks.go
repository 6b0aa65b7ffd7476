package duplex

// #include "shim.h"
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// Exported to shim.c. Each runs on the loop thread (or, for the teardown in
// Loop.Close, on the goroutine calling it) and must not block.

//export goOnOpen
func goOnOpen(p *C.duplex_conn, user C.uintptr_t) {
	switch v := cgo.Handle(user).Value().(type) {
	case *Conn:
		v.onOpen(p)
	case *Listener:
		v.onAccept(p)
	}
}

//export goOnRead
func goOnRead(p *C.duplex_conn, data unsafe.Pointer, n C.size_t, user C.uintptr_t) {
	if c, ok := cgo.Handle(user).Value().(*Conn); ok {
		// The view is borrowed for this callback only: copy it.
		c.onRead(p, C.GoBytes(data, C.int(n)))
	}
}

//export goOnEOF
func goOnEOF(p *C.duplex_conn, user C.uintptr_t) {
	if c, ok := cgo.Handle(user).Value().(*Conn); ok {
		c.onEOF()
	}
}

//export goOnWritable
func goOnWritable(p *C.duplex_conn, user C.uintptr_t) {
	if c, ok := cgo.Handle(user).Value().(*Conn); ok {
		c.onWritable()
	}
}

//export goOnClose
func goOnClose(p *C.duplex_conn, reason C.int, user C.uintptr_t) {
	// An accepted conn that closed before on_open (a TLS handshake that
	// failed, or was cut by the loop's free) still carries its
	// listener's handle, which stays valid until the loop is freed; no
	// such conn was handed to Go, so nothing to do.
	if c, ok := cgo.Handle(user).Value().(*Conn); ok {
		c.onClose(p, reason)
	}
}

//export goOnTLSDone
func goOnTLSDone(p *C.duplex_conn, status C.int, user C.uintptr_t) {
	h := cgo.Handle(user)
	w := h.Value().(*tlsStart)
	deleteHandle(h) // the callback runs exactly once
	w.onTLSDone(p, status)
}

//export goListenerClosed
func goListenerClosed(user C.uintptr_t, status C.int) {
	cgo.Handle(user).Value().(*Listener).onClosed(status)
}

//export goListenerBarrier
func goListenerBarrier(user C.uintptr_t, status C.int) {
	cgo.Handle(user).Value().(*Listener).onBarrier()
}
