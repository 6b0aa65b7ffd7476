// libduplex C++ layer: coroutines that run on the loop thread.
#pragma once

#include <duplex/loop.hpp>

#include <coroutine>
#include <cstddef>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

namespace duplex {

/// A lazily started coroutine returning T. Await it from another task, or
/// hand a task<void> to spawn(). Move-only; destroying an unstarted or
/// finished task frees its frame. Frames come from a per-thread cache of
/// recycled blocks (see detail::block_cache), so a task awaited once per
/// message costs no allocation once the cache is warm.
template <class T = void> class [[nodiscard]] task;

namespace detail {

/// A per-thread cache of freed memory blocks, by size class: what coroutine
/// frames and read chunks are made of. A block freed on a thread goes to
/// that thread's cache (up to kMaxCached bytes in all; beyond, and for
/// blocks over kLargeMax, it goes back to operator delete), and the next
/// block of the same class made on that thread reuses it. Blocks are plain
/// operator new memory, so any thread may free any block. What a thread
/// still caches is freed when it exits. Not for use across fork().
class block_cache {
public:
  static constexpr std::size_t kSmallStep = 16;  // classes 16, 32, ... 1024
  static constexpr std::size_t kSmallMax = 1024;
  static constexpr std::size_t kLargeMax = 64 * 1024; // then 2 KiB ... 64 KiB
  static constexpr std::size_t kMaxCached = 1024 * 1024;

  static void *get(std::size_t n) {
    std::size_t size;
    unsigned c = size_class(n, &size);
    state &s = here();
    if (c != kNone && s.free[c] != nullptr) {
      node *b = s.free[c];
      s.free[c] = b->next;
      s.cached -= size;
      return b;
    }
    return ::operator new(size);
  }
  static void put(void *p, std::size_t n) noexcept {
    if (p == nullptr)
      return;
    std::size_t size;
    unsigned c = size_class(n, &size);
    state &s = here();
    if (c == kNone || s.closed || s.cached + size > kMaxCached) {
      ::operator delete(p);
      return;
    }
    if (!s.reaped)
      arm_reaper(s); // the first block this thread keeps
    auto *b = static_cast<node *>(p);
    b->next = s.free[c];
    s.free[c] = b;
    s.cached += size;
  }
  /// Bytes the calling thread's cache holds (for tests and diagnostics).
  static std::size_t cached() noexcept { return here().cached; }

private:
  struct node {
    node *next;
  };
  static constexpr unsigned kSmall = kSmallMax / kSmallStep; // 64 classes
  static constexpr unsigned kClasses = kSmall + 6;           // + 2K..64K
  static constexpr unsigned kNone = ~0u;
  // Trivially destructible and constant-initialized (no guard on each
  // access), so using it while the thread exits is safe; the reaper,
  // armed when the thread first keeps a block, empties it at thread exit
  // and marks it closed.
  struct state {
    node *free[kClasses];
    std::size_t cached;
    bool reaped;
    bool closed;
  };
  struct reaper {
    state *s;
    ~reaper() {
      for (node *&head : s->free)
        while (head != nullptr)
          ::operator delete(std::exchange(head, head->next));
      s->cached = 0;
      s->closed = true;
    }
  };
  static state &here() noexcept {
    static thread_local state s{};
    return s;
  }
  static void arm_reaper(state &s) noexcept {
    static thread_local reaper r{&s};
    (void)r;
    s.reaped = true;
  }
  static unsigned size_class(std::size_t n, std::size_t *size) noexcept {
    if (n <= kSmallMax) {
      std::size_t k = n == 0 ? 1 : (n + kSmallStep - 1) / kSmallStep;
      *size = k * kSmallStep;
      return static_cast<unsigned>(k - 1);
    }
    if (n <= kLargeMax) {
      unsigned c = kSmall;
      std::size_t sz = 2 * kSmallMax;
      while (sz < n) {
        sz *= 2;
        c++;
      }
      *size = sz;
      return c;
    }
    *size = n;
    return kNone;
  }
};

struct final_awaiter {
  bool await_ready() const noexcept { return false; }
  template <class P>
  std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) noexcept {
    auto &p = h.promise();
    if (p.detached != nullptr) {
      // A spawned task: nobody awaits it. Report its exception to the loop
      // and free the frame (it is suspended here, so that is allowed).
      if (p.error)
        p.detached->capture(p.error);
      h.destroy();
      return std::noop_coroutine();
    }
    auto c = p.continuation;
    return c ? c : std::noop_coroutine();
  }
  void await_resume() const noexcept {}
};

template <class T> struct promise_base {
  std::coroutine_handle<> continuation;
  std::exception_ptr error;
  LoopCore *detached = nullptr; // set by spawn(): the task owns itself
  std::suspend_always initial_suspend() noexcept { return {}; }
  final_awaiter final_suspend() noexcept { return {}; }
  void unhandled_exception() noexcept { error = std::current_exception(); }
  // Frames are recycled through the calling thread's block cache.
  static void *operator new(std::size_t n) { return block_cache::get(n); }
  static void operator delete(void *p, std::size_t n) noexcept {
    block_cache::put(p, n);
  }
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
  /// The frame, handed over (spawn() uses it).
  std::coroutine_handle<Promise> release() noexcept {
    return std::exchange(h_, nullptr);
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

struct SleepWaiter {
  SleepWaiter *next = nullptr;
  SleepWaiter *prev = nullptr;
  LoopCore *core = nullptr;
  TimerSlot *slot = nullptr;
  std::coroutine_handle<> h;
  std::error_code ec;
  bool linked = false;
  bool fired = false;
  bool pooled = false; // slot comes from (and goes back to) core's pool

  static void on_timer(duplex_timer *, void *user) {
    if (SleepWaiter *w = static_cast<TimerSlot *>(user)->w)
      w->finish({});
  }
  /// Take a timer (a pooled one on the loop thread) and start it.
  int start(uint64_t ms) noexcept {
    pooled = duplex_loop_on_thread(core->loop) == 1;
    if (pooled && core->idle_timers != nullptr) {
      slot = core->idle_timers;
      core->idle_timers = slot->next;
      core->idle_count--;
    } else {
      try {
        slot = new TimerSlot;
      } catch (const std::bad_alloc &) {
        return DUPLEX_ENOMEM;
      }
      int rc = duplex_timer_new(&slot->timer, core->loop, &on_timer, slot);
      if (rc != 0) {
        delete std::exchange(slot, nullptr);
        return rc;
      }
    }
    slot->w = this;
    slot->next = nullptr;
    int rc = duplex_timer_start(slot->timer, ms, 0);
    if (rc != 0)
      drop_timer();
    return rc;
  }
  void link() noexcept {
    next = core->sleepers;
    if (next != nullptr)
      next->prev = this;
    core->sleepers = this;
    linked = true;
  }
  void unlink() noexcept {
    if (!linked)
      return;
    if (prev != nullptr)
      prev->next = next;
    else if (core->sleepers == this)
      core->sleepers = next;
    if (next != nullptr)
      next->prev = prev;
    next = prev = nullptr;
    linked = false;
  }
  /// Let go of the timer: stopped and kept for reuse, or closed and our
  /// reference dropped. On the loop thread no callback starts after this.
  void drop_timer() noexcept {
    if (slot == nullptr)
      return;
    TimerSlot *t = std::exchange(slot, nullptr);
    t->w = nullptr;
    if (pooled && core->idle_count < LoopCore::kIdleTimers &&
        duplex_timer_stop(t->timer) == 0) {
      t->next = core->idle_timers;
      core->idle_timers = t;
      core->idle_count++;
      return;
    }
    duplex_timer_close(t->timer);
    duplex_timer_unref(t->timer);
    delete t;
  }
  void finish(std::error_code e) noexcept {
    unlink();
    ec = e;
    fired = true;
    drop_timer();
    if (h)
      std::exchange(h, nullptr).resume();
  }
};

inline void LoopCore::cancel_sleepers() noexcept {
  while (sleepers != nullptr)
    sleepers->finish(make_error_code(errc::DUPLEX_ECANCELED));
}

} // namespace detail

/// Start @p t on @p loop's thread; it owns itself until it finishes (its
/// frame is freed then). An exception escaping it is rethrown by
/// Loop::run() / Loop::rethrow(). If the loop is freed before it starts,
/// the task is destroyed unrun. Throws duplex::error if the loop takes no
/// more work (being freed). @thread any.
inline void spawn(Loop &loop, task<void> t) {
  auto h = t.release();
  if (!h)
    return;
  h.promise().detached = loop.core();
  int rc = duplex_loop_post(
      loop.native(),
      [](duplex_loop *, int status, void *arg) {
        auto hh = std::coroutine_handle<detail::task_promise<void>>::from_address(arg);
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
/// the delay with an empty error_code, or with errc::DUPLEX_ECANCELED when
/// the loop is being freed first. It is also a first_of() operand, which
/// makes it a timeout: `first_of(conn.read(), loop.sleep(5s))` resumes
/// with the read, or with index 1 once 5 s passed without one. The time
/// counts from when the await starts waiting; when another operand wins,
/// the timer is closed and nothing else happens. One await per object.
class sleep_awaiter {
public:
  /// Holds a share of the loop's core: awaited after the Loop is gone, it
  /// resumes at once with errc::DUPLEX_ECANCELED.
  sleep_awaiter(std::shared_ptr<detail::LoopCore> core,
                std::chrono::milliseconds d)
      : core_(std::move(core)), d_(d) {
    w_.core = core_.get();
  }
  sleep_awaiter(sleep_awaiter &&o) noexcept
      : core_(std::move(o.core_)), d_(o.d_) {
    w_.core = core_.get(); // only moved before it is awaited
  }
  sleep_awaiter &operator=(sleep_awaiter &&) = delete;
  ~sleep_awaiter() { unsubscribe(); }

  // ---- first_of() operand (see queue_awaitable) ----
  /// Whether the time ran out (or the timer could not be made).
  bool ready() const noexcept { return w_.fired; }
  /// Start the timer (first call) and resume @p h when it fires.
  void subscribe(std::coroutine_handle<> h) noexcept {
    w_.h = h;
    if (w_.fired || w_.linked)
      return;
    int rc = w_.start(static_cast<uint64_t>(d_.count()));
    if (rc != 0) {
      // A loop being freed refuses new timers: that is a cancellation.
      w_.ec = to_error_code(rc == DUPLEX_ECLOSED ? DUPLEX_ECANCELED : rc);
      w_.fired = true;
      w_.h = nullptr;
      return;
    }
    w_.link();
  }
  /// Stop waiting: the timer is closed (it never fires after this).
  void unsubscribe() noexcept {
    w_.h = nullptr;
    if (!w_.fired && w_.linked) {
      w_.unlink();
      w_.drop_timer();
    }
  }
  std::error_code take() const noexcept { return w_.ec; }

  bool await_ready() const noexcept { return w_.fired; }
  bool await_suspend(std::coroutine_handle<> h) noexcept {
    subscribe(h);
    return !w_.fired; // the timer could not be made: resume at once
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

/// Interface of the awaitables first_of() combines: conn reads, channel
/// receives and sleeps. They never lose a value: a value stays queued
/// until the awaiter that wins takes it. subscribe() may throw (a second
/// reader of one conn: errc::DUPLEX_EBUSY); unsubscribe() undoes only this
/// awaiter's own subscription and may be called again.
template <class A>
concept queue_awaitable = requires(A a, std::coroutine_handle<> h) {
  { a.ready() } -> std::same_as<bool>;
  a.subscribe(h);
  a.unsubscribe();
  a.take();
};

/// Await whichever of the operands has a value first; the others are left
/// untouched (nothing is consumed from them), so the select is
/// cancel-safe. Result: std::variant whose index is the winner's position.
/// When several are ready, the leftmost wins.
template <queue_awaitable... A> class first_of_awaiter {
  static_assert(sizeof...(A) >= 2, "first_of() needs two operands or more");

public:
  using result_type = std::variant<decltype(std::declval<A &>().take())...>;

  explicit first_of_awaiter(A... a) : aw_(std::move(a)...) {}
  bool await_ready() noexcept { return ready_index() != kNone; }
  bool await_suspend(std::coroutine_handle<> h) {
    subscribe_from<0>(h);
    if (ready_index() != kNone) { // one became ready while subscribing
      unsubscribe_all();
      return false;
    }
    return true;
  }
  result_type await_resume() {
    unsubscribe_all();
    std::size_t i = ready_index();
    return take_at<0>(i == kNone ? sizeof...(A) - 1 : i);
  }

private:
  static constexpr std::size_t kNone = ~std::size_t{0};
  /// The leftmost ready operand's position, or kNone.
  template <std::size_t I = 0> std::size_t ready_index() noexcept {
    if constexpr (I == sizeof...(A))
      return kNone;
    else
      return std::get<I>(aw_).ready() ? I : ready_index<I + 1>();
  }
  template <std::size_t I> void subscribe_from(std::coroutine_handle<> h) {
    if constexpr (I < sizeof...(A)) {
      try {
        std::get<I>(aw_).subscribe(h);
      } catch (...) {
        unsubscribe_all();
        throw;
      }
      subscribe_from<I + 1>(h);
    }
  }
  void unsubscribe_all() noexcept {
    std::apply([](auto &...x) { (x.unsubscribe(), ...); }, aw_);
  }
  template <std::size_t I> result_type take_at(std::size_t i) {
    if constexpr (I + 1 < sizeof...(A)) {
      if (i != I)
        return take_at<I + 1>(i);
    }
    return result_type(std::in_place_index<I>, std::get<I>(aw_).take());
  }
  std::tuple<A...> aw_;
};

/// co_await first_of(a, b, ...): see first_of_awaiter. Operands are taken
/// by value (awaiters hold what they use). A timeout is a sleep operand:
/// `first_of(conn.read(), ch.receive(), loop.sleep(1s))`.
template <queue_awaitable... A> first_of_awaiter<A...> first_of(A... a) {
  return first_of_awaiter<A...>(std::move(a)...);
}

} // namespace duplex
