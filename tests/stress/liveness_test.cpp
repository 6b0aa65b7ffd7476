// Liveness: a 5 ms repeating timer runs beside every pump path and must keep
// firing while the path is busy. For each path -- producer threads writing
// into one conn, a write chain driven by write-done callbacks on the loop
// thread, pause/resume churn on framed input, backpressure (slow reader,
// refused writes retried after on_writable), shutdown of conn after conn, a
// channel flood from threads and a post flood -- the busy phase ends on a
// count of timer expiries (it never ends on a clock), and the case checks
// that the path made progress between the first and the last of them, so
// the expiries happened while it was busy. A loop that never yields to its
// timer fails the case at the hang guard instead of running into meson's
// timeout. The data of each path is checked too (order, every byte, exactly
// once).
//
// Regression for review defect 4 (chained_writes_starve.c,
// producers_starve.c), extended to every path that moves work on the loop.
// Light by default (a few seconds in all); DUPLEX_STRESS=full counts more
// expiries.
#include "stress.hpp"

#include "../hardening.hpp"

using namespace dtest;
using namespace stress;
using hard::kHang;
using hard::Ticker;
using hard::Watchdog;

namespace {

constexpr uint64_t kPeriodMs = 5;

int busy_ticks() { return pick(20, 20, 400); }

// The busy window: opened by the path once it is busy, closed by the timer
// after busy_ticks() expiries inside it. `work` counts the path's progress.
struct Window {
  std::atomic<bool> busy{false};
  std::atomic<bool> done{false};
  std::atomic<bool> rescue{false}; // the hang guard ended the busy phase
  std::atomic<int> start_tick{-1};
  std::atomic<int> ticks_inside{0};
  std::atomic<uint64_t> work{0}, work_at_start{0}, work_at_end{0};

  // The ticker's hook (loop thread).
  void on_tick(int n) {
    if (!busy.load() || done.load())
      return;
    if (start_tick.load() < 0) {
      start_tick = n;
      work_at_start = work.load();
      return;
    }
    ticks_inside = n - start_tick.load();
    if (ticks_inside.load() >= busy_ticks()) {
      work_at_end = work.load();
      done = true;
    }
  }
  bool over() const { return done.load() || rescue.load(); }

  // Wait for the window to close; on the hang guard, end the busy phase and
  // report how far the timer got.
  void wait_and_check(const std::string &path) {
    bool ok = hard::wait_until([&] { return done.load(); }, kHang);
    if (!ok)
      rescue = true;
    CHECK_MESSAGE(ok, path << ": the 5 ms timer fired " << ticks_inside.load()
                           << " times while the path was busy (needs " << busy_ticks()
                           << ")");
    uint64_t in_window = ok ? work_at_end.load() - work_at_start.load() : 0;
    if (ok)
      CHECK_MESSAGE(work_at_end.load() > work_at_start.load(),
                    path << ": no progress while the timer fired");
    Figures("liveness_" + path)
        .add("ticks", ticks_inside.load())
        .add("work", work.load())
        .add("work_in_window", in_window);
  }
};

// 64-byte records: seq (8 bytes), producer id (1 byte), filler.
constexpr size_t kRec = 64;
void make_rec(uint8_t *rec, uint64_t seq, unsigned id) {
  std::memcpy(rec, &seq, 8);
  rec[8] = static_cast<uint8_t>(id);
  std::memset(rec + 9, static_cast<int>((seq + id) & 0x7f), kRec - 9);
}

// Reads records to EOF on a thread and checks each producer's order.
struct RecordPeer {
  std::atomic<uint64_t> bytes{0};
  std::atomic<bool> bad{false};
  std::vector<uint64_t> next; // per producer; read after join
  PeerThread thread;

  void start(int fd, unsigned producers) {
    next.assign(producers, 0);
    thread = PeerThread([this, fd, producers] {
      std::string pend;
      read_until_eof(fd, [&](const uint8_t *d, size_t n) {
        pend.append(reinterpret_cast<const char *>(d), n);
        size_t off = 0;
        while (pend.size() - off >= kRec) {
          const auto *r = reinterpret_cast<const uint8_t *>(pend.data() + off);
          unsigned id = r[8];
          uint8_t want[kRec];
          if (id >= producers) {
            bad = true;
          } else {
            make_rec(want, next[id], id);
            if (std::memcmp(r, want, kRec) != 0)
              bad = true;
            next[id]++;
          }
          off += kRec;
        }
        pend.erase(0, off);
        bytes += n;
        return true;
      });
    });
  }
  uint64_t records() const {
    uint64_t s = 0;
    for (auto v : next)
      s += v;
    return s;
  }
};

void free_loop(Loop &loop, const char *what) {
  Watchdog fw(std::string(what) + ": duplex_loop_free");
  CHECK(loop.free() == 0);
}

} // namespace

TEST_CASE("liveness: producer threads writing into one conn") {
  Watchdog wd("liveness: producers", std::chrono::seconds(180));
  constexpr unsigned kProducers = 4;
  SocketPair sp = socket_pair();
  RecordPeer peer;
  peer.start(sp.peer.get(), kProducers);
  Window win;
  Ticker tick;
  Loop loop(false);
  duplex_conn *c = adopt(loop, sp.ours, nullptr);
  tick.hook = [&](int n) { win.on_tick(n); };
  tick.start(loop, kPeriodMs);
  REQUIRE(duplex_loop_start(loop) == 0);

  std::atomic<int> errors{0};
  std::vector<std::thread> producers;
  for (unsigned id = 0; id < kProducers; id++)
    producers.emplace_back([&, id] {
      uint8_t rec[kRec];
      uint64_t seq = 0;
      while (!win.over()) {
        make_rec(rec, seq, id);
        int rc = duplex_conn_write(c, rec, sizeof rec, nullptr, nullptr);
        if (rc == 0) {
          seq++;
          win.work++;
          win.busy = true;
        } else if (rc == DUPLEX_EWOULDBLOCK) {
          duplex_conn_wait_writable(c, 100);
        } else {
          errors++;
          break;
        }
      }
    });
  win.wait_and_check("producers");
  win.rescue = true;
  for (auto &t : producers)
    t.join();
  CHECK(errors.load() == 0);
  uint64_t n = win.work.load();
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0); // flush, then EOF
  peer.thread.join();
  CHECK_FALSE(peer.bad.load());
  CHECK(peer.bytes.load() == n * kRec);
  CHECK(peer.records() == n);
  free_loop(loop, "producers");
  duplex_conn_unref(c);
}

namespace {
struct Chain {
  duplex_conn *conn = nullptr;
  Window *win = nullptr;
  std::atomic<bool> ended{false};
  std::atomic<int> error{0};
  uint64_t seq = 0; // loop thread

  void next() {
    uint8_t rec[kRec];
    make_rec(rec, seq, 0);
    int rc = duplex_conn_write(conn, rec, sizeof rec, &s_done, this);
    if (rc != 0) {
      error = rc;
      ended = true;
      return;
    }
    seq++;
    win->work++;
    win->busy = true;
  }
  static void s_done(duplex_conn *, int status, void *u) {
    auto *ch = static_cast<Chain *>(u);
    if (status != 0) {
      ch->error = status;
      ch->ended = true;
    } else if (ch->win->over()) {
      ch->ended = true;
    } else {
      ch->next();
    }
  }
};
} // namespace

TEST_CASE("liveness: a write chain driven by write-done callbacks on the loop thread") {
  Watchdog wd("liveness: chain", std::chrono::seconds(180));
  SocketPair sp = socket_pair();
  int sz = 4 << 20;
  ::setsockopt(sp.ours.get(), SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
  ::setsockopt(sp.peer.get(), SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
  RecordPeer peer;
  peer.start(sp.peer.get(), 1);
  Window win;
  Chain chain;
  chain.win = &win;
  Ticker tick;
  Loop loop(false);
  duplex_conn *c = adopt(loop, sp.ours, nullptr);
  chain.conn = c;
  tick.hook = [&](int n) { win.on_tick(n); };
  tick.start(loop, kPeriodMs);
  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(on_loop(loop, [&] { chain.next(); }));

  win.wait_and_check("chain");
  win.rescue = true;
  if (!hard::wait_until([&] { return chain.ended.load(); }, kHang))
    hard::die("liveness: the write chain never ended");
  CHECK(chain.error.load() == 0);
  uint64_t n = win.work.load();
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  peer.thread.join();
  CHECK_FALSE(peer.bad.load());
  CHECK(peer.bytes.load() == n * kRec);
  free_loop(loop, "chain");
  duplex_conn_unref(c);
}

namespace {
void resume_post(duplex_loop *, int status, void *arg) {
  auto *c = static_cast<duplex_conn *>(arg);
  if (status == 0)
    duplex_conn_resume(c);
  duplex_conn_unref(c);
}

// A thread that resumes conns handed to it (each with a reference it drops).
class Resumer {
public:
  Resumer() : t_([this] { run(); }) {}
  ~Resumer() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_one();
    t_.join();
  }
  void push(duplex_conn *c) {
    std::lock_guard<std::mutex> lk(mu_);
    q_.push_back(c);
    cv_.notify_one();
  }

private:
  void run() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return quit_ || !q_.empty(); });
      if (q_.empty())
        return;
      std::vector<duplex_conn *> batch;
      batch.swap(q_);
      lk.unlock();
      for (duplex_conn *c : batch) {
        duplex_conn_resume(c);
        duplex_conn_unref(c);
      }
      lk.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<duplex_conn *> q_;
  bool quit_ = false;
  std::thread t_;
};
} // namespace


TEST_CASE("liveness: pause/resume churn on framed input") {
  Watchdog wd("liveness: pause/resume", std::chrono::seconds(180));
  SocketPair sp = socket_pair();
  Window win;
  Ticker tick;
  ConnEvents ev;
  std::atomic<uint64_t> frames{0};
  std::atomic<bool> order_bad{false};
  std::atomic<int> post_errors{0};
  Resumer resumer; // another thread resumes every third pause
  Loop loop(false);
  ev.read_hook = [&](duplex_conn *conn, const uint8_t *d, size_t n) {
    std::string want = std::to_string(frames.load());
    if (std::string(reinterpret_cast<const char *>(d), n) != want)
      order_bad = true;
    frames++;
    win.work++;
    win.busy = true;
    // Every frame: pause, and resume from a post (the loop's idle phase);
    // every third from another thread instead.
    duplex_conn_pause(conn);
    duplex_conn_ref(conn);
    if ((frames.load() % 3) == 0) {
      resumer.push(conn);
    } else if (duplex_loop_post(loop, resume_post, conn) != 0) {
      post_errors++;
      duplex_conn_unref(conn);
    }
  };
  duplex_framing fr = DUPLEX_FRAMING_INIT;
  fr.kind = DUPLEX_FRAME_DELIMITED;
  fr.delimiter[0] = '\n';
  fr.delimiter_len = 1;
  duplex_conn_opts o = ev.opts();
  o.framing = &fr;
  duplex_conn *c = adopt(loop, sp.ours, &o);
  tick.hook = [&](int n) { win.on_tick(n); };
  tick.start(loop, kPeriodMs);
  REQUIRE(duplex_loop_start(loop) == 0);

  // The peer sends numbered lines, 64 per write, until the window closes.
  std::atomic<uint64_t> sent{0};
  PeerThread sender([&, fd = sp.peer.get()] {
    uint64_t k = 0;
    while (!win.over()) {
      std::string batch;
      for (int i = 0; i < 64; i++)
        batch += std::to_string(k++) + "\n";
      if (write_all(fd, batch.data(), batch.size()) != 0)
        break;
      sent = k;
    }
    ::shutdown(fd, SHUT_WR);
  });
  win.wait_and_check("pause_resume");
  win.rescue = true;
  sender.join();
  CHECK(hard::wait_until([&] { return ev.eofs.load() == 1; }, kHang));
  CHECK(frames.load() == sent.load());
  CHECK_FALSE(order_bad.load());
  CHECK(post_errors.load() == 0);
  CHECK(ev.order_errors.load() == 0);
  free_loop(loop, "pause_resume");
  duplex_conn_unref(c);
}

namespace {
// Writes a pattern stream on the loop thread until refused, then again from
// on_writable (retrying the refused write).
struct BpWriter {
  static constexpr size_t kChunk = 16 * 1024;
  duplex_conn *conn = nullptr;
  Window *win = nullptr;
  uint64_t offset = 0;                  // loop thread
  std::atomic<uint64_t> written{0};     // bytes accepted
  std::atomic<uint64_t> refusals{0};
  std::atomic<int> error{0};
  std::atomic<bool> finished{false};
  std::vector<uint8_t> buf = std::vector<uint8_t>(kChunk);

  void pump() {
    while (!win->over()) {
      fill_pattern(buf.data(), kChunk, offset, 9);
      int rc = duplex_conn_write(conn, buf.data(), kChunk, nullptr, nullptr);
      if (rc == DUPLEX_EWOULDBLOCK) {
        refusals++;
        return; // on_writable calls pump() again
      }
      if (rc != 0) {
        error = rc;
        finished = true;
        return;
      }
      offset += kChunk;
      written = offset;
      win->work++;
      win->busy = true;
    }
    finished = true;
  }
};
} // namespace

TEST_CASE("liveness: backpressure with a slow reader, refused writes retried after "
          "on_writable") {
  Watchdog wd("liveness: backpressure", std::chrono::seconds(180));
  SocketPair sp = socket_pair();
  std::atomic<uint64_t> got{0};
  PatternChecker chk(9);
  PeerThread reader([&, fd = sp.peer.get()] {
    std::vector<uint8_t> b(4096);
    for (;;) {
      ssize_t n = ::read(fd, b.data(), b.size());
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        break;
      chk.feed(b.data(), static_cast<size_t>(n));
      got += static_cast<uint64_t>(n);
      ::usleep(200); // a slow reader: small reads with pauses
    }
  });
  Window win;
  BpWriter w;
  w.win = &win;
  Ticker tick;
  ConnEvents ev;
  ev.writable_hook = [&](duplex_conn *) { w.pump(); };
  Loop loop(false);
  duplex_conn_opts o = ev.opts(128 * 1024, 32 * 1024, 256 * 1024);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  w.conn = c;
  tick.hook = [&](int n) { win.on_tick(n); };
  tick.start(loop, kPeriodMs);
  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(on_loop(loop, [&] { w.pump(); }));

  win.wait_and_check("backpressure");
  win.rescue = true;
  CHECK(w.error.load() == 0);
  CHECK(w.refusals.load() > 0);
  // Stop writing (on the loop thread, so no pump runs after), then flush.
  REQUIRE(on_loop(loop, [&] { CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0); }));
  reader.join();
  CHECK(got.load() == w.written.load());
  CHECK(chk.first_bad == UINT64_MAX);
  CHECK(ev.close_reason.load() == 0);
  free_loop(loop, "backpressure");
  duplex_conn_unref(c);
}

TEST_CASE("liveness: shutdown of conn after conn, each flushing 256 KiB first") {
  Watchdog wd("liveness: shutdown", std::chrono::seconds(180));
  constexpr size_t kBytes = 256 * 1024, kChunk = 16 * 1024;
  Window win;
  Ticker tick;
  Loop loop(false);
  tick.hook = [&](int n) { win.on_tick(n); };
  tick.start(loop, kPeriodMs);
  REQUIRE(duplex_loop_start(loop) == 0);

  uint64_t rounds = 0;
  while (!win.over()) {
    SocketPair sp = socket_pair();
    ConnEvents ev;
    WriteCounter shut;
    duplex_conn_opts o = ev.opts();
    duplex_conn *c = adopt(loop, sp.ours, &o);
    uint32_t seed = static_cast<uint32_t>(rounds + 1);
    // Queue the writes and the shutdown on the loop thread, in one go.
    REQUIRE(on_loop(loop, [&] {
      std::vector<uint8_t> b(kChunk);
      for (size_t off = 0; off < kBytes; off += kChunk) {
        fill_pattern(b.data(), kChunk, off, seed);
        CHECK(duplex_conn_write(c, b.data(), kChunk, nullptr, nullptr) == 0);
      }
      CHECK(duplex_conn_shutdown(c, WriteCounter::cb, &shut) == 0);
    }));
    PatternChecker chk(seed);
    int rc = read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      chk.feed(d, n);
      return true;
    });
    CHECK(rc == 0);
    CHECK(chk.offset == kBytes);
    CHECK(chk.first_bad == UINT64_MAX);
    sp.peer.reset(); // our EOF: both directions done, the conn closes
    REQUIRE(ev.wait_closed(kHang));
    CHECK(ev.close_reason.load() == 0);
    CHECK(shut.total.load() == 1);
    CHECK(shut.ok.load() == 1);
    duplex_conn_unref(c);
    rounds++;
    win.work++;
    win.busy = true;
  }
  win.wait_and_check("shutdown");
  free_loop(loop, "shutdown");
}

namespace {
struct Flood {
  static constexpr unsigned kThreads = 4;
  std::atomic<uint64_t> delivered{0};
  std::atomic<bool> bad{false};
  uint64_t next[kThreads] = {}; // loop thread
  Window *win = nullptr;
  std::atomic<int> closes{0}, close_reason{kUnset};

  static void on_message(duplex_channel *, void *data, size_t len, void *u) {
    auto *f = static_cast<Flood *>(u);
    uint64_t m[2];
    if (len != sizeof m) {
      f->bad = true;
      return;
    }
    std::memcpy(m, data, sizeof m);
    if (m[0] >= kThreads || m[1] != f->next[m[0]])
      f->bad = true;
    else
      f->next[m[0]]++;
    f->delivered++;
    f->win->work++;
    f->win->busy = true;
  }
  static void on_close(duplex_channel *, int reason, void *u) {
    auto *f = static_cast<Flood *>(u);
    f->close_reason = reason;
    f->closes++;
  }
};
} // namespace

TEST_CASE("liveness: a channel flooded from 4 threads") {
  Watchdog wd("liveness: channel", std::chrono::seconds(180));
  Window win;
  Flood flood;
  flood.win = &win;
  Ticker tick;
  Loop loop(false);
  duplex_channel_opts co = DUPLEX_CHANNEL_OPTS_INIT;
  co.on_message = &Flood::on_message;
  co.on_close = &Flood::on_close;
  co.user = &flood;
  co.capacity = 8192;
  duplex_channel *ch = nullptr;
  REQUIRE(duplex_channel_new(&ch, loop, &co) == 0);
  tick.hook = [&](int n) { win.on_tick(n); };
  tick.start(loop, kPeriodMs);
  REQUIRE(duplex_loop_start(loop) == 0);

  std::atomic<uint64_t> sent{0};
  std::atomic<int> errors{0};
  std::vector<std::thread> th;
  for (unsigned id = 0; id < Flood::kThreads; id++)
    th.emplace_back([&, id] {
      uint64_t m[2] = {id, 0};
      while (!win.over()) {
        int rc = duplex_channel_send(ch, m, sizeof m, 100);
        if (rc == 0) {
          m[1]++;
          sent++;
        } else if (rc != DUPLEX_ETIMEDOUT) {
          errors++;
          break;
        }
      }
    });
  win.wait_and_check("channel");
  win.rescue = true;
  for (auto &t : th)
    t.join();
  CHECK(errors.load() == 0);
  REQUIRE(duplex_channel_close(ch) == 0); // delivers what is queued, then on_close(0)
  REQUIRE(hard::wait_until([&] { return flood.closes.load() == 1; }, kHang));
  CHECK(flood.close_reason.load() == 0);
  CHECK(flood.delivered.load() == sent.load());
  CHECK_FALSE(flood.bad.load());
  free_loop(loop, "channel");
  duplex_channel_unref(ch);
}

namespace {
struct PostFlood {
  static constexpr unsigned kThreads = 4;
  std::atomic<uint64_t> ran{0};
  std::atomic<bool> bad{false};
  uint64_t next[kThreads] = {}; // loop thread
  Window *win = nullptr;
};
struct PostItem {
  PostFlood *f;
  unsigned id;
  uint64_t seq;
};
void post_item(duplex_loop *, int status, void *arg) {
  std::unique_ptr<PostItem> it(static_cast<PostItem *>(arg));
  PostFlood *f = it->f;
  if (status != 0 || it->seq != f->next[it->id])
    f->bad = true;
  else
    f->next[it->id]++;
  f->ran++;
  f->win->work++;
  f->win->busy = true;
}
} // namespace

TEST_CASE("liveness: posts flooded from 4 threads") {
  Watchdog wd("liveness: posts", std::chrono::seconds(180));
  Window win;
  PostFlood flood;
  flood.win = &win;
  Ticker tick;
  Loop loop(false);
  tick.hook = [&](int n) { win.on_tick(n); };
  tick.start(loop, kPeriodMs);
  REQUIRE(duplex_loop_start(loop) == 0);

  std::atomic<uint64_t> posted{0};
  std::atomic<int> errors{0};
  std::vector<std::thread> th;
  for (unsigned id = 0; id < PostFlood::kThreads; id++)
    th.emplace_back([&, id] {
      uint64_t seq = 0;
      while (!win.over()) {
        // Keep the backlog bounded: at most 20000 posts not yet run.
        if (posted.load() - flood.ran.load() > 20000) {
          std::this_thread::yield();
          continue;
        }
        auto *it = new PostItem{&flood, id, seq};
        if (duplex_loop_post(loop, post_item, it) != 0) {
          delete it;
          errors++;
          break;
        }
        seq++;
        posted++;
      }
    });
  win.wait_and_check("posts");
  win.rescue = true;
  for (auto &t : th)
    t.join();
  CHECK(errors.load() == 0);
  CHECK(hard::wait_until([&] { return flood.ran.load() == posted.load(); }, kHang));
  CHECK_FALSE(flood.bad.load());
  free_loop(loop, "posts");
  CHECK(flood.ran.load() == posted.load());
}
