// libduplex C++ layer: Listener (move-only owner).
#pragma once

#include <duplex/conn.hpp>

namespace duplex {

/// How a listener listens (see duplex_listener_opts).
struct ListenerOptions {
  /// Pending connections the kernel keeps for accept(); 0 = 511.
  int backlog = 0;
  /// UNIX sockets: permission bits of the socket file (e.g. 0660); 0 =
  /// what the umask gives. Ignored for TCP.
  unsigned mode = 0;
  /// IPv6 TCP listeners: accept IPv6 only (IPV6_V6ONLY).
  bool ipv6_only = false;
  /// LoopGroup TCP listeners: one SO_REUSEPORT socket per loop, each
  /// accepting onto its own loop (DUPLEX_LISTEN_REUSEPORT; Linux only,
  /// else errc::DUPLEX_ENOTSUP). Off: loop 0 accepts and hands each conn
  /// to the least-loaded loop. Ignored by single-loop listeners.
  bool reuse_port = false;
  /// Accepting failed; the listener keeps listening. When accept() itself
  /// fails (out of descriptors: errc::DUPLEX_EMFILE / DUPLEX_ENFILE, equal
  /// to std::errc::too_many_files_open / too_many_files_open_in_system; or
  /// out of memory) the listener backs off (20 ms doubling to 1 s) and this
  /// runs once per such episode; clients wait in the backlog meanwhile.
  /// Failures with one accepted conn (errc::DUPLEX_ENOMEM for its state)
  /// are reported as they happen. Runs on the loop thread, never after
  /// close() returned on that thread; an exception it throws goes to
  /// Loop::run() like a handler's. May be empty.
  std::function<void(std::error_code)> on_error = {};
  /// Serve TLS with this server-role configuration (each accepted conn
  /// holds a reference while it lives); a conn's on_open runs once its
  /// handshake is done, and one whose handshake fails closes without
  /// on_open (its on_close still runs, with the reason). Empty = plain.
  Tls tls = {};
};

/// Accepts conns; each accepted conn gets the handlers and options given
/// here (on_open is where to take a Conn if you want to keep one).
/// Move-only. It owns a reference to the C listener: destroying it closes
/// the listening socket and drops that reference, so a Listener may
/// outlive its Loop (port() and address() still answer).
///
/// Creating one binds and listens on the calling thread (any thread; it
/// never waits for the loop): clients may connect as soon as it returns.
/// Throws duplex::error when it cannot listen (errc::DUPLEX_EADDRINUSE,
/// DUPLEX_EACCES, DUPLEX_EINVAL for a bad host, ...).
class Listener {
public:
  Listener() = default;
  static Listener tcp(Loop &loop, const std::string &host, uint16_t port,
                      ConnHandlers h, const ConnOptions &o,
                      ListenerOptions lo) {
    return create(loop, std::move(h), o, std::move(lo),
                  [&](duplex_listener **out, const duplex_listener_opts *opts) {
                    return duplex_listener_tcp(
                        out, loop.native(),
                        host.empty() ? nullptr : host.c_str(), port, opts);
                  });
  }
  static Listener tcp(Loop &loop, const std::string &host, uint16_t port,
                      ConnHandlers h, const ConnOptions &o = {},
                      int backlog = 0) {
    return tcp(loop, host, port, std::move(h), o,
               ListenerOptions{.backlog = backlog});
  }
  static Listener unix_path(Loop &loop, const std::string &path,
                            ConnHandlers h, const ConnOptions &o,
                            ListenerOptions lo) {
    return create(loop, std::move(h), o, std::move(lo),
                  [&](duplex_listener **out, const duplex_listener_opts *opts) {
                    return duplex_listener_unix(out, loop.native(),
                                                path.c_str(), opts);
                  });
  }
  static Listener unix_path(Loop &loop, const std::string &path,
                            ConnHandlers h, const ConnOptions &o = {},
                            unsigned mode = 0, int backlog = 0) {
    return unix_path(loop, path, std::move(h), o,
                     ListenerOptions{.backlog = backlog, .mode = mode});
  }
  /// Listen for a whole LoopGroup (see group.hpp): each accepted conn
  /// lives on one member loop, where on_open and all its callbacks run;
  /// their exceptions go to LoopGroup::rethrow(). The handlers are shared
  /// by every loop's conns, so they may run concurrently on several loop
  /// threads. Defined in group.hpp.
  static Listener tcp(LoopGroup &group, const std::string &host,
                      uint16_t port, ConnHandlers h, const ConnOptions &o = {},
                      ListenerOptions lo = {});
  static Listener unix_path(LoopGroup &group, const std::string &path,
                            ConnHandlers h, const ConnOptions &o = {},
                            ListenerOptions lo = {});

  Listener(Listener &&o) noexcept
      : l_(std::exchange(o.l_, nullptr)), box_(std::move(o.box_)),
        core_(std::move(o.core_)), tls_(o.tls_) {}
  Listener &operator=(Listener &&o) noexcept {
    if (this != &o) {
      close();
      l_ = std::exchange(o.l_, nullptr);
      box_ = std::move(o.box_);
      core_ = std::move(o.core_);
      tls_ = o.tls_;
    }
    return *this;
  }
  Listener(const Listener &) = delete;
  Listener &operator=(const Listener &) = delete;
  ~Listener() { close(); }

  /// Stop accepting and let go of the listener (idempotent; also after the
  /// loop was freed). Conns already accepted stay open.
  void close() noexcept {
    if (l_ == nullptr)
      return;
    // DUPLEX_ECLOSED once the loop was freed: nothing left to stop.
    duplex_listener_close(l_);
    // An accept (or on_error) the loop is handling right now (on another
    // thread) still reads the box: the core frees it after that. A TLS
    // listener's conns read it at their first callback, which comes after
    // their handshake, and the close leaves handshakes under way to
    // finish: its box stays until the loop is freed.
    if (tls_)
      core_->keep_until_freed(std::move(box_));
    else
      core_->retire(std::move(box_));
    duplex_listener_unref(std::exchange(l_, nullptr)); // the creation's
    core_.reset();
  }
  [[nodiscard]] uint16_t port() const {
    uint16_t p = 0;
    detail::check(duplex_listener_get_port(l_, &p), "port");
    return p;
  }
  [[nodiscard]] std::string address() const {
    char buf[1024];
    detail::check(duplex_listener_get_address(l_, buf, sizeof buf), "address");
    return buf;
  }
  [[nodiscard]] duplex_listener *native() const noexcept { return l_; }

private:
  friend class LoopGroup;
  template <class F>
  static Listener create(Loop &loop, ConnHandlers h, const ConnOptions &o,
                         ListenerOptions lopt, F &&make) {
    return create(loop.shared_core(), nullptr, std::move(h), o,
                  std::move(lopt), std::forward<F>(make));
  }
  /// @p members: a group's member cores (loop 0 first), or nullptr.
  template <class F>
  static Listener
  create(std::shared_ptr<detail::LoopCore> core0,
         const std::vector<std::shared_ptr<detail::LoopCore>> *members,
         ConnHandlers h, const ConnOptions &o, ListenerOptions lopt,
         F &&make) {
    Listener l;
    l.core_ = std::move(core0);
    // In a group each loop's conns get a ConnShared naming that loop's
    // core; their handlers forward to one shared set.
    std::shared_ptr<ConnHandlers> hs;
    auto make_shared_state = [&](detail::LoopCore *core) {
      auto *cs = new detail::ConnShared;
      cs->core = core;
      cs->read_limit = o.read_buffer_limit;
      if (!hs) {
        cs->h = std::move(h);
        return cs;
      }
      try {
        if (hs->on_open)
          cs->h.on_open = [hs](ConnRef c) { hs->on_open(c); };
        if (hs->on_read)
          cs->h.on_read = [hs](ConnRef c, std::span<const std::byte> d) {
            hs->on_read(c, d);
          };
        if (hs->on_eof)
          cs->h.on_eof = [hs](ConnRef c) { hs->on_eof(c); };
        if (hs->on_backpressure)
          cs->h.on_backpressure = [hs](ConnRef c, std::size_t q) {
            hs->on_backpressure(c, q);
          };
        if (hs->on_writable)
          cs->h.on_writable = [hs](ConnRef c) { hs->on_writable(c); };
        if (hs->on_close)
          cs->h.on_close = [hs](ConnRef c, std::error_code ec) {
            hs->on_close(c, ec);
          };
      } catch (...) {
        cs->unref();
        throw;
      }
      return cs;
    };
    if (members != nullptr)
      hs = std::make_shared<ConnHandlers>(std::move(h));
    auto *shared = make_shared_state(l.core_.get());
    try {
      l.box_ = std::make_shared<detail::ListenerBox>(shared); // owns `shared`
    } catch (...) {
      shared->unref();
      throw;
    }
    if (members != nullptr) {
      l.box_->by_loop.reserve(members->size());
      for (const auto &m : *members) {
        auto *cs = make_shared_state(m.get());
        l.box_->by_loop.emplace_back(m->loop, cs); // reserved: no throw
      }
    }
    l.box_->on_error = std::move(lopt.on_error);
    static const duplex_conn_cbs cbs = detail::conn_trampolines();
    duplex_framing fr;
    duplex_conn_opts co = Conn::c_opts(
        o, &cbs, static_cast<detail::BoxBase *>(l.box_.get()), &fr);
    duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
    lo.conn_opts = &co;
    lo.backlog = lopt.backlog;
    lo.mode = lopt.mode;
    lo.flags = lopt.ipv6_only ? DUPLEX_LISTEN_IPV6ONLY : 0u;
    lo.tls = lopt.tls.native();
    if (members != nullptr && lopt.reuse_port)
      lo.flags |= DUPLEX_LISTEN_REUSEPORT;
    if (l.box_->on_error) {
      lo.on_error = [](duplex_listener *, int status, void *user) {
        auto *b = static_cast<detail::ListenerBox *>(user);
        detail::LoopCore *core = b->s->core;
        for (const auto &e : b->by_loop) // a group's: this thread's loop
          if (duplex_loop_on_thread(e.first) == 1)
            core = e.second->core;
        detail::guarded(core, [&] { b->on_error(to_error_code(status)); });
      };
      lo.user = l.box_.get();
    }
    detail::check(make(&l.l_, &lo), "listen");
    l.tls_ = static_cast<bool>(lopt.tls);
    return l;
  }
  duplex_listener *l_ = nullptr;
  std::shared_ptr<detail::ListenerBox> box_;
  std::shared_ptr<detail::LoopCore> core_; // outlives the Loop if need be
  bool tls_ = false; // serves TLS: see close()
};

} // namespace duplex
