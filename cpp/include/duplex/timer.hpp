// libduplex C++ layer: Timer (move-only owner).
#pragma once

#include <duplex/loop.hpp>

namespace duplex {

/// A one-shot or repeating timer; the callback runs on the loop thread.
/// Move-only; destroying it closes the timer.
class Timer {
public:
  Timer() = default;
  Timer(Loop &loop, std::function<void()> cb)
      : box_(new Box{loop.core(), std::move(cb)}) {
    int rc = duplex_timer_new(&t_, loop.native(), &tramp, box_.get());
    if (rc != 0)
      throw error(rc, "timer");
  }
  Timer(Timer &&o) noexcept
      : t_(std::exchange(o.t_, nullptr)), box_(std::move(o.box_)) {}
  Timer &operator=(Timer &&o) noexcept {
    if (this != &o) {
      close();
      t_ = std::exchange(o.t_, nullptr);
      box_ = std::move(o.box_);
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
  /// Close now (idempotent). On the loop thread the callback never runs
  /// again; call it there (or stop first) if the callback captures state
  /// that dies with the Timer.
  void close() noexcept {
    if (t_ != nullptr) {
      duplex_timer_close(t_);
      t_ = nullptr;
      // The callback box must outlive a callback the loop may still be
      // delivering: hand it to the loop to free after the close.
      auto *b = box_.release();
      if (duplex_loop_post(
              b->core->loop,
              [](duplex_loop *, int, void *arg) { delete static_cast<Box *>(arg); },
              b) != 0)
        delete b;
    }
  }
  [[nodiscard]] duplex_timer *native() const noexcept { return t_; }

private:
  struct Box {
    detail::LoopCore *core;
    std::function<void()> cb;
  };
  static void tramp(duplex_timer *, void *user) {
    auto *b = static_cast<Box *>(user);
    detail::guarded(b->core, [&] { b->cb(); });
  }
  duplex_timer *t_ = nullptr;
  std::unique_ptr<Box> box_;
};

} // namespace duplex
