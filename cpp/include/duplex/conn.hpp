// libduplex C++ layer: Conn (counted owner), ConnRef (view), coroutines.
#pragma once

#include <duplex/task.hpp>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace duplex {

class ConnRef;

/// Callbacks of a conn; each may be empty. They run on the loop thread.
/// Exceptions they throw are caught at the C boundary and rethrown by
/// Loop::run() / Loop::rethrow().
struct ConnHandlers {
  std::function<void(ConnRef)> on_open = {};
  /// Bytes (or one whole frame, with framing); borrowed for the call.
  /// When empty, data is queued for co_await conn.read().
  std::function<void(ConnRef, std::span<const std::byte>)> on_read = {};
  std::function<void(ConnRef)> on_eof = {};
  std::function<void(ConnRef, std::size_t)> on_backpressure = {};
  std::function<void(ConnRef)> on_writable = {};
  std::function<void(ConnRef, std::error_code)> on_close = {};
};

/// Framing settings (see duplex_framing).
struct Framing {
  static Framing lines(char delim = '\n', std::size_t max = 0) {
    Framing f;
    f.raw.kind = DUPLEX_FRAME_DELIMITED;
    f.raw.delimiter[0] = static_cast<unsigned char>(delim);
    f.raw.delimiter_len = 1;
    f.raw.max_frame = max;
    return f;
  }
  static Framing length_prefix(unsigned bytes, bool little_endian = false,
                               std::size_t max = 0) {
    Framing f;
    f.raw.kind = DUPLEX_FRAME_LENGTH_PREFIX;
    f.raw.prefix_bytes = bytes;
    f.raw.flags = little_endian ? DUPLEX_FRAME_LITTLE_ENDIAN : 0u;
    f.raw.max_frame = max;
    return f;
  }
  duplex_framing raw = DUPLEX_FRAMING_INIT;
};

/// Limits, flags, deadlines and framing of a conn (zero = default / off).
struct ConnOptions {
  std::size_t high_watermark = 0, low_watermark = 0, hard_limit = 0;
  unsigned flags = 0;
  std::chrono::milliseconds connect_timeout{0}, idle_timeout{0},
      read_timeout{0}, flush_timeout{0};
  std::optional<Framing> framing;
  /// Coroutine reads: pause reading while this many bytes wait unread.
  std::size_t read_buffer_limit = 1 << 20;
};

/// The result of co_await conn.read().
struct ReadResult {
  std::string data;     ///< a chunk, or one frame with framing
  bool eof = false;     ///< the peer finished sending
  std::error_code error; ///< the conn closed (errc::DUPLEX_ECLOSED or the reason)
  [[nodiscard]] bool ok() const noexcept { return !eof && !error; }
};

namespace detail {

/// What a C user pointer points at: a conn's box, or (for conns a
/// listener accepted, until their first callback) the listener's.
struct BoxBase {
  enum Kind { kConn, kListener } kind;
};

struct ListenerBox : BoxBase {
  ListenerBox() : BoxBase{kListener} {}
  LoopCore *core = nullptr;
  std::shared_ptr<const ConnHandlers> h; // shared by every accepted conn
  std::size_t read_limit = 1 << 20;
};

class write_awaiter;

struct ConnBox : BoxBase {
  ConnBox() : BoxBase{kConn} {}
  // async_write()s waiting for room: resumed by on_writable or the close
  write_awaiter *room_waiters = nullptr;
  LoopCore *core = nullptr;
  std::shared_ptr<const ConnHandlers> h;
  std::size_t read_limit = 1 << 20;
  // coroutine side (loop thread only); chunks not yet read, allocated
  // only while some wait (an idle conn keeps no container)
  std::unique_ptr<std::deque<std::string>> rx;
  std::size_t rx_bytes = 0;
  bool eof = false;
  bool paused_for_rx = false;
  std::error_code closed; // set once on_close ran
  std::coroutine_handle<> reader;
};

/// The conn's box; an accepted conn gets its own from the listener's
/// template the first time (on the loop thread).
inline ConnBox *conn_box(duplex_conn *c, void *u) {
  auto *base = static_cast<BoxBase *>(u);
  if (base == nullptr || base->kind == BoxBase::kConn)
    return static_cast<ConnBox *>(base);
  auto *lb = static_cast<ListenerBox *>(base);
  auto *b = new ConnBox;
  b->core = lb->core;
  b->h = lb->h;
  b->read_limit = lb->read_limit;
  duplex_conn_set_user(c, static_cast<BoxBase *>(b));
  return b;
}

inline ConnBox *box_of(duplex_conn *c) {
  void *u = nullptr;
  duplex_conn_get_user(c, &u);
  return conn_box(c, u);
}

inline void resume_reader(ConnBox *b) {
  if (b->reader) {
    auto h = std::exchange(b->reader, nullptr);
    h.resume();
  }
}

duplex_conn_cbs conn_trampolines() noexcept;

/// One reference to a conn (duplex_conn_ref / duplex_conn_unref): what an
/// awaitable or a coroutine frame holds, so that the conn's memory outlives
/// it whatever happens to the ConnRef or Conn it came from. Move-only.
class conn_hold {
public:
  explicit conn_hold(duplex_conn *c) noexcept : c_(c) {
    if (c_ != nullptr)
      duplex_conn_ref(c_);
  }
  conn_hold(conn_hold &&o) noexcept : c_(std::exchange(o.c_, nullptr)) {}
  conn_hold &operator=(conn_hold &&) = delete;
  conn_hold(const conn_hold &) = delete;
  conn_hold &operator=(const conn_hold &) = delete;
  ~conn_hold() {
    if (c_ != nullptr)
      duplex_conn_unref(c_);
  }
  [[nodiscard]] duplex_conn *get() const noexcept { return c_; }

private:
  duplex_conn *c_;
};

/// co_await conn.read(): the next chunk (or frame), EOF, or the close.
/// Holds its own reference to the conn, so it may outlive the ConnRef or
/// Conn it came from (and be passed to another coroutine or first_of()).
class read_awaiter {
public:
  explicit read_awaiter(duplex_conn *c) noexcept : c_(c) {}
  bool ready() const noexcept {
    auto *b = box_of(c_.get());
    return b == nullptr || b->rx != nullptr || b->eof || b->closed;
  }
  void subscribe(std::coroutine_handle<> h) noexcept {
    if (auto *b = box_of(c_.get()))
      b->reader = h;
  }
  void unsubscribe() noexcept {
    if (auto *b = box_of(c_.get()))
      b->reader = nullptr;
  }
  ReadResult take() {
    ReadResult r;
    auto *b = box_of(c_.get());
    if (b == nullptr) {
      r.error = make_error_code(errc::DUPLEX_ECLOSED);
      return r;
    }
    if (b->rx != nullptr) {
      r.data = std::move(b->rx->front());
      b->rx->pop_front();
      if (b->rx->empty())
        b->rx.reset();
      b->rx_bytes -= r.data.size();
      if (b->paused_for_rx && b->rx_bytes < b->read_limit / 2) {
        b->paused_for_rx = false;
        duplex_conn_resume(c_.get());
      }
    } else if (b->eof) {
      r.eof = true;
    } else {
      r.error = b->closed;
    }
    return r;
  }
  bool await_ready() const noexcept { return ready(); }
  void await_suspend(std::coroutine_handle<> h) noexcept { subscribe(h); }
  ReadResult await_resume() { return take(); }

private:
  conn_hold c_;
};

/// One attempt of async_write(): awaited only inside the async_write
/// coroutine's own frame, which owns both the bytes and the conn reference.
class write_awaiter {
public:
  write_awaiter(duplex_conn *c, std::string_view data) noexcept
      : c_(c), data_(data) {}
  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> h) {
    h_ = h;
    int rc = duplex_conn_write(c_, data_.data(), data_.size(), done, this);
    if (rc == DUPLEX_EWOULDBLOCK) {
      // Retry once the queue ahead of us drained: a zero-length write
      // completes then. It costs DUPLEX_WRITE_OVERHEAD, so at the limit it
      // is refused too; the refusal guarantees an on_writable, which wakes
      // the waiters listed in the conn's box.
      retry_ = true;
      rc = duplex_conn_write(c_, nullptr, 0, done, this);
      ConnBox *b = rc == DUPLEX_EWOULDBLOCK ? box_of(c_) : nullptr;
      if (b != nullptr) {
        next_ = b->room_waiters;
        b->room_waiters = this;
        return true;
      }
    }
    if (rc == 0)
      return true;
    ec_ = to_error_code(rc);
    retry_ = false;
    return false;
  }
  std::error_code await_resume() const noexcept { return ec_; }
  bool retry() const noexcept { return retry_ && !ec_; }

  /// Resume every waiter of @p b (on_writable: retry; a close: @p ec).
  static void wake_room(ConnBox *b, std::error_code ec) {
    write_awaiter *w = std::exchange(b->room_waiters, nullptr);
    while (w != nullptr) {
      write_awaiter *next = w->next_;
      w->ec_ = ec;
      w->h_.resume();
      w = next;
    }
  }

private:
  static void done(duplex_conn *, int status, void *user) {
    auto *self = static_cast<write_awaiter *>(user);
    self->ec_ = to_error_code(status);
    self->h_.resume();
  }
  duplex_conn *c_;
  std::string_view data_;
  std::coroutine_handle<> h_;
  std::error_code ec_;
  bool retry_ = false;
  write_awaiter *next_ = nullptr;
};

/// The body of ConnRef::async_write(). A free coroutine, not a member: its
/// frame holds copies of what it needs (a conn reference and the bytes),
/// never a pointer to the view it was called on.
inline task<std::error_code> async_write(conn_hold c, std::string data) {
  for (;;) {
    write_awaiter w(c.get(), data);
    std::error_code ec = co_await w;
    if (!w.retry())
      co_return ec;
  }
}

} // namespace detail

/// A non-owning view of a conn, given to callbacks. Valid during the
/// callback; keep a Conn to hold on to it. The size of one pointer.
class ConnRef {
public:
  explicit ConnRef(duplex_conn *c) noexcept : c_(c) {}

  /// Queue a copy of @p bytes (any thread). Returns false when the queue
  /// is past its hard limit (would block: the bytes were not taken);
  /// throws duplex::error for other failures.
  [[nodiscard]] bool write(std::span<const std::byte> bytes) {
    std::error_code ec;
    bool ok = write(bytes, ec);
    if (ec)
      throw error(ec.value(), "write");
    return ok;
  }
  bool write(std::span<const std::byte> bytes, std::error_code &ec) noexcept {
    return result(duplex_conn_write(c_, bytes.data(), bytes.size(), nullptr,
                                    nullptr),
                  ec);
  }
  [[nodiscard]] bool write(std::string_view s) {
    return write(std::as_bytes(std::span(s)));
  }
  [[nodiscard]] bool write(const char *s) { return write(std::string_view(s)); }
  bool write(std::string_view s, std::error_code &ec) noexcept {
    return write(std::as_bytes(std::span(s)), ec);
  }
  bool write(const char *s, std::error_code &ec) noexcept {
    return write(std::string_view(s), ec);
  }
  /// Queue a copy; @p done(error_code) runs once on the loop thread.
  template <class F>
  bool write(std::span<const std::byte> bytes, F &&done) {
    auto *fn = new std::function<void(std::error_code)>(std::forward<F>(done));
    int rc = duplex_conn_write(c_, bytes.data(), bytes.size(), done_tramp, fn);
    if (rc != 0)
      delete fn;
    std::error_code ec;
    bool ok = result(rc, ec);
    if (ec)
      throw error(ec.value(), "write");
    return ok;
  }

  /// Zero-copy writes: the container moves into the library and is
  /// destroyed exactly once after it was written (or failed). On "would
  /// block" (false) or an exception, @p s still holds its bytes.
  [[nodiscard]] bool write(std::string &&s) { return write_owned(s); }
  [[nodiscard]] bool write(std::vector<std::byte> &&v) { return write_owned(v); }
  [[nodiscard]] bool write(std::string &&s, std::error_code &ec) noexcept {
    return write_owned(s, ec);
  }
  [[nodiscard]] bool write(std::vector<std::byte> &&v,
                           std::error_code &ec) noexcept {
    return write_owned(v, ec);
  }
  template <class T> bool write(std::unique_ptr<T[]> &&p, std::size_t count) {
    static_assert(std::is_trivially_copyable_v<T>);
    struct Holder {
      std::unique_ptr<T[]> p;
      std::size_t n;
      std::span<const std::byte> bytes() const {
        return std::as_bytes(std::span<const T>(p.get(), n));
      }
    };
    Holder h{std::move(p), count};
    try {
      bool ok = write_owned(h);
      if (!ok)
        p = std::move(h.p); // refused: the caller keeps its buffer
      return ok;
    } catch (...) {
      p = std::move(h.p);
      throw;
    }
  }

  /// Write one framed message (prefix or delimiter added). Any thread.
  [[nodiscard]] bool write_frame(std::string_view s, std::error_code &ec) noexcept {
    return result(duplex_conn_write_frame(c_, s.data(), s.size(), nullptr,
                                          nullptr),
                  ec);
  }
  [[nodiscard]] bool write_frame(std::string_view s) {
    std::error_code ec;
    bool ok = result(duplex_conn_write_frame(c_, s.data(), s.size(), nullptr,
                                             nullptr),
                     ec);
    if (ec)
      throw error(ec.value(), "write_frame");
    return ok;
  }

  /// Half-close after queued writes. Any thread.
  void shutdown() { detail::check(duplex_conn_shutdown(c_, nullptr, nullptr), "shutdown"); }
  void shutdown(std::error_code &ec) noexcept {
    ec = to_error_code(duplex_conn_shutdown(c_, nullptr, nullptr));
  }
  /// Close gracefully (flush first) or abort. Any thread; closing an
  /// already closed conn is not an error here.
  void close(bool abort = false) noexcept {
    duplex_conn_close(c_, abort ? DUPLEX_CLOSE_ABORT : DUPLEX_CLOSE_GRACEFUL);
  }
  void pause() noexcept { duplex_conn_pause(c_); }
  void resume() noexcept { duplex_conn_resume(c_); }
  [[nodiscard]] std::size_t queued() const noexcept {
    std::size_t n = 0;
    duplex_conn_get_queued(c_, &n);
    return n;
  }
  [[nodiscard]] std::string peer() const {
    char buf[1024];
    return duplex_conn_get_peer(c_, buf, sizeof buf) == 0 ? buf : "";
  }
  /// The conn's own address ("" when unnamed or closed); see
  /// duplex_conn_get_local(). Off the loop thread it waits for the loop.
  [[nodiscard]] std::string local() const {
    char buf[1024];
    return duplex_conn_get_local(c_, buf, sizeof buf) == 0 ? buf : "";
  }
  /// Block (off the loop thread) until writable. false on timeout.
  bool wait_writable(std::chrono::milliseconds timeout, std::error_code &ec) noexcept {
    int rc = duplex_conn_wait_writable(c_, static_cast<int>(timeout.count()));
    // Not writable (0 ms: EWOULDBLOCK; a wait that ran out: ETIMEDOUT) is
    // a false result, not an error.
    ec = rc == DUPLEX_ETIMEDOUT || rc == DUPLEX_EWOULDBLOCK
             ? std::error_code{}
             : to_error_code(rc);
    return rc == 0;
  }
  bool wait_writable(std::chrono::milliseconds timeout) {
    std::error_code ec;
    bool ok = wait_writable(timeout, ec);
    if (ec)
      throw error(ec.value(), "wait_writable");
    return ok;
  }
  /// Change a deadline (DUPLEX_TIMEOUT_*). Any thread.
  void set_timeout(int kind, std::chrono::milliseconds ms, std::error_code &ec) noexcept {
    ec = to_error_code(duplex_conn_set_timeout(c_, kind,
                                               static_cast<uint32_t>(ms.count())));
  }
  void set_timeout(int kind, std::chrono::milliseconds ms) {
    std::error_code ec;
    set_timeout(kind, ms, ec);
    if (ec)
      throw error(ec.value(), "set_timeout");
  }

  // ---- coroutines (loop thread) ----
  //
  // What these return holds a reference to the conn and copies of its
  // arguments, never `this`: it stays valid after the ConnRef (or Conn) it
  // was called on is gone, e.g. spawn(loop, use(ref.async_write(...)))
  // from a callback whose ConnRef parameter dies before the task runs.

  /// co_await conn.read(): the next chunk (or frame), EOF, or the close.
  using read_awaiter = detail::read_awaiter;
  [[nodiscard]] read_awaiter read() const { return read_awaiter(c_); }

  /// co_await conn.async_write(bytes): the bytes are taken now (moved or
  /// copied into the task); resumes once they were handed to the kernel (or
  /// failed). When the queue is past its hard limit it first waits until
  /// everything queued before has drained, then tries again. The task holds
  /// a reference to the conn until it finishes or is destroyed.
  [[nodiscard]] task<std::error_code> async_write(std::string data) const {
    return detail::async_write(detail::conn_hold(c_), std::move(data));
  }

  [[nodiscard]] duplex_conn *native() const noexcept { return c_; }

protected:
  static void done_tramp(duplex_conn *c, int status, void *user) {
    std::unique_ptr<std::function<void(std::error_code)>> fn(
        static_cast<std::function<void(std::error_code)> *>(user));
    auto *b = detail::box_of(c);
    detail::guarded(b ? b->core : nullptr,
                    [&] { (*fn)(to_error_code(status)); });
  }
  static bool result(int rc, std::error_code &ec) noexcept {
    ec.clear();
    if (rc == 0)
      return true;
    if (rc == DUPLEX_EWOULDBLOCK)
      return false;
    ec = to_error_code(rc);
    return false;
  }
  template <class C> bool write_owned(C &container) {
    std::error_code ec;
    bool ok = write_owned(container, ec);
    if (ec)
      throw error(ec.value(), "write");
    return ok;
  }
  template <class C> bool write_owned(C &container, std::error_code &ec) noexcept {
    using Box = std::decay_t<C>;
    Box *box = nullptr;
    try {
      box = new Box(std::move(container));
    } catch (...) {
      ec = make_error_code(errc::DUPLEX_ENOMEM); // container left intact
      return false;
    }
    std::span<const std::byte> bytes;
    if constexpr (requires { box->bytes(); })
      bytes = box->bytes();
    else
      bytes = std::as_bytes(std::span(box->data(), box->size()));
    int rc = duplex_conn_write_zc(
        c_, const_cast<std::byte *>(bytes.data()), bytes.size(),
        [](void *, std::size_t, int, void *user) {
          delete static_cast<Box *>(user);
        },
        box);
    if (rc != 0) {
      container = std::move(*box); // refused: the caller keeps its bytes
      delete box;
    }
    return result(rc, ec);
  }
  duplex_conn *c_;
};

static_assert(sizeof(ConnRef) == sizeof(void *));

/// A counted owner of a conn: copying takes a reference (like shared_ptr),
/// destroying drops it. Dropping the last Conn does not close the conn —
/// the loop keeps it open until close() or an error, as with any C ref.
class Conn : public ConnRef {
public:
  Conn() noexcept : ConnRef(nullptr) {}
  /// Take a reference to the conn a callback handed you.
  explicit Conn(ConnRef r) noexcept : ConnRef(r.native()) {
    if (c_ != nullptr)
      duplex_conn_ref(c_);
  }
  Conn(const Conn &o) noexcept : ConnRef(o.c_) {
    if (c_ != nullptr)
      duplex_conn_ref(c_);
  }
  Conn(Conn &&o) noexcept : ConnRef(std::exchange(o.c_, nullptr)) {}
  Conn &operator=(Conn o) noexcept {
    std::swap(c_, o.c_);
    return *this;
  }
  ~Conn() {
    if (c_ != nullptr)
      duplex_conn_unref(c_);
  }
  explicit operator bool() const noexcept { return c_ != nullptr; }

  static Conn connect_tcp(Loop &loop, const std::string &host, uint16_t port,
                          ConnHandlers h = {}, const ConnOptions &o = {}) {
    return create(loop, std::move(h), o, [&](duplex_conn **out,
                                             const duplex_conn_opts *opts) {
      return duplex_conn_connect_tcp(out, loop.native(), host.c_str(), port,
                                     opts);
    });
  }
  static Conn connect_unix(Loop &loop, const std::string &path,
                           ConnHandlers h = {}, const ConnOptions &o = {}) {
    return create(loop, std::move(h), o, [&](duplex_conn **out,
                                             const duplex_conn_opts *opts) {
      return duplex_conn_connect_unix(out, loop.native(), path.c_str(), opts);
    });
  }
  /// Adopt a connected fd (ownership passes to the conn on success).
  static Conn adopt(Loop &loop, int fd, ConnHandlers h = {},
                    const ConnOptions &o = {}) {
    return create(loop, std::move(h), o, [&](duplex_conn **out,
                                             const duplex_conn_opts *opts) {
      return duplex_conn_adopt(out, loop.native(), fd, opts);
    });
  }
  static Conn adopt_pair(Loop &loop, int read_fd, int write_fd,
                         ConnHandlers h = {}, const ConnOptions &o = {}) {
    return create(loop, std::move(h), o, [&](duplex_conn **out,
                                             const duplex_conn_opts *opts) {
      return duplex_conn_adopt_pair(out, loop.native(), read_fd, write_fd,
                                    opts);
    });
  }

  /// The C options these settings map to (the callbacks are the C++
  /// trampolines; user points at a box the trampolines own).
  static duplex_conn_opts c_opts(const ConnOptions &o, const duplex_conn_cbs *cbs,
                                 void *user, duplex_framing *fr) {
    duplex_conn_opts co = DUPLEX_CONN_OPTS_INIT;
    co.cbs = cbs;
    co.user = user;
    co.high_watermark = o.high_watermark;
    co.low_watermark = o.low_watermark;
    co.hard_limit = o.hard_limit;
    co.flags = o.flags;
    co.connect_timeout_ms = static_cast<uint32_t>(o.connect_timeout.count());
    co.idle_timeout_ms = static_cast<uint32_t>(o.idle_timeout.count());
    co.read_timeout_ms = static_cast<uint32_t>(o.read_timeout.count());
    co.flush_timeout_ms = static_cast<uint32_t>(o.flush_timeout.count());
    if (o.framing) {
      *fr = o.framing->raw;
      co.framing = fr;
    }
    return co;
  }

private:
  explicit Conn(duplex_conn *c, int) noexcept : ConnRef(c) {}
  template <class F>
  static Conn create(Loop &loop, ConnHandlers h, const ConnOptions &o,
                     F &&make) {
    auto box = std::make_unique<detail::ConnBox>();
    box->core = loop.core();
    box->h = std::make_shared<const ConnHandlers>(std::move(h));
    box->read_limit = o.read_buffer_limit;
    static const duplex_conn_cbs cbs = detail::conn_trampolines();
    duplex_framing fr;
    duplex_conn_opts co =
        c_opts(o, &cbs, static_cast<detail::BoxBase *>(box.get()), &fr);
    duplex_conn *c = nullptr;
    detail::check(make(&c, &co), "connect");
    box.release(); // owned by the conn now; freed after on_close
    return Conn(c, 0);
  }
};

namespace detail {

inline duplex_conn_cbs conn_trampolines() noexcept {
  // Each trampoline is noexcept in effect: guarded() stops every exception.
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = [](duplex_conn *c, void *u) {
    auto *b = conn_box(c, u);
    if (b->h->on_open)
      guarded(b->core, [&] { b->h->on_open(ConnRef(c)); });
  };
  cbs.on_read = [](duplex_conn *c, const void *d, size_t n, void *u) {
    auto *b = conn_box(c, u);
    if (b->h->on_read) {
      guarded(b->core, [&] {
        b->h->on_read(ConnRef(c),
                     std::span(static_cast<const std::byte *>(d), n));
      });
      return;
    }
    guarded(b->core, [&] {
      if (b->rx == nullptr)
        b->rx = std::make_unique<std::deque<std::string>>();
      b->rx->emplace_back(static_cast<const char *>(d), n);
      b->rx_bytes += n;
      if (!b->paused_for_rx && b->rx_bytes >= b->read_limit) {
        b->paused_for_rx = true;
        duplex_conn_pause(c);
      }
      resume_reader(b);
    });
  };
  cbs.on_eof = [](duplex_conn *c, void *u) {
    auto *b = conn_box(c, u);
    b->eof = true;
    if (b->h->on_eof)
      guarded(b->core, [&] { b->h->on_eof(ConnRef(c)); });
    guarded(b->core, [&] { resume_reader(b); });
  };
  cbs.on_backpressure = [](duplex_conn *c, size_t q, void *u) {
    auto *b = conn_box(c, u);
    if (b->h->on_backpressure)
      guarded(b->core, [&] { b->h->on_backpressure(ConnRef(c), q); });
  };
  cbs.on_writable = [](duplex_conn *c, void *u) {
    auto *b = conn_box(c, u);
    if (b->h->on_writable)
      guarded(b->core, [&] { b->h->on_writable(ConnRef(c)); });
    guarded(b->core, [&] { write_awaiter::wake_room(b, {}); });
  };
  cbs.on_close = [](duplex_conn *c, int reason, void *u) {
    std::unique_ptr<ConnBox> b(conn_box(c, u));
    b->closed = reason != 0 ? to_error_code(reason)
                            : make_error_code(errc::DUPLEX_ECLOSED);
    if (b->h->on_close)
      guarded(b->core, [&] { b->h->on_close(ConnRef(c), to_error_code(reason)); });
    // Wake a waiting reader: it sees the close. (Writers are resumed by
    // their own completions, which the close cancels.)
    guarded(b->core, [&] { resume_reader(b.get()); });
    guarded(b->core, [&] { write_awaiter::wake_room(b.get(), b->closed); });
    duplex_conn_set_user(c, nullptr);
  };
  return cbs;
}

} // namespace detail

} // namespace duplex
