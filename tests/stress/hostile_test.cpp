// Hostile input beyond tests/badinput_test.cpp (which has a row per public
// function with NULLs, the documented bad values and closed conns/channels
// on a live loop). Here:
//  - struct sizes larger than ours: zero tail accepted, non-zero tail and
//    absurd sizes refused with DUPLEX_EVERSION, for every versioned struct
//    and the ones nested in them; nothing is taken on refusal (fd stays ours);
//  - zero and huge sizes that are legal: zero-length zero-copy writes, empty
//    vectored writes, a 1-byte loop read buffer, SIZE_MAX watermarks, huge
//    timeouts -- each works and completes exactly once;
//  - calls through refs to objects closed by an error, by shutdown, and by
//    freeing their loop: a clear negative code every time, and refused
//    writes leave the bytes with the caller (zero-copy release never runs);
//  - calls on the wrong thread: EDEADLK / EBUSY, never a hang.
// Every expectation is an exact code from duplex.h.
#include "stress.hpp"

using namespace dtest;
using namespace stress;

namespace {

struct Totals {
  std::atomic<uint64_t> calls{0};
  ~Totals() { Figures("hostile").add("hostile_calls", calls.load()).add("crashes", 0); }
} g_tot;

// A versioned struct followed by a tail of extra bytes, as a newer caller
// would pass it.
template <class T> struct Padded {
  T v;
  unsigned char tail[64];
  Padded() { std::memset(tail, 0, sizeof tail); }
  // size = ours + extra; tail byte @p dirty (if >= 0) set to 1.
  T *grow(size_t extra, int dirty = -1) {
    v.size = sizeof(T) + extra;
    if (dirty >= 0)
      tail[dirty] = 1;
    return &v;
  }
};
static_assert(offsetof(Padded<duplex_conn_opts>, tail) == sizeof(duplex_conn_opts),
              "the tail must follow the struct directly");

int rc_of(int rc) {
  g_tot.calls++;
  return rc;
}

// Refused zero-copy write: bytes untouched, release never called.
struct ZcProbe {
  std::atomic<int> releases{0};
  char bytes[32];
  ZcProbe() { std::memset(bytes, 'Z', sizeof bytes); }
  static void release(void *, size_t, int, void *u) { static_cast<ZcProbe *>(u)->releases++; }
  bool untouched() const {
    for (char c : bytes)
      if (c != 'Z')
        return false;
    return true;
  }
};

} // namespace

TEST_CASE("hostile: larger struct sizes: zero tail accepted, non-zero tail refused") {
  Loop loop;
  // loop opts
  {
    Padded<duplex_loop_opts> p;
    duplex_loop_opts_init(&p.v);
    duplex_loop *l = reinterpret_cast<duplex_loop *>(&p);
    CHECK(rc_of(duplex_loop_new(&l, p.grow(64))) == 0);
    CHECK(l != nullptr);
    if (l)
      CHECK(duplex_loop_free(l) == 0);
    l = reinterpret_cast<duplex_loop *>(&p);
    CHECK(rc_of(duplex_loop_new(&l, p.grow(64, 63))) == DUPLEX_EVERSION);
    CHECK(l == nullptr);
    p.v.size = SIZE_MAX;
    CHECK(rc_of(duplex_loop_new(&l, &p.v)) == DUPLEX_EVERSION);
    CHECK(l == nullptr);
  }
  // conn opts, cbs and framing (through adopt; the fd stays ours on refusal)
  {
    auto sp = socket_pair();
    Padded<duplex_conn_opts> po;
    duplex_conn_opts_init(&po.v);
    duplex_conn *c = nullptr;
    CHECK(rc_of(duplex_conn_adopt(&c, loop, sp.ours.get(), po.grow(1, 0))) == DUPLEX_EVERSION);
    CHECK(c == nullptr);
    po.v.size = SIZE_MAX;
    CHECK(rc_of(duplex_conn_adopt(&c, loop, sp.ours.get(), &po.v)) == DUPLEX_EVERSION);
    po.tail[0] = 0;
    Padded<duplex_conn_cbs> pc;
    duplex_conn_cbs_init(&pc.v);
    po.grow(0);
    po.v.cbs = pc.grow(8, 7);
    CHECK(rc_of(duplex_conn_adopt(&c, loop, sp.ours.get(), &po.v)) == DUPLEX_EVERSION);
    pc.tail[7] = 0;
    po.v.cbs = nullptr;
    Padded<duplex_framing> pf;
    duplex_framing_init(&pf.v);
    pf.v.kind = DUPLEX_FRAME_LENGTH_PREFIX;
    pf.v.prefix_bytes = 4;
    po.v.framing = pf.grow(16, 15);
    CHECK(rc_of(duplex_conn_adopt(&c, loop, sp.ours.get(), &po.v)) == DUPLEX_EVERSION);
    pf.v.size = SIZE_MAX;
    CHECK(rc_of(duplex_conn_adopt(&c, loop, sp.ours.get(), &po.v)) == DUPLEX_EVERSION);
    CHECK(c == nullptr);
    CHECK(fd_is_open(sp.ours.get())); // refused: still ours
    // All three larger with zero tails: accepted, and the conn works.
    pf.tail[15] = 0;
    po.grow(32);
    po.v.cbs = pc.grow(8);
    po.v.framing = pf.grow(16);
    REQUIRE(rc_of(duplex_conn_adopt(&c, loop, sp.ours.get(), &po.v)) == 0);
    sp.ours.release();
    const char frame_msg[] = "framed";
    WriteCounter w;
    CHECK(duplex_conn_write_frame(c, frame_msg, 6, WriteCounter::cb, &w) == 0);
    unsigned char got[10];
    CHECK(read_exactly(sp.peer.get(), got, sizeof got));
    CHECK(got[3] == 6);
    CHECK(std::memcmp(got + 4, frame_msg, 6) == 0);
    // total is the callback's last store: waiting for it (not ok) means the
    // loop thread is done with `w` before this scope ends.
    CHECK(wait_until([&] { return w.total.load() == 1; }));
    CHECK(w.ok.load() == 1);
    CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  // listener opts and the conn opts nested in them
  {
    Padded<duplex_listener_opts> pl;
    duplex_listener_opts_init(&pl.v);
    duplex_listener *l = nullptr;
    CHECK(rc_of(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, pl.grow(4, 3))) == DUPLEX_EVERSION);
    CHECK(l == nullptr);
    pl.tail[3] = 0;
    Padded<duplex_conn_opts> po;
    duplex_conn_opts_init(&po.v);
    pl.v.conn_opts = po.grow(8, 2);
    CHECK(rc_of(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, pl.grow(4))) == DUPLEX_EVERSION);
    CHECK(l == nullptr);
    po.tail[2] = 0;
    pl.v.backlog = -1;
    CHECK(rc_of(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &pl.v)) == DUPLEX_EINVAL);
    pl.v.backlog = 0;
    pl.v.mode = 01000;
    CHECK(rc_of(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &pl.v)) == DUPLEX_EINVAL);
    pl.v.mode = 0;
    pl.v.backlog = INT32_MAX; // the kernel caps it
    CHECK(rc_of(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &pl.v)) == 0);
    CHECK(l != nullptr);
    if (l) {
      CHECK(duplex_listener_close(l) == 0);
      CHECK(duplex_listener_unref(l) == 0);
    }
  }
  // channel opts
  {
    Padded<duplex_channel_opts> ph;
    duplex_channel_opts_init(&ph.v);
    ph.v.on_message = [](duplex_channel *, void *, size_t, void *) {};
    duplex_channel *ch = nullptr;
    CHECK(rc_of(duplex_channel_new(&ch, loop, ph.grow(8, 0))) == DUPLEX_EVERSION);
    CHECK(ch == nullptr);
    ph.v.size = SIZE_MAX;
    CHECK(rc_of(duplex_channel_new(&ch, loop, &ph.v)) == DUPLEX_EVERSION);
    ph.tail[0] = 0;
    ph.v.capacity = SIZE_MAX; // huge but legal: unbounded in practice
    REQUIRE(rc_of(duplex_channel_new(&ch, loop, ph.grow(8))) == 0);
    CHECK(duplex_channel_send(ch, "m", 1, 0) == 0);
    CHECK(duplex_channel_close(ch) == 0);
    CHECK(duplex_channel_unref(ch) == 0);
  }
  CHECK(loop.free() == 0);
}

TEST_CASE("hostile: legal zero and huge sizes work and complete exactly once") {
  // A 1-byte loop read buffer: every byte still arrives, one per read.
  duplex_loop_opts lo = DUPLEX_LOOP_OPTS_INIT;
  lo.read_buffer_size = 1;
  Loop loop(true, &lo);
  ConnEvents ev;
  ev.keep_data = true;
  auto sp = socket_pair();
  // SIZE_MAX hard limit and watermarks near it: accepted.
  auto opts = ev.opts(SIZE_MAX / 2, SIZE_MAX / 4, SIZE_MAX);
  duplex_conn *c = adopt(loop, sp.ours, &opts);
  CHECK(rc_of(duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_IDLE, UINT32_MAX)) == 0);
  CHECK(rc_of(duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_IDLE, 0)) == 0);
  REQUIRE(write_all(sp.peer.get(), "0123456789abcdef", 16) == 0);
  CHECK(ev.wait_bytes(16));
  CHECK(ev.data() == "0123456789abcdef");
  CHECK(ev.reads.load() == 16);

  // Zero-length zero-copy write: a flush marker whose release runs once.
  ZcCounter z;
  void *zero = std::malloc(1);
  CHECK(rc_of(duplex_conn_write_zc(c, zero, 0, ZcCounter::release, &z)) == 0);
  // An empty vectored write (non-NULL bufs, nbufs 0) and one of empty bufs.
  WriteCounter w;
  duplex_buf empty[2] = {{nullptr, 0}, {"", 0}};
  CHECK(rc_of(duplex_conn_writev(c, empty, 0, WriteCounter::cb, &w)) == 0);
  CHECK(rc_of(duplex_conn_writev(c, empty, 2, WriteCounter::cb, &w)) == 0);
  CHECK(rc_of(duplex_conn_write(c, "end", 3, WriteCounter::cb, &w)) == 0);
  char got[3];
  CHECK(read_exactly(sp.peer.get(), got, 3));
  CHECK(std::memcmp(got, "end", 3) == 0);
  CHECK(wait_until([&] { return w.total.load() == 3 && z.released.load() == 1; }));
  CHECK(w.ok.load() == 3);
  CHECK(z.ok.load() == 1);
  CHECK(z.bytes_released.load() == 0);

  // Huge sizes refused whole: the bytes stay ours, no release.
  ZcProbe probe;
  CHECK(rc_of(duplex_conn_write_zc(c, probe.bytes, SIZE_MAX, ZcProbe::release, &probe)) ==
        DUPLEX_EMSGSIZE);
  CHECK(rc_of(duplex_conn_write_zc(c, probe.bytes, DUPLEX_WRITE_MAX + 1, ZcProbe::release,
                                   &probe)) == DUPLEX_EMSGSIZE);
  // Host names at and over the documented 1024-byte bound.
  duplex_conn *d = nullptr;
  std::string host(1025, 'h');
  CHECK(rc_of(duplex_conn_connect_tcp(&d, loop, host.c_str(), 80, nullptr)) ==
        DUPLEX_ENAMETOOLONG);
  CHECK(d == nullptr);
  // Output buffers of length 0 and 1.
  char one[1] = {'?'};
  CHECK(rc_of(duplex_conn_get_peer(c, one, 0)) == DUPLEX_EINVAL);
  CHECK(rc_of(duplex_conn_get_peer(c, one, 1)) == 0); // socketpair: ""
  CHECK(one[0] == '\0');
  CHECK(probe.releases.load() == 0);
  CHECK(probe.untouched());

  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(ev.close_reason.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
  CHECK(probe.releases.load() == 0);
}

namespace {
// Calls through a ref to a conn that is closed (any cause): ECLOSED, and
// refused writes leave the bytes with the caller.
void expect_closed_everywhere(duplex_conn *c) {
  ZcProbe probe;
  WriteCounter w;
  duplex_buf b = {"x", 1};
  CHECK(rc_of(duplex_conn_write(c, "x", 1, WriteCounter::cb, &w)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_write(c, nullptr, 0, WriteCounter::cb, &w)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_writev(c, &b, 1, WriteCounter::cb, &w)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_write_frame(c, "x", 1, WriteCounter::cb, &w)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_write_zc(c, probe.bytes, sizeof probe.bytes, ZcProbe::release,
                                   &probe)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_write_zc(c, probe.bytes, 0, ZcProbe::release, &probe)) ==
        DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_shutdown(c, WriteCounter::cb, &w)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_close(c, DUPLEX_CLOSE_ABORT)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_pause(c)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_resume(c)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_READ, 10)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_wait_writable(c, 0)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_conn_wait_writable(c, -1)) == DUPLEX_ECLOSED); // must not hang
  size_t q = 7;
  CHECK(rc_of(duplex_conn_get_queued(c, &q)) == 0);
  CHECK(q == 0);
  void *u = nullptr;
  CHECK(rc_of(duplex_conn_set_user(c, &q)) == 0);
  CHECK(rc_of(duplex_conn_get_user(c, &u)) == 0);
  CHECK(u == &q);
  CHECK(rc_of(duplex_conn_ref(c)) == 0);
  CHECK(rc_of(duplex_conn_unref(c)) == 0);
  CHECK(probe.releases.load() == 0);
  CHECK(probe.untouched());
  CHECK(w.total.load() == 0);
}
} // namespace

TEST_CASE("hostile: refs to conns closed by an error, by half-close + EOF, by loop free") {
  Loop loop;
  // Closed by an error: the peer vanished with our data unread.
  ConnEvents e1;
  auto s1 = socket_pair();
  auto o1 = e1.opts();
  duplex_conn *c1 = adopt(loop, s1.ours, &o1);
  REQUIRE(write_all(s1.peer.get(), "unread", 6) == 0);
  CHECK(e1.wait_open());
  s1.peer.reset();
  std::vector<char> big(256 * 1024, 'e');
  int rc = 0;
  for (int i = 0; i < 64 && rc == 0; i++)
    rc = duplex_conn_write(c1, big.data(), big.size(), nullptr, nullptr);
  CHECK(e1.wait_closed());
  CHECK(e1.close_reason.load() < 0);
  expect_closed_everywhere(c1);

  // Shut down: writes refused with ESHUTDOWN (bytes stay ours) until it
  // closes after the peer's EOF; then ECLOSED everywhere.
  ConnEvents e2;
  auto s2 = socket_pair();
  auto o2 = e2.opts();
  duplex_conn *c2 = adopt(loop, s2.ours, &o2);
  CHECK(duplex_conn_shutdown(c2, nullptr, nullptr) == 0);
  ZcProbe probe;
  CHECK(rc_of(duplex_conn_write_zc(c2, probe.bytes, sizeof probe.bytes, ZcProbe::release,
                                   &probe)) == DUPLEX_ESHUTDOWN);
  CHECK(rc_of(duplex_conn_write(c2, "x", 1, nullptr, nullptr)) == DUPLEX_ESHUTDOWN);
  CHECK(rc_of(duplex_conn_shutdown(c2, nullptr, nullptr)) == DUPLEX_ESHUTDOWN);
  char eof;
  CHECK(::read(s2.peer.get(), &eof, 1) == 0);
  s2.peer.reset();
  CHECK(e2.wait_closed());
  CHECK(e2.close_reason.load() == 0);
  CHECK(probe.releases.load() == 0);
  CHECK(probe.untouched());
  expect_closed_everywhere(c2);

  // Closed because the loop was freed under it; a channel too.
  ConnEvents e3;
  auto s3 = socket_pair();
  auto o3 = e3.opts();
  duplex_conn *c3 = adopt(loop, s3.ours, &o3);
  duplex_channel_opts co = DUPLEX_CHANNEL_OPTS_INIT;
  co.on_message = [](duplex_channel *, void *, size_t, void *) {};
  duplex_channel *ch = nullptr;
  REQUIRE(duplex_channel_new(&ch, loop, &co) == 0);
  CHECK(duplex_conn_unref(c1) == 0);
  CHECK(duplex_conn_unref(c2) == 0);
  CHECK(loop.free() == 0);
  CHECK(e3.closes.load() == 1);
  CHECK(e3.close_reason.load() == DUPLEX_ECANCELED);
  expect_closed_everywhere(c3);
  CHECK(duplex_conn_unref(c3) == 0);
  ZcProbe cp;
  CHECK(rc_of(duplex_channel_send(ch, "m", 1, 0)) == DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_channel_send(ch, "m", 1, -1)) == DUPLEX_ECLOSED); // no hang
  CHECK(rc_of(duplex_channel_send_ptr(ch, cp.bytes, sizeof cp.bytes, ZcProbe::release, &cp, 0)) ==
        DUPLEX_ECLOSED);
  CHECK(rc_of(duplex_channel_close(ch)) == DUPLEX_ECLOSED);
  size_t pending = 9;
  CHECK(rc_of(duplex_channel_get_pending(ch, &pending)) == 0);
  CHECK(pending == 0);
  CHECK(cp.releases.load() == 0);
  CHECK(cp.untouched());
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("hostile: calls on the wrong thread are refused, never a hang") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *c = adopt(loop, sp.ours, &opts);
  duplex_channel_opts co = DUPLEX_CHANNEL_OPTS_INIT;
  co.on_message = [](duplex_channel *, void *, size_t, void *) {};
  co.capacity = 1;
  duplex_channel *ch = nullptr;
  REQUIRE(duplex_channel_new(&ch, loop, &co) == 0);
  duplex_loop *l = loop;
  std::atomic<int> wait_rc{kUnset}, run_rc{kUnset}, free_rc{kUnset}, send_rc{kUnset},
      start_rc{kUnset};
  CHECK(on_loop(loop, [&] {
    wait_rc = duplex_conn_wait_writable(c, -1);
    run_rc = duplex_loop_run(l, DUPLEX_RUN_NOWAIT);
    free_rc = duplex_loop_free(l);
    start_rc = duplex_loop_start(l);
    // Fill the bounded channel, then a waiting send would deadlock.
    duplex_channel_send(ch, "a", 1, 0);
    send_rc = duplex_channel_send(ch, "b", 1, -1);
  }));
  g_tot.calls += 5;
  CHECK(wait_rc.load() == DUPLEX_EDEADLK);
  CHECK(run_rc.load() == DUPLEX_EDEADLK);
  CHECK(free_rc.load() == DUPLEX_EDEADLK);
  CHECK(start_rc.load() == DUPLEX_EBUSY);
  CHECK(send_rc.load() == DUPLEX_EDEADLK);
  CHECK(rc_of(duplex_loop_run(loop, DUPLEX_RUN_NOWAIT)) == DUPLEX_EBUSY);
  CHECK(rc_of(duplex_loop_start(loop)) == DUPLEX_EBUSY);
  CHECK(duplex_channel_unref(ch) == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}
