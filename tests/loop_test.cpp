// Loop lifecycle: new/free, options, run on the caller's thread or started
// on its own thread, posts from many threads, on_thread, and what free does
// to pending work.
#include "fixture.hpp"

#include <deque>

using namespace dtest;

namespace {

struct PostCtx;

// One posted call. Runs exactly once; records how.
struct Item {
  PostCtx *ctx = nullptr;
  unsigned tid = 0;
  uint32_t seq = 0;
  std::atomic<int> runs{0};
  std::atomic<int> status{kUnset};
  std::atomic<int> on_thread{kUnset};
  std::atomic<std::thread::id> thread{};
};

struct PostCtx {
  explicit PostCtx(unsigned nthreads) : next(nthreads) {
    for (auto &n : next)
      n = 0;
  }
  duplex_loop *loop = nullptr;
  std::vector<std::atomic<uint32_t>> next; // per posting thread
  std::atomic<uint64_t> ran{0};
  std::atomic<uint64_t> order_errors{0};
  std::atomic<uint64_t> canceled{0};
};

void item_cb(duplex_loop *loop, int status, void *arg) {
  auto *it = static_cast<Item *>(arg);
  PostCtx *ctx = it->ctx;
  it->status = status;
  it->thread = std::this_thread::get_id();
  if (status == 0) {
    it->on_thread = duplex_loop_on_thread(loop);
    if (loop != ctx->loop)
      ctx->order_errors++;
    uint32_t expect = ctx->next[it->tid].load(std::memory_order_relaxed);
    if (it->seq != expect)
      ctx->order_errors++;
    ctx->next[it->tid].store(it->seq + 1, std::memory_order_relaxed);
  } else if (status == DUPLEX_ECANCELED) {
    ctx->canceled++;
  }
  it->runs++;
  ctx->ran++;
}

// A watchdog for duplex_loop_run() on the main thread: if the run has not
// returned within the hang guard, stop the loop so the test can fail rather
// than hang.
class Watchdog {
public:
  explicit Watchdog(duplex_loop *loop)
      : t_([this, loop] {
          if (!done_.wait()) {
            fired_ = true;
            duplex_loop_stop(loop);
          }
        }) {}
  ~Watchdog() { disarm(); }
  void disarm() {
    done_.set();
    if (t_.joinable())
      t_.join();
  }
  bool fired() const { return fired_.load(); }

private:
  Event done_;
  std::atomic<bool> fired_{false};
  std::thread t_;
};

struct StopCtx {
  std::atomic<int> runs{0};
  std::atomic<int> on_thread{kUnset};
  std::atomic<int> stop_rc{kUnset};
  std::atomic<int> free_rc{kUnset};
  std::atomic<int> status{kUnset};
};

void stop_cb(duplex_loop *loop, int status, void *arg) {
  auto *s = static_cast<StopCtx *>(arg);
  s->status = status;
  s->on_thread = duplex_loop_on_thread(loop);
  if (status == 0) {
    s->free_rc = duplex_loop_free(loop); // must be refused: EDEADLK
    s->stop_rc = duplex_loop_stop(loop);
  }
  s->runs++;
}

void count_cb(duplex_loop *, int status, void *arg) {
  auto *s = static_cast<StopCtx *>(arg);
  s->status = status;
  s->runs++;
}

} // namespace

TEST_CASE("a loop is created and freed with default options") {
  duplex_loop *loop = nullptr;
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  REQUIRE(loop != nullptr);
  CHECK(duplex_loop_on_thread(loop) == 0);
  CHECK(duplex_loop_free(loop) == 0);
}

TEST_CASE("loop options: init matches the macro, valid values are accepted") {
  duplex_loop_opts a = DUPLEX_LOOP_OPTS_INIT;
  duplex_loop_opts b;
  std::memset(&b, 0x5a, sizeof b);
  REQUIRE(duplex_loop_opts_init(&b) == 0);
  CHECK(b.size == sizeof(duplex_loop_opts));
  CHECK(a.size == b.size);
  CHECK(a.flags == b.flags);
  CHECK(a.read_buffer_size == b.read_buffer_size);
  CHECK(b.flags == 0u);

  for (uint32_t rbs : {0u, 1u, 4096u, 64u * 1024u, 16u * 1024u * 1024u}) {
    INFO("read_buffer_size " << rbs);
    duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
    o.read_buffer_size = rbs;
    duplex_loop *loop = nullptr;
    REQUIRE(duplex_loop_new(&loop, &o) == 0);
    REQUIRE(loop != nullptr);
    CHECK(duplex_loop_free(loop) == 0);
  }
}

TEST_CASE("a loop accepts read_buffer_size up to 16 MiB and no more") {
  duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
  o.read_buffer_size = 16u * 1024u * 1024u + 1u;
  duplex_loop *loop = reinterpret_cast<duplex_loop *>(&o);
  CHECK(duplex_loop_new(&loop, &o) == DUPLEX_EINVAL);
  CHECK(loop == nullptr);
}

TEST_CASE("a wrong opts->size is refused with DUPLEX_EVERSION") {
  for (size_t size : {size_t(0), size_t(1)}) {
    INFO("size " << size);
    duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
    o.size = size;
    duplex_loop *loop = reinterpret_cast<duplex_loop *>(&o); // not NULL
    CHECK(duplex_loop_new(&loop, &o) == DUPLEX_EVERSION);
    CHECK(loop == nullptr);
  }
}

TEST_CASE("unknown loop flags are refused with DUPLEX_EINVAL") {
  for (unsigned flags : {1u, 2u, 0x80000000u, ~0u}) {
    INFO("flags " << flags);
    duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
    o.flags = flags;
    duplex_loop *loop = reinterpret_cast<duplex_loop *>(&o);
    CHECK(duplex_loop_new(&loop, &o) == DUPLEX_EINVAL);
    CHECK(loop == nullptr);
  }
}

TEST_CASE("run on the caller's thread returns 0 when a post stops it") {
  Loop loop(false);
  StopCtx s;
  REQUIRE(duplex_loop_post(loop, stop_cb, &s) == 0);
  CHECK(s.runs.load() == 0); // nothing runs before the loop does
  {
    Watchdog dog(loop);
    CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
    dog.disarm();
    CHECK_FALSE(dog.fired());
  }
  CHECK(s.runs.load() == 1);
  CHECK(s.status.load() == 0);
  CHECK(s.on_thread.load() == 1);
  CHECK(s.free_rc.load() == DUPLEX_EDEADLK);
  CHECK(s.stop_rc.load() == 0);
  CHECK(duplex_loop_on_thread(loop) == 0);

  SUBCASE("and can be run again") {
    StopCtx s2;
    REQUIRE(duplex_loop_post(loop, stop_cb, &s2) == 0);
    Watchdog dog(loop);
    CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
    dog.disarm();
    CHECK_FALSE(dog.fired());
    CHECK(s2.runs.load() == 1);
    CHECK(s2.on_thread.load() == 1);
  }
  CHECK(loop.free() == 0);
}

TEST_CASE("duplex_loop_stop from another thread ends run on the caller's thread") {
  Loop loop(false);
  Event running;
  std::atomic<int> stop_rc{kUnset};
  std::thread stopper([&] {
    // Know the loop runs: a post has run on it.
    if (!on_loop(loop, [&] { running.set(); }))
      return;
    stop_rc = duplex_loop_stop(loop);
  });
  Watchdog dog(loop);
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
  dog.disarm();
  stopper.join();
  CHECK_FALSE(dog.fired());
  CHECK(running.is_set());
  CHECK(stop_rc.load() == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("a stop requested while not running makes the next run return") {
  Loop loop(false);
  CHECK(duplex_loop_stop(loop) == 0);
  {
    Watchdog dog(loop);
    CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
    dog.disarm();
    CHECK_FALSE(dog.fired());
  }
  // The request was consumed: a normal run still works and needs a stop.
  StopCtx s;
  REQUIRE(duplex_loop_post(loop, stop_cb, &s) == 0);
  {
    Watchdog dog(loop);
    CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
    dog.disarm();
    CHECK_FALSE(dog.fired());
  }
  CHECK(s.runs.load() == 1);
  CHECK(loop.free() == 0);
}

TEST_CASE("RUN_NOWAIT and RUN_ONCE run posted work and return 0") {
  Loop loop(false);
  StopCtx a, b;
  REQUIRE(duplex_loop_post(loop, count_cb, &a) == 0);
  for (int i = 0; i < 10000 && a.runs.load() == 0; i++)
    REQUIRE(duplex_loop_run(loop, DUPLEX_RUN_NOWAIT) == 0);
  CHECK(a.runs.load() == 1);
  CHECK(a.status.load() == 0);

  REQUIRE(duplex_loop_post(loop, count_cb, &b) == 0);
  for (int i = 0; i < 100 && b.runs.load() == 0; i++)
    REQUIRE(duplex_loop_run(loop, DUPLEX_RUN_ONCE) == 0);
  CHECK(b.runs.load() == 1);
  CHECK(b.status.load() == 0);
  CHECK(a.runs.load() == 1);
  CHECK(loop.free() == 0);
}

TEST_CASE("work posted before start waits and then runs on the loop thread") {
  Loop loop(false);
  StopCtx s;
  REQUIRE(duplex_loop_post(loop, count_cb, &s) == 0);
  REQUIRE(duplex_loop_start(loop) == 0);
  CHECK(wait_until([&] { return s.runs.load() == 1; }));
  CHECK(s.status.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(s.runs.load() == 1);
}

TEST_CASE("posts from many threads run exactly once, in each thread's order") {
  const unsigned kThreads = 4;
  const uint32_t kPerThread = kTsan ? 5000 : 25000;
  Loop loop;
  PostCtx ctx(kThreads);
  ctx.loop = loop;
  std::vector<std::deque<Item>> items(kThreads);
  for (unsigned t = 0; t < kThreads; t++) {
    items[t].resize(kPerThread);
    for (uint32_t i = 0; i < kPerThread; i++) {
      items[t][i].ctx = &ctx;
      items[t][i].tid = t;
      items[t][i].seq = i;
    }
  }
  std::atomic<uint64_t> post_errors{0};
  {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; t++) {
      threads.emplace_back([&, t] {
        for (uint32_t i = 0; i < kPerThread; i++) {
          if (duplex_loop_post(loop, item_cb, &items[t][i]) != 0)
            post_errors++;
        }
      });
    }
    for (auto &th : threads)
      th.join();
  }
  CHECK(post_errors.load() == 0);
  const uint64_t total = uint64_t(kThreads) * kPerThread;
  CHECK(wait_until([&] { return ctx.ran.load() == total; }));
  CHECK(loop.free() == 0);

  CHECK(ctx.ran.load() == total);
  CHECK(ctx.order_errors.load() == 0);
  CHECK(ctx.canceled.load() == 0);
  std::thread::id loop_thread = items[0][0].thread.load();
  CHECK(loop_thread != std::this_thread::get_id());
  uint64_t bad = 0;
  for (auto &per : items)
    for (auto &it : per)
      if (it.runs.load() != 1 || it.status.load() != 0 ||
          it.on_thread.load() != 1 || it.thread.load() != loop_thread)
        bad++;
  CHECK(bad == 0);
}

TEST_CASE("duplex_loop_on_thread is true inside callbacks and false outside") {
  CHECK(duplex_loop_on_thread(nullptr) == DUPLEX_EINVAL);
  {
    Loop loop(false);
    CHECK(duplex_loop_on_thread(loop) == 0); // not running
    REQUIRE(duplex_loop_start(loop) == 0);
    CHECK(duplex_loop_on_thread(loop) == 0); // main thread
    std::atomic<int> other{kUnset}, inside{kUnset};
    std::thread([&] { other = duplex_loop_on_thread(loop); }).join();
    CHECK(other.load() == 0);
    REQUIRE(on_loop(loop, [&] { inside = duplex_loop_on_thread(loop); }));
    CHECK(inside.load() == 1);
    CHECK(loop.free() == 0);
  }
  {
    // A second loop's thread is not this loop's thread.
    Loop a, b;
    std::atomic<int> a_in_b{kUnset};
    REQUIRE(on_loop(b, [&] { a_in_b = duplex_loop_on_thread(a); }));
    CHECK(a_in_b.load() == 0);
    CHECK(b.free() == 0);
    CHECK(a.free() == 0);
  }
}

TEST_CASE("posts pending when the loop is freed run exactly once with ECANCELED") {
  SUBCASE("loop never run") {
    duplex_loop *loop = nullptr;
    REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
    const unsigned kThreads = 2;
    const uint32_t kPer = 500;
    PostCtx ctx(kThreads);
    ctx.loop = loop;
    std::vector<std::deque<Item>> items(kThreads);
    for (unsigned t = 0; t < kThreads; t++) {
      items[t].resize(kPer);
      for (uint32_t i = 0; i < kPer; i++) {
        items[t][i].ctx = &ctx;
        items[t][i].tid = t;
        items[t][i].seq = i;
      }
    }
    // One thread posts from main, one from another thread.
    for (uint32_t i = 0; i < kPer; i++)
      REQUIRE(duplex_loop_post(loop, item_cb, &items[0][i]) == 0);
    std::thread([&] {
      for (uint32_t i = 0; i < kPer; i++)
        CHECK(duplex_loop_post(loop, item_cb, &items[1][i]) == 0);
    }).join();
    CHECK(ctx.ran.load() == 0);
    CHECK(duplex_loop_free(loop) == 0);
    // They ran before free returned, on this thread.
    CHECK(ctx.ran.load() == uint64_t(kThreads) * kPer);
    CHECK(ctx.canceled.load() == uint64_t(kThreads) * kPer);
    uint64_t bad = 0;
    for (auto &per : items)
      for (auto &it : per)
        if (it.runs.load() != 1 || it.status.load() != DUPLEX_ECANCELED ||
            it.thread.load() != std::this_thread::get_id())
          bad++;
    CHECK(bad == 0);
  }
  SUBCASE("loop run and stopped") {
    duplex_loop *loop = nullptr;
    REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
    StopCtx stop;
    REQUIRE(duplex_loop_post(loop, stop_cb, &stop) == 0);
    REQUIRE(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == 0);
    StopCtx late;
    REQUIRE(duplex_loop_post(loop, count_cb, &late) == 0);
    CHECK(duplex_loop_free(loop) == 0);
    CHECK(late.runs.load() == 1);
    CHECK(late.status.load() == DUPLEX_ECANCELED);
  }
  SUBCASE("started loop: racing free, each post runs once, 0 or ECANCELED") {
    duplex_loop *loop = nullptr;
    REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
    REQUIRE(duplex_loop_start(loop) == 0);
    const uint32_t kPer = 2000;
    PostCtx ctx(1);
    ctx.loop = loop;
    std::deque<Item> items(kPer);
    for (uint32_t i = 0; i < kPer; i++) {
      items[i].ctx = &ctx;
      items[i].seq = i;
    }
    for (uint32_t i = 0; i < kPer; i++)
      REQUIRE(duplex_loop_post(loop, item_cb, &items[i]) == 0);
    CHECK(duplex_loop_free(loop) == 0);
    CHECK(ctx.ran.load() == kPer);
    CHECK(ctx.order_errors.load() == 0);
    uint64_t bad = 0;
    for (auto &it : items) {
      int st = it.status.load();
      if (it.runs.load() != 1 || (st != 0 && st != DUPLEX_ECANCELED))
        bad++;
      if (st == DUPLEX_ECANCELED && it.thread.load() != std::this_thread::get_id())
        bad++;
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("a post made on the loop thread runs later, never inside the call") {
  Loop loop;
  StopCtx inner;
  std::atomic<int> rc{kUnset}, runs_at_return{kUnset};
  REQUIRE(on_loop(loop, [&] {
    rc = duplex_loop_post(loop, count_cb, &inner);
    runs_at_return = inner.runs.load();
  }));
  CHECK(rc.load() == 0);
  CHECK(runs_at_return.load() == 0);
  CHECK(wait_until([&] { return inner.runs.load() == 1; }));
  CHECK(inner.status.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(inner.runs.load() == 1);
}

TEST_CASE("duplex_loop_free from inside a loop callback returns DUPLEX_EDEADLK") {
  Loop loop;
  std::atomic<int> rc{kUnset};
  REQUIRE(on_loop(loop, [&] { rc = duplex_loop_free(loop); }));
  CHECK(rc.load() == DUPLEX_EDEADLK);
  // The loop is intact and still runs work.
  StopCtx s;
  REQUIRE(duplex_loop_post(loop, count_cb, &s) == 0);
  CHECK(wait_until([&] { return s.runs.load() == 1; }));
  CHECK(loop.free() == 0);
}

TEST_CASE("run or start on a started loop returns DUPLEX_EBUSY") {
  Loop loop;
  REQUIRE(on_loop(loop, [] {})); // it is running
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == DUPLEX_EBUSY);
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_ONCE) == DUPLEX_EBUSY);
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_NOWAIT) == DUPLEX_EBUSY);
  CHECK(duplex_loop_start(loop) == DUPLEX_EBUSY);
  CHECK(loop.free() == 0);
}

TEST_CASE("run or start while another thread runs the loop returns DUPLEX_EBUSY") {
  Loop loop(false);
  LoopRunner runner(loop);
  REQUIRE(on_loop(loop, [] {})); // it is running on the runner thread
  CHECK(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT) == DUPLEX_EBUSY);
  CHECK(duplex_loop_start(loop) == DUPLEX_EBUSY);
  CHECK(runner.stop_and_join() == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("a thread that runs one loop gets DUPLEX_EDEADLK running another") {
  Loop a;
  Loop b(false);
  std::atomic<int> rc{kUnset};
  REQUIRE(on_loop(a, [&] { rc = duplex_loop_run(b, DUPLEX_RUN_NOWAIT); }));
  CHECK(rc.load() == DUPLEX_EDEADLK);
  CHECK(b.free() == 0);
  CHECK(a.free() == 0);
}

TEST_CASE("duplex_loop_stop has no effect on a started loop") {
  Loop loop;
  CHECK(duplex_loop_stop(loop) == 0);
  StopCtx s;
  REQUIRE(duplex_loop_post(loop, count_cb, &s) == 0);
  CHECK(wait_until([&] { return s.runs.load() == 1; }));
  CHECK(s.status.load() == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("freeing a loop run by another thread stops it and waits for run") {
  Loop loop(false);
  LoopRunner runner(loop);
  REQUIRE(on_loop(loop, [] {}));
  CHECK(loop.free() == 0);
  CHECK(runner.join() == 0);
}

namespace {
struct FreeingCtx {
  std::atomic<int> runs{0}, status{kUnset};
  std::atomic<int> post_rc{kUnset}, run_rc{kUnset}, start_rc{kUnset}, stop_rc{kUnset};
  std::atomic<int> free_rc{kUnset};
  std::atomic<int> inner_runs{0};
};
void inner_cb(duplex_loop *, int, void *arg) { static_cast<FreeingCtx *>(arg)->inner_runs++; }
void freeing_cb(duplex_loop *loop, int status, void *arg) {
  auto *f = static_cast<FreeingCtx *>(arg);
  f->status = status;
  if (status == DUPLEX_ECANCELED) {
    // The loop is being freed by this very thread.
    f->post_rc = duplex_loop_post(loop, inner_cb, f);
    f->run_rc = duplex_loop_run(loop, DUPLEX_RUN_NOWAIT);
    f->start_rc = duplex_loop_start(loop);
    f->stop_rc = duplex_loop_stop(loop);
    f->free_rc = duplex_loop_free(loop);
  }
  f->runs++;
}
} // namespace

TEST_CASE("calls made while the loop is being freed return DUPLEX_ECLOSED") {
  duplex_loop *loop = nullptr;
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  FreeingCtx f;
  REQUIRE(duplex_loop_post(loop, freeing_cb, &f) == 0);
  CHECK(duplex_loop_free(loop) == 0);
  CHECK(f.runs.load() == 1);
  CHECK(f.status.load() == DUPLEX_ECANCELED);
  CHECK(f.post_rc.load() == DUPLEX_ECLOSED);
  CHECK(f.inner_runs.load() == 0); // a refused post never runs
  CHECK(f.start_rc.load() == DUPLEX_ECLOSED);
  CHECK(f.stop_rc.load() == DUPLEX_ECLOSED);
  // The freeing thread runs these callbacks as the loop's thread, so both
  // documented codes fit run and free here: "being freed" and "this thread
  // runs the loop".
  CHECK((f.run_rc.load() == DUPLEX_ECLOSED || f.run_rc.load() == DUPLEX_EDEADLK));
  CHECK((f.free_rc.load() == DUPLEX_ECLOSED || f.free_rc.load() == DUPLEX_EDEADLK));
}
