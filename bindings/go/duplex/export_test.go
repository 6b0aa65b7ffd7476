package duplex

// Test hooks.

// LiveHandles is the number of cgo handles not yet deleted.
func LiveHandles() int64 { return liveHandles.Load() }

// LiveRefs is the number of listener references not yet dropped.
func LiveRefs() int64 { return liveRefs.Load() }

// ReadPaused reports whether c has stopped reading because Recv is full,
// and how many chunks wait besides the channel's.
func (c *Conn) ReadPaused() (bool, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushing, len(c.pending)
}
