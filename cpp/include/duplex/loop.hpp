// libduplex C++ layer: Loop, and the exception boundary every callback uses.
#pragma once

#include <duplex/error.hpp>

#include <chrono>
#include <coroutine>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>

namespace duplex {

namespace detail {

struct SleepWaiter;

/// What C callbacks need from a Loop; heap-allocated so Loop can move.
struct LoopCore {
  duplex_loop *loop = nullptr;
  std::mutex mu;
  std::exception_ptr error; // first exception thrown by a callback
  SleepWaiter *sleepers = nullptr; // loop thread only

  /// Store the exception in flight (called inside a catch block) and ask
  /// run() to return, so it can rethrow (asio's semantics).
  void capture() noexcept {
    {
      std::lock_guard<std::mutex> g(mu);
      if (!error)
        error = std::current_exception();
    }
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
  explicit Loop(const duplex_loop_opts *opts) : core_(new detail::LoopCore) {
    detail::check(duplex_loop_new(&core_->loop, opts), "duplex_loop_new");
  }
  Loop(Loop &&) noexcept = default;
  Loop &operator=(Loop &&o) noexcept {
    if (this != &o) {
      close();
      core_ = std::move(o.core_);
    }
    return *this;
  }
  Loop(const Loop &) = delete;
  Loop &operator=(const Loop &) = delete;
  ~Loop() { close(); }

  /// Free the loop now (idempotent). Coroutines sleeping on it resume with
  /// errc::DUPLEX_ECANCELED before it goes. Must not be called on the loop thread.
  void close() noexcept {
    if (!core_)
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
    core_.reset();
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

  /// Awaitable: resume after @p d on the loop thread (see task.hpp).
  auto sleep(std::chrono::milliseconds d);

private:
  void run_mode(unsigned mode) {
    detail::check(duplex_loop_run(core_->loop, mode), "duplex_loop_run");
    core_->rethrow();
  }
  std::unique_ptr<detail::LoopCore> core_;
};

} // namespace duplex

// LoopCore::cancel_sleepers and Loop::sleep are defined with the awaitables.
#include <duplex/task.hpp>
