// libduplex C++ layer: LoopGroup (N loops on library-owned threads), group
// listeners, and Signal.
#pragma once

#include <duplex/listener.hpp>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace duplex {

namespace detail {

/// What a LoopGroup shares with what may outlive it (its listeners).
struct GroupCore {
  duplex_loop_group *group = nullptr; // the creation's reference, until freed
  std::vector<std::shared_ptr<LoopCore>> cores; // loop i's at [i]
  std::mutex mu;
  bool freed = false; // under mu
  // Listener boxes: a conn handed to another loop reads its listener's box
  // in its first callback, whenever that runs; they go once the group is
  // freed (no callback after). Under mu.
  std::vector<std::shared_ptr<void>> keep;
};

} // namespace detail

/// N event loops, each run by its own library-owned thread (see "Loop
/// groups" in docs/cpp.md). Move-only; destroying it frees every loop,
/// which closes every conn, listener, timer and signal watcher on them.
class LoopGroup {
public:
  /// Create the group and start its threads. @p loops = 0: one per CPU
  /// the process may run on. @p pin: pin loop i's thread to a CPU (Linux
  /// only, else errc::DUPLEX_ENOTSUP). Throws duplex::error.
  explicit LoopGroup(unsigned loops = 0, bool pin = false)
      : gc_(std::make_shared<detail::GroupCore>()) {
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.loops = loops;
    o.flags = pin ? DUPLEX_GROUP_PIN : 0u;
    detail::check(duplex_group_new(&gc_->group, &o), "duplex_group_new");
    try {
      unsigned n = 0;
      detail::check(duplex_group_get_count(gc_->group, &n), "group count");
      gc_->cores.reserve(n);
      loops_.reserve(n);
      for (unsigned i = 0; i < n; i++) {
        auto core = std::make_shared<detail::LoopCore>();
        detail::check(duplex_group_get_loop(gc_->group, i, &core->loop),
                      "group loop");
        duplex_loop_ref(core->loop); // the core's own, dropped with it
        gc_->cores.push_back(core);
        loops_.push_back(std::unique_ptr<Loop>(
            new Loop(std::move(core), Loop::member_tag{})));
      }
      detail::check(duplex_group_start(gc_->group), "duplex_group_start");
    } catch (...) {
      close();
      throw;
    }
  }
  LoopGroup(LoopGroup &&) noexcept = default;
  LoopGroup &operator=(LoopGroup &&o) noexcept {
    if (this != &o) {
      close();
      gc_ = std::move(o.gc_);
      loops_ = std::move(o.loops_);
    }
    return *this;
  }
  LoopGroup(const LoopGroup &) = delete;
  LoopGroup &operator=(const LoopGroup &) = delete;
  ~LoopGroup() { close(); }

  [[nodiscard]] unsigned size() const noexcept {
    return static_cast<unsigned>(loops_.size());
  }
  /// Loop @p i (0 .. size()-1): post(), sleep(), spawn(), Conn, Timer,
  /// Channel, Signal work on it as on any loop. The group runs it:
  /// run()/start() throw errc::DUPLEX_EBUSY and close() does nothing. The
  /// reference stays valid as long as the group object (also after moves).
  [[nodiscard]] Loop &loop(unsigned i) const { return *loops_.at(i); }
  /// The least-loaded loop (fewest live conns, ties round-robin): where to
  /// place an outgoing conn.
  [[nodiscard]] Loop &pick() const {
    duplex_loop *l = nullptr;
    detail::check(duplex_group_pick(group(), &l), "duplex_group_pick");
    return *loops_[index_of(l)];
  }
  /// The loop @p c lives on (any thread; e.g. in on_open, to spawn a
  /// coroutine there). Throws duplex::error (errc::DUPLEX_ECLOSED once
  /// the conn finished closing, DUPLEX_EINVAL if it is not the group's).
  [[nodiscard]] Loop &loop_of(const ConnRef &c) const {
    duplex_loop *l = nullptr;
    detail::check(duplex_conn_get_loop(c.native(), &l), "duplex_conn_get_loop");
    return *loops_[index_of(l)];
  }
  /// Loop @p i's figures (live conns, queued bytes, conns accepted onto it).
  [[nodiscard]] duplex_loop_stats stats(unsigned i) const {
    duplex_loop_stats s = DUPLEX_LOOP_STATS_INIT;
    detail::check(duplex_loop_get_stats(loop(i).native(), &s), "stats");
    return s;
  }

  /// Stop the threads after their current iteration; nothing closes.
  /// Not on one of the group's threads (errc::DUPLEX_EDEADLK).
  void stop() { detail::check(duplex_group_stop(group()), "duplex_group_stop"); }
  /// Start the threads again after stop().
  void start() { detail::check(duplex_group_start(group()), "duplex_group_start"); }

  /// Free every loop now (idempotent): coroutines sleeping on them resume
  /// with errc::DUPLEX_ECANCELED, every conn closes (its on_close runs on
  /// the calling thread). Not on one of the group's threads.
  void close() noexcept {
    if (!gc_ || gc_->group == nullptr)
      return;
    for (auto &core : gc_->cores)
      duplex_loop_post(
          core->loop,
          [](duplex_loop *, int, void *arg) {
            static_cast<detail::LoopCore *>(arg)->cancel_sleepers();
          },
          core.get());
    duplex_group_free(gc_->group);
    std::vector<std::shared_ptr<void>> dead;
    for (auto &core : gc_->cores) {
      std::lock_guard<std::mutex> g(core->mu);
      core->freed = true;
      for (auto &p : core->graveyard)
        dead.push_back(std::move(p));
      core->graveyard.clear();
    }
    {
      std::lock_guard<std::mutex> g(gc_->mu);
      gc_->freed = true;
      gc_->group = nullptr;
      for (auto &p : gc_->keep)
        dead.push_back(std::move(p));
      gc_->keep.clear();
    }
    dead.clear();
  }

  /// Raise the first stored callback exception of any loop (lowest index
  /// first), if any. Any thread.
  void rethrow() {
    for (auto &core : gc_->cores)
      core->rethrow();
  }

  [[nodiscard]] duplex_loop_group *native() const noexcept {
    return gc_ ? gc_->group : nullptr;
  }

private:
  friend class Listener;
  duplex_loop_group *group() const {
    if (!gc_ || gc_->group == nullptr)
      throw error(DUPLEX_ECLOSED, "group");
    return gc_->group;
  }
  unsigned index_of(duplex_loop *l) const {
    for (unsigned i = 0; i < loops_.size(); i++)
      if (loops_[i]->native() == l)
        return i;
    throw error(DUPLEX_EINVAL, "not a loop of this group");
  }
  template <class F>
  static Listener listen(LoopGroup &grp, ConnHandlers h, const ConnOptions &o,
                         ListenerOptions lo, F &&make);

  std::shared_ptr<detail::GroupCore> gc_;
  std::vector<std::unique_ptr<Loop>> loops_;
};

template <class F>
Listener LoopGroup::listen(LoopGroup &grp, ConnHandlers h, const ConnOptions &o,
                           ListenerOptions lo, F &&make) {
  duplex_loop_group *g = grp.group();
  std::shared_ptr<detail::GroupCore> gc = grp.gc_;
  {
    std::lock_guard<std::mutex> lk(gc->mu);
    gc->keep.reserve(gc->keep.size() + 1); // registering below cannot throw
  }
  Listener l = Listener::create(
      gc->cores.at(0), &gc->cores, std::move(h), o, std::move(lo),
      [&](duplex_listener **out, const duplex_listener_opts *opts) {
        return make(out, g, opts);
      });
  std::lock_guard<std::mutex> lk(gc->mu);
  if (!gc->freed)
    gc->keep.push_back(l.box_);
  return l;
}

inline Listener Listener::tcp(LoopGroup &group, const std::string &host,
                              uint16_t port, ConnHandlers h,
                              const ConnOptions &o, ListenerOptions lo) {
  return LoopGroup::listen(
      group, std::move(h), o, std::move(lo),
      [&](duplex_listener **out, duplex_loop_group *g,
          const duplex_listener_opts *opts) {
        return duplex_group_listen_tcp(out, g,
                                       host.empty() ? nullptr : host.c_str(),
                                       port, opts);
      });
}

inline Listener Listener::unix_path(LoopGroup &group, const std::string &path,
                                    ConnHandlers h, const ConnOptions &o,
                                    ListenerOptions lo) {
  return LoopGroup::listen(
      group, std::move(h), o, std::move(lo),
      [&](duplex_listener **out, duplex_loop_group *g,
          const duplex_listener_opts *opts) {
        return duplex_group_listen_unix(out, g, path.c_str(), opts);
      });
}

/// Watches a signal on a loop (duplex_signal_*): the handler runs on the
/// loop thread with the signal number; an exception it throws goes to
/// Loop::run() / rethrow() (LoopGroup::rethrow() for a group loop) like a
/// handler's. Several arrivals before the loop runs may be reported once.
/// Move-only; destroying it stops watching. It may outlive its Loop.
class Signal {
public:
  Signal() = default;
  /// Watch @p signum (caught from the moment this returns). Any thread;
  /// blocks one iteration when the loop runs on another thread. Throws
  /// duplex::error (errc::DUPLEX_EINVAL for SIGKILL/SIGSTOP or an empty
  /// handler, DUPLEX_ECLOSED once the loop was freed).
  Signal(Loop &loop, int signum, std::function<void(int)> handler)
      : core_(loop.shared_core()),
        box_(std::make_shared<Box>(Box{loop.core(), std::move(handler)})) {
    if (!box_->fn)
      throw error(DUPLEX_EINVAL, "signal handler");
    detail::check(duplex_signal_new(&s_, loop.native(), signum, &tramp,
                                    box_.get()),
                  "duplex_signal_new");
  }
  Signal(Signal &&o) noexcept
      : s_(std::exchange(o.s_, nullptr)), core_(std::move(o.core_)),
        box_(std::move(o.box_)) {}
  Signal &operator=(Signal &&o) noexcept {
    if (this != &o) {
      close();
      s_ = std::exchange(o.s_, nullptr);
      core_ = std::move(o.core_);
      box_ = std::move(o.box_);
    }
    return *this;
  }
  Signal(const Signal &) = delete;
  Signal &operator=(const Signal &) = delete;
  ~Signal() { close(); }

  /// Stop watching (idempotent; also from the handler, and after the loop
  /// was freed). No handler starts after this returns.
  void close() noexcept {
    if (s_ == nullptr)
      return;
    duplex_signal_close(s_); // DUPLEX_ECLOSED once the loop was freed
    duplex_signal_unref(std::exchange(s_, nullptr));
    // The handler may be the caller (close from inside it): free later.
    core_->retire(std::move(box_));
    core_.reset();
  }
  [[nodiscard]] int signum() const {
    int n = 0;
    detail::check(duplex_signal_get_signum(s_, &n), "signum");
    return n;
  }
  [[nodiscard]] duplex_signal *native() const noexcept { return s_; }

private:
  struct Box {
    detail::LoopCore *core;
    std::function<void(int)> fn;
  };
  static void tramp(duplex_signal *, int signum, void *user) {
    auto *b = static_cast<Box *>(user);
    detail::guarded(b->core, [&] { b->fn(signum); });
  }
  duplex_signal *s_ = nullptr;
  std::shared_ptr<detail::LoopCore> core_;
  std::shared_ptr<Box> box_;
};

} // namespace duplex
