package duplex

import (
	"sync"
	"time"
)

// A deadline is one direction's net.Conn deadline: a channel that is
// closed once the deadline passes. Calls select on it, so a deadline set
// while they wait (also one in the past) wakes them, and one moved later
// before it passed keeps them waiting.
type deadline struct {
	mu    sync.Mutex
	gen   uint64        // counts set calls: a timer of an older one does nothing
	timer *time.Timer   // nil when none is pending
	ch    chan struct{} // closed when the deadline has passed
}

func newDeadline() *deadline { return &deadline{ch: make(chan struct{})} }

// set replaces the deadline; the zero time means none.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gen++
	if d.timer != nil {
		d.timer.Stop() // if it is firing now, its gen no longer matches
		d.timer = nil
	}
	wait := time.Until(t)
	passed := !t.IsZero() && wait <= 0
	if isClosed(d.ch) {
		if passed {
			return // still passed
		}
		d.ch = make(chan struct{}) // calls from now on wait again
	}
	switch {
	case t.IsZero():
	case passed:
		close(d.ch)
	default:
		gen, ch := d.gen, d.ch
		d.timer = time.AfterFunc(wait, func() {
			d.mu.Lock()
			if d.gen == gen {
				close(ch)
				d.timer = nil
			}
			d.mu.Unlock()
		})
	}
}

// done returns the channel of the current deadline: closed once it passed.
func (d *deadline) done() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ch
}
