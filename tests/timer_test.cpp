// Timers: one-shot and repeating, started, stopped, restarted and closed
// from the loop thread and from other threads, and closed by loop free.
//
// No assertion depends on how long anything takes. Where a test must show
// that something did NOT fire, it uses ordering, not time: a sentinel timer
// started after the timer under test with a longer timeout fires after it
// would have (libuv runs due timers in due-time order), so when the
// sentinel has fired the timer under test had its chance.
#include "fixture.hpp"

using namespace dtest;

namespace {

struct TimerEv {
  duplex_loop *loop = nullptr;
  std::atomic<int> fires{0};
  std::atomic<int> off_loop_thread{0};
  std::atomic<int> wrong_timer{0};
  duplex_timer *self = nullptr; // expected timer argument (set before start)
  std::function<void(duplex_timer *, int)> hook; // (timer, fire number from 1)
  std::vector<duplex_timer *> owned; // our references, dropped at the end
  TimerEv() = default;
  TimerEv(const TimerEv &) = delete;
  ~TimerEv() {
    for (duplex_timer *t : owned)
      CHECK(duplex_timer_unref(t) == 0);
  }

  static void cb(duplex_timer *t, void *user) {
    auto *e = static_cast<TimerEv *>(user);
    if (e->loop != nullptr && duplex_loop_on_thread(e->loop) != 1)
      e->off_loop_thread++;
    if (e->self != nullptr && t != e->self)
      e->wrong_timer++;
    int n = e->fires.load() + 1;
    if (e->hook)
      e->hook(t, n);
    e->fires++;
  }
  bool wait_fires(int n) {
    return wait_until([&] { return fires.load() >= n; });
  }
};

duplex_timer *new_timer(duplex_loop *loop, TimerEv &ev) {
  duplex_timer *t = nullptr;
  ev.loop = loop;
  int rc = duplex_timer_new(&t, loop, TimerEv::cb, &ev);
  REQUIRE_MESSAGE(rc == 0, "duplex_timer_new: " << err_str(rc));
  REQUIRE(t != nullptr);
  ev.self = t;
  ev.owned.push_back(t);
  return t;
}

// Start a one-shot sentinel of @p ms and wait for it: every timer started
// before it with a shorter timeout has had its chance to fire.
void sentinel(duplex_loop *loop, uint64_t ms) {
  TimerEv s;
  duplex_timer *t = new_timer(loop, s);
  REQUIRE(duplex_timer_start(t, ms, 0) == 0);
  REQUIRE(s.wait_fires(1));
  CHECK(duplex_timer_close(t) == 0);
  CHECK(s.fires.load() == 1);
}

} // namespace

TEST_CASE("a one-shot timer fires exactly once, on the loop thread") {
  Loop loop;
  TimerEv ev;
  duplex_timer *t = new_timer(loop, ev);
  REQUIRE(duplex_timer_start(t, 5, 0) == 0);
  REQUIRE(ev.wait_fires(1));
  sentinel(loop, 50); // a second expiry of t would have come first
  CHECK(ev.fires.load() == 1);
  CHECK(ev.off_loop_thread.load() == 0);
  CHECK(ev.wrong_timer.load() == 0);
  CHECK(duplex_timer_close(t) == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.fires.load() == 1);
}

TEST_CASE("a timeout of 0 fires once, never inside the start call") {
  Loop loop;
  TimerEv ev;
  duplex_timer *t = new_timer(loop, ev);
  int inside = kUnset;
  REQUIRE(on_loop(loop, [&] {
    REQUIRE(duplex_timer_start(t, 0, 0) == 0);
    inside = ev.fires.load();
  }));
  CHECK(inside == 0);
  REQUIRE(ev.wait_fires(1));
  sentinel(loop, 20);
  CHECK(ev.fires.load() == 1);
  CHECK(duplex_timer_close(t) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("a repeating timer fires N times, then duplex_timer_stop from its callback ends it") {
  constexpr int kN = 5;
  Loop loop;
  TimerEv ev;
  std::atomic<int> stop_rc{kUnset};
  ev.hook = [&](duplex_timer *t, int n) {
    if (n == kN)
      stop_rc = duplex_timer_stop(t);
  };
  duplex_timer *t = new_timer(loop, ev);
  REQUIRE(duplex_timer_start(t, 1, 1) == 0);
  REQUIRE(ev.wait_fires(kN));
  sentinel(loop, 50); // a 1 ms repeat would have fired many times by then
  CHECK(stop_rc.load() == 0);
  CHECK(ev.fires.load() == kN);
  CHECK(ev.off_loop_thread.load() == 0);

  // A stopped timer can be started again.
  ev.hook = nullptr; // (the loop is idle: no callback is running)
  REQUIRE(duplex_timer_start(t, 1, 0) == 0);
  REQUIRE(ev.wait_fires(kN + 1));
  sentinel(loop, 30);
  CHECK(ev.fires.load() == kN + 1);
  CHECK(duplex_timer_close(t) == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.fires.load() == kN + 1);
}

TEST_CASE("a one-shot timer restarted from its own callback fires once per restart") {
  constexpr int kN = 4;
  Loop loop;
  TimerEv ev;
  std::atomic<int> bad_rc{0};
  ev.hook = [&](duplex_timer *t, int n) {
    if (n < kN && duplex_timer_start(t, 1, 0) != 0)
      bad_rc++;
  };
  duplex_timer *t = new_timer(loop, ev);
  REQUIRE(duplex_timer_start(t, 1, 0) == 0);
  REQUIRE(ev.wait_fires(kN));
  sentinel(loop, 50);
  CHECK(ev.fires.load() == kN);
  CHECK(bad_rc.load() == 0);
  CHECK(duplex_timer_close(t) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("start from another thread: fires once, on the loop thread") {
  Loop loop;
  TimerEv ev;
  duplex_timer *t = new_timer(loop, ev);
  std::atomic<int> rc{kUnset};
  std::thread([&] { rc = duplex_timer_start(t, 1, 0); }).join();
  CHECK(rc.load() == 0);
  REQUIRE(ev.wait_fires(1));
  sentinel(loop, 30);
  CHECK(ev.fires.load() == 1);
  CHECK(ev.off_loop_thread.load() == 0);

  // A timer created on another thread, started there, closed here.
  TimerEv ev2;
  duplex_timer *t2 = nullptr;
  std::atomic<int> rc2{kUnset};
  ev2.loop = loop;
  std::thread([&] {
    int r = duplex_timer_new(&t2, loop, TimerEv::cb, &ev2);
    if (r == 0)
      r = duplex_timer_start(t2, 1, 0);
    rc2 = r;
  }).join();
  REQUIRE(rc2.load() == 0);
  REQUIRE(ev2.wait_fires(1));
  CHECK(ev2.off_loop_thread.load() == 0);
  CHECK(duplex_timer_close(t2) == 0);
  ev2.owned.push_back(t2);
  CHECK(duplex_timer_close(t) == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.fires.load() == 1);
  CHECK(ev2.fires.load() == 1);
}

TEST_CASE("stop from another thread before the timer fires: it never fires") {
  Loop loop;
  SUBCASE("60 s timer stopped at once") {
    TimerEv ev;
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 60000, 0) == 0);
    REQUIRE(duplex_timer_stop(t) == 0);
    sentinel(loop, 30);
    CHECK(ev.fires.load() == 0);
    CHECK(duplex_timer_close(t) == 0);
    CHECK(loop.free() == 0);
    CHECK(ev.fires.load() == 0);
  }
  SUBCASE("20 ms timer stopped at once, checked against a later 100 ms sentinel") {
    TimerEv ev;
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 20, 0) == 0);
    REQUIRE(duplex_timer_stop(t) == 0);
    sentinel(loop, 100); // t, had it run, was due first
    CHECK(ev.fires.load() == 0);
    CHECK(duplex_timer_close(t) == 0);
    CHECK(loop.free() == 0);
    CHECK(ev.fires.load() == 0);
  }
  SUBCASE("repeating timer stopped from another thread: at most one expiry already "
          "being delivered runs after stop returns") {
    TimerEv ev;
    std::atomic<bool> stopped{false};
    std::atomic<int> after_stop{0};
    ev.hook = [&](duplex_timer *, int) {
      if (stopped.load())
        after_stop++;
    };
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 1, 1) == 0);
    REQUIRE(ev.wait_fires(3));
    REQUIRE(duplex_timer_stop(t) == 0);
    stopped = true;
    sentinel(loop, 50);
    CHECK(after_stop.load() <= 1);
    int settled = ev.fires.load();
    sentinel(loop, 20);
    CHECK(ev.fires.load() == settled);
    CHECK(duplex_timer_close(t) == 0);
    CHECK(loop.free() == 0);
  }
}

TEST_CASE("restarting a running timer resets it") {
  Loop loop;
  SUBCASE("a 60 s timer restarted with 1 ms fires once") {
    TimerEv ev;
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 60000, 0) == 0);
    REQUIRE(duplex_timer_start(t, 1, 0) == 0);
    REQUIRE(ev.wait_fires(1));
    sentinel(loop, 30);
    CHECK(ev.fires.load() == 1);
    CHECK(duplex_timer_close(t) == 0);
    CHECK(loop.free() == 0);
  }
  SUBCASE("on the loop thread: a 10 ms timer restarted with 60 s does not fire before a "
          "100 ms sentinel") {
    TimerEv ev, sev;
    duplex_timer *t = new_timer(loop, ev);
    duplex_timer *s = new_timer(loop, sev);
    REQUIRE(on_loop(loop, [&] {
      CHECK(duplex_timer_start(t, 10, 0) == 0);
      CHECK(duplex_timer_start(t, 60000, 0) == 0);
      CHECK(duplex_timer_start(s, 100, 0) == 0);
    }));
    REQUIRE(sev.wait_fires(1));
    CHECK(ev.fires.load() == 0);
    CHECK(duplex_timer_close(t) == 0);
    CHECK(duplex_timer_close(s) == 0);
    CHECK(loop.free() == 0);
    CHECK(ev.fires.load() == 0);
  }
  SUBCASE("a repeating timer restarted as one-shot fires exactly once more") {
    TimerEv ev;
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 1, 1) == 0);
    REQUIRE(ev.wait_fires(3));
    int before = kUnset;
    REQUIRE(on_loop(loop, [&] {
      before = ev.fires.load();
      CHECK(duplex_timer_start(t, 5, 0) == 0);
    }));
    sentinel(loop, 60);
    CHECK(ev.fires.load() == before + 1);
    CHECK(duplex_timer_close(t) == 0);
    CHECK(loop.free() == 0);
  }
}

TEST_CASE("close from any thread") {
  Loop loop;
  SUBCASE("from the loop thread inside its own callback: no further expiry") {
    TimerEv ev;
    std::atomic<int> close_rc{kUnset};
    ev.hook = [&](duplex_timer *t, int n) {
      if (n == 3)
        close_rc = duplex_timer_close(t);
    };
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 1, 1) == 0);
    REQUIRE(ev.wait_fires(3));
    sentinel(loop, 50);
    CHECK(close_rc.load() == 0);
    CHECK(ev.fires.load() == 3);
    CHECK(loop.free() == 0);
    CHECK(ev.fires.load() == 3);
  }
  SUBCASE("from the loop thread (posted job) while a 1 ms repeat runs: no further expiry") {
    TimerEv ev;
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 1, 1) == 0);
    REQUIRE(ev.wait_fires(2));
    int at_close = kUnset;
    REQUIRE(on_loop(loop, [&] {
      CHECK(duplex_timer_close(t) == 0);
      at_close = ev.fires.load();
    }));
    sentinel(loop, 50);
    CHECK(ev.fires.load() == at_close);
    CHECK(loop.free() == 0);
  }
  SUBCASE("from another thread while a 1 ms repeat runs: no callback starts after close "
          "returns") {
    TimerEv ev;
    std::atomic<bool> closed{false};
    std::atomic<int> after_close{0};
    ev.hook = [&](duplex_timer *, int) {
      if (closed.load())
        after_close++;
    };
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 1, 1) == 0);
    REQUIRE(ev.wait_fires(2));
    std::atomic<int> rc{kUnset};
    std::thread([&] {
      rc = duplex_timer_close(t);
      closed = true;
    }).join();
    CHECK(rc.load() == 0);
    int at_close = ev.fires.load();
    sentinel(loop, 50);
    CHECK(after_close.load() == 0);
    CHECK(ev.fires.load() == at_close);
    CHECK(loop.free() == 0);
  }
  SUBCASE("from another thread while its callback runs: close waits for it to return") {
    TimerEv ev;
    std::atomic<bool> in_cb{false}, entered{false};
    std::atomic<int> after_close{0};
    std::atomic<bool> closed{false};
    ev.hook = [&](duplex_timer *, int n) {
      if (closed.load())
        after_close++;
      if (n == 1) {
        in_cb = true;
        entered = true;
        std::this_thread::sleep_for(100ms); // the loop thread is busy in here
        in_cb = false;
      }
    };
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 1, 1) == 0);
    REQUIRE(wait_until([&] { return entered.load(); }));
    std::atomic<int> rc{kUnset};
    std::atomic<bool> running_at_return{true};
    std::thread([&] {
      rc = duplex_timer_close(t);
      running_at_return = in_cb.load();
      closed = true;
    }).join();
    CHECK(rc.load() == 0);
    CHECK_FALSE(running_at_return.load());
    int at_close = ev.fires.load();
    sentinel(loop, 50);
    CHECK(after_close.load() == 0);
    CHECK(ev.fires.load() == at_close);
    CHECK(loop.free() == 0);
  }
  SUBCASE("from another thread right after new, before the loop saw the timer") {
    TimerEv ev;
    duplex_timer *t = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(t, 1, 0) == 0);
    CHECK(duplex_timer_close(t) == 0);
    sentinel(loop, 30);
    CHECK(ev.fires.load() == 0);
    CHECK(loop.free() == 0);
  }
  SUBCASE("a never-started timer") {
    TimerEv ev;
    duplex_timer *t = new_timer(loop, ev);
    sentinel(loop, 1);
    CHECK(duplex_timer_close(t) == 0);
    CHECK(loop.free() == 0);
    CHECK(ev.fires.load() == 0);
  }
}

TEST_CASE("4 threads create, start, stop and close 200 timers each while the loop runs") {
  constexpr int kThreads = 4, kTimers = 200;
  Loop loop;
  std::vector<TimerEv> evs(size_t(kThreads) * kTimers);
  std::atomic<int> errors{0};
  std::atomic<int> last_error{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; th++)
    threads.emplace_back([&, th] {
      std::vector<duplex_timer *> mine;
      for (int i = 0; i < kTimers; i++) {
        TimerEv &e = evs[size_t(th) * kTimers + size_t(i)];
        e.loop = loop;
        duplex_timer *t = nullptr;
        int rc = duplex_timer_new(&t, loop, TimerEv::cb, &e);
        if (rc == 0)
          e.owned.push_back(t);
        if (rc == 0)
          rc = duplex_timer_start(t, uint64_t(i % 3), uint64_t(i % 2));
        if (rc == 0 && i % 5 == 0)
          rc = duplex_timer_stop(t);
        if (rc != 0) {
          errors++;
          last_error = rc;
        }
        if (t != nullptr)
          mine.push_back(t);
      }
      for (auto *t : mine) {
        int rc = duplex_timer_close(t);
        if (rc != 0) {
          errors++;
          last_error = rc;
        }
      }
    });
  for (auto &t : threads)
    t.join();
  CHECK_MESSAGE(errors.load() == 0, "last error " << err_str(last_error.load()));
  sentinel(loop, 20);
  std::vector<int> settled;
  for (auto &e : evs)
    settled.push_back(e.fires.load());
  sentinel(loop, 20);
  int changed = 0, off = 0;
  for (size_t i = 0; i < evs.size(); i++) {
    changed += evs[i].fires.load() != settled[i];
    off += evs[i].off_loop_thread.load();
  }
  CHECK(changed == 0); // every timer is closed: nothing fires any more
  CHECK(off == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("timers left open are closed by loop free: none fires afterwards, nothing leaks") {
  SUBCASE("running loop") {
    Loop loop;
    TimerEv long_ev, rep_ev, stopped_ev, idle_ev, fired_ev;
    duplex_timer *a = new_timer(loop, long_ev);
    duplex_timer *b = new_timer(loop, rep_ev);
    duplex_timer *c = new_timer(loop, stopped_ev);
    (void)new_timer(loop, idle_ev);
    duplex_timer *e = new_timer(loop, fired_ev);
    REQUIRE(duplex_timer_start(a, 60000, 0) == 0);
    REQUIRE(duplex_timer_start(b, 1, 1) == 0);
    REQUIRE(duplex_timer_start(c, 60000, 60000) == 0);
    REQUIRE(duplex_timer_stop(c) == 0);
    REQUIRE(duplex_timer_start(e, 1, 0) == 0);
    REQUIRE(rep_ev.wait_fires(2));
    REQUIRE(fired_ev.wait_fires(1));
    CHECK(loop.free() == 0);
    int rep_after_free = rep_ev.fires.load();
    std::this_thread::sleep_for(20ms); // nothing can run now: there is no loop
    CHECK(rep_ev.fires.load() == rep_after_free);
    CHECK(long_ev.fires.load() == 0);
    CHECK(stopped_ev.fires.load() == 0);
    CHECK(idle_ev.fires.load() == 0);
    CHECK(fired_ev.fires.load() == 1);
  }
  SUBCASE("loop never run: timers created and started from this thread") {
    Loop loop(false);
    TimerEv ev1, ev2;
    duplex_timer *a = new_timer(loop, ev1);
    (void)new_timer(loop, ev2);
    REQUIRE(duplex_timer_start(a, 0, 1) == 0);
    CHECK(loop.free() == 0);
    CHECK(ev1.fires.load() == 0);
    CHECK(ev2.fires.load() == 0);
  }
  SUBCASE("loop pumped on this thread, then freed") {
    Loop loop(false);
    TimerEv ev;
    duplex_timer *a = new_timer(loop, ev);
    REQUIRE(duplex_timer_start(a, 0, 1) == 0);
    REQUIRE(pump_until(loop, [&] { return ev.fires.load() >= 2; }));
    CHECK(loop.free() == 0);
    int n = ev.fires.load();
    CHECK(n >= 2);
  }
}

TEST_CASE("a timer reference outlives close and the loop: calls return DUPLEX_ECLOSED") {
  TimerEv ev;
  duplex_timer *closed = nullptr, *open = nullptr;
  {
    Loop loop;
    closed = new_timer(loop, ev);
    TimerEv ev2;
    open = nullptr;
    REQUIRE(duplex_timer_new(&open, loop, TimerEv::cb, &ev2) == 0);
    REQUIRE(duplex_timer_start(open, 60000, 0) == 0);
    REQUIRE(duplex_timer_close(closed) == 0);
    CHECK(duplex_timer_close(closed) == DUPLEX_ECLOSED); // a second close
    CHECK(duplex_timer_start(closed, 1, 0) == DUPLEX_ECLOSED);
    CHECK(loop.free() == 0);
    // The loop is gone; the timer it closed is still ours to ask.
    CHECK(duplex_timer_close(open) == DUPLEX_ECLOSED);
    CHECK(duplex_timer_stop(open) == DUPLEX_ECLOSED);
    CHECK(duplex_timer_start(open, 1, 0) == DUPLEX_ECLOSED);
    CHECK(duplex_timer_unref(open) == 0);
  }
  CHECK(duplex_timer_close(closed) == DUPLEX_ECLOSED);
  CHECK(ev.fires.load() == 0);
}
