// libduplex C++ layer: Timer (move-only owner).
#pragma once

#include <duplex/loop.hpp>

namespace duplex {

/// A one-shot or repeating timer; the callback runs on the loop thread.
/// Move-only. It owns a reference to the C timer: destroying it closes the
/// timer and drops that reference, so a Timer may outlive its Loop (once
/// the loop is freed, start() throws errc::DUPLEX_ECLOSED and stop() does
/// nothing).
class Timer {
public:
  Timer() = default;
  Timer(Loop &loop, std::function<void()> cb)
      : box_(new Box{loop.core(), std::move(cb)}) {
    int rc = duplex_timer_new(&t_, loop.native(), &tramp, box_);
    if (rc != 0) {
      delete std::exchange(box_, nullptr);
      throw error(rc, "timer");
    }
  }
  Timer(Timer &&o) noexcept
      : t_(std::exchange(o.t_, nullptr)), box_(std::exchange(o.box_, nullptr)) {}
  Timer &operator=(Timer &&o) noexcept {
    if (this != &o) {
      close();
      t_ = std::exchange(o.t_, nullptr);
      box_ = std::exchange(o.box_, nullptr);
    }
    return *this;
  }
  Timer(const Timer &) = delete;
  Timer &operator=(const Timer &) = delete;
  ~Timer() { close(); }

  /// (Re)start; any thread.
  void start(std::chrono::milliseconds timeout, std::chrono::milliseconds repeat,
             std::error_code &ec) noexcept {
    ec = to_error_code(duplex_timer_start(
        t_, static_cast<uint64_t>(timeout.count()),
        static_cast<uint64_t>(repeat.count())));
  }
  void start(std::chrono::milliseconds timeout,
             std::chrono::milliseconds repeat = std::chrono::milliseconds(0)) {
    std::error_code ec;
    start(timeout, repeat, ec);
    if (ec)
      throw error(ec.value(), "timer start");
  }
  void stop() noexcept { duplex_timer_stop(t_); }
  /// Close and let go of the timer (idempotent; also after the loop was
  /// freed). The callback never starts after this returns; called from
  /// another thread while it runs, this waits for it to return (so do not
  /// call it from a thread the callback waits for). It may be called from
  /// the timer's own callback (destroying the Timer there is safe).
  void close() noexcept {
    if (t_ == nullptr)
      return;
    // DUPLEX_ECLOSED once the loop was freed: nothing left to stop.
    duplex_timer_close(t_);
    // No callback is running now, except when this is called from inside
    // it: then the trampoline frees the box once the callback returned.
    Box *b = std::exchange(box_, nullptr);
    if (b->running)
      b->orphaned = true;
    else
      delete b;
    duplex_timer_unref(std::exchange(t_, nullptr)); // duplex_timer_new's
  }
  [[nodiscard]] duplex_timer *native() const noexcept { return t_; }

private:
  struct Box {
    detail::LoopCore *core; // used only in callbacks: the loop is alive
    std::function<void()> cb;
    // Loop thread only (read by close() off the thread once
    // duplex_timer_close() returned: that waits for a running callback).
    bool running = false;
    bool orphaned = false; // the Timer was closed from inside the callback
  };
  static void tramp(duplex_timer *, void *user) {
    auto *b = static_cast<Box *>(user);
    b->running = true;
    detail::guarded(b->core, [b] { b->cb(); });
    if (b->orphaned)
      delete b;
    else
      b->running = false;
  }
  duplex_timer *t_ = nullptr;
  Box *box_ = nullptr;
};

} // namespace duplex
