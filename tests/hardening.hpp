// Helpers for the regression tests of the outside review's defects
// (hardening_*_test.cpp, stress/liveness_test.cpp).
//
// Liveness is asserted as "a loop timer keeps firing", "the call returns",
// "the loop frees", never as a duration. A defect of this kind usually spins
// the loop thread or blocks it for good, and then every later step (even
// duplex_loop_free) would hang until meson's timeout. So:
//   - a bounded wait that fails on a loop that cannot recover calls die(),
//     which prints why and ends the process at once (the test fails fast);
//   - a Watchdog around a call that may never return does the same when it
//     expires.
// The limits are hang guards only: generous enough for ASan/TSan builds on
// a loaded 2-core machine, far below meson's per-test timeout.
#ifndef DUPLEX_TESTS_HARDENING_HPP
#define DUPLEX_TESTS_HARDENING_HPP

#include "fixture.hpp"

#include <poll.h>

#include <iostream>

namespace hard {

using namespace dtest;

// How long a liveness wait may take before the case is declared hung.
inline constexpr std::chrono::seconds kHang{20};

// End the process now: the loop is stuck and nothing after this point could
// finish (the loop's owner would hang freeing it). Prints @p why first.
[[noreturn]] inline void die(const std::string &why) {
  std::cout.flush();
  std::fprintf(stderr, "\n*** FAILED (hang guard, process ends here): %s\n", why.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  std::_Exit(3);
}

// Calls die(what) unless destroyed within @p limit.
class Watchdog {
public:
  explicit Watchdog(std::string what, std::chrono::seconds limit = kHang)
      : what_(std::move(what)) {
    t_ = std::thread([this, limit] {
      std::unique_lock<std::mutex> lk(mu_);
      if (!cv_.wait_for(lk, limit, [&] { return done_; }))
        die(what_ + ": did not finish within the hang guard");
    });
  }
  Watchdog(const Watchdog &) = delete;
  Watchdog &operator=(const Watchdog &) = delete;
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

private:
  std::string what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread t_;
};

// Timers and listeners became reference-counted after 78bf722 (the review's
// base): the caller drops its reference with duplex_timer_unref() /
// duplex_listener_unref(). These call them where the header declares them,
// so that the tests also build against 78bf722 (to show that they fail
// there), where the loop's free released both.
template <class T> void timer_unref(T *t) {
  if constexpr (requires(T *p) { duplex_timer_unref(p); })
    if (t != nullptr)
      duplex_timer_unref(t);
}
template <class T> void listener_unref(T *l) {
  if constexpr (requires(T *p) { duplex_listener_unref(p); })
    if (l != nullptr)
      duplex_listener_unref(l);
}

// A repeating timer on a loop that counts its expiries. Declare it before
// the Loop so that it outlives the loop (the loop owns the duplex_timer and
// the callback uses this object). The optional hook runs on the loop thread
// with the new count.
struct Ticker {
  duplex_timer *timer = nullptr;
  std::atomic<int> ticks{0};
  std::function<void(int)> hook;

  Ticker() = default;
  Ticker(const Ticker &) = delete;
  Ticker &operator=(const Ticker &) = delete;
  ~Ticker() { timer_unref(timer); } // after the loop's free: a valid reference
  void start(duplex_loop *loop, uint64_t period_ms) {
    REQUIRE(duplex_timer_new(&timer, loop, &s_tick, this) == 0);
    REQUIRE(duplex_timer_start(timer, period_ms, period_ms) == 0);
  }
  // Wait until the timer fired @p n times in all (hang guard @p guard).
  bool wait_ticks(int n, std::chrono::milliseconds guard = kHang) {
    return wait_until([&] { return ticks.load() >= n; }, guard);
  }
  // Wait for @p n more expiries than so far.
  bool wait_more(int n, std::chrono::milliseconds guard = kHang) {
    return wait_ticks(ticks.load() + n, guard);
  }

private:
  static void s_tick(duplex_timer *, void *u) {
    auto *t = static_cast<Ticker *>(u);
    int n = t->ticks.load() + 1;
    if (t->hook)
      t->hook(n);
    t->ticks.store(n);
  }
};

// An ordered log of events, written on the loop thread, read by the test.
struct EventLog {
  void add(const std::string &s) {
    std::lock_guard<std::mutex> lk(mu_);
    v_.push_back(s);
  }
  std::string joined() {
    std::lock_guard<std::mutex> lk(mu_);
    std::string out;
    for (auto &s : v_) {
      if (!out.empty())
        out += ' ';
      out += s;
    }
    return out;
  }
  bool has(const std::string &s) {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto &x : v_)
      if (x == s)
        return true;
    return false;
  }

private:
  std::mutex mu_;
  std::vector<std::string> v_;
};

// Wait up to @p guard for @p fd to become readable (data, EOF or error).
inline bool readable_within(int fd, std::chrono::milliseconds guard = kHang) {
  auto deadline = std::chrono::steady_clock::now() + guard;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() < 0)
      return false;
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 1000)));
    if (rc > 0)
      return true;
    if (rc < 0 && errno != EINTR)
      return false;
  }
}

} // namespace hard

#endif // DUPLEX_TESTS_HARDENING_HPP
