// Regression tests for the defects an outside review found at 78bf722 (the
// reproductions are in the review's repros/ directory; each case names its
// defect number and repro). Every case asserts what a user relies on: the
// bytes, their order, exactly-once callbacks, error codes, and liveness as
// "a loop timer keeps firing / the call returns / the loop frees". No case
// asserts how long anything takes; the waits are hang guards (hardening.hpp)
// and a loop that spins or blocks for good ends the process with a message
// instead of running into meson's timeout.
//
// Defects that need a libuv or libc function interposed (5, 8, 11) are in
// hardening_interpose_test.cpp, the C++-layer ones (2 via coroutines, 3) in
// hardening_cpp_test.cpp, and those that need a fork()ed child with its own
// stdio (13, 14) in hardening_fork_test.cpp.
#include "hardening.hpp"

#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <shared_mutex>

using namespace dtest;
using namespace hard;

namespace {

duplex_framing lines() {
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_DELIMITED;
  f.delimiter[0] = '\n';
  f.delimiter_len = 1;
  return f;
}

// A peer thread that reads everything and checks it is a stream of 64-byte
// records whose first 8 bytes count 0, 1, 2, ... (one writer's sequence).
struct SeqPeer {
  static constexpr size_t kRec = 64;
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> records{0};
  std::atomic<bool> out_of_order{false};
  std::atomic<int> read_error{0};
  PeerThread thread;

  static void make(uint8_t *rec, uint64_t seq) {
    std::memcpy(rec, &seq, 8);
    std::memset(rec + 8, static_cast<int>(seq & 0x7f), kRec - 8);
  }

  void start(int fd) {
    thread = PeerThread([this, fd] {
      std::string pend;
      uint64_t next = 0;
      int rc = read_until_eof(fd, [&](const uint8_t *d, size_t n) {
        pend.append(reinterpret_cast<const char *>(d), n);
        size_t off = 0;
        while (pend.size() - off >= kRec) {
          uint8_t want[kRec];
          make(want, next);
          if (std::memcmp(pend.data() + off, want, kRec) != 0)
            out_of_order = true;
          next++;
          off += kRec;
        }
        pend.erase(0, off);
        records = next;
        bytes += n;
        return true;
      });
      read_error = rc;
    });
  }
};

// Raw TCP client connected to 127.0.0.1:port (blocking connect; the kernel
// completes it from the listener's backlog).
Fd tcp_client(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sa.sin_port = htons(port);
  REQUIRE_MESSAGE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0,
                  "connect: " << std::strerror(errno));
  return fd;
}

void set_recv_timeout(int fd, std::chrono::seconds s) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(s.count());
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

} // namespace

// ---------------------------------------------------------------------------
// Defect 1 (adopt_wronly_pipe.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 1: adopting a pipe's write end: writes work, no reads, the loop does not "
          "spin and frees") {
  Watchdog wd("defect 1", std::chrono::seconds(90));
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  Fd rd(p[0]), wr(p[1]);

  ConnEvents ev;
  WriteCounter w1, w2;
  Ticker tick;
  Loop loop(false);
  duplex_conn_opts o = ev.opts();
  duplex_conn *c = adopt(loop, wr, &o);
  // Queued before the loop runs, flushed once it does.
  REQUIRE(duplex_conn_write(c, "hello\n", 6, WriteCounter::cb, &w1) == 0);
  tick.start(loop, 10);
  REQUIRE(duplex_loop_start(loop) == 0);

  if (!tick.wait_ticks(10))
    die("defect 1: a 10 ms loop timer fired " + std::to_string(tick.ticks.load()) +
        " times: the loop thread is stuck after adopting a write-only pipe");
  REQUIRE(ev.wait_open(kHang));
  CHECK(ev.opens.load() == 1);
  REQUIRE(wait_until([&] { return w1.total.load() == 1; }, kHang));
  CHECK(w1.ok.load() == 1);

  // A later write from another thread goes out too.
  REQUIRE(duplex_conn_write(c, "again\n", 6, WriteCounter::cb, &w2) == 0);
  REQUIRE(wait_until([&] { return w2.total.load() == 1; }, kHang));
  CHECK(w2.ok.load() == 1);
  if (!tick.wait_more(10))
    die("defect 1: the loop timer stopped firing after a second write to the write-only pipe");

  REQUIRE(readable_within(rd.get(), kHang));
  char buf[12];
  REQUIRE(read_exactly(rd.get(), buf, sizeof buf));
  CHECK(std::string(buf, sizeof buf) == "hello\nagain\n");

  CHECK(ev.reads.load() == 0);
  CHECK(ev.eofs.load() == 0);
  CHECK(ev.closes.load() == 0);
  {
    Watchdog fw("defect 1: duplex_loop_free with an adopted write-only pipe");
    CHECK(loop.free() == 0);
  }
  CHECK(ev.closes.load() == 1);
  CHECK(ev.reads.load() == 0);
  CHECK(ev.eofs.load() == 0);
  CHECK(ev.order_errors.load() == 0);
  CHECK(w1.total.load() == 1);
  CHECK(w2.total.load() == 1);
  duplex_conn_unref(c);
}

// ---------------------------------------------------------------------------
// Defect 2 (held_eof_spin.c)
// ---------------------------------------------------------------------------


namespace {
// Posted from on_read: resume the conn from the loop's idle phase.
struct ResumeJob {
  EventLog *log;
  duplex_conn *conn;
};
void resume_job(duplex_loop *, int status, void *arg) {
  std::unique_ptr<ResumeJob> j(static_cast<ResumeJob *>(arg));
  if (status == 0) {
    j->log->add("[resume]");
    CHECK(duplex_conn_resume(j->conn) == 0);
  }
  duplex_conn_unref(j->conn);
}
} // namespace

TEST_CASE("defect 2: frames held by a pause are delivered on resume before the EOF that "
          "followed them, and the loop does not spin") {
  Watchdog wd("defect 2", std::chrono::seconds(90));
  SocketPair sp = socket_pair();
  REQUIRE(write_all(sp.peer.get(), "a\nb\nc\n", 6) == 0);
  REQUIRE(::shutdown(sp.peer.get(), SHUT_WR) == 0); // FIN right behind the frames

  EventLog log;
  ConnEvents ev;
  Ticker tick;
  Loop loop(false);
  ev.read_hook = [&](duplex_conn *c, const uint8_t *d, size_t n) {
    std::string m(reinterpret_cast<const char *>(d), n);
    log.add("read:" + m);
    if (m == "a") {
      CHECK(duplex_conn_pause(c) == 0); // "b" and "c" are held
      duplex_conn_ref(c);
      auto *j = new ResumeJob{&log, c};
      if (duplex_loop_post(loop, resume_job, j) != 0) {
        duplex_conn_unref(c);
        delete j;
        FAIL_CHECK("duplex_loop_post failed");
      }
    }
  };
  ev.eof_hook = [&](duplex_conn *) { log.add("EOF"); };
  duplex_framing fr = lines();
  duplex_conn_opts o = ev.opts();
  o.framing = &fr;
  duplex_conn *c = adopt(loop, sp.ours, &o);
  tick.start(loop, 10);
  REQUIRE(duplex_loop_start(loop) == 0);

  bool eof = wait_until([&] { return log.has("EOF"); }, kHang);
  CHECK_MESSAGE(eof, "no EOF; events: " << log.joined());
  CHECK(log.joined() == "read:a [resume] read:b read:c EOF");
  if (!tick.wait_more(10))
    die("defect 2: the loop timer stopped firing after resume with held frames and EOF "
        "(events: " + log.joined() + ")");
  CHECK(log.joined() == "read:a [resume] read:b read:c EOF");
  CHECK(ev.closes.load() == 0); // EOF alone does not close: the write side is open
  {
    Watchdog fw("defect 2: duplex_loop_free after held frames and EOF");
    CHECK(loop.free() == 0);
  }
  CHECK(ev.closes.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  CHECK(ev.eofs.load() == 1);
  CHECK(ev.reads.load() == 3);
  duplex_conn_unref(c);
}

// ---------------------------------------------------------------------------
// Defect 4 (chained_writes_starve.c, producers_starve.c)
// ---------------------------------------------------------------------------

namespace {
// Each write's done callback makes the next write, on the loop thread.
struct Chain {
  duplex_conn *conn = nullptr;
  std::atomic<bool> stop{false};
  std::atomic<bool> ended{false};
  std::atomic<uint64_t> accepted{0};
  std::atomic<int> error{0};

  // Probes: a function the chain posts runs at the loop's next iteration,
  // so the chain must yield to it; `max_lag` is the most writes the chain
  // made between posting a probe and the probe running.
  duplex_loop *loop = nullptr;
  bool probe_pending = false; // loop thread
  uint64_t probe_at = 0;      // loop thread
  std::atomic<int> probes_run{0};
  std::atomic<uint64_t> max_lag{0};
  static constexpr int kProbes = 20;

  static void s_probe(duplex_loop *, int status, void *u) {
    auto *ch = static_cast<Chain *>(u);
    if (status != 0)
      return; // the loop is being freed
    uint64_t lag = ch->accepted.load() - ch->probe_at;
    if (lag > ch->max_lag.load())
      ch->max_lag = lag;
    ch->probe_pending = false;
    ch->probes_run++;
  }

  void write_next() {
    uint8_t rec[SeqPeer::kRec];
    SeqPeer::make(rec, accepted.load());
    int rc = duplex_conn_write(conn, rec, sizeof rec, &s_done, this);
    if (rc == 0) {
      accepted++;
    } else {
      error = rc;
      ended = true;
      return;
    }
    if (loop != nullptr && !probe_pending && probes_run.load() < kProbes &&
        duplex_loop_post(loop, &s_probe, this) == 0) {
      probe_pending = true;
      probe_at = accepted.load();
    }
  }
  static void s_done(duplex_conn *, int status, void *u) {
    auto *ch = static_cast<Chain *>(u);
    if (status != 0) {
      ch->error = status;
      ch->ended = true;
    } else if (ch->stop.load()) {
      ch->ended = true;
    } else {
      ch->write_next();
    }
  }
};

void big_buffers(int ours, int peer) {
  int sz = 4 << 20;
  ::setsockopt(ours, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
  ::setsockopt(peer, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
}
} // namespace

TEST_CASE("defect 4: a write chain driven by write-done callbacks on the loop thread lets a "
          "loop timer fire and posted functions run") {
  Watchdog wd("defect 4 (chain)", std::chrono::seconds(120));
  SocketPair sp = socket_pair();
  big_buffers(sp.ours.get(), sp.peer.get());
  SeqPeer peer;
  peer.start(sp.peer.get());

  Chain chain;
  Ticker tick;
  std::atomic<uint64_t> at_tick2{0}, at_tick11{0};
  Loop loop(false);
  duplex_conn *c = adopt(loop, sp.ours, nullptr);
  chain.conn = c;
  chain.loop = loop;
  tick.hook = [&](int n) {
    if (n == 1)
      chain.write_next(); // start the chain
    else if (n == 2)
      at_tick2 = chain.accepted.load();
    else if (n == 11) {
      at_tick11 = chain.accepted.load();
      chain.stop = true; // the chain ends on a count of timer expiries
    }
  };
  tick.start(loop, 10);
  REQUIRE(duplex_loop_start(loop) == 0);

  bool ended = wait_until([&] { return chain.ended.load(); }, kHang);
  int ticks = tick.ticks.load();
  if (!ended) {
    chain.stop = true; // rescue: let the chain end so the loop can recover
    if (!wait_until([&] { return chain.ended.load(); }, kHang))
      die("defect 4: the write chain never ended");
  }
  CHECK_MESSAGE(ended, "the 10 ms timer fired only " << ticks
                           << " times while the chain ran (it needs 11)");
  CHECK(chain.error.load() == 0);
  CHECK(at_tick11.load() > at_tick2.load()); // the chain ran while the timer fired
  // The chain yields to the rest of the loop: a function it posts runs at
  // the next iteration, long before the chain made 1000 more writes (an
  // unfair pump runs the chain for as long as the kernel takes the bytes).
  CHECK(chain.probes_run.load() > 0);
  CHECK_MESSAGE(chain.max_lag.load() <= 1000,
                "a function posted by the chain ran only after the chain made "
                    << chain.max_lag.load() << " more writes");
  uint64_t n = chain.accepted.load();
  CHECK(n > 0);
  CHECK(wait_until([&] { return peer.bytes.load() >= n * SeqPeer::kRec; }, kHang));
  CHECK(peer.bytes.load() == n * SeqPeer::kRec);
  CHECK_FALSE(peer.out_of_order.load());
  {
    Watchdog fw("defect 4: duplex_loop_free after the chain");
    CHECK(loop.free() == 0);
  }
  duplex_conn_unref(c);
  peer.thread.join();
  CHECK(peer.records.load() == n);
}

TEST_CASE("defect 4: a producer thread writing as fast as it can lets a loop timer fire") {
  Watchdog wd("defect 4 (producer)", std::chrono::seconds(120));
  SocketPair sp = socket_pair();
  SeqPeer peer;
  peer.start(sp.peer.get());

  Ticker tick;
  std::atomic<bool> producing{false}, stop{false}, rescue{false};
  std::atomic<int> start_tick{-1};
  std::atomic<uint64_t> writes{0}, at_first{0}, at_stop{0};
  Loop loop(false);
  duplex_conn *c = adopt(loop, sp.ours, nullptr);
  tick.hook = [&](int n) {
    if (!producing.load() || stop.load())
      return;
    if (start_tick.load() < 0) {
      start_tick = n;
      at_first = writes.load();
    } else if (n - start_tick.load() >= 20) {
      at_stop = writes.load();
      stop = true; // the busy phase ends on a count of timer expiries
    }
  };
  tick.start(loop, 10);
  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(tick.wait_ticks(2));

  std::atomic<int> werr{0};
  std::thread producer([&] {
    producing = true;
    uint8_t rec[SeqPeer::kRec];
    while (!stop.load() && !rescue.load()) {
      SeqPeer::make(rec, writes.load());
      int rc = duplex_conn_write(c, rec, sizeof rec, nullptr, nullptr);
      if (rc == 0)
        writes++;
      else if (rc == DUPLEX_EWOULDBLOCK)
        duplex_conn_wait_writable(c, 100);
      else {
        werr = rc;
        break;
      }
    }
  });
  bool stopped = wait_until([&] { return stop.load() || werr.load() != 0; }, kHang);
  int ticks = tick.ticks.load();
  rescue = true;
  producer.join();
  CHECK_MESSAGE(stopped, "the 10 ms timer fired only " << ticks
                             << " times in all while the producer wrote (it needs 20 more "
                                "after the producer started)");
  CHECK(werr.load() == 0);
  CHECK(at_stop.load() > at_first.load()); // the producer wrote while the timer fired
  uint64_t n = writes.load();
  CHECK(wait_until([&] { return peer.bytes.load() >= n * SeqPeer::kRec; }, kHang));
  CHECK(peer.bytes.load() == n * SeqPeer::kRec);
  CHECK_FALSE(peer.out_of_order.load());
  {
    Watchdog fw("defect 4: duplex_loop_free after the producer");
    CHECK(loop.free() == 0);
  }
  duplex_conn_unref(c);
  peer.thread.join();
}

// ---------------------------------------------------------------------------
// Defect 6 (idle_direct_write.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 6: writes made from a loop timer keep the idle deadline from expiring") {
  Watchdog wd("defect 6", std::chrono::seconds(90));
  SocketPair sp = socket_pair();
  std::atomic<uint64_t> got{0};
  PatternChecker chk(6);
  std::mutex chk_mu;
  PeerThread peer([&, fd = sp.peer.get()] {
    read_until_eof(fd, [&](const uint8_t *d, size_t n) {
      {
        std::lock_guard<std::mutex> lk(chk_mu);
        chk.feed(d, n);
      }
      got += n;
      return true;
    });
  });

  constexpr int kWrites = 60;
  ConnEvents ev;
  Ticker tick;
  std::atomic<int> writes{0}, write_err{0}, closes_at_last{-1};
  duplex_conn *c = nullptr;
  Loop loop(false);
  duplex_conn_opts o = ev.opts();
  o.idle_timeout_ms = 1000;
  c = adopt(loop, sp.ours, &o);
  tick.hook = [&](int) {
    int k = writes.load();
    if (k >= kWrites || write_err.load() != 0)
      return;
    uint8_t b[10];
    fill_pattern(b, sizeof b, static_cast<uint64_t>(k) * 10, 6);
    int rc = duplex_conn_write(c, b, sizeof b, nullptr, nullptr);
    if (rc != 0) {
      write_err = rc;
      return;
    }
    writes = k + 1;
    if (k + 1 == kWrites)
      closes_at_last = ev.closes.load();
  };
  tick.start(loop, 20); // 10 bytes every 20 ms
  REQUIRE(duplex_loop_start(loop) == 0);

  REQUIRE(wait_until([&] { return writes.load() == kWrites || ev.closes.load() > 0 ||
                                  write_err.load() != 0; },
                     std::chrono::seconds(60)));
  CHECK_MESSAGE((ev.closes.load() == 0 || closes_at_last.load() == 0),
                "closed after " << writes.load() << " writes with "
                                << err_str(ev.close_reason.load()));
  CHECK(writes.load() == kWrites);
  CHECK(write_err.load() == 0);
  CHECK(closes_at_last.load() == 0);
  uint64_t expect = static_cast<uint64_t>(writes.load()) * 10; // every accepted byte
  CHECK(wait_until([&] { return got.load() >= expect; }, kHang));
  CHECK(got.load() == expect);
  {
    std::lock_guard<std::mutex> lk(chk_mu);
    CHECK(chk.first_bad == UINT64_MAX);
  }
  {
    Watchdog fw("defect 6: duplex_loop_free");
    CHECK(loop.free() == 0);
  }
  duplex_conn_unref(c);
}

// ---------------------------------------------------------------------------
// Defect 7 (entry_amplification.c, channel_arena.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 7: the hard limit counts what a write costs: 1-byte and zero-length writes "
          "are refused once the queue is full, every accepted one completes once") {
  Watchdog wd("defect 7 (hard limit)", std::chrono::seconds(120));
  SocketPair sp = socket_pair();
  fill_send_buffer(sp.ours.get()); // nothing the conn writes can leave it
  constexpr size_t kHard = size_t(4) << 20;
  constexpr uint64_t kMaxWrites = kHard / 32; // at least 32 bytes charged per write

  ConnEvents ev;
  WriteCounter w;
  Loop loop;
  duplex_conn_opts o = ev.opts(size_t(1) << 20, 0, kHard);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_open(kHang));

  uint64_t n = 0;
  int rc = 0;
  while ((rc = duplex_conn_write(c, "x", 1, WriteCounter::cb, &w)) == 0)
    if (++n > kMaxWrites)
      break;
  CHECK_MESSAGE(rc == DUPLEX_EWOULDBLOCK, "1-byte writes with a callback: " << n
                                              << " accepted without a refusal");
  CHECK(n <= kMaxWrites);

  uint64_t m = 0;
  int rc0 = 0;
  while ((rc0 = duplex_conn_write(c, nullptr, 0, WriteCounter::cb, &w)) == 0)
    if (++m > kMaxWrites)
      break;
  CHECK_MESSAGE(rc0 == DUPLEX_EWOULDBLOCK, "zero-length writes at the limit: " << m
                                               << " accepted without a refusal");
  CHECK(n + m <= kMaxWrites);

  REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  REQUIRE(ev.wait_closed(kHang));
  CHECK(wait_until([&] { return w.total.load() >= n + m; }, kHang));
  {
    Watchdog fw("defect 7: duplex_loop_free");
    CHECK(loop.free() == 0);
  }
  CHECK(w.total.load() == n + m); // each accepted write's callback exactly once
  CHECK(w.ok.load() + w.canceled.load() == n + m);
  CHECK(w.failed.load() == 0);
  duplex_conn_unref(c);
}

namespace {
// 64 MiB; under sanitizers (where RSS is not checked) 8 MiB is enough to
// exercise the path.
const size_t kArenaBig = kSanitized ? size_t(8) << 20 : size_t(64) << 20;

struct ArenaSink {
  std::atomic<uint64_t> delivered{0}, big{0}, bad{0};
  static void on_message(duplex_channel *, void *data, size_t len, void *u) {
    auto *s = static_cast<ArenaSink *>(u);
    if (len == kArenaBig) {
      const auto *p = static_cast<const uint8_t *>(data);
      if (p[0] != 'x' || p[len / 2] != 'x' || p[len - 1] != 'x')
        s->bad++;
      s->big++;
    } else if (len != 5 || std::memcmp(data, "small", 5) != 0) {
      s->bad++;
    }
    s->delivered++;
  }
};

uint64_t rss_now() {
  std::FILE *f = std::fopen("/proc/self/statm", "r");
  unsigned long long size = 0, res = 0;
  if (f) {
    if (std::fscanf(f, "%llu %llu", &size, &res) != 2)
      res = 0;
    std::fclose(f);
  }
  return res * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}
} // namespace

TEST_CASE("defect 7: a channel gives back the memory of a 64 MiB message once smaller ones "
          "follow") {
  Watchdog wd("defect 7 (channel arena)", std::chrono::seconds(120));
  ArenaSink sink;
  Loop loop;
  duplex_channel_opts co = DUPLEX_CHANNEL_OPTS_INIT;
  co.on_message = &ArenaSink::on_message;
  co.user = &sink;
  duplex_channel *ch = nullptr;
  REQUIRE(duplex_channel_new(&ch, loop, &co) == 0);

  // Warm up (first batch, allocator arenas of both threads).
  for (int i = 0; i < 16; i++)
    REQUIRE(duplex_channel_send(ch, "small", 5, -1) == 0);
  REQUIRE(wait_until([&] { return sink.delivered.load() == 16; }, kHang));
  REQUIRE(on_loop(loop, [] { ::malloc_trim(0); }));
  ::malloc_trim(0);
  uint64_t before = rss_now();

  {
    std::vector<char> buf(kArenaBig, 'x');
    REQUIRE(duplex_channel_send(ch, buf.data(), buf.size(), -1) == 0);
  }
  REQUIRE(wait_until([&] { return sink.delivered.load() == 17; }, kHang));
  for (int i = 0; i < 16; i++)
    REQUIRE(duplex_channel_send(ch, "small", 5, -1) == 0);
  REQUIRE(wait_until([&] { return sink.delivered.load() == 33; }, kHang));
  for (int i = 0; i < 16; i++)
    REQUIRE(duplex_channel_send(ch, "small", 5, -1) == 0);
  REQUIRE(wait_until([&] { return sink.delivered.load() == 49; }, kHang));
  // Let the loop finish the batch, then hand free pages back (both threads'
  // malloc arenas), so that RSS shows what is still allocated.
  REQUIRE(on_loop(loop, [] { ::malloc_trim(0); }));
  ::malloc_trim(0);
  uint64_t after = rss_now();

  CHECK(sink.big.load() == 1);
  CHECK(sink.bad.load() == 0);
  if (kSanitized) {
    MESSAGE("RSS check skipped under sanitizers (their allocator keeps freed memory)");
  } else {
    CHECK_MESSAGE(after <= before + (uint64_t(16) << 20),
                  "RSS grew from " << (before >> 20) << " MiB to " << (after >> 20)
                                   << " MiB after one 64 MiB message was delivered");
  }
  {
    Watchdog fw("defect 7: duplex_loop_free");
    CHECK(loop.free() == 0);
  }
  duplex_channel_unref(ch);
}

// ---------------------------------------------------------------------------
// Defect 9 (unix_stale_block.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 9: duplex_listener_unix on a live listener with a full backlog returns "
          "DUPLEX_EADDRINUSE without blocking the loop") {
  Watchdog wd("defect 9", std::chrono::seconds(120));
  TempDir dir;
  std::string path = dir.file("live.sock");
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof sun.sun_path);
  std::memcpy(sun.sun_path, path.c_str(), path.size() + 1);

  // A live listener (another process in real life) that never accepts...
  Fd lfd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(lfd);
  REQUIRE(::bind(lfd.get(), reinterpret_cast<sockaddr *>(&sun), sizeof sun) == 0);
  REQUIRE(::listen(lfd.get(), 0) == 0);
  // ... whose backlog is full: a further non-blocking connect is refused.
  std::vector<Fd> fillers;
  bool full = false;
  for (int i = 0; i < 64 && !full; i++) {
    Fd f(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    REQUIRE(f);
    if (::connect(f.get(), reinterpret_cast<sockaddr *>(&sun), sizeof sun) == 0)
      fillers.push_back(std::move(f));
    else {
      REQUIRE(errno == EAGAIN);
      full = true;
    }
  }
  REQUIRE(full);

  Ticker tick;
  Loop loop(false);
  tick.start(loop, 10);
  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(tick.wait_ticks(2));

  std::atomic<int> rc{kUnset};
  std::thread caller([&] {
    duplex_listener *l = nullptr;
    int r = duplex_listener_unix(&l, loop, path.c_str(), nullptr);
    if (r == 0) {
      duplex_listener_close(l);
      listener_unref(l);
    }
    rc = r;
  });
  bool returned = wait_until([&] { return rc.load() != kUnset; }, kHang);
  int ticks_while_blocked = tick.ticks.load();
  if (!returned) {
    // Drain the live listener's backlog so that a blocked probe completes.
    set_nonblocking(lfd.get(), true);
    for (int i = 0; i < 128; i++) {
      int a = ::accept(lfd.get(), nullptr, nullptr);
      if (a >= 0)
        ::close(a);
    }
    if (!wait_until([&] { return rc.load() != kUnset; }, kHang))
      die("defect 9: duplex_listener_unix stayed blocked after the backlog drained");
  }
  caller.join();
  CHECK_MESSAGE(returned, "duplex_listener_unix blocked while the live listener's backlog "
                          "was full (timer at "
                              << ticks_while_blocked << " ticks)");
  CHECK(rc.load() == DUPLEX_EADDRINUSE);
  if (!tick.wait_more(10))
    die("defect 9: the loop timer stopped firing after duplex_listener_unix");
  // The live listener keeps its path.
  CHECK(std::filesystem::exists(path));
  {
    Watchdog fw("defect 9: duplex_loop_free");
    CHECK(loop.free() == 0);
  }
}

// ---------------------------------------------------------------------------
// Defect 10 (read_after_abort.c)
// ---------------------------------------------------------------------------

namespace {
void abort_inside_on_read(bool framed) {
  Watchdog wd(std::string("defect 10 (") + (framed ? "framed" : "unframed") + ")",
              std::chrono::seconds(60));
  SocketPair sp = socket_pair();
  REQUIRE(write_all(sp.peer.get(), "a\nb\nc\nd\n", 8) == 0);
  REQUIRE(::shutdown(sp.peer.get(), SHUT_WR) == 0);

  duplex_loop_opts lo = DUPLEX_LOOP_OPTS_INIT;
  lo.read_buffer_size = 2; // unframed: four 2-byte chunks in one read pass
  ConnEvents ev;
  int close_rc = kUnset, reads_after = 0, eofs_after = 0;
  bool requested = false;
  Loop loop(false, &lo);
  ev.read_hook = [&](duplex_conn *c, const uint8_t *, size_t) {
    if (requested) {
      reads_after++;
      return;
    }
    requested = true;
    close_rc = duplex_conn_close(c, DUPLEX_CLOSE_ABORT);
  };
  ev.eof_hook = [&](duplex_conn *) {
    if (requested)
      eofs_after++;
  };
  ev.close_hook = [&](duplex_conn *, int) { duplex_loop_stop(loop); };
  duplex_framing fr = lines();
  duplex_conn_opts o = ev.opts();
  if (framed)
    o.framing = &fr;
  duplex_conn *c = adopt(loop, sp.ours, &o);
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);

  CHECK(requested);
  CHECK(close_rc == 0);
  CHECK(reads_after == 0);
  CHECK(eofs_after == 0);
  CHECK(ev.closes.load() == 1);
  CHECK_MESSAGE(ev.close_reason.load() == DUPLEX_ECONNABORTED,
                "on_close reason " << err_str(ev.close_reason.load()));
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  duplex_conn_unref(c);
}

// Accept one TCP conn whose peer sent "hello"; on_read closes it with @p how.
// Returns the client's recv() outcome after the close: 0 (EOF) or an errno.
int tcp_close_inside_on_read(unsigned how, ConnEvents &ev) {
  Loop loop(false);
  int close_rc = kUnset;
  ev.read_hook = [&](duplex_conn *c, const uint8_t *, size_t) {
    if (close_rc == kUnset)
      close_rc = duplex_conn_close(c, how);
  };
  ev.close_hook = [&](duplex_conn *, int) { duplex_loop_stop(loop); };
  duplex_conn_opts co = ev.opts();
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  lo.conn_opts = &co;
  duplex_listener *l = nullptr;
  REQUIRE(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == 0);
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);
  Fd client = tcp_client(port);
  REQUIRE(write_all(client.get(), "hello", 5) == 0);
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
  CHECK(close_rc == 0);
  CHECK(ev.closes.load() == 1);

  set_recv_timeout(client.get(), kHang);
  char b[16];
  ssize_t n;
  do
    n = ::recv(client.get(), b, sizeof b, 0);
  while (n < 0 && errno == EINTR);
  int out = n == 0 ? 0 : n < 0 ? errno : -1; // -1: unexpected data
  CHECK(loop.free() == 0);
  listener_unref(l);
  return out;
}
} // namespace

TEST_CASE("defect 10: close(ABORT) inside on_read of a framed conn: no read or EOF after it, "
          "on_close(DUPLEX_ECONNABORTED) once") {
  abort_inside_on_read(true);
}

TEST_CASE("defect 10: close(ABORT) inside on_read of an unframed conn: no read or EOF after it, "
          "on_close(DUPLEX_ECONNABORTED) once") {
  abort_inside_on_read(false);
}

TEST_CASE("defect 10: close(ABORT) of a TCP conn resets it: the peer's recv fails with "
          "ECONNRESET") {
  Watchdog wd("defect 10 (TCP abort)", std::chrono::seconds(60));
  ConnEvents ev;
  int r = tcp_close_inside_on_read(DUPLEX_CLOSE_ABORT, ev);
  CHECK_MESSAGE(r == ECONNRESET, "peer recv after abort: "
                                     << (r == 0 ? std::string("EOF") : std::strerror(r)));
  CHECK(ev.close_reason.load() == DUPLEX_ECONNABORTED);
  CHECK(ev.order_errors.load() == 0);
}

TEST_CASE("defect 10: a graceful close of a TCP conn inside on_read: on_close(0), the peer "
          "sees EOF") {
  Watchdog wd("defect 10 (TCP graceful)", std::chrono::seconds(60));
  ConnEvents ev;
  int r = tcp_close_inside_on_read(DUPLEX_CLOSE_GRACEFUL, ev);
  CHECK_MESSAGE(r == 0, "peer recv after graceful close: " << std::strerror(r));
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.order_errors.load() == 0);
}

// ---------------------------------------------------------------------------
// Defect 12 (get_queued_after_close.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 12: duplex_conn_get_queued reports 0 on an aborted conn: right after the "
          "abort, inside on_close and after it") {
  Watchdog wd("defect 12", std::chrono::seconds(90));
  SocketPair sp = socket_pair(); // the peer never reads
  fill_send_buffer(sp.ours.get());
  ConnEvents ev;
  std::atomic<size_t> q_in_close{SIZE_MAX};
  ev.close_hook = [&](duplex_conn *c, int) {
    size_t q = SIZE_MAX;
    CHECK(duplex_conn_get_queued(c, &q) == 0);
    q_in_close = q;
  };
  WriteCounter w;
  Loop loop;
  duplex_conn_opts o = ev.opts();
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_open(kHang));

  static char chunk[64 * 1024];
  for (int i = 0; i < 16; i++) // taken by the loop: in flight
    REQUIRE(duplex_conn_write(c, chunk, sizeof chunk, WriteCounter::cb, &w) == 0);
  REQUIRE(on_loop(loop, [] {}));
  for (int i = 0; i < 32; i++) // waiting behind them
    REQUIRE(duplex_conn_write(c, chunk, sizeof chunk, WriteCounter::cb, &w) == 0);
  size_t before = 0;
  REQUIRE(duplex_conn_get_queued(c, &before) == 0);
  CHECK(before >= 48 * sizeof chunk); // (may include per-write overhead)

  REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  size_t after_abort = SIZE_MAX;
  REQUIRE(duplex_conn_get_queued(c, &after_abort) == 0);
  CHECK(after_abort == 0);
  CHECK(duplex_conn_write(c, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);

  REQUIRE(ev.wait_closed(kHang));
  CHECK(q_in_close.load() == 0);
  size_t after_close = SIZE_MAX;
  REQUIRE(duplex_conn_get_queued(c, &after_close) == 0);
  CHECK(after_close == 0);
  CHECK(wait_until([&] { return w.total.load() == 48; }, kHang));
  CHECK(w.canceled.load() == 48);
  {
    Watchdog fw("defect 12: duplex_loop_free");
    CHECK(loop.free() == 0);
  }
  CHECK(w.total.load() == 48);
  size_t after_free = SIZE_MAX;
  REQUIRE(duplex_conn_get_queued(c, &after_free) == 0);
  CHECK(after_free == 0);
  duplex_conn_unref(c);
}

// ---------------------------------------------------------------------------
// Checks from the review that found no defect (frame_edges.c, sigpipe_check.c,
// tsan_mix.c, tsan_timer_chan.c), kept as tests.
// ---------------------------------------------------------------------------

namespace {
struct EdgeResult {
  size_t got = 0;
  int reads = 0;
  int reason = kUnset;
  int write_frame_rc = kUnset;
  bool zeros = true;
};

EdgeResult frame_edge(size_t max_frame, size_t len) {
  Watchdog wd("frame edges", std::chrono::seconds(120));
  SocketPair sp = socket_pair();
  EdgeResult r;
  ConnEvents ev;
  Loop loop(false);
  ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) {
    r.got = n;
    for (size_t i = 0; i < n; i++)
      if (d[i] != 0) {
        r.zeros = false;
        break;
      }
  };
  ev.eof_hook = [](duplex_conn *c) { duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL); };
  ev.close_hook = [&](duplex_conn *, int) { duplex_loop_stop(loop); };
  duplex_framing fr = DUPLEX_FRAMING_INIT;
  fr.kind = DUPLEX_FRAME_LENGTH_PREFIX;
  fr.prefix_bytes = 4;
  fr.max_frame = max_frame;
  duplex_conn_opts o = ev.opts();
  o.framing = &fr;
  duplex_conn *c = adopt(loop, sp.ours, &o);
  PeerThread sender([fd = sp.peer.get(), len] {
    uint8_t h[4] = {uint8_t(len >> 24), uint8_t(len >> 16), uint8_t(len >> 8), uint8_t(len)};
    std::vector<uint8_t> body(len, 0);
    if (write_all(fd, h, 4) == 0)
      write_all(fd, body.data(), body.size()); // may fail once the conn closes
    ::shutdown(fd, SHUT_WR);
  });
  {
    std::vector<uint8_t> big(max_frame + 1, 0);
    r.write_frame_rc = duplex_conn_write_frame(c, big.data(), big.size(), nullptr, nullptr);
  }
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
  sender.join();
  r.reads = ev.reads.load();
  r.reason = ev.close_reason.load();
  CHECK(loop.free() == 0);
  duplex_conn_unref(c);
  return r;
}
} // namespace

TEST_CASE("review check: a length-prefixed frame of exactly max_frame is delivered whole; "
          "max_frame + 1 closes with DUPLEX_EMSGSIZE; write_frame refuses max_frame + 1") {
  const size_t max = size_t(8) << 20;
  EdgeResult a = frame_edge(max, max);
  CHECK(a.reads == 1);
  CHECK(a.got == max);
  CHECK(a.zeros);
  CHECK(a.reason == 0);
  CHECK(a.write_frame_rc == DUPLEX_EMSGSIZE);

  EdgeResult b = frame_edge(max, max + 1);
  CHECK(b.reads == 0);
  CHECK(b.reason == DUPLEX_EMSGSIZE);
  CHECK(b.write_frame_rc == DUPLEX_EMSGSIZE);
}

TEST_CASE("review check: writes to a closed peer fail without SIGPIPE; the loop thread's "
          "signal mask and the process disposition are unchanged") {
  Watchdog wd("sigpipe check", std::chrono::seconds(60));
  REQUIRE(sigpipe_is_default());
  bool blocked_before = sigpipe_blocked_here();
  SocketPair sp = socket_pair();
  sp.peer.reset(); // the peer is gone
  ConnEvents ev;
  Loop loop(false);
  ev.open_hook = [](duplex_conn *c) {
    for (int i = 0; i < 100; i++)
      duplex_conn_write(c, "xxxxxxxx", 8, nullptr, nullptr);
  };
  ev.close_hook = [&](duplex_conn *, int) { duplex_loop_stop(loop); };
  duplex_conn_opts o = ev.opts();
  duplex_conn *c = adopt(loop, sp.ours, &o);
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0); // the process survives
  CHECK(ev.closes.load() == 1);
  int reason = ev.close_reason.load();
  CHECK_MESSAGE((reason == DUPLEX_EPIPE || reason == DUPLEX_ECONNRESET),
                "close reason " << err_str(reason));
  CHECK_FALSE(sigpipe_pending());
  CHECK(sigpipe_blocked_here() == blocked_before);
  CHECK(sigpipe_is_default());
  CHECK(loop.free() == 0);
  duplex_conn_unref(c);
}

namespace {
struct Mix {
  duplex_conn *conn = nullptr;
  duplex_timer *timer = nullptr;
  std::shared_mutex timer_mu; // shared: a timer call; unique: closing it
  bool timer_gone = false;    // under timer_mu
  std::atomic<uint64_t> frames{0}, accepted{0}, done{0}, zc_accepted{0}, released{0};
  std::atomic<int> bad_codes{0};
  std::atomic<int> at_half{0};

  static void on_done(duplex_conn *, int, void *u) { static_cast<Mix *>(u)->done++; }
  static void on_release(void *d, size_t, int, void *u) {
    std::free(d);
    static_cast<Mix *>(u)->released++;
  }
  static void tick(duplex_timer *, void *) {}

  void count(int rc, bool accepted_write) {
    if (rc == 0 && accepted_write)
      accepted++;
    else if (rc != 0 && rc != DUPLEX_ECLOSED && rc != DUPLEX_EWOULDBLOCK)
      bad_codes++;
  }

  void hammer(unsigned seed, int ops) {
    char peer[128];
    for (int i = 0; i < ops; i++) {
      if (i == ops / 2)
        at_half++;
      switch (rand_r(&seed) % 10) {
      case 0:
        count(duplex_conn_write_frame(conn, "hello", 5, on_done, this), true);
        break;
      case 1: {
        duplex_buf b[2] = {{"a", 1}, {"b\n", 2}};
        count(duplex_conn_writev(conn, b, 2, on_done, this), true);
        break;
      }
      case 2: {
        char *p = static_cast<char *>(std::malloc(3));
        p[0] = 'z';
        p[1] = 'z';
        p[2] = '\n';
        int rc = duplex_conn_write_zc(conn, p, 3, on_release, this);
        if (rc == 0)
          zc_accepted++;
        else
          std::free(p);
        count(rc, false);
        break;
      }
      case 3:
        count(duplex_conn_pause(conn), false);
        break;
      case 4:
        count(duplex_conn_resume(conn), false);
        break;
      case 5:
        count(duplex_conn_set_timeout(conn, DUPLEX_TIMEOUT_IDLE, 50000 + rand_r(&seed) % 100),
              false);
        break;
      case 6: {
        size_t q;
        count(duplex_conn_get_queued(conn, &q), false);
        break;
      }
      case 7: {
        int rc = duplex_conn_get_peer(conn, peer, sizeof peer);
        if (rc != 0 && rc != DUPLEX_ECLOSED)
          bad_codes++;
        break;
      }
      case 8: {
        std::shared_lock<std::shared_mutex> lk(timer_mu);
        if (!timer_gone)
          count(duplex_timer_start(timer, 1, 1), false);
        break;
      }
      case 9: {
        std::shared_lock<std::shared_mutex> lk(timer_mu);
        if (!timer_gone)
          count(duplex_timer_stop(timer), false);
        break;
      }
      }
    }
  }
};
} // namespace

TEST_CASE("review check: threads hammer one framed conn and a timer with every any-thread "
          "call, then the loop is freed under them; every callback runs exactly once") {
  Watchdog wd("tsan mix", std::chrono::seconds(240));
  const int ops = kSanitized ? 4000 : 20000;
  SocketPair sp = socket_pair();
  PeerThread echo([fd = sp.peer.get()] {
    char b[4096];
    for (;;) {
      ssize_t n = ::read(fd, b, sizeof b);
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0 || write_all(fd, b, static_cast<size_t>(n)) != 0)
        break;
    }
  });
  Mix mix;
  ConnEvents ev;
  ev.read_hook = [&](duplex_conn *, const uint8_t *, size_t) { mix.frames++; };
  duplex_loop *loop = nullptr;
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  duplex_framing fr = lines();
  duplex_conn_opts o = ev.opts();
  o.framing = &fr;
  mix.conn = adopt(loop, sp.ours, &o);
  REQUIRE(duplex_timer_new(&mix.timer, loop, &Mix::tick, nullptr) == 0);
  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(ev.wait_open(kHang)); // get_peer is ENOTCONN before the open

  std::vector<std::thread> th;
  for (unsigned i = 0; i < 3; i++)
    th.emplace_back([&, i] { mix.hammer(i + 1, ops); });
  CHECK(wait_until([&] { return mix.at_half.load() == 3; }, std::chrono::seconds(120)));
  {
    std::unique_lock<std::shared_mutex> lk(mix.timer_mu);
    mix.timer_gone = true;
    CHECK(duplex_timer_close(mix.timer) == 0);
  }
  timer_unref(mix.timer);
  {
    Watchdog fw("tsan mix: duplex_loop_free while threads call the conn");
    CHECK(duplex_loop_free(loop) == 0); // the threads keep calling the conn
  }
  for (auto &t : th)
    t.join();
  CHECK(mix.bad_codes.load() == 0);
  CHECK(mix.done.load() == mix.accepted.load());
  CHECK(mix.released.load() == mix.zc_accepted.load());
  CHECK(ev.closes.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  duplex_conn_unref(mix.conn);
  ::shutdown(sp.peer.get(), SHUT_RDWR);
  echo.join();
}

namespace {
struct TimerState {
  std::atomic<bool> closed{false};
  std::atomic<bool> in_cb{false};
};
std::atomic<uint64_t> g_tc_callbacks{0}, g_tc_violations{0};
void tc_tick(duplex_timer *, void *u) {
  auto *s = static_cast<TimerState *>(u);
  s->in_cb = true;
  if (s->closed.load())
    g_tc_violations++;
  g_tc_callbacks++;
  volatile int sink = 0;
  for (int i = 0; i < 1000; i++)
    sink = i; // a little work inside the callback
  (void)sink;
  s->in_cb = false;
}
void tc_message(duplex_channel *, void *, size_t, void *) { ::usleep(50); }
} // namespace

TEST_CASE("review check: timers closed from other threads never call back after close; "
          "senders waiting on a full channel wake with DUPLEX_ECLOSED when the loop is freed") {
  Watchdog wd("timers and channel", std::chrono::seconds(240));
  const int rounds = kSanitized ? 150 : 400;
  duplex_loop *loop = nullptr;
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  duplex_channel_opts co = DUPLEX_CHANNEL_OPTS_INIT;
  co.on_message = tc_message;
  co.capacity = 4;
  duplex_channel *ch = nullptr;
  REQUIRE(duplex_channel_new(&ch, loop, &co) == 0);
  REQUIRE(duplex_loop_start(loop) == 0);

  std::atomic<int> timer_errors{0};
  auto timers = [&](unsigned seed) {
    for (int i = 0; i < rounds; i++) {
      auto *s = new TimerState;
      duplex_timer *t = nullptr;
      if (duplex_timer_new(&t, loop, tc_tick, s) != 0) {
        timer_errors++;
        delete s;
        break;
      }
      duplex_timer_start(t, 0, 1);
      ::usleep(rand_r(&seed) % 500);
      if (duplex_timer_close(t) != 0)
        timer_errors++;
      timer_unref(t);
      s->closed = true;
      if (s->in_cb.load())
        g_tc_violations++; // close returned while a callback ran
      ::usleep(2000);      // a late callback would see closed (or ASan a use after free)
      delete s;
    }
  };
  std::atomic<uint64_t> sent{0};
  std::atomic<int> woken_closed{0}, other_errors{0};
  auto sender = [&] {
    for (;;) {
      int r = duplex_channel_send(ch, "m", 1, -1);
      if (r == 0) {
        sent++;
        continue;
      }
      if (r == DUPLEX_ECLOSED)
        woken_closed++;
      else
        other_errors++;
      break;
    }
  };
  std::thread t1(timers, 1u), t2(timers, 2u);
  std::vector<std::thread> senders;
  for (int i = 0; i < 3; i++)
    senders.emplace_back(sender);
  t1.join();
  t2.join();
  {
    Watchdog fw("timers and channel: duplex_loop_free with senders waiting for room");
    CHECK(duplex_loop_free(loop) == 0);
  }
  for (auto &s : senders)
    s.join();
  CHECK(timer_errors.load() == 0);
  CHECK(g_tc_violations.load() == 0);
  CHECK(woken_closed.load() == 3);
  CHECK(other_errors.load() == 0);
  CHECK(sent.load() > 0);
  duplex_channel_unref(ch);
}
