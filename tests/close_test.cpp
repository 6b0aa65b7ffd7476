// Closing: graceful close flushes, abort close cancels, freeing the loop
// cancels, and whatever happens every write completes exactly once, every
// zero-copy buffer is released exactly once, on_close runs exactly once, and
// refs held by other threads stay safe (DUPLEX_ECLOSED).
#include "fixture.hpp"

#include <deque>

using namespace dtest;

namespace {

// A producer thread that writes frames (alternating copy and zero-copy)
// until the conn refuses with something other than DUPLEX_EWOULDBLOCK.
struct Producer {
  uint8_t tid = 0;
  duplex_conn *conn = nullptr;
  bool wait_on_wouldblock = true; // else: poll wait_writable with a short timeout
  // Results.
  std::atomic<uint64_t> accepted_copy{0}, accepted_zc{0}, bytes{0};
  std::atomic<uint64_t> wouldblocks{0};
  std::atomic<int> final_rc{kUnset};
  WriteCounter writes;
  ZcCounter zc;
  std::thread thread;

  void start(uint64_t seed) {
    // The thread holds its own reference for as long as it writes.
    REQUIRE(duplex_conn_ref(conn) == 0);
    thread = std::thread([this, seed] { run(seed); });
  }

  void run(uint64_t seed) {
    Rng rng(seed);
    uint8_t buf[4096];
    for (uint32_t seq = 0;; seq++) {
      size_t len = rng.range(frame::kHeader, sizeof buf);
      frame::encode(buf, tid, seq, len);
      bool use_zc = seq % 2 == 1;
      void *zbuf = use_zc ? ZcCounter::alloc_copy(buf, len) : nullptr;
      int rc;
      for (;;) {
        rc = use_zc ? duplex_conn_write_zc(conn, zbuf, len, ZcCounter::release, &zc)
                    : duplex_conn_write(conn, buf, len, WriteCounter::cb, &writes);
        if (rc != DUPLEX_EWOULDBLOCK)
          break;
        wouldblocks++;
        // Congested: wait (ECLOSED once the conn is gone, then the write
        // says so too).
        int w = duplex_conn_wait_writable(conn, 100);
        CHECK((w == 0 || w == DUPLEX_ETIMEDOUT || w == DUPLEX_ECLOSED));
      }
      if (rc != 0) {
        if (use_zc)
          std::free(zbuf); // refused: still ours
        final_rc = rc;
        break;
      }
      (use_zc ? accepted_zc : accepted_copy)++;
      bytes += len;
    }
    CHECK(duplex_conn_unref(conn) == 0);
  }

  void join() {
    if (thread.joinable())
      thread.join();
  }
};

// Reads frames until EOF.
struct FramePeer {
  FramePeer(int fd, unsigned nthreads) : verifier(nthreads) {
    thread = PeerThread([this, fd] {
      rc = read_until_eof(fd, [this](const uint8_t *d, size_t n) {
        verifier.feed(d, n);
        return true;
      });
      finished.set();
    });
  }
  frame::Verifier verifier;
  Event finished;
  int rc = -1;
  PeerThread thread;
};

// Every call through a ref to a closed conn is safe and says so.
void check_closed_conn(duplex_conn *conn) {
  CHECK(duplex_conn_write(conn, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
  duplex_buf b = {"x", 1};
  CHECK(duplex_conn_writev(conn, &b, 1, nullptr, nullptr) == DUPLEX_ECLOSED);
  ZcCounter z;
  void *p = ZcCounter::alloc_copy("x", 1);
  CHECK(duplex_conn_write_zc(conn, p, 1, ZcCounter::release, &z) == DUPLEX_ECLOSED);
  CHECK(z.released.load() == 0); // refused: still ours
  std::free(p);
  CHECK(duplex_conn_shutdown(conn, nullptr, nullptr) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_pause(conn) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_resume(conn) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_wait_writable(conn, 0) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_wait_writable(conn, 1000) == DUPLEX_ECLOSED);
  size_t q = 12345;
  CHECK(duplex_conn_get_queued(conn, &q) == 0);
  CHECK(q == 0);
  void *u = nullptr;
  CHECK(duplex_conn_get_user(conn, &u) == 0);
  CHECK(duplex_conn_ref(conn) == 0);
  CHECK(duplex_conn_unref(conn) == 0);
}

} // namespace

TEST_CASE("graceful close flushes every byte queued before it, then EOF") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);

  const size_t kChunk = 64 * 1024, kChunks = 64; // 4 MiB
  std::vector<uint8_t> all = pattern(kChunk * kChunks, 0, 5);
  PatternChecker checker(5);
  Event peer_done;
  std::atomic<int> peer_rc{kUnset};
  PeerThread peer([&] {
    peer_rc = read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      checker.feed(d, n);
      return true;
    });
    peer_done.set();
  });

  WriteCounter w;
  ZcCounter z;
  for (size_t i = 0; i < kChunks; i++) {
    const uint8_t *p = all.data() + i * kChunk;
    if (i % 4 == 3) {
      REQUIRE(duplex_conn_write_zc(conn, ZcCounter::alloc_copy(p, kChunk), kChunk,
                                   ZcCounter::release, &z) == 0);
    } else {
      REQUIRE(duplex_conn_write(conn, p, kChunk, WriteCounter::cb, &w) == 0);
    }
  }
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  // After close: refused, and the same kind of close again too.
  CHECK(duplex_conn_write(conn, "late", 4, WriteCounter::cb, &w) == DUPLEX_ECLOSED);
  duplex_buf b = {"late", 4};
  CHECK(duplex_conn_writev(conn, &b, 1, WriteCounter::cb, &w) == DUPLEX_ECLOSED);
  void *late = ZcCounter::alloc_copy("late", 4);
  CHECK(duplex_conn_write_zc(conn, late, 4, ZcCounter::release, &z) == DUPLEX_ECLOSED);
  std::free(late);
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == DUPLEX_ECLOSED);

  CHECK(peer_done.wait());
  peer.join();
  CHECK(peer_rc.load() == 0);
  CHECK(checker.ok());
  CHECK(checker.offset == all.size());
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] { return w.total.load() + z.released.load() == kChunks; }));
  CHECK(w.ok.load() == kChunks - kChunks / 4);
  CHECK(z.ok.load() == kChunks / 4);
  CHECK(w.total.load() + z.released.load() == kChunks); // no callbacks for refused writes
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.order_errors.load() == 0);
  check_closed_conn(conn);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
}

TEST_CASE("graceful close while 4 threads write: every accepted write arrives") {
  const unsigned kThreads = 4;
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts(256 * 1024, 64 * 1024, 1024 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  FramePeer peer(sp.peer.get(), kThreads);

  std::deque<Producer> prods(kThreads);
  for (unsigned t = 0; t < kThreads; t++) {
    prods[t].tid = static_cast<uint8_t>(t);
    prods[t].conn = conn;
    prods[t].start(t + 1);
  }
  const uint64_t kBeforeClose = kTsan ? 2000 : 20000;
  CHECK(wait_until([&] {
    uint64_t n = 0;
    for (auto &p : prods)
      n += p.accepted_copy + p.accepted_zc;
    return n >= kBeforeClose;
  }));
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  for (auto &p : prods)
    p.join();
  CHECK(peer.finished.wait());
  peer.thread.join();

  uint64_t bytes = 0;
  for (unsigned t = 0; t < kThreads; t++) {
    Producer &p = prods[t];
    INFO("thread " << t);
    CHECK(p.final_rc.load() == DUPLEX_ECLOSED);
    bytes += p.bytes;
    CHECK(wait_until([&] {
      return p.writes.total.load() == p.accepted_copy.load() &&
             p.zc.released.load() == p.accepted_zc.load();
    }));
    // Graceful and the peer reads: everything accepted was written.
    CHECK(p.writes.ok.load() == p.accepted_copy.load());
    CHECK(p.zc.ok.load() == p.accepted_zc.load());
    CHECK(peer.verifier.count(t) == p.accepted_copy.load() + p.accepted_zc.load());
  }
  CHECK_MESSAGE(peer.verifier.ok(), peer.verifier.error());
  CHECK(peer.verifier.dangling() == 0);
  CHECK(peer.verifier.frame_bytes() == bytes);
  CHECK(ev.wait_closed());
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.order_errors.load() == 0);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  for (auto &p : prods) {
    CHECK(p.writes.total.load() == p.accepted_copy.load());
    CHECK(p.zc.released.load() == p.accepted_zc.load());
  }
}

TEST_CASE("abort close cancels pending writes, each completes exactly once") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  // The peer never reads: nothing queued can reach the kernel.
  fill_send_buffer(sp.ours.get());
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  CHECK(ev.wait_open());

  WriteCounter w;
  ZcCounter z;
  std::vector<uint8_t> chunk = pattern(64 * 1024, 0, 1);
  const int kWrites = 40;
  for (int i = 0; i < kWrites; i++) {
    if (i % 2)
      REQUIRE(duplex_conn_write_zc(conn, ZcCounter::alloc_copy(chunk.data(), chunk.size()),
                                   chunk.size(), ZcCounter::release, &z) == 0);
    else
      REQUIRE(duplex_conn_write(conn, chunk.data(), chunk.size(), WriteCounter::cb, &w) == 0);
  }
  WriteCounter sd;
  REQUIRE(duplex_conn_shutdown(conn, WriteCounter::cb, &sd) == 0);

  SUBCASE("abort alone") {}
  SUBCASE("abort overrides a graceful close that cannot finish") {
    REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
    CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == DUPLEX_ECLOSED);
    REQUIRE(on_loop(loop, [] {})); // the graceful close is in effect
    CHECK(ev.closes.load() == 0);   // and stuck behind the unread data
  }
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(duplex_conn_write(conn, "x", 1, WriteCounter::cb, &w) == DUPLEX_ECLOSED);
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] {
    return w.total.load() == kWrites / 2 && z.released.load() == kWrites / 2 &&
           sd.total.load() == 1;
  }));
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == DUPLEX_ECLOSED);
  CHECK(w.total.load() == kWrites / 2);
  CHECK(z.released.load() == kWrites / 2);
  CHECK(w.failed.load() == 0);
  CHECK(z.failed.load() == 0);
  CHECK(w.canceled.load() + z.canceled.load() >= 1);
  CHECK(w.canceled.load() == kWrites / 2); // the kernel buffer was full
  CHECK(z.canceled.load() == kWrites / 2);
  CHECK(sd.canceled.load() == 1);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECONNABORTED); // an abort, not a graceful end
  CHECK(ev.order_errors.load() == 0);
  size_t q = 1;
  CHECK(duplex_conn_get_queued(conn, &q) == 0);
  CHECK(q == 0);
  check_closed_conn(conn);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("freeing the loop with writes pending from other threads") {
  const unsigned kThreads = 4;
  std::thread::id main_thread = std::this_thread::get_id();
  ConnEvents ev;
  std::deque<Producer> prods(kThreads);
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get()); // the peer never reads
  duplex_conn *conn = nullptr;
  {
    Loop loop;
    auto opts = ev.opts(64 * 1024, 16 * 1024, 256 * 1024);
    conn = adopt(loop, sp.ours, &opts);
    for (unsigned t = 0; t < kThreads; t++) {
      prods[t].tid = static_cast<uint8_t>(t);
      prods[t].conn = conn;
      prods[t].start(t + 11);
    }
    // Every producer has met the hard limit: writes are pending.
    CHECK(wait_until([&] {
      for (auto &p : prods)
        if (p.wouldblocks.load() == 0 && p.final_rc.load() == kUnset)
          return false;
      return true;
    }));
    CHECK(loop.free() == 0);
    // Everything on the loop closed before free returned, on this thread.
    CHECK(ev.closes.load() == 1);
    CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
    CHECK(ev.close_thread.load() == main_thread);
  }
  // The producers' refs are still valid; they now get DUPLEX_ECLOSED.
  for (auto &p : prods)
    p.join();
  uint64_t canceled = 0;
  for (unsigned t = 0; t < kThreads; t++) {
    Producer &p = prods[t];
    INFO("thread " << t);
    CHECK(p.final_rc.load() == DUPLEX_ECLOSED);
    CHECK(p.writes.total.load() == p.accepted_copy.load());
    CHECK(p.zc.released.load() == p.accepted_zc.load());
    CHECK(p.writes.failed.load() == 0);
    CHECK(p.zc.failed.load() == 0);
    CHECK(p.writes.ok.load() + p.writes.canceled.load() == p.accepted_copy.load());
    CHECK(p.zc.ok.load() + p.zc.canceled.load() == p.accepted_zc.load());
    canceled += p.writes.canceled + p.zc.canceled;
  }
  CHECK(canceled >= 1);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  // Our own ref after the loop is gone.
  check_closed_conn(conn);
  CHECK(duplex_conn_unref(conn) == 0);
}

TEST_CASE("a ref held by another thread returns DUPLEX_ECLOSED after close") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  REQUIRE(duplex_conn_ref(conn) == 0); // the other thread's ref
  Event closed;
  std::thread other([&] {
    closed.wait();
    check_closed_conn(conn);
    CHECK(duplex_conn_unref(conn) == 0);
  });
  // Drop the creator's ref first: the other thread's ref keeps it alive.
  CHECK(duplex_conn_unref(conn) == 0);
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  closed.set();
  other.join();
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("close requested from 8 threads at once: one wins, on_close once") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::atomic<int> ok{0}, closed{0}, other{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; i++) {
    threads.emplace_back([&] {
      while (!go.load())
        std::this_thread::yield();
      int rc = duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL);
      (rc == 0 ? ok : rc == DUPLEX_ECLOSED ? closed : other)++;
    });
  }
  go = true;
  for (auto &t : threads)
    t.join();
  CHECK(ok.load() == 1);
  CHECK(closed.load() == 7);
  CHECK(other.load() == 0);
  CHECK(ev.wait_closed());
  CHECK(on_loop(loop, [] {}));
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
}

TEST_CASE("close from inside a callback runs on_close later, not inside") {
  ConnEvents ev;
  Loop loop;
  std::atomic<int> rc{kUnset}, closes_at_return{kUnset};
  ev.open_hook = [&](duplex_conn *c) {
    rc = duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL);
    closes_at_return = ev.closes.load();
  };
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  CHECK(ev.wait_closed());
  CHECK(rc.load() == 0);
  CHECK(closes_at_return.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  // The peer sees EOF.
  char c;
  CHECK(::read(sp.peer.get(), &c, 1) == 0);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("freeing the loop closes conns nobody else holds") {
  ConnEvents ev[3];
  WriteCounter w;
  std::thread::id main_thread = std::this_thread::get_id();
  {
    Loop loop;
    for (auto &e : ev) {
      auto sp = socket_pair();
      auto opts = e.opts();
      duplex_conn *c = adopt(loop, sp.ours, &opts);
      REQUIRE(duplex_conn_write(c, "abc", 3, WriteCounter::cb, &w) == 0);
      CHECK(duplex_conn_unref(c) == 0); // only the loop holds it now
      // sp.peer closes here: the conn may see EOF or an error first.
    }
    CHECK(loop.free() == 0);
  }
  for (auto &e : ev) {
    CHECK(e.closes.load() == 1);
    CHECK(e.order_errors.load() == 0);
    if (e.close_thread.load() != main_thread)
      CHECK(e.close_reason.load() != DUPLEX_ECANCELED);
  }
  CHECK(w.total.load() == 3);
}

TEST_CASE("the last unref from another thread during on_close frees nothing early") {
  ConnEvents ev;
  Loop loop;
  Event in_close, unrefed;
  std::atomic<int> get_user_rc{kUnset}, queued_rc{kUnset}, write_rc{kUnset};
  std::atomic<void *> user_seen{nullptr};
  ev.close_hook = [&](duplex_conn *c, int) {
    in_close.set();
    unrefed.wait(); // the other thread has dropped its (the last user) ref
    // The conn is still ours for the rest of this callback.
    void *u = nullptr;
    get_user_rc = duplex_conn_get_user(c, &u);
    user_seen = u;
    size_t q = 1;
    queued_rc = duplex_conn_get_queued(c, &q);
    write_rc = duplex_conn_write(c, "x", 1, nullptr, nullptr);
  };
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::thread other([&] {
    CHECK(in_close.wait());
    CHECK(duplex_conn_unref(conn) == 0);
    unrefed.set();
  });
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  other.join();
  CHECK(ev.wait_closed());
  CHECK(get_user_rc.load() == 0);
  CHECK(user_seen.load() == &ev);
  CHECK(queued_rc.load() == 0);
  CHECK(write_rc.load() == DUPLEX_ECLOSED);
  CHECK(loop.free() == 0);
}
