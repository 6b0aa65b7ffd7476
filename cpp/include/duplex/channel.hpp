// libduplex C++ layer: Channel<T>, moving T values to the loop thread.
#pragma once

#include <duplex/task.hpp>

#include <deque>
#include <functional>
#include <memory>
#include <optional>

namespace duplex {

namespace detail {
template <class T> struct ChannelBox {
  LoopCore *core = nullptr;
  std::function<void(T &&)> on_message; // empty: queue for receive()
  std::deque<T> rx;
  bool closed = false;
  std::coroutine_handle<> receiver;
};
} // namespace detail

/// A multi-producer channel of T bound to a loop. Copying a Channel takes a
/// reference (like shared_ptr); values are moved in by send() on any thread
/// and handed, moved, to the handler or to co_await receive() on the loop
/// thread, in per-sender order.
template <class T> class Channel {
public:
  Channel() = default;
  /// @p on_message runs on the loop thread for each value; leave it empty
  /// to consume with co_await receive(). @p capacity 0 = unbounded.
  explicit Channel(Loop &loop, std::function<void(T &&)> on_message = {},
                   std::size_t capacity = 0) {
    box_ = std::make_shared<detail::ChannelBox<T>>();
    box_->core = loop.core();
    box_->on_message = std::move(on_message);
    // The C side holds its own share until on_close.
    auto held = std::make_unique<Shared>(box_);
    duplex_channel_opts o = DUPLEX_CHANNEL_OPTS_INIT;
    o.on_message = &on_message_tramp;
    o.on_close = &on_close_tramp;
    o.user = held.get();
    o.capacity = capacity;
    detail::check(duplex_channel_new(&ch_, loop.native(), &o), "channel");
    held.release();
  }
  Channel(const Channel &o) noexcept : ch_(o.ch_), box_(o.box_) {
    if (ch_ != nullptr)
      duplex_channel_ref(ch_);
  }
  Channel(Channel &&o) noexcept
      : ch_(std::exchange(o.ch_, nullptr)), box_(std::move(o.box_)) {}
  Channel &operator=(Channel o) noexcept {
    std::swap(ch_, o.ch_);
    std::swap(box_, o.box_);
    return *this;
  }
  ~Channel() {
    if (ch_ != nullptr)
      duplex_channel_unref(ch_);
  }

  /// Move @p v in. Returns false when full (the value stays with the
  /// caller); throws duplex::error for other failures (closed...). Any
  /// thread. @p timeout: 0 never waits, -1 waits for room.
  bool send(T &&v, std::chrono::milliseconds timeout = std::chrono::milliseconds(-1)) {
    std::error_code ec;
    bool ok = send(std::move(v), timeout, ec);
    if (ec)
      throw error(ec.value(), "send");
    return ok;
  }
  bool send(T &&v, std::chrono::milliseconds timeout, std::error_code &ec) {
    ec.clear();
    T *p = new T(std::move(v));
    int rc = duplex_channel_send_ptr(
        ch_, p, sizeof(T),
        [](void *ptr, std::size_t, int, void *) { delete static_cast<T *>(ptr); },
        nullptr, static_cast<int>(timeout.count()));
    if (rc == 0)
      return true;
    v = std::move(*p); // refused: the caller keeps its value
    delete p;
    if (rc != DUPLEX_EWOULDBLOCK && rc != DUPLEX_ETIMEDOUT)
      ec = to_error_code(rc);
    return false;
  }
  /// Stop accepting; queued values are still delivered. Any thread.
  void close() noexcept { duplex_channel_close(ch_); }

  /// co_await ch.receive(): the next value, or std::nullopt once the
  /// channel is closed and drained. Loop thread. The awaiter holds its own
  /// share of the channel's state: it may outlive this Channel object. One
  /// coroutine at a time may wait in a channel's receive(): a second one's
  /// co_await throws duplex::error with errc::DUPLEX_EBUSY.
  class receive_awaiter {
  public:
    explicit receive_awaiter(std::shared_ptr<detail::ChannelBox<T>> b) noexcept
        : b_(std::move(b)) {}
    receive_awaiter(receive_awaiter &&o) noexcept : b_(std::move(o.b_)) {}
    receive_awaiter &operator=(receive_awaiter &&) = delete;
    ~receive_awaiter() { unsubscribe(); }
    bool ready() const noexcept { return !b_->rx.empty() || b_->closed; }
    void subscribe(std::coroutine_handle<> h) {
      if (b_->receiver && b_->receiver != h)
        throw error(DUPLEX_EBUSY, "receive: another coroutine is waiting "
                                  "in this channel's receive()");
      b_->receiver = h;
      h_ = h;
    }
    void unsubscribe() noexcept {
      if (h_ && b_ && b_->receiver == h_)
        b_->receiver = nullptr;
      h_ = nullptr;
    }
    std::optional<T> take() {
      if (b_->rx.empty())
        return std::nullopt;
      std::optional<T> v(std::move(b_->rx.front()));
      b_->rx.pop_front();
      return v;
    }
    bool await_ready() const noexcept { return ready(); }
    void await_suspend(std::coroutine_handle<> h) { subscribe(h); }
    std::optional<T> await_resume() {
      h_ = nullptr; // resumed: the channel let go of us
      return take();
    }

  private:
    std::shared_ptr<detail::ChannelBox<T>> b_;
    std::coroutine_handle<> h_; // while subscribed
  };
  [[nodiscard]] receive_awaiter receive() const { return receive_awaiter(box_); }

  [[nodiscard]] duplex_channel *native() const noexcept { return ch_; }

private:
  static void on_message_tramp(duplex_channel *, void *data, std::size_t,
                               void *user) {
    auto *b = static_cast<Shared *>(user)->get();
    std::unique_ptr<T> v(static_cast<T *>(data)); // ownership passed to us
    detail::guarded(b->core, [&] {
      if (b->on_message) {
        b->on_message(std::move(*v));
        return;
      }
      b->rx.push_back(std::move(*v));
      if (b->receiver)
        std::exchange(b->receiver, nullptr).resume();
    });
  }
  static void on_close_tramp(duplex_channel *, int, void *user) {
    std::unique_ptr<Shared> held(static_cast<Shared *>(user));
    auto *b = held->get();
    b->closed = true;
    detail::guarded(b->core, [&] {
      if (b->receiver)
        std::exchange(b->receiver, nullptr).resume();
    });
  }
  using Shared = std::shared_ptr<detail::ChannelBox<T>>;
  duplex_channel *ch_ = nullptr;
  Shared box_;
};

} // namespace duplex
