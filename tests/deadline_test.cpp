// Conn deadlines: connect, idle, read and flush timeouts close the conn with
// on_close(DUPLEX_ETIMEDOUT); none fires while the traffic it watches flows,
// paused time does not count against the read deadline, and
// duplex_conn_set_timeout() from another thread changes a running conn.
//
// Timeouts are small (50-200 ms). Assertions are about outcomes only: which
// reason a conn closed with, or that it was still open at a point where a
// deadline would have fired had it been counting wrongly. Waiting for a
// close uses the hang guard; "still open" is checked after sleeping several
// times the timeout, which is a wait, not a timing assertion.
#include "fixture.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>

using namespace dtest;

namespace {

duplex_conn_opts with_timeouts(ConnEvents &ev, uint32_t idle, uint32_t read, uint32_t flush,
                               unsigned flags = 0) {
  duplex_conn_opts o = ev.opts(0, 0, 0, flags);
  o.idle_timeout_ms = idle;
  o.read_timeout_ms = read;
  o.flush_timeout_ms = flush;
  return o;
}

// A TCP listener on 127.0.0.1 (port 0) with backlog 0 whose accept queue is
// already full: one connection was completed into it and it is never
// accepted. Linux drops further SYNs while the accept queue is full (the
// client retransmits them for minutes), so a connect to it stays pending:
// a reliable local "connect that never completes". (A UNIX-socket listener
// with a full backlog does not work: a non-blocking connect to it fails at
// once with EAGAIN instead of waiting.)
struct StuckListener {
  Fd listener;
  Fd filler;
  uint16_t port = 0;

  StuckListener() {
    listener.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(listener);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = 0;
    REQUIRE(::bind(listener.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
    REQUIRE(::listen(listener.get(), 0) == 0);
    socklen_t len = sizeof sa;
    REQUIRE(::getsockname(listener.get(), reinterpret_cast<sockaddr *>(&sa), &len) == 0);
    port = ntohs(sa.sin_port);
    // Fill the accept queue (backlog 0 holds one connection).
    filler.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(filler);
    REQUIRE(::connect(filler.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
  }
};

// The peer side of a conn: sends one byte every @p period, @p rounds times,
// reading back the echo of each before the next (so bytes flow both ways).
// Returns the number of complete rounds.
int echo_rounds(int fd, int rounds, std::chrono::milliseconds period) {
  for (int i = 0; i < rounds; i++) {
    char b = char('a' + i % 26), back = 0;
    if (write_all(fd, &b, 1) != 0)
      return i;
    if (!read_exactly(fd, &back, 1) || back != b)
      return i;
    std::this_thread::sleep_for(period);
  }
  return rounds;
}

// Echo every byte read back to the peer (read hook, loop thread).
void echo_hook(ConnEvents &ev) {
  ev.read_hook = [](duplex_conn *c, const uint8_t *data, size_t len) {
    duplex_conn_write(c, data, len, nullptr, nullptr);
  };
}

// True if the peer side sees EOF or an error (the conn closed its fd).
bool peer_sees_close(int fd) {
  char b[256];
  for (;;) {
    ssize_t n = ::read(fd, b, sizeof b);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return true;
  }
}

} // namespace

// ---------------------------------------------------------------------------
// connect
// ---------------------------------------------------------------------------

TEST_CASE("connect deadline: a TCP connect that never completes closes with DUPLEX_ETIMEDOUT "
          "and never opens") {
  StuckListener stuck;
  Loop loop;
  ConnEvents ev;
  auto o = ev.opts();
  o.connect_timeout_ms = 100;
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", stuck.port, &o) == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(ev.opens.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  CHECK(duplex_conn_write(c, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("connect deadline set with duplex_conn_set_timeout from another thread while the "
          "connect is pending") {
  StuckListener stuck;
  Loop loop;
  ConnEvents ev;
  auto o = ev.opts(); // no deadline: this connect would wait for minutes
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", stuck.port, &o) == 0);
  std::atomic<int> rc{kUnset};
  std::thread([&] { rc = duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_CONNECT, 50); }).join();
  CHECK(rc.load() == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(ev.opens.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("connect deadline does not fire once the conn is open") {
  Loop loop;
  ConnEvents srv_ev;
  auto so = srv_ev.opts();
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  lo.conn_opts = &so;
  duplex_listener *l = nullptr;
  REQUIRE(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == 0);
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);

  ConnEvents ev;
  auto o = ev.opts();
  o.connect_timeout_ms = 50;
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &o) == 0);
  REQUIRE(ev.wait_open());
  REQUIRE(ev.opens.load() == 1);
  REQUIRE(srv_ev.wait_open());
  std::this_thread::sleep_for(300ms); // six connect timeouts
  CHECK(ev.closes.load() == 0);
  CHECK(srv_ev.closes.load() == 0);
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(duplex_listener_unref(l) == 0);
}

// ---------------------------------------------------------------------------
// idle and read
// ---------------------------------------------------------------------------

TEST_CASE("idle deadline: nobody sends, the conn closes with DUPLEX_ETIMEDOUT") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  auto o = with_timeouts(ev, 100, 0, 0);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(ev.opens.load() == 1);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  CHECK(peer_sees_close(sp.peer.get()));
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("read deadline: the peer stays silent, the conn closes with DUPLEX_ETIMEDOUT") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  auto o = with_timeouts(ev, 0, 100, 0);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(ev.opens.load() == 1);
  CHECK(peer_sees_close(sp.peer.get()));
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("read deadline: our own writes do not hold it off") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  auto o = with_timeouts(ev, 0, 100, 0);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  // The peer drains whatever we write, so writes make progress.
  int peer_fd = sp.peer.get();
  PeerThread drain([peer_fd] { read_until_eof(peer_fd, [](const uint8_t *, size_t) { return true; }); });
  REQUIRE(ev.wait_open());
  auto deadline = std::chrono::steady_clock::now() + kGuard;
  while (ev.closes.load() == 0 && std::chrono::steady_clock::now() < deadline) {
    duplex_conn_write(c, "w", 1, nullptr, nullptr); // ECLOSED once it closed
    std::this_thread::sleep_for(10ms);
  }
  REQUIRE(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(loop.free() == 0);
  drain.join();
  CHECK(duplex_conn_unref(c) == 0);
}

namespace {
struct CheckAfterResume {
  ConnEvents *ev;
  std::atomic<int> closes_seen{kUnset};
  std::atomic<int> resume_rc{kUnset};
  duplex_timer *timer = nullptr;
  static void fired(duplex_timer *t, void *user) {
    auto *k = static_cast<CheckAfterResume *>(user);
    k->closes_seen = k->ev->closes.load();
    duplex_timer_close(t);
    duplex_timer_unref(t);
  }
};
} // namespace

TEST_CASE("read deadline: time spent paused does not count") {
  // Paused for four read timeouts, then resumed on the loop thread. Right
  // after the resume a 0 ms timer is started; had the paused time counted,
  // the read deadline would already be overdue and (armed earlier, due no
  // later) would fire before that timer. Afterwards, still silent, the read
  // deadline does fire.
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  duplex_conn_opts o;
  SUBCASE("DUPLEX_CONN_START_PAUSED") {
    o = with_timeouts(ev, 0, 100, 0, DUPLEX_CONN_START_PAUSED);
  }
  SUBCASE("paused from on_open") {
    o = with_timeouts(ev, 0, 100, 0);
    ev.open_hook = [](duplex_conn *c) { CHECK(duplex_conn_pause(c) == 0); };
  }
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_open());
  std::this_thread::sleep_for(400ms);
  CHECK(ev.closes.load() == 0);

  CheckAfterResume k;
  k.ev = &ev;
  REQUIRE(on_loop(loop, [&] {
    k.resume_rc = duplex_conn_resume(c);
    // (CHECK, not REQUIRE: this runs on the loop thread.)
    CHECK(duplex_timer_new(&k.timer, loop, CheckAfterResume::fired, &k) == 0);
    if (k.timer != nullptr)
      CHECK(duplex_timer_start(k.timer, 0, 0) == 0);
  }));
  CHECK(k.resume_rc.load() == 0);
  REQUIRE(wait_until([&] { return k.closes_seen.load() != kUnset; }));
  CHECK_MESSAGE(k.closes_seen.load() == 0, "the read deadline counted the paused time");
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("deadlines do not fire while traffic flows, and do once it stops") {
  // The peer sends a byte every 20 ms and reads its echo, for 20 rounds
  // (several times every timeout below). The conn must still be open after
  // the last round; then, with the peer silent, the deadline fires.
  Loop loop;
  ConnEvents ev;
  echo_hook(ev);
  auto sp = socket_pair();
  duplex_conn_opts o;
  SUBCASE("idle 100 ms") { o = with_timeouts(ev, 100, 0, 0); }
  SUBCASE("read 100 ms") { o = with_timeouts(ev, 0, 100, 0); }
  SUBCASE("idle, read and flush 100 ms") { o = with_timeouts(ev, 100, 100, 100); }
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_open());
  int done = echo_rounds(sp.peer.get(), 20, 20ms);
  CHECK(done == 20);
  CHECK(ev.closes.load() == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(ev.bytes_read.load() == 20);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("idle deadline: writes alone keep the conn alive") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  auto o = with_timeouts(ev, 100, 0, 0);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  int peer_fd = sp.peer.get();
  std::atomic<uint64_t> got{0};
  PeerThread drain([peer_fd, &got] {
    read_until_eof(peer_fd, [&](const uint8_t *, size_t n) {
      got += n;
      return true;
    });
  });
  REQUIRE(ev.wait_open());
  for (int i = 0; i < 20; i++) {
    CHECK(duplex_conn_write(c, "w", 1, nullptr, nullptr) == 0);
    std::this_thread::sleep_for(20ms);
  }
  CHECK(ev.closes.load() == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  drain.join();
  CHECK(got.load() == 20);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

// ---------------------------------------------------------------------------
// flush
// ---------------------------------------------------------------------------

TEST_CASE("flush deadline: the peer never reads while we write more than the socket buffer") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  auto o = with_timeouts(ev, 0, 0, 100);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  WriteCounter wc;
  std::vector<uint8_t> big(8u << 20, 'f'); // far more than any socket buffer
  REQUIRE(duplex_conn_write(c, big.data(), big.size(), WriteCounter::cb, &wc) == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  CHECK(ev.opens.load() == 1);
  REQUIRE(wait_until([&] { return wc.total.load() == 1; }));
  CHECK(wc.ok.load() == 0); // its bytes never all went out
  CHECK(loop.free() == 0);
  CHECK(wc.total.load() == 1);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("flush deadline: does not fire while a slow reader makes progress, nor with "
          "nothing queued") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  auto o = with_timeouts(ev, 0, 0, 200);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_open());
  // Nothing queued: the flush deadline does not apply.
  std::this_thread::sleep_for(600ms);
  CHECK(ev.closes.load() == 0);

  // 2 MiB to a reader taking 64 KiB every 20 ms: the queue drains by steady
  // progress, each step far inside the 200 ms flush timeout.
  const size_t total = 2u << 20;
  int peer_fd = sp.peer.get();
  std::atomic<uint64_t> got{0};
  PeerThread slow([peer_fd, &got, total] {
    std::vector<char> buf(64 * 1024);
    while (got.load() < total) {
      ssize_t n = ::read(peer_fd, buf.data(), buf.size());
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        return;
      got += uint64_t(n);
      std::this_thread::sleep_for(20ms);
    }
  });
  WriteCounter wc;
  std::vector<uint8_t> big(total, 's');
  size_t nwrites = 0;
  SUBCASE("one 2 MiB write") {
    REQUIRE(duplex_conn_write(c, big.data(), big.size(), WriteCounter::cb, &wc) == 0);
    nwrites = 1;
  }
  SUBCASE("128 writes of 16 KiB") {
    for (size_t off = 0; off < total; off += 16384, nwrites++)
      REQUIRE(duplex_conn_write(c, big.data() + off, 16384, WriteCounter::cb, &wc) == 0);
  }
  REQUIRE(wait_until([&] { return wc.total.load() == nwrites || ev.closes.load() > 0; }));
  CHECK(wc.ok.load() == nwrites);
  CHECK_MESSAGE(ev.close_reason.load() == kUnset,
                "closed with " << err_str(ev.close_reason.load()) << " after the peer read "
                               << got.load() << " of " << total << " bytes");
  slow.join();
  CHECK(got.load() == total);
  CHECK(ev.closes.load() == 0);
  // Queue empty again: still no flush deadline.
  std::this_thread::sleep_for(600ms);
  CHECK(ev.closes.load() == 0);
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

// ---------------------------------------------------------------------------
// duplex_conn_set_timeout from another thread
// ---------------------------------------------------------------------------

TEST_CASE("duplex_conn_set_timeout from another thread changes a running conn") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  SUBCASE("turn an idle deadline on") {
    auto o = with_timeouts(ev, 0, 0, 0);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    REQUIRE(ev.wait_open());
    std::atomic<int> rc{kUnset};
    std::thread([&] { rc = duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_IDLE, 50); }).join();
    CHECK(rc.load() == 0);
    REQUIRE(ev.wait_closed());
    CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("turn a read deadline on") {
    auto o = with_timeouts(ev, 0, 0, 0);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    REQUIRE(ev.wait_open());
    std::atomic<int> rc{kUnset};
    std::thread([&] { rc = duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_READ, 50); }).join();
    CHECK(rc.load() == 0);
    REQUIRE(ev.wait_closed());
    CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("turn a flush deadline on while a write is stuck") {
    auto o = with_timeouts(ev, 0, 0, 0);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    WriteCounter wc;
    std::vector<uint8_t> big(8u << 20, 'f');
    REQUIRE(duplex_conn_write(c, big.data(), big.size(), WriteCounter::cb, &wc) == 0);
    REQUIRE(ev.wait_open());
    std::atomic<int> rc{kUnset};
    std::thread([&] { rc = duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_FLUSH, 50); }).join();
    CHECK(rc.load() == 0);
    REQUIRE(ev.wait_closed());
    CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
    REQUIRE(wait_until([&] { return wc.total.load() == 1; }));
    CHECK(wc.ok.load() == 0);
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("shorten a 60 s idle deadline to 1 ms: it expires (on the loop)") {
    auto o = with_timeouts(ev, 60000, 0, 0);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    REQUIRE(ev.wait_open());
    std::atomic<int> rc{kUnset};
    std::thread([&] { rc = duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_IDLE, 1); }).join();
    CHECK(rc.load() == 0);
    REQUIRE(ev.wait_closed());
    CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("turn an idle deadline off while traffic holds it off; it never fires") {
    echo_hook(ev);
    auto o = with_timeouts(ev, 150, 0, 0);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    REQUIRE(ev.wait_open());
    int peer_fd = sp.peer.get();
    // Keep traffic flowing across the change, so the old deadline cannot
    // expire before the new value is applied.
    std::atomic<int> rounds{0};
    PeerThread peer([peer_fd, &rounds] { rounds = echo_rounds(peer_fd, 10, 20ms); });
    REQUIRE(wait_until([&] { return ev.bytes_read.load() >= 2; }));
    std::atomic<int> rc{kUnset};
    std::thread([&] { rc = duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_IDLE, 0); }).join();
    CHECK(rc.load() == 0);
    peer.join();
    CHECK(rounds.load() == 10);
    std::this_thread::sleep_for(600ms); // four of the old idle timeouts
    CHECK(ev.closes.load() == 0);
    CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
    REQUIRE(ev.wait_closed());
    CHECK(ev.close_reason.load() == 0);
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("on a closed conn: DUPLEX_ECLOSED") {
    auto o = with_timeouts(ev, 0, 0, 0);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
    REQUIRE(ev.wait_closed());
    std::atomic<int> rc{kUnset};
    std::thread([&] { rc = duplex_conn_set_timeout(c, DUPLEX_TIMEOUT_IDLE, 10); }).join();
    CHECK(rc.load() == DUPLEX_ECLOSED);
    CHECK(ev.close_reason.load() == DUPLEX_ECONNABORTED);
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
}

TEST_CASE("a deadline that fires completes every pending write exactly once and closes "
          "exactly once") {
  Loop loop;
  ConnEvents ev;
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get()); // nothing we queue can leave
  auto o = with_timeouts(ev, 100, 0, 0);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  WriteCounter wc;
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; t++)
    writers.emplace_back([&] {
      for (int i = 0; i < 50; i++)
        if (duplex_conn_write(c, "0123456789", 10, WriteCounter::cb, &wc) != 0)
          wc.total++, wc.failed++; // refusals counted too, never called back
    });
  for (auto &w : writers)
    w.join();
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ETIMEDOUT);
  REQUIRE(wait_until([&] { return wc.total.load() == 200; }));
  CHECK(wc.ok.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(wc.total.load() == 200);
  CHECK(ev.closes.load() == 1);
  CHECK(duplex_conn_unref(c) == 0);
}
