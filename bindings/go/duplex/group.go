package duplex

// #include "shim.h"
import "C"

import (
	"context"
	"net"
	"sync"
)

// A LoopGroup is N loops, each run by its own thread that libduplex owns:
// a server that uses every core. Its loops are ordinary *Loop values
// (Dial, Listen and Stats work on each); the group starts them, and its
// Close frees them all. A conn stays on the loop it was created on for its
// whole life. LoopGroup.Listen spreads accepted conns over the loops and
// Pick (or the group's Dial) places outgoing conns on the least-loaded
// one. Every method may be called from any goroutine.
type LoopGroup struct {
	mu  sync.RWMutex // held for reading by every use of ptr; Close writes
	ptr *C.duplex_loop_group

	// Immutable after NewLoopGroup. cloops are the C loops (valid while
	// ptr is set), loops their wrappers, byPtr maps one to the other.
	cloops []*C.duplex_loop
	loops  []*Loop
	byPtr  map[*C.duplex_loop]*Loop
}

type groupConfig struct {
	flags C.unsigned // DUPLEX_GROUP_*
}

// A GroupOption changes how NewLoopGroup makes the group.
type GroupOption func(*groupConfig)

// WithCPUPinning pins loop i's thread to the i-th CPU the process may run
// on (its affinity mask), wrapping around. Linux only: elsewhere
// NewLoopGroup returns an error wrapping ENOTSUP.
func WithCPUPinning() GroupOption {
	return func(c *groupConfig) { c.flags |= C.DUPLEX_GROUP_PIN }
}

// NewLoopGroup creates a group of n loops (n == 0: one per CPU the
// process may run on; at most 1024) and starts their threads: the group
// is serving when it returns. Close it when done.
func NewLoopGroup(n int, opts ...GroupOption) (*LoopGroup, error) {
	var cfg groupConfig
	for _, o := range opts {
		o(&cfg)
	}
	if n < 0 || n > C.DUPLEX_GROUP_MAX_LOOPS {
		return nil, loopError("new group", C.int(EINVAL))
	}
	var p *C.duplex_loop_group
	if rc := C.dpxgo_group_new(&p, C.unsigned(n), cfg.flags); rc != 0 {
		return nil, loopError("new group", rc)
	}
	var count C.unsigned
	if rc := C.duplex_group_get_count(p, &count); rc != 0 {
		C.duplex_group_free(p)
		return nil, loopError("new group", rc)
	}
	g := &LoopGroup{
		ptr:    p,
		cloops: make([]*C.duplex_loop, count),
		loops:  make([]*Loop, count),
		byPtr:  make(map[*C.duplex_loop]*Loop, count),
	}
	for i := range g.loops {
		if rc := C.duplex_group_get_loop(p, C.unsigned(i), &g.cloops[i]); rc != 0 {
			C.duplex_group_free(p)
			return nil, loopError("new group", rc)
		}
		l := &Loop{ptr: g.cloops[i], group: g, listeners: map[*Listener]struct{}{}}
		g.loops[i] = l
		g.byPtr[g.cloops[i]] = l
	}
	if rc := C.duplex_group_start(p); rc != 0 {
		C.duplex_group_free(p)
		return nil, loopError("start group", rc)
	}
	return g, nil
}

// Loops returns the group's loops, in the order of their index (a new
// slice each call; the *Loop values are always the same). Use them as any
// Loop: Dial, Listen and Stats work on each. They belong to the group:
// Loop.Close on one returns an error wrapping EBUSY and leaves it running;
// LoopGroup.Close frees them all.
func (g *LoopGroup) Loops() []*Loop {
	return append([]*Loop(nil), g.loops...)
}

// Pick returns the least-loaded loop, the one with the fewest live conns
// (ties taken in turn), to dial from. A conn counts from the moment Dial
// creates it, so a burst of sequential Pick-then-Dial calls spreads
// evenly; picks made at the same instant from several goroutines may land
// on the same loop. After Close it returns one of the (closed) loops,
// whose calls return errors wrapping ECLOSED, never nil.
func (g *LoopGroup) Pick() *Loop {
	g.mu.RLock()
	defer g.mu.RUnlock()
	var p *C.duplex_loop
	if g.ptr == nil || C.duplex_group_pick(g.ptr, &p) != 0 {
		return g.loops[0]
	}
	if l, ok := g.byPtr[p]; ok {
		return l
	}
	return g.loops[0]
}

// Dial is Pick().Dial: it connects from the least-loaded loop.
func (g *LoopGroup) Dial(ctx context.Context, network, addr string, opts ...Option) (*Conn, error) {
	return g.Pick().Dial(ctx, network, addr, opts...)
}

// DialFunc is Loop.DialFunc for the group: each call dials from the loop
// Pick returns, e.g. http.Transport{DialContext: group.DialFunc()}.
func (g *LoopGroup) DialFunc(opts ...Option) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := g.Dial(ctx, network, addr, opts...)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// Listen listens for the whole group: network and address as for
// Loop.Listen, and it returns the same *Listener (a net.Listener). Each
// accepted conn opens on one of the group's loops, where all its callbacks
// run: by default one socket accepts on loop 0 and hands each conn to the
// loop with the fewest live conns (so the loops' shares stay within one
// conn of each other while none closes); with WithReusePort (Linux, TCP)
// every loop accepts on a socket of its own. Accept returns the conns of
// every loop. Close stops every socket and returns once no accept that
// began before it can still deliver a conn.
func (g *LoopGroup) Listen(network, addr string, opts ...Option) (*Listener, error) {
	return listen(g.loops[0], g, network, addr, opts)
}

// Stats returns the figures of every loop, in the order of Loops. Each
// loop's figures are read without stopping it (see Loop.Stats). After
// Close it returns an error wrapping ECLOSED.
func (g *LoopGroup) Stats() ([]LoopStats, error) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.ptr == nil {
		return nil, loopError("stats", C.int(ECLOSED))
	}
	out := make([]LoopStats, len(g.cloops))
	for i, p := range g.cloops {
		st, rc := loopStats(p)
		if rc != 0 {
			return nil, loopError("stats", rc)
		}
		out[i] = st
	}
	return out, nil
}

// Close stops the threads and frees every loop, as Loop.Close does for one:
// every conn on them ends (Recv closes, Err reports ECANCELED unless it had
// ended before), pending writes are canceled and writers waiting for room
// return errors wrapping ECLOSED, every listener (group listeners and
// those of single loops of the group) closes. It returns when all of that
// is done; later calls on the group, its loops, conns and listeners return
// errors wrapping ECLOSED (matching net.ErrClosed), and so does a second
// Close.
func (g *LoopGroup) Close() error {
	g.mu.Lock()
	p := g.ptr
	if p == nil {
		g.mu.Unlock()
		return loopError("close group", C.int(ECLOSED))
	}
	// Lock order: the group, then its loops in index order. The teardown
	// callbacks run on this goroutine's thread inside duplex_group_free;
	// none of them takes these locks.
	for _, l := range g.loops {
		l.mu.Lock()
	}
	rc := C.duplex_group_free(p)
	if rc == 0 {
		g.ptr = nil
		for _, l := range g.loops {
			l.ptr = nil
		}
	}
	for _, l := range g.loops {
		l.mu.Unlock()
	}
	g.mu.Unlock()
	if rc != 0 {
		return loopError("close group", rc)
	}
	for _, l := range g.loops {
		l.finishListeners()
	}
	return nil
}

// LoopStats are one loop's figures (duplex_loop_get_stats).
type LoopStats struct {
	// Conns is the number of live conns on the loop: dialled, accepted
	// (also those not taken by Accept yet) or being handed to it, until
	// they have closed.
	Conns int
	// Queued is the bytes queued for writing over all its conns, each
	// write counted with its 64-byte overhead (as WithWatermarks counts).
	Queued int64
	// Accepted is the total of conns listeners accepted onto this loop.
	Accepted int64
}

// Stats reads the loop's figures from any goroutine without stopping the
// loop. Each figure is exact at some instant during the call; the three
// are not one snapshot. After the loop was closed (or its group) it
// returns an error wrapping ECLOSED.
func (l *Loop) Stats() (LoopStats, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.ptr == nil {
		return LoopStats{}, loopError("stats", C.int(ECLOSED))
	}
	st, rc := loopStats(l.ptr)
	if rc != 0 {
		return LoopStats{}, loopError("stats", rc)
	}
	return st, nil
}

func loopStats(p *C.duplex_loop) (LoopStats, C.int) {
	st := C.duplex_loop_stats{size: C.sizeof_duplex_loop_stats}
	if rc := C.duplex_loop_get_stats(p, &st); rc != 0 {
		return LoopStats{}, rc
	}
	return LoopStats{Conns: int(st.conns), Queued: int64(st.queued), Accepted: int64(st.accepted)}, 0
}
