// libduplex C++ layer: Conn (counted owner), ConnRef (view), coroutines.
#pragma once

#include <duplex/task.hpp>
#include <duplex/tls.hpp>

#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
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
  std::optional<Framing> framing = {};
  /// Coroutine reads: pause reading while this many bytes wait unread.
  std::size_t read_buffer_limit = 1 << 20;
  /// Speak TLS on this conn with a client-role configuration (see
  /// duplex_conn_opts.tls): on_open runs once the handshake is done, and
  /// reads, writes, framing and coroutines work on the plaintext as
  /// usual. Empty = plain. Listeners take theirs from
  /// ListenerOptions::tls instead (set here for a listener: EINVAL).
  Tls tls = {};
  /// With tls: the server name sent as SNI and checked against the
  /// server's certificate. "" = the host given to connect_tcp(); required
  /// for a verifying client made any other way.
  std::string tls_host = {};
};

namespace detail {

/// One chunk (or frame) read for a coroutine: a block from the block cache
/// holding the bytes after this header.
struct rx_chunk {
  rx_chunk *next;
  std::size_t len;
  char *bytes() noexcept { return reinterpret_cast<char *>(this + 1); }
  static rx_chunk *make(const void *data, std::size_t n) {
    auto *c = ::new (block_cache::get(sizeof(rx_chunk) + n)) rx_chunk{nullptr, n};
    if (n != 0)
      std::memcpy(c->bytes(), data, n);
    return c;
  }
  static void free(rx_chunk *c) noexcept {
    if (c != nullptr)
      block_cache::put(c, sizeof(rx_chunk) + c->len);
  }
};

class read_awaiter;

} // namespace detail

/// The result of co_await conn.read(). It owns the bytes `data` shows: they
/// stay valid as long as this ReadResult (and are freed with it, into the
/// destroying thread's block cache). Move-only: copy the bytes
/// (`std::string(r.data)`) to keep them beyond it.
struct ReadResult {
  std::string_view data;  ///< a chunk, or one frame with framing
  bool eof = false;       ///< the peer finished sending
  std::error_code error;  ///< the conn closed (errc::DUPLEX_ECLOSED or the reason)
  [[nodiscard]] bool ok() const noexcept { return !eof && !error; }
  /// The same bytes as `data`.
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept {
    return std::as_bytes(std::span(data.data(), data.size()));
  }

  ReadResult() = default;
  ReadResult(ReadResult &&o) noexcept
      : data(std::exchange(o.data, {})), eof(o.eof), error(o.error),
        chunk_(std::exchange(o.chunk_, nullptr)) {}
  ReadResult &operator=(ReadResult &&o) noexcept {
    if (this != &o) {
      detail::rx_chunk::free(chunk_);
      data = std::exchange(o.data, {});
      eof = o.eof;
      error = o.error;
      chunk_ = std::exchange(o.chunk_, nullptr);
    }
    return *this;
  }
  ReadResult(const ReadResult &) = delete;
  ReadResult &operator=(const ReadResult &) = delete;
  ~ReadResult() { detail::rx_chunk::free(chunk_); }

private:
  friend class detail::read_awaiter;
  detail::rx_chunk *chunk_ = nullptr;
};

namespace detail {

/// What every conn made with the same handlers shares (one per Conn
/// factory call, one per Listener): counted, freed with the last conn.
struct ConnShared {
  LoopCore *core = nullptr;
  ConnHandlers h;
  std::size_t read_limit = 1 << 20;
  std::atomic<std::size_t> refs{1};

  void ref() noexcept { refs.fetch_add(1, std::memory_order_relaxed); }
  void unref() noexcept {
    if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1)
      delete this;
  }
};

/// What a C user pointer points at: a conn's box, or (for conns a
/// listener accepted, until their first callback) the listener's.
struct BoxBase {
  enum Kind : unsigned char { kConn, kListener } kind;
};

struct ListenerBox : BoxBase {
  explicit ListenerBox(ConnShared *shared) : BoxBase{kListener}, s(shared) {}
  ListenerBox(const ListenerBox &) = delete;
  ListenerBox &operator=(const ListenerBox &) = delete;
  ~ListenerBox() {
    s->unref();
    for (auto &e : by_loop)
      e.second->unref();
  }
  ConnShared *s; // one reference
  std::function<void(std::error_code)> on_error;
  // Group listeners: the shared state (with that loop's core) of the conns
  // each member loop gets, one reference each; empty otherwise.
  std::vector<std::pair<duplex_loop *, ConnShared *>> by_loop;
  [[nodiscard]] ConnShared *shared_for(duplex_conn *c) const noexcept {
    duplex_loop *l = nullptr;
    if (!by_loop.empty() && duplex_conn_get_loop(c, &l) == 0)
      for (const auto &e : by_loop)
        if (e.first == l)
          return e.second;
    return s;
  }
};

class write_awaiter;

/// A conn's C++ state (loop thread only, except its creation). Kept small:
/// every open conn has one.
struct ConnBox : BoxBase {
  explicit ConnBox(ConnShared *shared) noexcept : BoxBase{kConn}, s(shared) {
    s->ref();
  }
  ConnBox(const ConnBox &) = delete;
  ConnBox &operator=(const ConnBox &) = delete;
  ~ConnBox() {
    while (rx_chunk *c = rx_head) {
      rx_head = c->next;
      rx_chunk::free(c);
    }
    s->unref();
  }
  [[nodiscard]] std::error_code closed_error() const noexcept {
    return reason != 0 ? to_error_code(reason)
                       : make_error_code(errc::DUPLEX_ECLOSED);
  }

  bool eof = false;
  bool paused_for_rx = false;
  bool closed = false; // on_close ran (with `reason`)
  int reason = 0;
  ConnShared *s; // one reference
  std::coroutine_handle<> reader; // the coroutine waiting in read()
  // chunks not yet read (coroutine side), oldest first
  rx_chunk *rx_head = nullptr;
  rx_chunk *rx_tail = nullptr;
  std::size_t rx_bytes = 0;
  // async_write()s waiting for room: resumed by on_writable or the close
  write_awaiter *room_waiters = nullptr;
};

/// The conn's box; an accepted conn gets its own from the listener's
/// template the first time (on the loop thread).
inline ConnBox *conn_box(duplex_conn *c, void *u) {
  auto *base = static_cast<BoxBase *>(u);
  if (base == nullptr || base->kind == BoxBase::kConn)
    return static_cast<ConnBox *>(base);
  auto *b = new ConnBox(static_cast<ListenerBox *>(base)->shared_for(c));
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
/// Only one coroutine may wait in a conn's read() at a time: a second one
/// gets duplex::error with errc::DUPLEX_EBUSY from its co_await (the first
/// keeps waiting). Reading costs no allocation once the calling thread's
/// block cache is warm: each chunk is copied into a recycled block that the
/// ReadResult owns.
class read_awaiter {
public:
  explicit read_awaiter(duplex_conn *c) noexcept : c_(c) {}
  read_awaiter(read_awaiter &&o) noexcept : c_(std::move(o.c_)) {}
  read_awaiter &operator=(read_awaiter &&) = delete;
  ~read_awaiter() { unsubscribe(); }

  // ---- first_of() operand (see queue_awaitable) ----
  bool ready() const noexcept { return ready_in(box_of(c_.get())); }
  /// Wait for the conn with @p h; throws errc::DUPLEX_EBUSY when another
  /// coroutine waits in this conn's read() already.
  void subscribe(std::coroutine_handle<> h) { subscribe_in(box_of(c_.get()), h); }
  void unsubscribe() noexcept {
    if (!h_)
      return;
    auto h = std::exchange(h_, nullptr);
    auto *b = box_of(c_.get());
    if (b != nullptr && b->reader == h)
      b->reader = nullptr;
  }
  ReadResult take() noexcept { return take_from(box_of(c_.get())); }

  // ---- co_await conn.read() ----
  // The box is looked up once: it stays valid until the resumption, which
  // comes from one of its callbacks (data, EOF or the close, before the
  // box goes).
  bool await_ready() noexcept {
    b_ = box_of(c_.get());
    return ready_in(b_);
  }
  void await_suspend(std::coroutine_handle<> h) { subscribe_in(b_, h); }
  ReadResult await_resume() noexcept {
    h_ = nullptr; // resumed: the conn let go of us
    return take_from(b_);
  }

private:
  static bool ready_in(const ConnBox *b) noexcept {
    return b == nullptr || b->rx_head != nullptr || b->eof || b->closed;
  }
  void subscribe_in(ConnBox *b, std::coroutine_handle<> h) {
    if (b == nullptr)
      return; // closed: ready() holds
    if (b->reader && b->reader != h)
      throw error(DUPLEX_EBUSY, "read: another coroutine is waiting in "
                                "this conn's read()");
    b->reader = h;
    h_ = h;
  }
  ReadResult take_from(ConnBox *b) noexcept {
    ReadResult r;
    if (b == nullptr) {
      r.error = make_error_code(errc::DUPLEX_ECLOSED);
      return r;
    }
    if (rx_chunk *ch = b->rx_head) {
      b->rx_head = ch->next;
      if (b->rx_head == nullptr)
        b->rx_tail = nullptr;
      ch->next = nullptr;
      b->rx_bytes -= ch->len;
      r.chunk_ = ch;
      r.data = std::string_view(ch->bytes(), ch->len);
      if (b->paused_for_rx && b->rx_bytes < b->s->read_limit / 2) {
        b->paused_for_rx = false;
        duplex_conn_resume(c_.get());
      }
    } else if (b->eof) {
      r.eof = true;
    } else {
      r.error = b->closed_error();
    }
    return r;
  }

  conn_hold c_;
  std::coroutine_handle<> h_; // while subscribed
  ConnBox *b_ = nullptr;      // during a plain co_await
};

/// co_await conn.async_write(bytes): see ConnRef::async_write. Awaited at
/// most once, and not moved once awaited. It holds a reference to the conn
/// and a view of the caller's bytes (owned_write_awaiter: the std::string
/// moved in).
///
/// How it waits: it writes the bytes with duplex_conn_write() when awaited.
/// When the kernel took them whole (nothing queued afterwards, the usual
/// case for a coroutine that awaits each write) it does not suspend at all.
/// When some were queued it queues a zero-length write (a flush marker)
/// and resumes with its status once everything before it was written. When
/// the write is refused (past the hard limit) it waits for the queue ahead
/// of it to drain (the marker) and tries again; a refused marker (the
/// queue within DUPLEX_WRITE_OVERHEAD of the limit) waits for on_writable.
class write_awaiter {
public:
  write_awaiter(duplex_conn *c, std::string_view bytes) noexcept
      : data_(bytes), c_(c) {}
  write_awaiter(write_awaiter &&o) noexcept
      : data_(o.data_), c_(std::move(o.c_)) {}
  write_awaiter &operator=(write_awaiter &&) = delete;

  bool await_ready() noexcept {
    attempt();
    return state_ == kDone;
  }
  void await_suspend(std::coroutine_handle<> h) noexcept { h_ = h; }
  std::error_code await_resume() const noexcept { return to_error_code(rc_); }

  /// A task that awaits this write (for code that stores a
  /// task<std::error_code>); it owns the awaiter, hence what it holds.
  operator task<std::error_code>() && { return as_task(std::move(*this)); }

  /// Resume every waiter of @p b: on_writable (@p rc 0: each tries again)
  /// or the close (@p rc: each resumes with it).
  static void wake_room(ConnBox *b, int rc) {
    write_awaiter *w = std::exchange(b->room_waiters, nullptr);
    while (w != nullptr) {
      write_awaiter *next = w->next_;
      w->next_ = nullptr;
      if (rc != 0)
        w->finish(rc);
      else
        w->attempt();
      if (w->state_ == kDone)
        w->h_.resume();
      w = next;
    }
  }

protected:
  std::string_view data_;

private:
  enum State : unsigned char { kIdle, kMarker, kRoom, kDone };

  static task<std::error_code> as_task(write_awaiter w) { co_return co_await w; }

  void finish(int rc) noexcept {
    rc_ = rc;
    state_ = kDone;
  }
  /// Write the bytes (if not yet written), then wait as needed: sets
  /// state_ to kDone, or to what it waits for.
  void attempt() noexcept {
    duplex_conn *c = c_.get();
    if (!written_ && !data_.empty()) {
      int rc = duplex_conn_write(c, data_.data(), data_.size(), nullptr, nullptr);
      if (rc == 0) {
        written_ = true;
        std::size_t q = 1;
        duplex_conn_get_queued(c, &q);
        if (q == 0) // with the kernel (see ConnRef::async_write)
          return finish(0);
      } else if (rc != DUPLEX_EWOULDBLOCK) {
        return finish(rc);
      }
    } else if (data_.empty()) {
      written_ = true; // an empty write waits for what is queued
    }
    // Wait for what is queued (our bytes among it, or ahead of them).
    int rc = duplex_conn_write(c, nullptr, 0, &marker_done, this);
    if (rc == 0) {
      state_ = kMarker;
      return;
    }
    if (rc == DUPLEX_EWOULDBLOCK) {
      // The marker costs DUPLEX_WRITE_OVERHEAD: at the limit it is refused
      // too. The refusal guarantees an on_writable, which calls wake_room.
      if (ConnBox *b = box_of(c)) {
        next_ = b->room_waiters;
        b->room_waiters = this;
        state_ = kRoom;
        return;
      }
      rc = DUPLEX_ECLOSED;
    }
    finish(rc);
  }
  static void marker_done(duplex_conn *, int status, void *user) {
    auto *self = static_cast<write_awaiter *>(user);
    if (status == 0 && !self->written_)
      self->attempt(); // the queue ahead drained: try the bytes again
    else
      self->finish(status);
    if (self->state_ == kDone)
      self->h_.resume();
  }

  conn_hold c_;
  std::coroutine_handle<> h_;
  write_awaiter *next_ = nullptr; // in the box's room_waiters
  int rc_ = 0;
  bool written_ = false;
  State state_ = kIdle;
};

/// async_write(std::string&&): the same, owning the string.
class owned_write_awaiter : public write_awaiter {
public:
  owned_write_awaiter(duplex_conn *c, std::string &&s) noexcept
      : write_awaiter(c, {}), owned_(std::move(s)) {
    data_ = owned_;
  }
  owned_write_awaiter(owned_write_awaiter &&o) noexcept
      : write_awaiter(std::move(o)), owned_(std::move(o.owned_)) {
    data_ = owned_; // a short string's bytes moved with it
  }

  operator task<std::error_code>() && { return as_task(std::move(*this)); }

private:
  static task<std::error_code> as_task(owned_write_awaiter w) {
    co_return co_await w;
  }
  std::string owned_;
};

/// co_await conn.async_start_tls(tls, host): see ConnRef::async_start_tls.
/// Calls duplex_conn_start_tls() when awaited and resumes from its done
/// callback (never inside the call): with an empty error_code once the
/// handshake is done, or the error that closed the conn. A refused call
/// (EBUSY, ECLOSED, ...) resumes at once with its code. Holds a reference
/// to the conn, one to the configuration and a copy of the host, so it may
/// outlive the ConnRef, Tls and string it was made from. Awaited once.
class start_tls_awaiter {
public:
  start_tls_awaiter(duplex_conn *c, Tls tls, std::string host) noexcept
      : c_(c), tls_(std::move(tls)), host_(std::move(host)) {}
  start_tls_awaiter(start_tls_awaiter &&o) noexcept
      : c_(std::move(o.c_)), tls_(std::move(o.tls_)),
        host_(std::move(o.host_)) {}
  start_tls_awaiter &operator=(start_tls_awaiter &&) = delete;

  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> h) noexcept {
    h_ = h;
    rc_ = duplex_conn_start_tls(c_.get(), tls_.native(),
                                host_.empty() ? nullptr : host_.c_str(),
                                &done, this);
    return rc_ == 0; // refused: resume now with the code
  }
  std::error_code await_resume() const noexcept { return to_error_code(rc_); }

  operator task<std::error_code>() && { return as_task(std::move(*this)); }

private:
  static void done(duplex_conn *, int status, void *user) {
    auto *self = static_cast<start_tls_awaiter *>(user);
    self->rc_ = status;
    self->h_.resume();
  }
  static task<std::error_code> as_task(start_tls_awaiter a) {
    co_return co_await a;
  }
  conn_hold c_;
  Tls tls_;
  std::string host_;
  std::coroutine_handle<> h_;
  int rc_ = 0;
};

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
  // What these return holds a reference to the conn, never `this`: it
  // stays valid after the ConnRef (or Conn) it was called on is gone, e.g.
  // spawn(loop, use(ref.async_write("..."))) from a callback whose ConnRef
  // parameter dies before the task runs. Await them from a coroutine
  // running on this conn's loop.

  /// co_await conn.read(): a ReadResult with the next chunk (or frame),
  /// EOF, or the close. The ReadResult owns its bytes. One coroutine at a
  /// time: a second concurrent reader's co_await throws duplex::error with
  /// errc::DUPLEX_EBUSY.
  using read_awaiter = detail::read_awaiter;
  [[nodiscard]] read_awaiter read() const { return read_awaiter(c_); }

  /// co_await conn.async_write(bytes): writes the bytes when awaited and
  /// resumes with the write's std::error_code once the kernel has them (or
  /// they failed). When the kernel takes them at once (nothing queued) it
  /// resumes without suspending and costs no allocation. Past the hard
  /// limit it waits until what is queued ahead has drained, then tries
  /// again: it never resumes with errc::DUPLEX_EWOULDBLOCK.
  ///
  /// Bytes: a std::string_view, span or C string is borrowed: it must stay
  /// valid until the co_await completes (a ReadResult's data, a literal,
  /// a local that outlives the statement are fine). A std::string passed as
  /// an rvalue is moved into the awaiter instead (no copy of the bytes).
  ///
  /// The result converts to task<std::error_code>.
  using write_awaiter = detail::write_awaiter;
  using owned_write_awaiter = detail::owned_write_awaiter;
  [[nodiscard]] write_awaiter async_write(std::string_view bytes) const noexcept {
    return write_awaiter(c_, bytes);
  }
  [[nodiscard]] write_awaiter async_write(const char *s) const noexcept {
    return write_awaiter(c_, std::string_view(s));
  }
  [[nodiscard]] write_awaiter async_write(std::span<const std::byte> bytes) const noexcept {
    return write_awaiter(
        c_, std::string_view(reinterpret_cast<const char *>(bytes.data()),
                             bytes.size()));
  }
  [[nodiscard]] owned_write_awaiter async_write(std::string &&owned) const noexcept {
    return owned_write_awaiter(c_, std::move(owned));
  }

  // ---- TLS ----

  /// Upgrade this plaintext conn to TLS (STARTTLS; duplex_conn_start_tls):
  /// once every write queued before (by this thread) is flushed, the conn
  /// speaks TLS in @p tls's role, beginning with the handshake; writes made
  /// after this call are encrypted after it, in order. @p host (client:
  /// SNI and the name checked) "" = the host given to connect_tcp(). Any
  /// thread. Throws duplex::error: errc::DUPLEX_EBUSY (TLS already, or an
  /// upgrade queued), DUPLEX_EINVAL (no tls, or a verifying client without
  /// a host), DUPLEX_ESHUTDOWN, DUPLEX_ECLOSED, DUPLEX_ENOTSUP.
  void start_tls(const Tls &tls, std::string_view host = {}) {
    std::error_code ec;
    start_tls(tls, host, ec);
    if (ec)
      throw error(ec.value(), "start_tls");
  }
  void start_tls(const Tls &tls, std::string_view host,
                 std::error_code &ec) {
    std::string h(host);
    ec = to_error_code(duplex_conn_start_tls(
        c_, tls.native(), h.empty() ? nullptr : h.c_str(), nullptr, nullptr));
  }
  /// The same; @p done(std::error_code) runs once on the loop thread:
  /// empty once the handshake is done, else the error that closed the conn
  /// (errc::DUPLEX_ECANCELED if it closed before the upgrade began). It
  /// does not run when this throws.
  template <class F>
    requires std::invocable<F &, std::error_code>
  void start_tls(const Tls &tls, std::string_view host, F &&done) {
    std::string h(host);
    auto *fn = new std::function<void(std::error_code)>(std::forward<F>(done));
    int rc = duplex_conn_start_tls(c_, tls.native(),
                                   h.empty() ? nullptr : h.c_str(),
                                   done_tramp, fn);
    if (rc != 0) {
      delete fn;
      throw error(rc, "start_tls");
    }
  }
  /// co_await conn.async_start_tls(tls, host): start_tls() when awaited;
  /// resumes (on the loop thread) with an empty std::error_code once the
  /// handshake is done, or with the error that closed the conn
  /// (errc::DUPLEX_ETLS, DUPLEX_ETLSVERIFY, DUPLEX_ETIMEDOUT, ...), or at
  /// once with the reason start_tls() was refused. Converts to
  /// task<std::error_code>.
  using start_tls_awaiter = detail::start_tls_awaiter;
  [[nodiscard]] start_tls_awaiter async_start_tls(Tls tls,
                                                  std::string host = {}) const {
    return start_tls_awaiter(c_, std::move(tls), std::move(host));
  }

  /// What the handshake negotiated (from on_open on, or once start_tls is
  /// done). Any thread (off the loop thread it waits for the loop).
  /// Throws duplex::error: errc::DUPLEX_ENOTSUP (not a TLS conn),
  /// DUPLEX_ENOTCONN (handshake not done), DUPLEX_ECLOSED.
  [[nodiscard]] TlsInfo tls_info() const {
    std::error_code ec;
    TlsInfo info = tls_info(ec);
    if (ec)
      throw error(ec.value(), "tls_info");
    return info;
  }
  [[nodiscard]] TlsInfo tls_info(std::error_code &ec) const {
    duplex_tls_info raw;
    std::memset(&raw, 0, sizeof raw);
    raw.size = sizeof raw;
    TlsInfo info;
    ec = to_error_code(duplex_conn_get_tls_info(c_, &raw));
    if (ec)
      return info;
    auto text = [](const char *p, std::size_t cap) { // NUL-terminated
      const void *nul = std::memchr(p, '\0', cap);
      return std::string(p, nul != nullptr
                                ? static_cast<std::size_t>(
                                      static_cast<const char *>(nul) - p)
                                : cap);
    };
    info.version = static_cast<TlsVersion>(raw.version);
    info.version_name = text(raw.version_name, sizeof raw.version_name);
    info.cipher = text(raw.cipher, sizeof raw.cipher);
    info.alpn = text(raw.alpn, sizeof raw.alpn);
    info.sni = text(raw.sni, sizeof raw.sni);
    info.peer_subject = text(raw.peer_subject, sizeof raw.peer_subject);
    info.resumed = raw.resumed != 0;
    info.peer_cert = raw.peer_cert != 0;
    return info;
  }
  /// Why TLS failed on this conn, in the TLS library's words
  /// ("certificate verify failed: ..."), "" while nothing failed. Readable
  /// in on_close and afterwards. Any thread.
  [[nodiscard]] std::string tls_error() const {
    std::string buf(256, '\0');
    for (;;) {
      int rc = duplex_conn_get_tls_error(c_, buf.data(), buf.size());
      if (rc == DUPLEX_ENOBUFS && buf.size() < (1u << 20)) {
        buf.resize(buf.size() * 4);
        continue;
      }
      if (rc != 0 && rc != DUPLEX_ENOBUFS)
        return {};
      buf.resize(std::char_traits<char>::length(buf.c_str()));
      return buf;
    }
  }

  [[nodiscard]] duplex_conn *native() const noexcept { return c_; }

protected:
  static void done_tramp(duplex_conn *c, int status, void *user) {
    std::unique_ptr<std::function<void(std::error_code)>> fn(
        static_cast<std::function<void(std::error_code)> *>(user));
    auto *b = detail::box_of(c);
    detail::guarded(b ? b->s->core : nullptr,
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
// Every open conn carries a box: keep it within one 64-byte malloc chunk.
static_assert(sizeof(detail::ConnBox) <= 56);

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
    co.tls = o.tls.native();
    co.tls_host = o.tls_host.empty() ? nullptr : o.tls_host.c_str();
    return co;
  }

private:
  explicit Conn(duplex_conn *c, int) noexcept : ConnRef(c) {}
  template <class F>
  static Conn create(Loop &loop, ConnHandlers h, const ConnOptions &o,
                     F &&make) {
    auto *shared = new detail::ConnShared;
    shared->core = loop.core();
    shared->h = std::move(h);
    shared->read_limit = o.read_buffer_limit;
    std::unique_ptr<detail::ConnBox> box;
    try {
      box.reset(new detail::ConnBox(shared));
    } catch (...) {
      shared->unref();
      throw;
    }
    shared->unref(); // the box's reference remains
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
    if (b->s->h.on_open)
      guarded(b->s->core, [&] { b->s->h.on_open(ConnRef(c)); });
  };
  cbs.on_read = [](duplex_conn *c, const void *d, size_t n, void *u) {
    auto *b = conn_box(c, u);
    const ConnShared &s = *b->s;
    if (s.h.on_read) {
      guarded(s.core, [&] {
        s.h.on_read(ConnRef(c), std::span(static_cast<const std::byte *>(d), n));
      });
      return;
    }
    guarded(s.core, [&] {
      rx_chunk *ch = rx_chunk::make(d, n);
      if (b->rx_tail != nullptr)
        b->rx_tail->next = ch;
      else
        b->rx_head = ch;
      b->rx_tail = ch;
      b->rx_bytes += n;
      if (!b->paused_for_rx && b->rx_bytes >= s.read_limit) {
        b->paused_for_rx = true;
        duplex_conn_pause(c);
      }
      resume_reader(b);
    });
  };
  cbs.on_eof = [](duplex_conn *c, void *u) {
    auto *b = conn_box(c, u);
    b->eof = true;
    if (b->s->h.on_eof)
      guarded(b->s->core, [&] { b->s->h.on_eof(ConnRef(c)); });
    guarded(b->s->core, [&] { resume_reader(b); });
  };
  cbs.on_backpressure = [](duplex_conn *c, size_t q, void *u) {
    auto *b = conn_box(c, u);
    if (b->s->h.on_backpressure)
      guarded(b->s->core, [&] { b->s->h.on_backpressure(ConnRef(c), q); });
  };
  cbs.on_writable = [](duplex_conn *c, void *u) {
    auto *b = conn_box(c, u);
    if (b->s->h.on_writable)
      guarded(b->s->core, [&] { b->s->h.on_writable(ConnRef(c)); });
    guarded(b->s->core, [&] { write_awaiter::wake_room(b, 0); });
  };
  cbs.on_close = [](duplex_conn *c, int reason, void *u) {
    std::unique_ptr<ConnBox> b(conn_box(c, u));
    b->closed = true;
    b->reason = reason;
    LoopCore *core = b->s->core;
    if (b->s->h.on_close)
      guarded(core, [&] { b->s->h.on_close(ConnRef(c), to_error_code(reason)); });
    // Wake a waiting reader: it sees the close. (Writers waiting for a
    // completion are resumed by it: the close cancels them.)
    guarded(core, [&] { resume_reader(b.get()); });
    guarded(core, [&] {
      write_awaiter::wake_room(b.get(), reason != 0 ? reason : DUPLEX_ECLOSED);
    });
    duplex_conn_set_user(c, nullptr);
  };
  return cbs;
}

} // namespace detail

} // namespace duplex
