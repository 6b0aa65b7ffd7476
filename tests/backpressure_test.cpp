// Backpressure: a slow reader can never make the queue grow without bound.
// Crossing the high watermark calls on_backpressure, falling to the low
// watermark calls on_writable and wakes duplex_conn_wait_writable(); past the
// hard limit a write is refused whole (DUPLEX_EWOULDBLOCK) and the caller
// keeps its bytes.
//
// The conn's socket is filled before adoption and the peer does not read
// until told to, so nothing the conn queues can reach the kernel: queue
// growth is exact, not timing-dependent.
#include "fixture.hpp"

using namespace dtest;

namespace {

constexpr size_t kHigh = 64 * 1024;
constexpr size_t kLow = 16 * 1024;
constexpr size_t kHard = 256 * 1024;
constexpr size_t kChunk = 4096;

// Reads and discards @p n bytes on a peer thread when started.
struct Drainer {
  int fd;
  std::atomic<bool> ok{false};
  Event done;
  PeerThread thread;
  Drainer(int f, size_t n) : fd(f) {
    thread = PeerThread([this, n] {
      ok = drain_exactly(fd, n);
      done.set();
    });
  }
};

} // namespace

TEST_CASE("a producer meets DUPLEX_EWOULDBLOCK exactly at the hard limit") {
  ConnEvents ev;
  Loop loop;
  std::atomic<int> wait_in_cb{kUnset};
  std::atomic<size_t> queued_in_writable{SIZE_MAX};
  ev.backpressure_hook = [&](duplex_conn *c, size_t) {
    wait_in_cb = duplex_conn_wait_writable(c, 0);
  };
  ev.writable_hook = [&](duplex_conn *c) {
    size_t q = SIZE_MAX;
    duplex_conn_get_queued(c, &q);
    queued_in_writable = q;
  };
  auto sp = socket_pair();
  size_t prefill = fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(kHigh, kLow, kHard);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  CHECK(ev.wait_open());
  CHECK(duplex_conn_wait_writable(conn, 0) == 0); // nothing queued yet

  // --- Fill: a producer thread writes as fast as it can. ---
  WriteCounter w;
  std::vector<uint8_t> stream = pattern(2 * kHard, 0, 21);
  size_t accepted = 0, max_queued = 0, queued_at_refusal = 0;
  int refusal = 0;
  std::thread producer([&] {
    for (size_t off = 0; off + kChunk <= stream.size(); off += kChunk) {
      int rc = duplex_conn_write(conn, stream.data() + off, kChunk, WriteCounter::cb, &w);
      size_t q = SIZE_MAX;
      CHECK(duplex_conn_get_queued(conn, &q) == 0);
      if (rc != 0) {
        refusal = rc;
        queued_at_refusal = q;
        return;
      }
      accepted += kChunk;
      max_queued = std::max(max_queued, q);
    }
  });
  producer.join();
  CHECK(refusal == DUPLEX_EWOULDBLOCK);
  // Writes are taken while their cost (payload + DUPLEX_WRITE_OVERHEAD
  // each) fits under the hard limit; the next one is refused.
  const size_t kCost = kChunk + DUPLEX_WRITE_OVERHEAD;
  const size_t kFits = kHard / kCost * kCost;
  CHECK(accepted / kChunk == kHard / kCost);
  CHECK(max_queued <= kHard);
  CHECK(queued_at_refusal == kFits);
  CHECK(queued_at_refusal + kCost > kHard);

  // Crossed the high watermark once.
  CHECK(wait_until([&] { return ev.backpressures.load() == 1; }));
  CHECK(ev.backpressures.load() == 1);
  CHECK(ev.writables.load() == 0);
  CHECK(ev.last_bp_queued.load() >= kHigh);
  CHECK(ev.last_bp_queued.load() <= kHard);
  CHECK(wait_in_cb.load() == DUPLEX_EDEADLK); // on the loop thread

  // Still congested: refused whole, whatever the write function.
  CHECK(duplex_conn_write(conn, "x", 1, WriteCounter::cb, &w) == DUPLEX_EWOULDBLOCK);
  duplex_buf v[2] = {{"a", 1}, {"b", 1}};
  CHECK(duplex_conn_writev(conn, v, 2, WriteCounter::cb, &w) == DUPLEX_EWOULDBLOCK);
  ZcCounter z;
  void *zbuf = ZcCounter::alloc_copy(stream.data(), kChunk);
  CHECK(duplex_conn_write_zc(conn, zbuf, kChunk, ZcCounter::release, &z) == DUPLEX_EWOULDBLOCK);
  // The refused buffer is still ours: readable, writable, freeable.
  std::memset(zbuf, 0, kChunk);
  std::free(zbuf);

  // wait_writable: times out while congested, refuses on the loop thread.
  CHECK(duplex_conn_wait_writable(conn, 0) == DUPLEX_EWOULDBLOCK);
  CHECK(duplex_conn_wait_writable(conn, 20) == DUPLEX_ETIMEDOUT);
  std::atomic<int> on_loop_rc{kUnset};
  REQUIRE(on_loop(loop, [&] { on_loop_rc = duplex_conn_wait_writable(conn, 0); }));
  CHECK(on_loop_rc.load() == DUPLEX_EDEADLK);
  size_t q = 0;
  CHECK(duplex_conn_get_queued(conn, &q) == 0);
  CHECK(q == kFits); // nothing refused was queued
  CHECK(w.total.load() == 0);

  // --- Drain: the peer reads everything; a waiting producer wakes. ---
  std::atomic<int> waited{kUnset};
  std::thread waiter([&] { waited = duplex_conn_wait_writable(conn, 60000); });
  Drainer drain(sp.peer.get(), prefill);
  CHECK(drain.done.wait());
  PatternChecker checker(21);
  std::vector<uint8_t> buf(accepted);
  CHECK(read_exactly(sp.peer.get(), buf.data(), buf.size()));
  checker.feed(buf.data(), buf.size());
  CHECK(checker.ok());
  waiter.join();
  CHECK(drain.ok.load());
  CHECK(waited.load() == 0);
  CHECK(wait_until([&] {
    return ev.writables.load() == 1 && w.total.load() == accepted / kChunk;
  }));
  CHECK(ev.backpressures.load() == 1);
  CHECK(ev.writables.load() == 1);
  CHECK(queued_in_writable.load() <= kLow);
  CHECK(w.ok.load() == accepted / kChunk);
  CHECK(z.released.load() == 0); // the refused zero-copy write never comes back
  CHECK(duplex_conn_wait_writable(conn, 0) == 0);

  // --- Second round without a prefilled socket: the counts still pair up.
  size_t accepted2 = 0;
  int refusal2 = 0;
  size_t max_queued2 = 0;
  std::thread producer2([&] {
    for (size_t i = 0; i < 100000; i++) {
      int rc = duplex_conn_write(conn, stream.data(), kChunk, nullptr, nullptr);
      if (rc != 0) {
        refusal2 = rc;
        return;
      }
      accepted2 += kChunk;
      size_t qq = 0;
      duplex_conn_get_queued(conn, &qq);
      max_queued2 = std::max(max_queued2, qq);
    }
  });
  producer2.join();
  CHECK(refusal2 == DUPLEX_EWOULDBLOCK);
  CHECK(max_queued2 <= kHard);
  Drainer drain2(sp.peer.get(), accepted2);
  CHECK(drain2.done.wait());
  CHECK(drain2.ok.load());
  CHECK(wait_until([&] {
    size_t qq = 1;
    duplex_conn_get_queued(conn, &qq);
    return qq == 0 && ev.writables.load() == ev.backpressures.load();
  }));
  CHECK(ev.backpressures.load() >= 2);
  CHECK(ev.writables.load() == ev.backpressures.load());
  CHECK(ev.order_errors.load() == 0); // strictly alternating

  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(ev.close_reason.load() == 0);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("a write into an empty queue is taken whole, even past the limit") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(kHigh, kLow, kHard);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::vector<uint8_t> big(4 * kHard, 'B');
  WriteCounter w;
  REQUIRE(duplex_conn_write(conn, big.data(), big.size(), WriteCounter::cb, &w) == 0);
  CHECK(duplex_conn_write(conn, "x", 1, WriteCounter::cb, &w) == DUPLEX_EWOULDBLOCK);
  size_t q = 0;
  CHECK(duplex_conn_get_queued(conn, &q) == 0);
  CHECK(q == big.size() + DUPLEX_WRITE_OVERHEAD);
  CHECK(wait_until([&] { return ev.backpressures.load() == 1; }));
  CHECK(ev.last_bp_queued.load() == big.size() + DUPLEX_WRITE_OVERHEAD);
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] { return w.total.load() == 1; }));
  CHECK(w.canceled.load() == 1);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

// A big write refused while the queue is below the high watermark must not
// leave wait_writable() returning at once (a retry loop would spin): the
// refusal counts as congestion until the queue is back at the low mark.
TEST_CASE("after a refusal below the high watermark, wait_writable waits") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  size_t prefill = fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(kHigh, kLow, kHard);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  REQUIRE(ev.wait_open());
  WriteCounter w;
  std::vector<uint8_t> small(kLow + kChunk, 's'); // above low, below high
  REQUIRE(duplex_conn_write(conn, small.data(), small.size(), WriteCounter::cb, &w) == 0);
  std::vector<uint8_t> big(kHard, 'B'); // does not fit beside it
  CHECK(duplex_conn_write(conn, big.data(), big.size(), WriteCounter::cb, &w) ==
        DUPLEX_EWOULDBLOCK);
  CHECK(big[0] == 'B'); // still the caller's
  // The peer reads nothing: the queue cannot drain, so a waiter times out.
  CHECK(duplex_conn_wait_writable(conn, 0) == DUPLEX_EWOULDBLOCK);
  CHECK(duplex_conn_wait_writable(conn, 20) == DUPLEX_ETIMEDOUT);
  // Once the peer drains everything, the waiter returns and the retry fits.
  Drainer d(sp.peer.get(), prefill + small.size() + big.size());
  CHECK(duplex_conn_wait_writable(conn, -1) == 0);
  CHECK(wait_until([&] { return ev.writables.load() == 1; }));
  REQUIRE(duplex_conn_write(conn, big.data(), big.size(), WriteCounter::cb, &w) == 0);
  d.done.wait();
  CHECK(d.ok.load());
  CHECK(wait_until([&] { return w.total.load() == 2; }));
  CHECK(w.ok.load() == 2);
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("default limits: 16 MiB hard limit, 1 MiB high watermark") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(); // all zero: defaults
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  const size_t kBig = 64 * 1024;
  std::vector<uint8_t> chunk(kBig, 'D');
  size_t accepted = 0;
  int rc = 0;
  while ((rc = duplex_conn_write(conn, chunk.data(), kBig, nullptr, nullptr)) == 0) {
    accepted += kBig;
    if (accepted > 64u * 1024 * 1024)
      break; // unbounded: fail below rather than exhaust memory
  }
  CHECK(rc == DUPLEX_EWOULDBLOCK);
  const size_t kHardDefault = 16u * 1024 * 1024;
  CHECK(accepted / kBig == kHardDefault / (kBig + DUPLEX_WRITE_OVERHEAD));
  CHECK(wait_until([&] { return ev.backpressures.load() == 1; }));
  CHECK(ev.last_bp_queued.load() >= 1024u * 1024);
  CHECK(ev.last_bp_queued.load() <= 16u * 1024 * 1024);
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("4 producers never push the queue past the hard limit plus one write") {
  const unsigned kThreads = 4;
  const size_t kMaxWrite = 8192;
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  size_t prefill = fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(kHigh, kLow, kHard);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::atomic<uint64_t> accepted{0}, over{0}, refusals{0};
  std::atomic<size_t> max_seen{0};
  std::atomic<bool> stop_monitor{false};
  std::thread monitor([&] {
    while (!stop_monitor.load()) {
      size_t q = 0;
      duplex_conn_get_queued(conn, &q);
      if (q > kHard + kMaxWrite)
        over++;
      size_t m = max_seen.load();
      while (q > m && !max_seen.compare_exchange_weak(m, q)) {
      }
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> threads;
  std::vector<uint8_t> data(kMaxWrite, 'P');
  for (unsigned t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      Rng rng(t + 5);
      // Write until refused three times in a row.
      int refused_in_a_row = 0;
      while (refused_in_a_row < 3) {
        size_t len = rng.range(1, kMaxWrite);
        int rc = duplex_conn_write(conn, data.data(), len, nullptr, nullptr);
        if (rc == 0) {
          accepted += len;
          refused_in_a_row = 0;
          size_t q = 0;
          duplex_conn_get_queued(conn, &q);
          if (q > kHard + kMaxWrite)
            over++;
        } else {
          CHECK(rc == DUPLEX_EWOULDBLOCK);
          if (rc != DUPLEX_EWOULDBLOCK)
            return;
          refusals++;
          refused_in_a_row++;
        }
      }
    });
  }
  for (auto &t : threads)
    t.join();
  stop_monitor = true;
  monitor.join();
  CHECK(over.load() == 0);
  CHECK(max_seen.load() <= kHard + kMaxWrite);
  CHECK(accepted.load() <= kHard + kMaxWrite);
  CHECK(refusals.load() >= kThreads * 3);
  // Drain everything; the conn becomes writable again.
  Drainer drain(sp.peer.get(), prefill + accepted.load());
  CHECK(drain.done.wait());
  CHECK(drain.ok.load());
  CHECK(wait_until([&] { return ev.writables.load() == ev.backpressures.load(); }));
  CHECK(ev.backpressures.load() == 1);
  CHECK(ev.writables.load() == 1);
  CHECK(duplex_conn_wait_writable(conn, 0) == 0);
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("a producer blocked in wait_writable gets DUPLEX_ECLOSED on close") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(kHigh, kLow, kHard);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::vector<uint8_t> big(kHard, 'W');
  REQUIRE(duplex_conn_write(conn, big.data(), big.size(), nullptr, nullptr) == 0);
  CHECK(wait_until([&] { return ev.backpressures.load() == 1; }));
  std::atomic<int> rc{kUnset};
  Event waiting;
  std::thread waiter([&] {
    waiting.set();
    rc = duplex_conn_wait_writable(conn, 60000);
  });
  waiting.wait();
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  waiter.join();
  CHECK(rc.load() == DUPLEX_ECLOSED);
  CHECK(ev.wait_closed());
  CHECK(ev.writables.load() == 0);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

// duplex_conn_wait_room waits for the room one write needs, not for the low
// watermark: a producer with a big write refused keeps going as soon as that
// write fits.
TEST_CASE("wait_room waits for the room a write needs, not for the low watermark") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  size_t prefill = fill_send_buffer(sp.ours.get());
  constexpr size_t kHighHere = 200 * 1024;
  auto opts = ev.opts(kHighHere, kLow, kHard);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  REQUIRE(ev.wait_open());
  CHECK(duplex_conn_wait_room(conn, kHard * 4, 0) == 0); // empty queue: anything fits
  WriteCounter w;
  std::vector<uint8_t> first(100 * 1024, 'f'); // above low, below high
  REQUIRE(duplex_conn_write(conn, first.data(), first.size(), WriteCounter::cb, &w) == 0);
  std::vector<uint8_t> big(kHighHere, 'B'); // does not fit beside it
  CHECK(duplex_conn_write(conn, big.data(), big.size(), WriteCounter::cb, &w) ==
        DUPLEX_EWOULDBLOCK);
  // The refusal counts as congestion until the low watermark...
  CHECK(duplex_conn_wait_writable(conn, 0) == DUPLEX_EWOULDBLOCK);
  // ...but a write that fits beside the queue needs no wait at all.
  const size_t fits = kHard - (first.size() + DUPLEX_WRITE_OVERHEAD) - DUPLEX_WRITE_OVERHEAD;
  CHECK(duplex_conn_wait_room(conn, fits, 0) == 0);
  CHECK(duplex_conn_wait_room(conn, fits + 1, 0) == DUPLEX_EWOULDBLOCK);
  CHECK(duplex_conn_wait_room(conn, big.size(), 20) == DUPLEX_ETIMEDOUT);
  // A waiter for the big write wakes once the peer drains enough.
  std::atomic<int> waited{kUnset};
  std::thread waiter([&] { waited = duplex_conn_wait_room(conn, big.size(), -1); });
  Drainer d(sp.peer.get(), prefill + first.size() + big.size());
  waiter.join();
  CHECK(waited.load() == 0);
  REQUIRE(duplex_conn_write(conn, big.data(), big.size(), WriteCounter::cb, &w) == 0);
  d.done.wait();
  CHECK(d.ok.load());
  CHECK(wait_until([&] { return w.total.load() == 2; }));
  CHECK(w.ok.load() == 2);
  // On the loop thread it would wait for itself.
  std::atomic<int> on_loop_rc{kUnset};
  REQUIRE(on_loop(loop, [&] { on_loop_rc = duplex_conn_wait_room(conn, 1, -1); }));
  CHECK(on_loop_rc.load() == DUPLEX_EDEADLK);
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_wait_room(conn, 1, 0) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("a producer blocked in wait_room gets DUPLEX_ECLOSED on close") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(kHigh, kLow, kHard);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  REQUIRE(ev.wait_open());
  std::vector<uint8_t> block(kHard / 2, 'q');
  WriteCounter w;
  REQUIRE(duplex_conn_write(conn, block.data(), block.size(), WriteCounter::cb, &w) == 0);
  std::atomic<int> waited{kUnset};
  std::thread waiter([&] { waited = duplex_conn_wait_room(conn, kHard, -1); });
  std::this_thread::sleep_for(10ms); // let it block (not required for the result)
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  waiter.join();
  CHECK(waited.load() == DUPLEX_ECLOSED);
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] { return w.total.load() == 1; }));
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}
