// The peer goes away while we write a lot: reset (TCP RST via SO_LINGER 0),
// or a UNIX socket closed with unread data. The process has NO SIGPIPE
// handler (default disposition, which would kill it): it must live, and the
// error must be reported through the write callbacks and/or on_close.
#include "fixture.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

using namespace dtest;

namespace {

// A plain listening TCP socket on 127.0.0.1, port chosen by the kernel.
struct RawListener {
  Fd fd;
  uint16_t port = 0;
  RawListener() {
    fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
    REQUIRE(::listen(fd.get(), 8) == 0);
    socklen_t len = sizeof a;
    REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr *>(&a), &len) == 0);
    port = ntohs(a.sin_port);
  }
};

void reset_close(int fd) {
  linger lg{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  ::close(fd);
}

// Writes 64 KiB chunks until the conn refuses (DUPLEX_ECLOSED expected once
// the error closed it).
struct Producer {
  duplex_conn *conn;
  WriteCounter writes;
  std::atomic<uint64_t> accepted{0};
  std::atomic<int> final_rc{kUnset};
  std::thread thread;
  explicit Producer(duplex_conn *c) : conn(c) {
    REQUIRE(duplex_conn_ref(conn) == 0);
    thread = std::thread([this] {
      std::vector<uint8_t> chunk(64 * 1024, 'R');
      auto deadline = std::chrono::steady_clock::now() + kGuard;
      for (;;) {
        int rc = duplex_conn_write(conn, chunk.data(), chunk.size(), WriteCounter::cb, &writes);
        if (rc == DUPLEX_EWOULDBLOCK) {
          int w = duplex_conn_wait_writable(conn, 100);
          CHECK((w == 0 || w == DUPLEX_ETIMEDOUT || w == DUPLEX_ECLOSED));
          if (std::chrono::steady_clock::now() > deadline) {
            final_rc = DUPLEX_ETIMEDOUT;
            break;
          }
          continue;
        }
        if (rc != 0) {
          final_rc = rc;
          break;
        }
        accepted++;
      }
      CHECK(duplex_conn_unref(conn) == 0);
    });
  }
  ~Producer() { join(); }
  void join() {
    if (thread.joinable())
      thread.join();
  }
};

void check_reported(ConnEvents &ev, WriteCounter &w, uint64_t accepted) {
  int reason = ev.close_reason.load();
  MESSAGE("on_close reason: " << err_str(reason) << "; writes ok "
                              << w.ok.load() << ", failed " << w.failed.load()
                              << " (last " << err_str(w.last_error.load())
                              << "), canceled " << w.canceled.load());
  CHECK(ev.closes.load() == 1);
  CHECK(reason < 0);
  CHECK(reason != DUPLEX_ECANCELED);
  CHECK((w.failed.load() > 0 || reason < 0));
  if (w.failed.load() > 0)
    CHECK(w.last_error.load() < 0);
  // Every accepted write completed exactly once.
  CHECK(w.total.load() == accepted);
  CHECK(ev.order_errors.load() == 0);
}

} // namespace

TEST_CASE("TCP peer resets mid-write: no SIGPIPE, the error is reported") {
  REQUIRE(sigpipe_is_default());
  REQUIRE_FALSE(sigpipe_blocked_here());
  ConnEvents ev;
  Loop loop;
  RawListener server;
  auto opts = ev.opts();
  duplex_conn *conn = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&conn, loop, "127.0.0.1", server.port, &opts) == 0);
  REQUIRE(conn != nullptr);

  std::atomic<bool> peer_ok{false};
  PeerThread peer([&] {
    int fd = ::accept(server.fd.get(), nullptr, nullptr);
    if (fd < 0)
      return;
    // Take some, then reset with plenty still in flight.
    peer_ok = drain_exactly(fd, 256 * 1024);
    reset_close(fd);
  });
  CHECK(ev.wait_open());
  Producer prod(conn);
  peer.join();
  CHECK(peer_ok.load());
  CHECK(ev.wait_closed());
  prod.join();
  CHECK(prod.final_rc.load() == DUPLEX_ECLOSED);
  CHECK(wait_until([&] { return prod.writes.total.load() == prod.accepted.load(); }));
  check_reported(ev, prod.writes, prod.accepted.load());
  CHECK(ev.opens.load() == 1);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK(sigpipe_is_default());
  CHECK_FALSE(sigpipe_blocked_here());
}

TEST_CASE("UNIX peer closes with unread data while 2 threads write") {
  REQUIRE(sigpipe_is_default());
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  Producer a(conn), b(conn);
  CHECK(drain_exactly(sp.peer.get(), 512 * 1024));
  sp.peer.reset(); // unread data still queued: we get EPIPE / ECONNRESET
  CHECK(ev.wait_closed());
  a.join();
  b.join();
  CHECK(a.final_rc.load() == DUPLEX_ECLOSED);
  CHECK(b.final_rc.load() == DUPLEX_ECLOSED);
  CHECK(wait_until([&] {
    return a.writes.total.load() == a.accepted.load() &&
           b.writes.total.load() == b.accepted.load();
  }));
  WriteCounter both;
  both.total = a.writes.total + b.writes.total;
  both.ok = a.writes.ok + b.writes.ok;
  both.failed = a.writes.failed + b.writes.failed;
  both.canceled = a.writes.canceled + b.writes.canceled;
  both.last_error = a.writes.failed ? a.writes.last_error.load() : b.writes.last_error.load();
  check_reported(ev, both, a.accepted + b.accepted);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK(sigpipe_is_default());
}

namespace {
// Loop-thread writer for the caller-run loop: writes from on_open (directly,
// on the loop thread) and stops the loop on close.
struct CallerRun {
  duplex_loop *loop = nullptr;
  WriteCounter writes;
  std::atomic<uint64_t> accepted{0};
  std::atomic<int> first_rc{kUnset};
  std::vector<uint8_t> chunk = std::vector<uint8_t>(64 * 1024, 'C');
};
} // namespace

TEST_CASE("peer gone, loop run on the caller's thread: SIGPIPE never escapes") {
  REQUIRE(sigpipe_is_default());
  REQUIRE_FALSE(sigpipe_blocked_here());
  REQUIRE_FALSE(sigpipe_pending());
  bool closed_first = false;
  SUBCASE("peer closed before the first write") { closed_first = true; }
  SUBCASE("peer closes mid-stream") { closed_first = false; }

  ConnEvents ev;
  Loop loop(false);
  CallerRun cr;
  cr.loop = loop;
  ev.open_hook = [&](duplex_conn *c) {
    // On the loop thread, nothing queued: these are written at once.
    for (int i = 0; i < 64; i++) {
      int rc = duplex_conn_write(c, cr.chunk.data(), cr.chunk.size(), WriteCounter::cb, &cr.writes);
      if (i == 0)
        cr.first_rc = rc;
      if (rc != 0)
        break;
      cr.accepted++;
    }
  };
  ev.close_hook = [&](duplex_conn *, int) { duplex_loop_stop(cr.loop); };
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  PeerThread peer;
  if (closed_first) {
    sp.peer.reset();
  } else {
    peer = PeerThread([&] {
      drain_exactly(sp.peer.get(), 128 * 1024);
      sp.peer.reset();
    });
  }
  // Hang guard for the run below.
  Event returned;
  std::thread dog([&] {
    if (!returned.wait())
      duplex_loop_stop(loop);
  });
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
  returned.set();
  dog.join();
  peer.join();
  // The thread's signal state is as before: SIGPIPE neither blocked nor
  // pending (it would kill us the moment it is unblocked).
  CHECK_FALSE(sigpipe_blocked_here());
  CHECK_FALSE(sigpipe_pending());
  CHECK(sigpipe_is_default());
  CHECK(cr.first_rc.load() == 0);
  // Drain any remaining completions on this thread.
  pump_until(loop, [&] { return cr.writes.total.load() == cr.accepted.load(); });
  check_reported(ev, cr.writes, cr.accepted.load());
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK_FALSE(sigpipe_pending());
}

namespace {
struct StatusSlot {
  std::atomic<int> status{kUnset};
  std::atomic<int> runs{0};
};
void slot_done(duplex_conn *, int status, void *user) {
  auto *s = static_cast<StatusSlot *>(user);
  s->status = status;
  s->runs++;
}
} // namespace

// write_cb: "status is 0 once the bytes were handed to the kernel". A write
// whose every byte the peer has read was certainly handed to the kernel, so
// it completes with 0 even when a later write in the same burst fails.
TEST_CASE("writes the peer received complete with 0 even if later ones fail") {
  const size_t kChunk = 64 * 1024, kDelivered = 4;
  size_t kChunks = 32; // 2 MiB: more than a socketpair buffers
  ConnEvents ev;
  Loop loop;
  Fd peer_fd;
  duplex_conn *conn = nullptr;
  SUBCASE("UNIX socketpair, peer closes with unread data") {
    auto sp = socket_pair();
    auto opts = ev.opts();
    conn = adopt(loop, sp.ours, &opts);
    peer_fd = std::move(sp.peer);
  }
  SUBCASE("TCP, peer resets") {
    // Loopback TCP buffers several MiB: make the burst larger than that.
    kChunks = 512;
    RawListener server;
    auto opts = ev.opts(0, 0, 64u * 1024 * 1024);
    REQUIRE(duplex_conn_connect_tcp(&conn, loop, "127.0.0.1", server.port, &opts) == 0);
    peer_fd.reset(::accept(server.fd.get(), nullptr, nullptr));
    REQUIRE(peer_fd);
  }
  REQUIRE(conn != nullptr);
  std::vector<uint8_t> chunk(kChunk, 'S');
  std::vector<StatusSlot> slots(kChunks);
  for (size_t i = 0; i < kChunks; i++)
    REQUIRE(duplex_conn_write(conn, chunk.data(), kChunk, slot_done, &slots[i]) == 0);
  // The peer takes exactly the first kDelivered writes, then goes away.
  CHECK(drain_exactly(peer_fd.get(), kDelivered * kChunk));
  reset_close(peer_fd.release());
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] { return slots.back().runs.load() == 1; }));
  int reason = ev.close_reason.load();
  MESSAGE("on_close reason: " << err_str(reason));
  CHECK(reason < 0);
  for (size_t i = 0; i < kChunks; i++) {
    INFO("write " << i << " status " << err_str(slots[i].status.load()));
    CHECK(slots[i].runs.load() == 1);
    if (i < kDelivered)
      CHECK(slots[i].status.load() == 0); // the peer read every byte of it
    else
      CHECK(slots[i].status.load() != kUnset);
  }
  size_t failed = 0;
  for (auto &sl : slots)
    failed += sl.status.load() != 0;
  // Run-length summary of the statuses in call order, for diagnosis.
  std::string runs;
  for (size_t i = 0; i < kChunks;) {
    size_t j = i;
    while (j < kChunks && slots[j].status.load() == slots[i].status.load())
      j++;
    runs += " [" + std::to_string(i) + ".." + std::to_string(j - 1) + "] " +
            duplex_err_name(slots[i].status.load());
    i = j;
  }
  MESSAGE(failed << " of " << kChunks << " writes did not complete with 0:" << runs);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}
