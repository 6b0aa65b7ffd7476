package duplex

// Test hooks.

// LiveHandles is the number of cgo handles not yet deleted.
func LiveHandles() int64 { return liveHandles.Load() }

// LiveRefs is the number of listener references not yet dropped.
func LiveRefs() int64 { return liveRefs.Load() }

// LiveTLS is the number of TLSConfig references not yet dropped.
func LiveTLS() int64 { return liveTLS.Load() }

// LiveRoomWaiters is the number of room waiters (each holding a conn
// reference) still running.
func LiveRoomWaiters() int64 { return liveRoomWaiters.Load() }

// RoomWaiting reports whether c's room waiter runs, and how many writers
// wait for room.
func (c *Conn) RoomWaiting() (bool, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.roomWaiting, len(c.roomWaits)
}

// ReadPaused reports whether c has stopped reading because Recv is full,
// and how many chunks wait besides the channel's.
func (c *Conn) ReadPaused() (bool, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushing, len(c.pending)
}
