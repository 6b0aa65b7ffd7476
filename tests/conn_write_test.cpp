// Writing to one conn from many threads: per-thread order, no split or
// interleaved writes, every byte; write-done callbacks and zero-copy releases
// exactly once; zero-length writes as flush markers; unsplittable writev.
//
// The peer is plain blocking POSIX code on the other end of a socketpair; it
// checks the framed stream (see fixture.hpp, namespace frame).
#include "fixture.hpp"

#include <deque>
#include <numeric>

using namespace dtest;

namespace {

struct Producer;

// The user pointer of one write: which producer, which sequence number.
struct Tag {
  Producer *p;
  uint32_t seq;
};

struct Producer {
  uint8_t tid = 0;
  std::vector<Tag> tags;
  std::atomic<uint64_t> accepted{0}, bytes{0}, wouldblocks{0};
  std::atomic<uint64_t> done{0}, bad_status{0}, order_errors{0}, off_thread{0};
  std::atomic<uint32_t> next_done{0};
  std::atomic<int> last_rc{0};
  duplex_loop *loop = nullptr;
};

void tagged_done(duplex_conn *, int status, void *user) {
  auto *t = static_cast<Tag *>(user);
  Producer *p = t->p;
  if (status != 0)
    p->bad_status++;
  if (p->loop && duplex_loop_on_thread(p->loop) != 1)
    p->off_thread++;
  uint32_t expect = p->next_done.load(std::memory_order_relaxed);
  if (t->seq != expect)
    p->order_errors++;
  p->next_done.store(t->seq + 1, std::memory_order_relaxed);
  p->done++;
}

// Release of a zero-copy frame: the buffer must come back intact, once.
void tagged_release(void *data, size_t len, int status, void *user) {
  auto *t = static_cast<Tag *>(user);
  Producer *p = t->p;
  const auto *b = static_cast<const uint8_t *>(data);
  size_t flen = len >= frame::kHeader ? (size_t(b[2]) | (size_t(b[3]) << 8)) : 0;
  uint32_t seq = len >= frame::kHeader
                     ? (uint32_t(b[4]) | (uint32_t(b[5]) << 8) |
                        (uint32_t(b[6]) << 16) | (uint32_t(b[7]) << 24))
                     : UINT32_MAX;
  if (status != 0 || flen != len || b[1] != p->tid || seq != t->seq)
    p->bad_status++;
  std::free(data);
  p->done++;
}

// Run the peer reader on its own thread; joinable; records everything.
struct FramePeer {
  explicit FramePeer(int fd, unsigned nthreads) : verifier(nthreads) {
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

} // namespace

TEST_CASE("writes from 8 threads keep per-thread order and are never split") {
  const unsigned kThreads = 8;
  constexpr uint32_t kWrites = kTsan ? 25000 : 100000;
  ConnEvents ev;
  Loop loop;
  std::atomic<int> open_on_thread{kUnset};
  ev.open_hook = [&](duplex_conn *) {
    open_on_thread = duplex_loop_on_thread(loop);
  };
  auto sp = socket_pair();
  // Small limits so that producers meet DUPLEX_EWOULDBLOCK and retry.
  auto opts = ev.opts(256 * 1024, 64 * 1024, 1024 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  FramePeer peer(sp.peer.get(), kThreads);

  std::deque<Producer> prods(kThreads);
  {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; t++) {
      Producer &p = prods[t];
      p.tid = static_cast<uint8_t>(t);
      p.loop = loop;
      p.tags.resize(kWrites);
      for (uint32_t i = 0; i < kWrites; i++)
        p.tags[i] = Tag{&p, i};
      threads.emplace_back([&p, conn] {
        Rng rng(p.tid + 1);
        uint8_t buf[300];
        for (uint32_t seq = 0; seq < kWrites; seq++) {
          size_t len = rng.range(frame::kHeader, sizeof buf);
          frame::encode(buf, p.tid, seq, len);
          int rc = retry_wouldblock(
              conn,
              [&] {
                return duplex_conn_write(conn, buf, len, tagged_done,
                                         &p.tags[seq]);
              },
              &p.wouldblocks);
          if (rc != 0) {
            p.last_rc = rc;
            CHECK_MESSAGE(rc == 0, "thread " << int(p.tid) << " seq " << seq
                                              << ": " << err_str(rc));
            return;
          }
          p.accepted++;
          p.bytes += len;
        }
      });
    }
    for (auto &th : threads)
      th.join();
  }
  uint64_t accepted = 0, bytes = 0, wouldblocks = 0;
  for (auto &p : prods) {
    accepted += p.accepted;
    bytes += p.bytes;
    wouldblocks += p.wouldblocks;
  }
  MESSAGE("writes: " << accepted << ", bytes: " << bytes
                     << ", EWOULDBLOCK retries: " << wouldblocks);
  CHECK(accepted == uint64_t(kThreads) * kWrites);

  // Everything queued; half-close so the peer sees EOF after the last byte.
  WriteCounter sd;
  REQUIRE(duplex_conn_shutdown(conn, WriteCounter::cb, &sd) == 0);
  CHECK(peer.finished.wait());
  CHECK(wait_until([&] {
    uint64_t d = 0;
    for (auto &p : prods)
      d += p.done;
    return d == accepted && sd.total.load() == 1;
  }));

  peer.thread.join();
  CHECK(peer.rc == 0);
  CHECK_MESSAGE(peer.verifier.ok(), peer.verifier.error());
  CHECK(peer.verifier.dangling() == 0);
  CHECK(peer.verifier.frame_bytes() == bytes);
  CHECK(peer.verifier.bytes() == bytes);
  for (unsigned t = 0; t < kThreads; t++) {
    INFO("thread " << t);
    CHECK(peer.verifier.count(t) == prods[t].accepted.load());
    CHECK(prods[t].done.load() == prods[t].accepted.load());
    CHECK(prods[t].order_errors.load() == 0);
    CHECK(prods[t].bad_status.load() == 0);
    CHECK(prods[t].off_thread.load() == 0);
  }
  CHECK(sd.ok.load() == 1);
  CHECK(sd.total.load() == 1);

  // The peer closes its end: EOF + our shutdown done = close with reason 0.
  sp.peer.reset();
  CHECK(ev.wait_closed());
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.opens.load() == 1);
  CHECK(ev.eofs.load() == 1);
  CHECK(open_on_thread.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("zero-copy writes from 4 threads are released exactly once, intact") {
  const unsigned kThreads = 4;
  constexpr uint32_t kWrites = kTsan ? 3000 : 20000;
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts(256 * 1024, 64 * 1024, 1024 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  FramePeer peer(sp.peer.get(), kThreads);

  std::deque<Producer> prods(kThreads);
  std::atomic<uint64_t> leaked_on_error{0};
  {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; t++) {
      Producer &p = prods[t];
      p.tid = static_cast<uint8_t>(t);
      p.tags.resize(kWrites);
      for (uint32_t i = 0; i < kWrites; i++)
        p.tags[i] = Tag{&p, i};
      threads.emplace_back([&p, conn, &leaked_on_error] {
        Rng rng(p.tid + 100);
        for (uint32_t seq = 0; seq < kWrites; seq++) {
          size_t len = rng.range(frame::kHeader, 2000);
          auto *buf = static_cast<uint8_t *>(std::malloc(len));
          frame::encode(buf, p.tid, seq, len);
          // A refused write leaves the buffer with us: retry the same one.
          int rc = retry_wouldblock(
              conn,
              [&] {
                return duplex_conn_write_zc(conn, buf, len, tagged_release,
                                            &p.tags[seq]);
              },
              &p.wouldblocks);
          if (rc != 0) {
            std::free(buf);
            leaked_on_error++;
            CHECK_MESSAGE(rc == 0, "zc write: " << err_str(rc));
            return;
          }
          p.accepted++;
          p.bytes += len;
        }
      });
    }
    for (auto &th : threads)
      th.join();
  }
  uint64_t accepted = 0, bytes = 0;
  for (auto &p : prods) {
    accepted += p.accepted;
    bytes += p.bytes;
  }
  CHECK(accepted == uint64_t(kThreads) * kWrites);
  REQUIRE(duplex_conn_shutdown(conn, nullptr, nullptr) == 0);
  CHECK(peer.finished.wait());
  CHECK(wait_until([&] {
    uint64_t d = 0;
    for (auto &p : prods)
      d += p.done;
    return d == accepted;
  }));
  peer.thread.join();
  CHECK_MESSAGE(peer.verifier.ok(), peer.verifier.error());
  CHECK(peer.verifier.frame_bytes() == bytes);
  CHECK(peer.verifier.dangling() == 0);
  for (unsigned t = 0; t < kThreads; t++) {
    INFO("thread " << t);
    CHECK(peer.verifier.count(t) == prods[t].accepted.load());
    CHECK(prods[t].done.load() == prods[t].accepted.load());
    CHECK(prods[t].bad_status.load() == 0);
  }
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(ev.closes.load() == 1);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  // Exactly once, also counting anything released during free.
  for (auto &p : prods)
    CHECK(p.done.load() == p.accepted.load());
}

TEST_CASE("writev is one unsplittable write, even with empty pieces") {
  const unsigned kVecThreads = 3, kPlainThreads = 2;
  const unsigned kThreads = kVecThreads + kPlainThreads;
  constexpr uint32_t kWrites = kTsan ? 3000 : 20000;
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts(128 * 1024, 32 * 1024, 512 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  FramePeer peer(sp.peer.get(), kThreads);

  std::deque<Producer> prods(kThreads);
  {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; t++) {
      Producer &p = prods[t];
      p.tid = static_cast<uint8_t>(t);
      p.loop = loop;
      p.tags.resize(kWrites);
      for (uint32_t i = 0; i < kWrites; i++)
        p.tags[i] = Tag{&p, i};
      bool vec = t < kVecThreads;
      threads.emplace_back([&p, conn, vec] {
        Rng rng(p.tid + 7);
        uint8_t buf[1500];
        for (uint32_t seq = 0; seq < kWrites; seq++) {
          size_t len = rng.range(frame::kHeader, sizeof buf);
          frame::encode(buf, p.tid, seq, len);
          duplex_buf bufs[8];
          size_t n = 0;
          if (vec) {
            // Cut the frame in up to 8 pieces at random points, including
            // empty pieces (NULL base) and a cut inside the header.
            size_t pieces = rng.range(1, 8);
            size_t off = 0;
            for (size_t k = 0; k < pieces; k++) {
              size_t left = len - off;
              size_t take = k + 1 == pieces ? left : rng.range(0, left);
              bufs[n].base = take ? buf + off : nullptr;
              bufs[n].len = take;
              n++;
              off += take;
            }
          }
          int rc = retry_wouldblock(
              conn,
              [&] {
                return vec ? duplex_conn_writev(conn, bufs, n, tagged_done,
                                                &p.tags[seq])
                           : duplex_conn_write(conn, buf, len, tagged_done,
                                               &p.tags[seq]);
              },
              &p.wouldblocks);
          if (rc != 0) {
            CHECK_MESSAGE(rc == 0, (vec ? "writev: " : "write: ") << err_str(rc));
            return;
          }
          p.accepted++;
          p.bytes += len;
        }
      });
    }
    for (auto &th : threads)
      th.join();
  }
  uint64_t accepted = 0, bytes = 0;
  for (auto &p : prods) {
    accepted += p.accepted;
    bytes += p.bytes;
  }
  CHECK(accepted == uint64_t(kThreads) * kWrites);
  REQUIRE(duplex_conn_shutdown(conn, nullptr, nullptr) == 0);
  CHECK(peer.finished.wait());
  CHECK(wait_until([&] {
    uint64_t d = 0;
    for (auto &p : prods)
      d += p.done;
    return d == accepted;
  }));
  peer.thread.join();
  CHECK_MESSAGE(peer.verifier.ok(), peer.verifier.error());
  CHECK(peer.verifier.frame_bytes() == bytes);
  CHECK(peer.verifier.dangling() == 0);
  for (unsigned t = 0; t < kThreads; t++) {
    INFO("thread " << t);
    CHECK(peer.verifier.count(t) == prods[t].accepted.load());
    CHECK(prods[t].done.load() == prods[t].accepted.load());
    CHECK(prods[t].order_errors.load() == 0);
    CHECK(prods[t].bad_status.load() == 0);
    CHECK(prods[t].off_thread.load() == 0);
  }
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

namespace {
struct FlushCtx {
  WriteCounter *big = nullptr;
  duplex_conn *conn = nullptr;
  std::atomic<int> status{kUnset};
  std::atomic<int> runs{0};
  std::atomic<uint64_t> big_done_at_marker{UINT64_MAX};
  std::atomic<size_t> queued_at_marker{SIZE_MAX};
  std::atomic<int> queued_rc{kUnset};
};
void marker_done(duplex_conn *c, int status, void *user) {
  auto *f = static_cast<FlushCtx *>(user);
  f->big_done_at_marker = f->big->total.load();
  size_t q = SIZE_MAX;
  f->queued_rc = duplex_conn_get_queued(c, &q);
  f->queued_at_marker = q;
  f->status = status;
  f->runs++;
}
} // namespace

TEST_CASE("a zero-length write is a flush marker") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);

  const size_t kChunk = 64 * 1024, kChunks = 32; // 2 MiB, beyond the socket buffer
  std::vector<uint8_t> all = pattern(kChunk * kChunks, 0, 42);
  PatternChecker checker(42);
  Event peer_done;
  std::atomic<bool> peer_go{false};
  PeerThread peer([&] {
    // Read only once the marker is queued, so it has to wait for the data.
    wait_until([&] { return peer_go.load(); });
    read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      checker.feed(d, n);
      return true;
    });
    peer_done.set();
  });

  WriteCounter big;
  FlushCtx mk;
  mk.big = &big;
  mk.conn = conn;
  for (size_t i = 0; i < kChunks; i++)
    REQUIRE(duplex_conn_write(conn, all.data() + i * kChunk, kChunk,
                              WriteCounter::cb, &big) == 0);
  REQUIRE(duplex_conn_write(conn, nullptr, 0, marker_done, &mk) == 0);
  peer_go = true;
  CHECK(wait_until([&] { return mk.runs.load() == 1; }));
  CHECK(mk.status.load() == 0);
  // Every write queued before the marker had completed when it ran.
  CHECK(mk.big_done_at_marker.load() == kChunks);
  CHECK(mk.queued_rc.load() == 0);
  CHECK(mk.queued_at_marker.load() == 0);
  CHECK(big.ok.load() == kChunks);

  SUBCASE("on an empty queue it completes too, and not inside the call") {
    FlushCtx mk2;
    mk2.big = &big;
    std::atomic<int> rc{kUnset}, runs_at_return{kUnset};
    REQUIRE(on_loop(loop, [&] {
      rc = duplex_conn_write(conn, "", 0, marker_done, &mk2);
      runs_at_return = mk2.runs.load();
    }));
    CHECK(rc.load() == 0);
    CHECK(runs_at_return.load() == 0);
    CHECK(wait_until([&] { return mk2.runs.load() == 1; }));
    CHECK(mk2.status.load() == 0);
  }

  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(peer_done.wait());
  peer.join();
  CHECK(checker.ok());
  CHECK(checker.offset == all.size()); // the marker added no bytes
  CHECK(ev.wait_closed());
  CHECK(ev.close_reason.load() == 0);
  CHECK(mk.runs.load() == 1);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("writes on the loop thread never call back inside the call") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::string got;
  Event peer_done;
  PeerThread peer([&] {
    read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      got.append(reinterpret_cast<const char *>(d), n);
      return true;
    });
    peer_done.set();
  });
  CHECK(ev.wait_open());

  WriteCounter w;
  ZcCounter z;
  std::atomic<int> rc1{kUnset}, rc2{kUnset}, rc3{kUnset}, rc4{kUnset};
  std::atomic<uint64_t> w_at_return{99}, z_at_return{99};
  static const char kStatic[] = "static|";
  REQUIRE(on_loop(loop, [&] {
    rc1 = duplex_conn_write(conn, "copy|", 5, WriteCounter::cb, &w);
    void *zc = ZcCounter::alloc_copy("zc|", 3);
    rc2 = duplex_conn_write_zc(conn, zc, 3, ZcCounter::release, &z);
    duplex_buf v[2] = {{"vec", 3}, {"tor|", 4}};
    rc3 = duplex_conn_writev(conn, v, 2, WriteCounter::cb, &w);
    // Static data needs no release callback.
    rc4 = duplex_conn_write_zc(conn, const_cast<char *>(kStatic),
                               sizeof kStatic - 1, nullptr, nullptr);
    w_at_return = w.total.load();
    z_at_return = z.released.load();
  }));
  CHECK(rc1.load() == 0);
  CHECK(rc2.load() == 0);
  CHECK(rc3.load() == 0);
  CHECK(rc4.load() == 0);
  CHECK(w_at_return.load() == 0);
  CHECK(z_at_return.load() == 0);
  CHECK(wait_until([&] { return w.total.load() == 2 && z.released.load() == 1; }));
  CHECK(w.ok.load() == 2);
  CHECK(z.ok.load() == 1);
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(peer_done.wait());
  peer.join();
  CHECK(got == "copy|zc|vector|static|");
  CHECK(ev.wait_closed());
  CHECK(ev.closes.load() == 1);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK(w.total.load() == 2);
  CHECK(z.released.load() == 1);
}

TEST_CASE("writes made before the loop runs are queued and flushed in order") {
  ConnEvents ev;
  Loop loop(false);
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  WriteCounter w;
  std::vector<uint8_t> big = pattern(3 * 1024 * 1024, 0, 9);
  REQUIRE(duplex_conn_write(conn, big.data(), 1024 * 1024, WriteCounter::cb, &w) == 0);
  REQUIRE(duplex_conn_write(conn, big.data() + 1024 * 1024, 2 * 1024 * 1024,
                            WriteCounter::cb, &w) == 0);
  CHECK(w.total.load() == 0);
  PatternChecker checker(9);
  Event peer_done;
  PeerThread peer([&] {
    read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      checker.feed(d, n);
      return true;
    });
    peer_done.set();
  });
  REQUIRE(duplex_loop_start(loop) == 0);
  CHECK(wait_until([&] { return w.total.load() == 2; }));
  CHECK(w.ok.load() == 2);
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(peer_done.wait());
  peer.join();
  CHECK(checker.ok());
  CHECK(checker.offset == big.size());
  CHECK(ev.wait_closed());
  CHECK(ev.opens.load() == 1);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

namespace {
// The loop thread as one more producer: each post writes a run of frames
// (the first ones go straight to the kernel, later ones queue behind them).
struct LoopProducer {
  Producer p;
  duplex_conn *conn = nullptr;
  uint32_t seq = 0, per_post = 0, posts_left = 0;
  std::atomic<int> errors{0};
  std::atomic<bool> finished{false};
  Rng rng{1234};
};
void loop_producer_step(duplex_loop *loop, int status, void *arg) {
  auto *lp = static_cast<LoopProducer *>(arg);
  if (status != 0) {
    lp->errors++;
    lp->finished = true;
    return;
  }
  uint8_t buf[4000];
  for (uint32_t i = 0; i < lp->per_post; i++) {
    size_t len = lp->rng.range(frame::kHeader, sizeof buf);
    frame::encode(buf, lp->p.tid, lp->seq, len);
    int rc = duplex_conn_write(lp->conn, buf, len, tagged_done, &lp->p.tags[lp->seq]);
    if (rc != 0) {
      lp->errors++;
      lp->finished = true;
      return;
    }
    lp->p.accepted++;
    lp->p.bytes += len;
    lp->seq++;
  }
  if (--lp->posts_left == 0 || duplex_loop_post(loop, loop_producer_step, lp) != 0)
    lp->finished = true;
}
} // namespace

TEST_CASE("loop-thread writes and other threads' writes keep their own orders") {
  const unsigned kThreads = 3;
  constexpr uint32_t kWrites = kTsan ? 2000 : 10000;
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  // A hard limit the loop thread never meets (it must not wait).
  auto opts = ev.opts(1024 * 1024, 256 * 1024, 256u * 1024 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  FramePeer peer(sp.peer.get(), kThreads + 1);

  LoopProducer lp;
  lp.conn = conn;
  lp.p.tid = kThreads;
  lp.p.loop = loop;
  lp.per_post = 100;
  lp.posts_left = kWrites / lp.per_post;
  lp.p.tags.resize(kWrites);
  for (uint32_t i = 0; i < kWrites; i++)
    lp.p.tags[i] = Tag{&lp.p, i};
  std::deque<Producer> prods(kThreads);
  REQUIRE(duplex_loop_post(loop, loop_producer_step, &lp) == 0);
  {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; t++) {
      Producer &p = prods[t];
      p.tid = static_cast<uint8_t>(t);
      p.loop = loop;
      p.tags.resize(kWrites);
      for (uint32_t i = 0; i < kWrites; i++)
        p.tags[i] = Tag{&p, i};
      threads.emplace_back([&p, conn] {
        Rng rng(p.tid + 50);
        uint8_t buf[4000];
        for (uint32_t seq = 0; seq < kWrites; seq++) {
          size_t len = rng.range(frame::kHeader, sizeof buf);
          frame::encode(buf, p.tid, seq, len);
          int rc = retry_wouldblock(conn, [&] {
            return duplex_conn_write(conn, buf, len, tagged_done, &p.tags[seq]);
          });
          if (rc != 0) {
            CHECK_MESSAGE(rc == 0, err_str(rc));
            return;
          }
          p.accepted++;
          p.bytes += len;
        }
      });
    }
    for (auto &th : threads)
      th.join();
  }
  CHECK(wait_until([&] { return lp.finished.load(); }));
  CHECK(lp.errors.load() == 0);
  CHECK(lp.p.accepted.load() == kWrites);
  REQUIRE(duplex_conn_shutdown(conn, nullptr, nullptr) == 0);
  CHECK(peer.finished.wait());
  peer.thread.join();
  CHECK_MESSAGE(peer.verifier.ok(), peer.verifier.error());
  CHECK(peer.verifier.dangling() == 0);
  auto check = [&](Producer &p) {
    INFO("producer " << int(p.tid));
    CHECK(wait_until([&] { return p.done.load() == p.accepted.load(); }));
    CHECK(peer.verifier.count(p.tid) == p.accepted.load());
    CHECK(p.order_errors.load() == 0);
    CHECK(p.bad_status.load() == 0);
    CHECK(p.off_thread.load() == 0);
  };
  for (auto &p : prods)
    check(p);
  check(lp.p);
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}
