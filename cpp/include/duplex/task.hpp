// libduplex C++ layer: coroutines that run on the loop thread.
#pragma once

#include <duplex/loop.hpp>

#include <coroutine>
#include <exception>
#include <memory>
#include <optional>
#include <utility>
#include <type_traits>
#include <variant>

namespace duplex {

/// A lazily started coroutine returning T. Await it from another task, or
/// hand a task<void> to spawn(). Move-only; destroying an unstarted or
/// finished task frees its frame.
template <class T = void> class [[nodiscard]] task;

namespace detail {

struct final_awaiter {
  bool await_ready() const noexcept { return false; }
  template <class P>
  std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) noexcept {
    auto c = h.promise().continuation;
    return c ? c : std::noop_coroutine();
  }
  void await_resume() const noexcept {}
};

template <class T> struct promise_base {
  std::coroutine_handle<> continuation;
  std::exception_ptr error;
  std::suspend_always initial_suspend() noexcept { return {}; }
  final_awaiter final_suspend() noexcept { return {}; }
  void unhandled_exception() noexcept { error = std::current_exception(); }
};

} // namespace detail

namespace detail {

/// What task<T> and task<void> share: owning the frame and starting it
/// with the awaiter as its continuation.
template <class Promise> class task_frame {
public:
  task_frame(task_frame &&o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  task_frame &operator=(task_frame &&o) noexcept {
    if (this != &o) {
      if (h_)
        h_.destroy();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  ~task_frame() {
    if (h_)
      h_.destroy();
  }
  bool await_ready() const noexcept { return false; }
  std::coroutine_handle<> await_suspend(std::coroutine_handle<> c) noexcept {
    h_.promise().continuation = c;
    return h_;
  }

protected:
  explicit task_frame(std::coroutine_handle<Promise> h) : h_(h) {}
  void rethrow_if_failed() const {
    if (h_.promise().error)
      std::rethrow_exception(h_.promise().error);
  }
  std::coroutine_handle<Promise> h_;
};

template <class T> struct task_promise : promise_base<T> {
  std::optional<T> value;
  task<T> get_return_object() noexcept;
  template <class U> void return_value(U &&v) {
    value.emplace(std::forward<U>(v));
  }
};

template <> struct task_promise<void> : promise_base<void> {
  task<void> get_return_object() noexcept;
  void return_void() noexcept {}
};

} // namespace detail

template <class T>
class [[nodiscard]] task : public detail::task_frame<detail::task_promise<T>> {
public:
  using promise_type = detail::task_promise<T>;
  T await_resume() {
    this->rethrow_if_failed();
    if constexpr (!std::is_void_v<T>)
      return std::move(*this->h_.promise().value);
  }

private:
  friend promise_type;
  explicit task(std::coroutine_handle<promise_type> h)
      : detail::task_frame<promise_type>(h) {}
};

template <class T> task<T> detail::task_promise<T>::get_return_object() noexcept {
  return task<T>(std::coroutine_handle<task_promise>::from_promise(*this));
}

inline task<void> detail::task_promise<void>::get_return_object() noexcept {
  return task<void>(std::coroutine_handle<task_promise>::from_promise(*this));
}

namespace detail {

/// A self-destroying coroutine that runs a task<void> to completion and
/// reports its exception to the loop.
struct detached {
  struct promise_type {
    LoopCore *core = nullptr;
    detached get_return_object() noexcept {
      return {std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept {
      if (core != nullptr)
        core->capture();
    }
  };
  std::coroutine_handle<promise_type> h;
};

inline detached run_detached(task<void> t) { co_await std::move(t); }

struct SleepWaiter {
  SleepWaiter *next = nullptr;
  SleepWaiter *prev = nullptr;
  LoopCore *core = nullptr;
  duplex_timer *timer = nullptr;
  std::coroutine_handle<> h;
  std::error_code ec;

  void unlink() noexcept {
    if (prev != nullptr)
      prev->next = next;
    else if (core->sleepers == this)
      core->sleepers = next;
    if (next != nullptr)
      next->prev = prev;
    next = prev = nullptr;
  }
  /// Close the timer and drop our reference (duplex_timer_new's). On the
  /// loop thread: no callback starts after this.
  void drop_timer() noexcept {
    if (timer != nullptr) {
      duplex_timer_close(timer);
      duplex_timer_unref(timer);
      timer = nullptr;
    }
  }
  void finish(std::error_code e) noexcept {
    unlink();
    ec = e;
    drop_timer();
    h.resume();
  }
};

inline void LoopCore::cancel_sleepers() noexcept {
  while (sleepers != nullptr)
    sleepers->finish(make_error_code(errc::DUPLEX_ECANCELED));
}

} // namespace detail

/// Start @p t on @p loop's thread; it owns itself until it finishes. An
/// exception escaping it is rethrown by Loop::run() / Loop::rethrow().
/// If the loop is freed before it starts, the task is destroyed unrun.
/// @thread any.
inline void spawn(Loop &loop, task<void> t) {
  detail::detached d = detail::run_detached(std::move(t));
  d.h.promise().core = loop.core();
  auto h = d.h;
  int rc = duplex_loop_post(
      loop.native(),
      [](duplex_loop *, int status, void *arg) {
        auto hh = std::coroutine_handle<detail::detached::promise_type>::
            from_address(arg);
        if (status == 0)
          hh.resume();
        else
          hh.destroy();
      },
      h.address());
  if (rc != 0) {
    h.destroy();
    throw error(rc, "spawn");
  }
}

/// Awaitable returned by Loop::sleep(): resumes on the loop thread after
/// the delay with an empty error_code, or with errc::DUPLEX_ECANCELED when the
/// loop is being freed first.
class sleep_awaiter {
public:
  /// Holds a share of the loop's core: awaited after the Loop is gone, it
  /// resumes at once with errc::DUPLEX_ECANCELED.
  sleep_awaiter(std::shared_ptr<detail::LoopCore> core,
                std::chrono::milliseconds d)
      : core_(std::move(core)), d_(d) {
    w_.core = core_.get();
  }
  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> h) noexcept {
    w_.h = h;
    int rc = duplex_timer_new(
        &w_.timer, w_.core->loop,
        [](duplex_timer *, void *user) {
          static_cast<detail::SleepWaiter *>(user)->finish({});
        },
        &w_);
    if (rc == 0)
      rc = duplex_timer_start(w_.timer, static_cast<uint64_t>(d_.count()), 0);
    if (rc != 0) {
      w_.drop_timer();
      // A loop being freed refuses new timers: that is a cancellation.
      w_.ec = to_error_code(rc == DUPLEX_ECLOSED ? DUPLEX_ECANCELED : rc);
      return false; // resume at once with the error
    }
    w_.next = w_.core->sleepers;
    if (w_.next != nullptr)
      w_.next->prev = &w_;
    w_.core->sleepers = &w_;
    return true;
  }
  std::error_code await_resume() const noexcept { return w_.ec; }

private:
  std::shared_ptr<detail::LoopCore> core_;
  std::chrono::milliseconds d_;
  detail::SleepWaiter w_;
};

inline auto Loop::sleep(std::chrono::milliseconds d) {
  return sleep_awaiter(core_, d);
}

/// Interface of the queue-backed awaitables (conn reads, channel receives)
/// that first_of() can combine: they never lose a value, because a value
/// stays queued until the awaiter that wins takes it.
template <class A>
concept queue_awaitable = requires(A a, std::coroutine_handle<> h) {
  { a.ready() } -> std::same_as<bool>;
  a.subscribe(h);
  a.unsubscribe();
  a.take();
};

/// Await whichever of @p a and @p b has a value first; the other is left
/// untouched (nothing is consumed from it), so the select is cancel-safe.
/// Result: std::variant with index 0 for @p a, 1 for @p b.
template <queue_awaitable A, queue_awaitable B> class first_of_awaiter {
public:
  first_of_awaiter(A a, B b) : a_(std::move(a)), b_(std::move(b)) {}
  bool await_ready() noexcept { return a_.ready() || b_.ready(); }
  void await_suspend(std::coroutine_handle<> h) {
    a_.subscribe(h);
    b_.subscribe(h);
  }
  std::variant<decltype(std::declval<A &>().take()),
               decltype(std::declval<B &>().take())>
  await_resume() {
    a_.unsubscribe();
    b_.unsubscribe();
    using V = std::variant<decltype(std::declval<A &>().take()),
                           decltype(std::declval<B &>().take())>;
    if (a_.ready())
      return V(std::in_place_index<0>, a_.take());
    return V(std::in_place_index<1>, b_.take());
  }

private:
  A a_;
  B b_;
};

template <queue_awaitable A, queue_awaitable B>
first_of_awaiter<A, B> first_of(A a, B b) {
  return first_of_awaiter<A, B>(std::move(a), std::move(b));
}

} // namespace duplex
