// libduplex C++ layer: Loop, and the exception boundary every callback uses.
#pragma once

#include <duplex/error.hpp>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace duplex {

class LoopGroup;

namespace detail {

struct SleepWaiter;

/// A C timer kept for reuse by sleeps (loop.sleep(), first_of timeouts):
/// its callback user pointer stays this slot, which names the waiter the
/// timer currently serves.
struct TimerSlot {
  duplex_timer *timer = nullptr; // our reference (duplex_timer_new's)
  SleepWaiter *w = nullptr;      // whom it serves now, or nullptr
  TimerSlot *next = nullptr;     // in LoopCore::idle_timers
};

/// What C callbacks need from a Loop; heap-allocated so Loop can move, and
/// shared by what may outlive the Loop (a Listener, a sleep awaiter). It
/// holds its own reference to the C loop (duplex_loop_ref), so `loop`
/// stays a valid pointer after duplex_loop_free(): calls through it then
/// return DUPLEX_ECLOSED.
struct LoopCore {
  duplex_loop *loop = nullptr;
  std::mutex mu;
  std::exception_ptr error; // first exception thrown by a callback
  SleepWaiter *sleepers = nullptr; // loop thread only
  // Stopped timers kept for the next sleep (loop thread only), at most
  // kIdleTimers: a sleep per message costs no allocation.
  static constexpr unsigned kIdleTimers = 64;
  TimerSlot *idle_timers = nullptr;
  unsigned idle_count = 0;
  bool freed = false; // under mu: duplex_loop_free() has returned
  // run(DEFAULT) is on the stack of the loop thread (the only thread that
  // calls capture() then); atomic for a started loop's thread.
  std::atomic<bool> running_default{false};
  std::vector<std::shared_ptr<void>> graveyard; // under mu, see retire()

  LoopCore() = default;
  LoopCore(const LoopCore &) = delete;
  LoopCore &operator=(const LoopCore &) = delete;
  ~LoopCore() {
    // The loop was freed (which closed these timers): drop them.
    while (TimerSlot *t = idle_timers) {
      idle_timers = t->next;
      duplex_timer_close(t->timer);
      duplex_timer_unref(t->timer);
      delete t;
    }
    if (loop != nullptr)
      duplex_loop_unref(loop);
  }

  /// Free @p p once no callback of this loop can be using it: on the loop
  /// thread after the callback running now (a post), or, when the loop is
  /// being freed and takes no posts, once duplex_loop_free() has returned.
  /// Any thread.
  void retire(std::shared_ptr<void> p) noexcept {
    try {
      auto keep = std::make_unique<std::shared_ptr<void>>(std::move(p));
      if (duplex_loop_post(
              loop,
              [](duplex_loop *, int, void *arg) {
                delete static_cast<std::shared_ptr<void> *>(arg);
              },
              keep.get()) == 0) {
        keep.release();
        return;
      }
      std::lock_guard<std::mutex> g(mu);
      if (!freed)
        graveyard.push_back(std::move(*keep));
      // else: the loop is gone, nothing can use it: freed here
    } catch (...) {
      // out of memory: leak it rather than free it under a callback
    }
  }

  /// Keep @p p until the loop is freed: callbacks may use it until then
  /// (a closed TLS listener's conns mid-handshake). Any thread.
  void keep_until_freed(std::shared_ptr<void> p) noexcept {
    try {
      std::lock_guard<std::mutex> g(mu);
      if (!freed)
        graveyard.push_back(std::move(p));
      // else: the loop is gone, nothing can use it: freed here
    } catch (...) {
      // out of memory: leak it rather than free it under a callback
      (void)new (std::nothrow) std::shared_ptr<void>(std::move(p));
    }
  }

  /// Store the exception in flight (called inside a catch block) and ask
  /// run() to return, so it can rethrow (asio's semantics). Only run() in
  /// DEFAULT mode is asked: run_once()/run_nowait() return after their
  /// iteration anyway, and a stop nobody consumes would end the next run()
  /// early; a started loop keeps running (rethrow() raises it).
  void capture() noexcept { capture(std::current_exception()); }
  /// The same for an exception already caught (a spawned task's).
  void capture(std::exception_ptr e) noexcept {
    {
      std::lock_guard<std::mutex> g(mu);
      if (!error)
        error = std::move(e);
    }
    if (running_default.load(std::memory_order_relaxed))
      duplex_loop_stop(loop);
  }
  void rethrow() {
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> g(mu);
      e = std::exchange(error, nullptr);
    }
    if (e)
      std::rethrow_exception(e);
  }
  void cancel_sleepers() noexcept;
};

/// Run @p f; an exception never unwinds into C: it is stored and rethrown
/// from Loop::run() (or Loop::rethrow() for a started loop).
template <class F> void guarded(LoopCore *core, F &&f) noexcept {
  try {
    f();
  } catch (...) {
    if (core != nullptr)
      core->capture();
  }
}

} // namespace detail

/// An event loop (owner). Move-only; destroying it frees the loop, which
/// closes every conn, channel, listener and timer on it.
class Loop {
public:
  /// Create a loop. Throws duplex::error.
  Loop() : Loop(nullptr) {}
  explicit Loop(const duplex_loop_opts *opts)
      : core_(std::make_shared<detail::LoopCore>()) {
    detail::check(duplex_loop_new(&core_->loop, opts), "duplex_loop_new");
    duplex_loop_ref(core_->loop); // the core's own, dropped with it
  }
  Loop(Loop &&) noexcept = default;
  Loop &operator=(Loop &&o) noexcept {
    if (this != &o) {
      close();
      core_ = std::move(o.core_);
      member_ = o.member_;
    }
    return *this;
  }
  Loop(const Loop &) = delete;
  Loop &operator=(const Loop &) = delete;
  ~Loop() { close(); }

  /// Free the loop now (idempotent). Coroutines sleeping on it resume with
  /// errc::DUPLEX_ECANCELED before it goes. Must not be called on the loop thread.
  /// A no-op on a LoopGroup's loop (the group frees it).
  void close() noexcept {
    if (!core_ || member_)
      return;
    detail::LoopCore *core = core_.get();
    // Runs on the loop thread before it stops, or during free with
    // DUPLEX_ECANCELED: either way before duplex_loop_free returns.
    duplex_loop_post(
        core->loop,
        [](duplex_loop *, int, void *arg) {
          static_cast<detail::LoopCore *>(arg)->cancel_sleepers();
        },
        core);
    duplex_loop_free(core->loop);
    std::vector<std::shared_ptr<void>> dead;
    {
      std::lock_guard<std::mutex> g(core->mu);
      core->freed = true;
      dead.swap(core->graveyard);
    }
    dead.clear();
    core_.reset(); // the C loop's memory goes with the last share
  }

  /// Run on this thread until stop(); rethrows the first exception a
  /// callback threw (the loop keeps its state and can run again).
  void run() { run_mode(DUPLEX_RUN_DEFAULT); }
  void run_once() { run_mode(DUPLEX_RUN_ONCE); }
  void run_nowait() { run_mode(DUPLEX_RUN_NOWAIT); }

  /// Run on a thread owned by the loop until it is destroyed. Exceptions
  /// from callbacks are kept; rethrow() raises them on the calling thread.
  void start() { detail::check(duplex_loop_start(core_->loop), "start"); }
  /// Ask run() to return. Any thread.
  void stop() noexcept { duplex_loop_stop(core_->loop); }
  /// Raise a stored callback exception, if any. Any thread.
  void rethrow() { core_->rethrow(); }
  /// Whether the caller is the loop thread. Any thread.
  [[nodiscard]] bool on_thread() const noexcept {
    return duplex_loop_on_thread(core_->loop) == 1;
  }

  /// Run @p f() on the loop thread (never inside this call). Any thread.
  /// If the loop is freed first, @p f is destroyed without running.
  template <class F> void post(F &&f) {
    using Fn = std::decay_t<F>;
    struct Box {
      detail::LoopCore *core;
      Fn fn;
    };
    auto *box = new Box{core_.get(), std::forward<F>(f)};
    int rc = duplex_loop_post(
        core_->loop,
        [](duplex_loop *, int status, void *arg) {
          std::unique_ptr<Box> b(static_cast<Box *>(arg));
          if (status == 0)
            detail::guarded(b->core, [&] { b->fn(); });
        },
        box);
    if (rc != 0) {
      delete box;
      throw error(rc, "duplex_loop_post");
    }
  }

  [[nodiscard]] duplex_loop *native() const noexcept { return core_->loop; }
  [[nodiscard]] detail::LoopCore *core() const noexcept { return core_.get(); }
  /// A share of the core, for what may outlive this Loop.
  [[nodiscard]] std::shared_ptr<detail::LoopCore> shared_core() const noexcept {
    return core_;
  }

  /// Awaitable: resume after @p d on the loop thread (see task.hpp).
  auto sleep(std::chrono::milliseconds d);

private:
  friend class LoopGroup;
  // A LoopGroup's member: a view of a loop the group frees.
  struct member_tag {};
  Loop(std::shared_ptr<detail::LoopCore> core, member_tag) noexcept
      : core_(std::move(core)), member_(true) {}

  void run_mode(unsigned mode) {
    if (mode != DUPLEX_RUN_DEFAULT) {
      detail::check(duplex_loop_run(core_->loop, mode), "duplex_loop_run");
      core_->rethrow();
      return;
    }
    struct Flag { // restored however run() ends (also on EBUSY)
      std::atomic<bool> &f;
      bool was;
      ~Flag() { f.store(was, std::memory_order_relaxed); }
    } flag{core_->running_default,
           core_->running_default.exchange(true, std::memory_order_relaxed)};
    detail::check(duplex_loop_run(core_->loop, mode), "duplex_loop_run");
    core_->rethrow();
  }
  std::shared_ptr<detail::LoopCore> core_;
  bool member_ = false; // of a LoopGroup: close() leaves the loop alone
};

} // namespace duplex

// LoopCore::cancel_sleepers and Loop::sleep are defined with the awaitables.
#include <duplex/task.hpp>
