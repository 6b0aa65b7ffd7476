// Faults: the peer or the environment fails while several threads write.
// Each TEST_CASE says what it injects and the exact outcome it asserts. The
// common promise: no crash, no SIGPIPE, every accepted write completes once,
// every zero-copy buffer is released once, on_close runs once with the
// documented reason, and refs held by other threads stay safe afterwards.
//
// The out-of-descriptors storm and the lossy link are in their own
// executables (emfile_test.cpp, lossy_test.cpp): one lowers the process's
// RLIMIT_NOFILE, the other needs network namespaces.
#include "stress.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>

#include <deque>
#include <shared_mutex>

using namespace dtest;
using namespace stress;

namespace {

// Figures across the cases of this file, printed once at exit.
struct FaultTotals {
  std::atomic<uint64_t> faults{0}, writes{0}, completions{0}, canceled{0}, failed{0},
      bytes{0};
  ~FaultTotals() {
    Figures("faults")
        .add("faults_injected", faults.load())
        .add("writes_accepted", writes.load())
        .add("completions", completions.load())
        .add("canceled", canceled.load())
        .add("failed", failed.load())
        .add("bytes_verified", bytes.load())
        .add("bytes_lost", 0);
  }
} g_totals;

struct RawListener {
  Fd fd;
  uint16_t port = 0;
  explicit RawListener(bool listening = true) {
    fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
    if (listening)
      REQUIRE(::listen(fd.get(), 64) == 0);
    socklen_t len = sizeof a;
    REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr *>(&a), &len) == 0);
    port = ntohs(a.sin_port);
  }
  int accept_one() {
    pollfd pf{fd.get(), POLLIN, 0};
    if (::poll(&pf, 1, 60000) != 1)
      return -1;
    return ::accept4(fd.get(), nullptr, nullptr, SOCK_CLOEXEC);
  }
};

// A producer thread writing frames (tid, seq) to one conn, alternating copy
// and zero-copy, holding its own ref.
struct Producer {
  duplex_conn *conn = nullptr;
  uint8_t tid = 0;
  bool stop_on_wouldblock = false;       // else wait_writable and retry
  uint64_t max_frames = UINT64_MAX;       // stop after this many (rc 0)
  std::atomic<uint64_t> acc_copy{0}, acc_zc{0}, acc_bytes{0}, wouldblocks{0};
  std::atomic<int> final_rc{kUnset};
  WriteCounter w;
  ZcCounter z;
  std::thread th;

  void start(uint64_t seed) {
    REQUIRE(duplex_conn_ref(conn) == 0);
    th = std::thread([this, seed] { run(seed); });
  }
  void run(uint64_t seed) {
    Rng rng(seed);
    std::vector<uint8_t> buf(8192);
    auto guard = std::chrono::steady_clock::now() + kGuard;
    uint32_t seq = 0;
    for (;;) {
      if (seq >= max_frames) {
        final_rc = 0;
        break;
      }
      size_t len = rng.range(frame::kHeader, buf.size());
      frame::encode(buf.data(), tid, seq, len);
      bool zc = seq % 2 == 1;
      int rc;
      if (zc) {
        void *p = ZcCounter::alloc_copy(buf.data(), len);
        rc = duplex_conn_write_zc(conn, p, len, ZcCounter::release, &z);
        if (rc != 0) {
          CHECK(std::memcmp(p, buf.data(), len) == 0); // handed back whole
          std::free(p);
        }
      } else {
        rc = duplex_conn_write(conn, buf.data(), len, WriteCounter::cb, &w);
      }
      if (rc == 0) {
        (zc ? acc_zc : acc_copy)++;
        acc_bytes += len;
        seq++;
        continue;
      }
      if (rc == DUPLEX_EWOULDBLOCK) {
        wouldblocks++;
        if (stop_on_wouldblock) {
          final_rc = rc;
          break;
        }
        int wr = duplex_conn_wait_writable(conn, 100);
        CHECK((wr == 0 || wr == DUPLEX_ETIMEDOUT || wr == DUPLEX_ECLOSED));
        if (std::chrono::steady_clock::now() > guard) {
          final_rc = DUPLEX_ETIMEDOUT;
          break;
        }
        continue;
      }
      final_rc = rc;
      break;
    }
    CHECK(duplex_conn_unref(conn) == 0);
  }
  void join() {
    if (th.joinable())
      th.join();
  }
  uint64_t accepted() const { return acc_copy.load() + acc_zc.load(); }
  bool all_completed() const {
    return w.total.load() == acc_copy.load() && z.released.load() == acc_zc.load();
  }
  void add_totals() const {
    g_totals.writes += accepted();
    g_totals.completions += w.total.load() + z.released.load();
    g_totals.canceled += w.canceled.load() + z.canceled.load();
    g_totals.failed += w.failed.load() + z.failed.load();
  }
};

// Every call through a ref to a closed conn: DUPLEX_ECLOSED, the caller keeps
// zero-copy bytes (release never called).
void check_closed_conn(duplex_conn *conn) {
  CHECK(duplex_conn_write(conn, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
  ZcCounter z;
  void *p = ZcCounter::alloc_copy("x", 1);
  CHECK(duplex_conn_write_zc(conn, p, 1, ZcCounter::release, &z) == DUPLEX_ECLOSED);
  CHECK(z.released.load() == 0);
  std::free(p);
  CHECK(duplex_conn_shutdown(conn, nullptr, nullptr) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_pause(conn) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_wait_writable(conn, 0) == DUPLEX_ECLOSED);
}

void reset_close(int fd) {
  linger lg{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  ::close(fd);
}

} // namespace

TEST_CASE("fault: TCP peer resets mid-write while 4 threads write copy and zero-copy") {
  // Injects: RST (SO_LINGER 0) after the peer read 256 KiB, while 4 threads
  // keep the queue at its hard limit.
  // Asserts: what the peer read is a valid per-thread prefix; on_close once
  // with ECONNRESET or EPIPE; each producer ends with ECLOSED; every accepted
  // write completed exactly once, the ones that never reached the kernel
  // with an error or ECANCELED; a thread's frames seen <= its ok writes.
  const unsigned kThreads = 4;
  ConnEvents ev;
  Loop loop;
  RawListener server;
  auto opts = ev.opts(128 * 1024, 32 * 1024, 512 * 1024);
  duplex_conn *conn = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&conn, loop, "127.0.0.1", server.port, &opts) == 0);
  Fd peer(server.accept_one());
  REQUIRE(peer);
  std::deque<Producer> prods(kThreads);
  for (unsigned t = 0; t < kThreads; t++) {
    prods[t].conn = conn;
    prods[t].tid = static_cast<uint8_t>(t);
    prods[t].start(10 + t);
  }
  frame::Verifier ver(kThreads);
  uint64_t got = 0;
  std::vector<uint8_t> buf(64 * 1024);
  while (got < 256 * 1024) {
    ssize_t n = ::read(peer.get(), buf.data(), std::min<size_t>(buf.size(), 256 * 1024 - got));
    REQUIRE(n > 0);
    ver.feed(buf.data(), static_cast<size_t>(n));
    got += static_cast<uint64_t>(n);
  }
  reset_close(peer.release());
  g_totals.faults++;
  CHECK(ev.wait_closed());
  for (auto &p : prods)
    p.join();
  CHECK(wait_until([&] {
    for (auto &p : prods)
      if (!p.all_completed())
        return false;
    return true;
  }));
  CHECK_MESSAGE(ver.ok(), ver.error());
  int reason = ev.close_reason.load();
  MESSAGE("on_close reason " << err_str(reason));
  CHECK((reason == DUPLEX_ECONNRESET || reason == DUPLEX_EPIPE));
  CHECK(ev.closes.load() == 1);
  CHECK(ev.opens.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  for (unsigned t = 0; t < kThreads; t++) {
    Producer &p = prods[t];
    INFO("thread " << t);
    CHECK(p.final_rc.load() == DUPLEX_ECLOSED);
    CHECK(p.w.total.load() == p.acc_copy.load());
    CHECK(p.z.released.load() == p.acc_zc.load());
    CHECK(ver.count(t) <= p.w.ok.load() + p.z.ok.load());
    CHECK(p.w.canceled.load() + p.w.failed.load() + p.w.ok.load() == p.acc_copy.load());
    p.add_totals();
  }
  g_totals.bytes += got;
  check_closed_conn(conn);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  for (auto &p : prods)
    CHECK(p.all_completed()); // and nothing more after the loop went
}

TEST_CASE("fault: peer closes while writes from 4 threads are queued") {
  // Injects: the peer never reads (its receive buffer and our send buffer
  // are full before adopt), 4 threads queue writes until the hard limit
  // refuses them, then the peer closes.
  // Asserts: nothing could reach the kernel, so no write completes with 0;
  // every accepted write completes exactly once with an error or ECANCELED;
  // every zero-copy buffer is released once; on_close once with EPIPE or
  // ECONNRESET; refused writes were handed back whole (checked in Producer).
  const unsigned kThreads = 4;
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get());
  auto opts = ev.opts(64 * 1024, 16 * 1024, 256 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  CHECK(ev.wait_open());
  std::deque<Producer> prods(kThreads);
  for (unsigned t = 0; t < kThreads; t++) {
    prods[t].conn = conn;
    prods[t].tid = static_cast<uint8_t>(t);
    prods[t].stop_on_wouldblock = true;
    prods[t].start(20 + t);
  }
  for (auto &p : prods)
    p.join();
  uint64_t accepted = 0;
  for (auto &p : prods) {
    CHECK(p.final_rc.load() == DUPLEX_EWOULDBLOCK);
    accepted += p.accepted();
  }
  size_t queued = 0;
  CHECK(duplex_conn_get_queued(conn, &queued) == 0);
  CHECK(queued > 0);
  CHECK(queued <= 256 * 1024);
  CHECK(accepted > 0);
  sp.peer.reset();
  g_totals.faults++;
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] {
    for (auto &p : prods)
      if (!p.all_completed())
        return false;
    return true;
  }));
  int reason = ev.close_reason.load();
  MESSAGE("on_close reason " << err_str(reason));
  CHECK((reason == DUPLEX_EPIPE || reason == DUPLEX_ECONNRESET));
  CHECK(ev.closes.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  for (auto &p : prods) {
    CHECK(p.w.ok.load() == 0);
    CHECK(p.z.ok.load() == 0);
    CHECK(p.w.total.load() == p.acc_copy.load());
    CHECK(p.z.released.load() == p.acc_zc.load());
    CHECK(p.w.canceled.load() + p.w.failed.load() == p.acc_copy.load());
    CHECK(p.z.canceled.load() + p.z.failed.load() == p.acc_zc.load());
    p.add_totals();
  }
  check_closed_conn(conn);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("fault: peer half-closes; we keep writing from 4 threads, then shut down") {
  // Injects: the peer sends 100 KiB then shutdown(SHUT_WR) before we wrote
  // anything.
  // Asserts: exactly 100 KiB read, on_eof once, the conn stays open; 4
  // threads then write 300 frames each and every one arrives in order; our
  // shutdown completes with 0 and the conn closes by itself with reason 0.
  const unsigned kThreads = 4;
  const uint64_t kFrames = kTsan ? 100 : 300;
  const size_t kIn = 100 * 1024;
  ConnEvents ev;
  PatternChecker in(7);
  ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) { in.feed(d, n); };
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts(64 * 1024, 16 * 1024, 256 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::vector<uint8_t> hello = pattern(kIn, 0, 7);
  REQUIRE(write_all(sp.peer.get(), hello.data(), hello.size()) == 0);
  REQUIRE(::shutdown(sp.peer.get(), SHUT_WR) == 0);
  g_totals.faults++;
  CHECK(wait_until([&] { return ev.eofs.load() == 1; }));
  CHECK(ev.closes.load() == 0);
  CHECK(ev.bytes_read.load() == kIn);

  frame::Verifier ver(kThreads);
  std::atomic<int> peer_rc{kUnset};
  PeerThread reader([&] {
    peer_rc = read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      ver.feed(d, n);
      return true;
    });
  });
  std::deque<Producer> prods(kThreads);
  for (unsigned t = 0; t < kThreads; t++) {
    prods[t].conn = conn;
    prods[t].tid = static_cast<uint8_t>(t);
    prods[t].max_frames = kFrames;
    prods[t].start(30 + t);
  }
  for (auto &p : prods)
    p.join();
  WriteCounter sd;
  REQUIRE(duplex_conn_shutdown(conn, WriteCounter::cb, &sd) == 0);
  CHECK(ev.wait_closed());
  reader.join();
  CHECK(wait_until([&] { return sd.total.load() == 1; }));
  CHECK(sd.ok.load() == 1);
  CHECK(peer_rc.load() == 0);
  CHECK_MESSAGE(ver.ok(), ver.error());
  CHECK(ver.dangling() == 0);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.eofs.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  CHECK(in.ok());
  CHECK(in.offset == kIn);
  for (unsigned t = 0; t < kThreads; t++) {
    Producer &p = prods[t];
    CHECK(p.final_rc.load() == 0);
    CHECK(p.accepted() == kFrames);
    CHECK(ver.count(t) == kFrames);
    CHECK(p.w.ok.load() == p.acc_copy.load());
    CHECK(p.z.ok.load() == p.acc_zc.load());
    p.add_totals();
  }
  g_totals.bytes += ver.bytes() + in.offset;
  check_closed_conn(conn);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

namespace {
// Requests made right after a connect that will fail: copy, writev, a
// flush marker, zero-copy and a shutdown. The connect fails on the loop
// thread, possibly while these are being made: each is either taken (rc 0,
// then it completes exactly once, never with 0) or refused with ECLOSED once
// the failure is known (no callback; a zero-copy buffer stays ours) -- and
// once refused, every later one is refused too.
struct DoomedConn {
  ConnEvents ev;
  duplex_conn *conn = nullptr;
  WriteCounter w;
  ZcCounter z;
  int queued_w = 0, queued_z = 0, refused = 0, bad_rc = 0, out_of_order = 0;
  void take(int rc, int &counter) {
    if (rc == 0) {
      counter++;
      if (refused > 0)
        out_of_order++;
    } else if (rc == DUPLEX_ECLOSED) {
      refused++;
    } else {
      bad_rc++;
    }
  }
  void queue_writes() {
    static const char msg[] = "queued before open";
    duplex_buf v[2] = {{msg, 6}, {msg + 6, sizeof msg - 6}};
    take(duplex_conn_write(conn, msg, sizeof msg, WriteCounter::cb, &w), queued_w);
    take(duplex_conn_writev(conn, v, 2, WriteCounter::cb, &w), queued_w);
    take(duplex_conn_write(conn, nullptr, 0, WriteCounter::cb, &w), queued_w);
    void *p = ZcCounter::alloc_copy(msg, sizeof msg);
    int rc = duplex_conn_write_zc(conn, p, sizeof msg, ZcCounter::release, &z);
    take(rc, queued_z);
    if (rc != 0)
      std::free(p); // refused: still ours
    take(duplex_conn_shutdown(conn, WriteCounter::cb, &w), queued_w);
  }
};

void connect_failure_storm(const char *host, uint16_t port, unsigned n,
                           const std::function<void(int)> &check_reason) {
  Loop loop;
  std::deque<DoomedConn> cs(n);
  for (auto &c : cs) {
    auto opts = c.ev.opts();
    int rc = duplex_conn_connect_tcp(&c.conn, loop, host, port, &opts);
    REQUIRE_MESSAGE(rc == 0, err_str(rc));
    c.queue_writes();
  }
  for (auto &c : cs) {
    CHECK(c.ev.wait_closed());
    CHECK(wait_until([&] {
      return c.w.total.load() == uint64_t(c.queued_w) && c.z.released.load() == uint64_t(c.queued_z);
    }));
  }
  int first = kUnset, queued_total = 0;
  for (auto &c : cs) {
    g_totals.faults++;
    CHECK(c.queued_w + c.queued_z + c.refused == 5);
    CHECK(c.bad_rc == 0);
    CHECK(c.out_of_order == 0);
    queued_total += c.queued_w + c.queued_z;
    CHECK(c.ev.opens.load() == 0);
    CHECK(c.ev.closes.load() == 1);
    CHECK(c.ev.order_errors.load() == 0);
    check_reason(c.ev.close_reason.load());
    if (first == kUnset)
      first = c.ev.close_reason.load();
    CHECK(c.ev.close_reason.load() == first); // the same failure for all
    CHECK(c.w.ok.load() == 0);
    CHECK(c.z.ok.load() == 0);
    CHECK(c.w.total.load() == uint64_t(c.queued_w));
    CHECK(c.z.released.load() == uint64_t(c.queued_z));
    g_totals.writes += c.queued_w + c.queued_z;
    g_totals.completions += c.w.total.load() + c.z.released.load();
    g_totals.canceled += c.w.canceled.load() + c.z.canceled.load();
    g_totals.failed += c.w.failed.load() + c.z.failed.load();
    check_closed_conn(c.conn);
    CHECK(duplex_conn_unref(c.conn) == 0);
  }
  MESSAGE((std::string(host) + ": on_close reason " + err_str(first) + "; " +
           std::to_string(queued_total) + " of " + std::to_string(5 * n) +
           " requests taken before the failure was known"));
  CHECK(loop.free() == 0);
}
} // namespace

TEST_CASE("fault: 32 connects refused, writes queued before open all fail once") {
  // Injects: a port bound but not listening (so nobody else can take it):
  // every SYN is answered with RST.
  // Asserts: on_close once with exactly ECONNREFUSED, on_open never, each of
  // the 5 requests queued before open completes exactly once and not with 0.
  RawListener bound(false);
  connect_failure_storm("127.0.0.1", bound.port, 32,
                        [](int reason) { CHECK(reason == DUPLEX_ECONNREFUSED); });
}

TEST_CASE("fault: unresolvable host, writes queued before open all fail once") {
  // Injects: a name under .invalid (RFC 6761: never resolves).
  // Asserts: on_close once with a name-resolution code (EAI_NONAME where a
  // resolver answers; EAI_AGAIN when none is reachable), never a crash or a
  // hang; the queued requests complete exactly once, none with 0.
  connect_failure_storm("no-such-host.invalid", 80, 4, [](int reason) {
    CHECK((reason == DUPLEX_EAI_NONAME || reason == DUPLEX_EAI_AGAIN ||
           reason == DUPLEX_EAI_NODATA || reason == DUPLEX_EAI_FAIL));
  });
}

namespace {
struct PostCount {
  std::atomic<uint64_t> ran{0}, canceled{0}, other{0};
  static void cb(duplex_loop *, int status, void *arg) {
    auto *p = static_cast<PostCount *>(arg);
    if (status == 0)
      p->ran++;
    else if (status == DUPLEX_ECANCELED)
      p->canceled++;
    else
      p->other++;
  }
};
struct ChanCount {
  std::atomic<uint64_t> delivered{0}, released{0}, bad_status{0}, closes{0};
  std::atomic<int> close_reason{kUnset};
  static void on_msg(duplex_channel *, void *data, size_t, void *user) {
    auto *c = static_cast<ChanCount *>(user);
    std::free(data);
    c->delivered++;
  }
  static void on_close(duplex_channel *, int reason, void *user) {
    auto *c = static_cast<ChanCount *>(user);
    c->close_reason = reason;
    c->closes++;
  }
  static void release(void *data, size_t, int status, void *user) {
    auto *c = static_cast<ChanCount *>(user);
    if (status != DUPLEX_ECANCELED)
      c->bad_status++;
    std::free(data);
    c->released++;
  }
};
} // namespace

TEST_CASE("fault: loop freed with live conns, pending cross-thread writes, posts and messages") {
  // Injects: duplex_loop_free() while 4 threads write (copy and zero-copy)
  // to 16 conns whose peers never read, send pointer messages on a channel
  // and (until free starts) post functions; the loop thread is held in a
  // callback meanwhile so that the inbox is full when free comes.
  // Asserts: every conn's on_close once with ECANCELED; every accepted write
  // completes and every zero-copy buffer is released exactly once, before
  // free returns, with 0 or ECANCELED; every post runs exactly once (0 or
  // ECANCELED); every pointer message is delivered or released (ECANCELED)
  // exactly once; the channel closes once with ECANCELED; calls through refs
  // held by the threads return ECLOSED afterwards; ASan/LSan clean.
  const unsigned kThreads = 4, kConns = 16;
  auto *loop = static_cast<duplex_loop *>(nullptr);
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  REQUIRE(duplex_loop_start(loop) == 0);
  std::deque<ConnEvents> evs(kConns);
  std::vector<duplex_conn *> conns;
  std::vector<Fd> peers;
  for (unsigned i = 0; i < kConns; i++) {
    auto sp = socket_pair();
    fill_send_buffer(sp.ours.get());
    auto o = evs[i].opts(64 * 1024, 16 * 1024, 1024 * 1024);
    conns.push_back(adopt(loop, sp.ours, &o));
    peers.push_back(std::move(sp.peer));
  }
  ChanCount cc;
  duplex_channel_opts co = DUPLEX_CHANNEL_OPTS_INIT;
  co.on_message = ChanCount::on_msg;
  co.on_close = ChanCount::on_close;
  co.user = &cc;
  duplex_channel *ch = nullptr;
  REQUIRE(duplex_channel_new(&ch, loop, &co) == 0);

  // Hold the loop thread until free has begun (hang-guarded).
  std::atomic<bool> freeing{false};
  std::atomic<bool> gate_in{false};
  auto gate = [](duplex_loop *, int status, void *arg) {
    auto *st = static_cast<std::pair<std::atomic<bool> *, std::atomic<bool> *> *>(arg);
    if (status == 0) {
      st->second->store(true);
      wait_until([&] { return st->first->load(); });
      std::this_thread::sleep_for(20ms); // let free mark the loop closing
    }
    delete st;
  };
  REQUIRE(duplex_loop_post(loop, gate, new std::pair<std::atomic<bool> *, std::atomic<bool> *>(
                                           &freeing, &gate_in)) == 0);
  CHECK(wait_until([&] { return gate_in.load(); }));

  std::shared_mutex post_lock; // posts only while the loop pointer is valid
  bool posts_allowed = true;
  PostCount pc;
  std::atomic<uint64_t> posted{0}, sent{0}, ops{0}, after_free_closed{0};
  std::atomic<bool> stop{false}, freed{false};
  struct Acc {
    std::atomic<uint64_t> w{0}, z{0};
    WriteCounter wc;
    ZcCounter zc;
  };
  std::deque<Acc> acc(kThreads * kConns);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      Rng rng(40 + t);
      for (auto *c : conns)
        CHECK(duplex_conn_ref(c) == 0);
      CHECK(duplex_channel_ref(ch) == 0);
      char buf[2048];
      std::memset(buf, 'L', sizeof buf);
      while (!stop.load()) {
        unsigned i = static_cast<unsigned>(rng.range(0, kConns - 1));
        Acc &a = acc[t * kConns + i];
        bool was_freed = freed.load();
        int rc;
        switch (rng.next() % 4) {
        case 0:
          a.w++; // counted before the call: its completion may come first
          rc = duplex_conn_write(conns[i], buf, rng.range(1, sizeof buf), WriteCounter::cb, &a.wc);
          if (rc != 0)
            a.w--;
          break;
        case 1: {
          size_t len = rng.range(1, sizeof buf);
          void *p = ZcCounter::alloc_copy(buf, len);
          a.z++;
          rc = duplex_conn_write_zc(conns[i], p, len, ZcCounter::release, &a.zc);
          if (rc != 0) {
            a.z--;
            std::free(p);
          }
          break;
        }
        case 2: {
          void *m = std::malloc(16);
          sent++; // counted before the call: its delivery may come first
          rc = duplex_channel_send_ptr(ch, m, 16, ChanCount::release, &cc, 0);
          if (rc != 0) {
            sent--;
            std::free(m);
          }
          break;
        }
        default: {
          std::shared_lock<std::shared_mutex> lk(post_lock);
          rc = DUPLEX_ECLOSED;
          if (posts_allowed) {
            posted++; // counted before the call: it may run first
            rc = duplex_loop_post(loop, PostCount::cb, &pc);
            if (rc != 0)
              posted--;
          }
          break;
        }
        }
        CHECK_MESSAGE((rc == 0 || rc == DUPLEX_ECLOSED || rc == DUPLEX_EWOULDBLOCK),
                      err_str(rc));
        if (was_freed) {
          CHECK(rc == DUPLEX_ECLOSED);
          after_free_closed++;
        }
        ops++;
        if (was_freed && after_free_closed.load() > 200)
          break;
      }
      for (auto *c : conns)
        CHECK(duplex_conn_unref(c) == 0);
      CHECK(duplex_channel_unref(ch) == 0);
    });
  }
  CHECK(wait_until([&] { return ops.load() >= (kTsan ? 2000u : 20000u); }));
  {
    std::unique_lock<std::shared_mutex> lk(post_lock);
    posts_allowed = false;
  }
  freeing = true;
  int frc = duplex_loop_free(loop);
  CHECK(frc == 0);
  freed = true;
  g_totals.faults++;
  // Everything completed before free returned.
  uint64_t w_acc = 0, w_done = 0, z_acc = 0, z_done = 0, canceled = 0, failed = 0;
  auto tally = [&] {
    w_acc = w_done = z_acc = z_done = canceled = failed = 0;
    for (auto &a : acc) {
      w_acc += a.w.load();
      z_acc += a.z.load();
      w_done += a.wc.total.load();
      z_done += a.zc.released.load();
      canceled += a.wc.canceled.load() + a.zc.canceled.load();
      failed += a.wc.failed.load() + a.zc.failed.load();
    }
  };
  tally();
  // Threads count a write before calling (and uncount a refusal), so a call
  // still in progress when free returned makes accepted > done here;
  // equality is checked once the threads have stopped, and no completion
  // may run after free returned.
  CHECK(w_done <= w_acc);
  CHECK(z_done <= z_acc);
  const uint64_t w_done_at_free = w_done, z_done_at_free = z_done;
  CHECK(failed == 0);
  // posts stop before free (post_lock), so they are exact already
  CHECK(pc.ran.load() + pc.canceled.load() == posted.load());
  CHECK(pc.other.load() == 0);
  CHECK(cc.delivered.load() + cc.released.load() <= sent.load());
  const uint64_t msgs_done_at_free = cc.delivered.load() + cc.released.load();
  CHECK(cc.bad_status.load() == 0);
  CHECK(cc.closes.load() == 1);
  CHECK(cc.close_reason.load() == DUPLEX_ECANCELED);
  for (auto &ev : evs) {
    CHECK(ev.closes.load() == 1);
    CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
    CHECK(ev.order_errors.load() == 0);
  }
  // Let the threads go on through their refs for a while (all ECLOSED).
  CHECK(wait_until([&] { return after_free_closed.load() >= 200; }));
  stop = true;
  for (auto &th : threads)
    th.join();
  tally(); // nothing more ran after free returned
  CHECK(cc.delivered.load() + cc.released.load() == msgs_done_at_free);
  CHECK(msgs_done_at_free == sent.load());
  CHECK(w_done == w_done_at_free);
  CHECK(z_done == z_done_at_free);
  CHECK(w_done == w_acc);
  CHECK(z_done == z_acc);
  CHECK(after_free_closed.load() > 0);
  MESSAGE("writes " << w_acc << " zc " << z_acc << " canceled " << canceled << "; posts "
                    << posted.load() << " (canceled " << pc.canceled.load() << "); messages "
                    << sent.load() << " (released " << cc.released.load() << ")");
  CHECK(canceled > 0);
  g_totals.writes += w_acc + z_acc;
  g_totals.completions += w_done + z_done;
  g_totals.canceled += canceled + pc.canceled.load() + cc.released.load();
  for (auto *c : conns) {
    check_closed_conn(c);
    CHECK(duplex_conn_unref(c) == 0);
  }
  CHECK(duplex_channel_send(ch, "x", 1, 0) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_unref(ch) == 0);
}
