// libduplex C++ layer: Listener (move-only owner).
#pragma once

#include <duplex/conn.hpp>

namespace duplex {

/// Accepts conns; each accepted conn gets the handlers and options given
/// here (on_open is where to take a Conn if you want to keep one).
/// Move-only. It owns a reference to the C listener: destroying it closes
/// the listening socket and drops that reference, so a Listener may
/// outlive its Loop (port() and address() still answer).
class Listener {
public:
  Listener() = default;
  static Listener tcp(Loop &loop, const std::string &host, uint16_t port,
                      ConnHandlers h, const ConnOptions &o = {},
                      int backlog = 0) {
    return create(loop, std::move(h), o, [&](duplex_listener **out,
                                             const duplex_listener_opts *lo) {
      return duplex_listener_tcp(out, loop.native(),
                                 host.empty() ? nullptr : host.c_str(), port,
                                 lo);
    }, backlog, 0);
  }
  static Listener unix_path(Loop &loop, const std::string &path,
                            ConnHandlers h, const ConnOptions &o = {},
                            unsigned mode = 0) {
    return create(loop, std::move(h), o, [&](duplex_listener **out,
                                             const duplex_listener_opts *lo) {
      return duplex_listener_unix(out, loop.native(), path.c_str(), lo);
    }, 0, mode);
  }
  Listener(Listener &&o) noexcept
      : l_(std::exchange(o.l_, nullptr)), box_(std::move(o.box_)),
        core_(std::move(o.core_)) {}
  Listener &operator=(Listener &&o) noexcept {
    if (this != &o) {
      close();
      l_ = std::exchange(o.l_, nullptr);
      box_ = std::move(o.box_);
      core_ = std::move(o.core_);
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
    // An accept the loop is handling right now (on another thread) still
    // reads the box: the core frees it after that.
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
  template <class F>
  static Listener create(Loop &loop, ConnHandlers h, const ConnOptions &o,
                         F &&make, int backlog, unsigned mode) {
    Listener l;
    l.core_ = loop.shared_core();
    l.box_ = std::make_shared<detail::ListenerBox>();
    l.box_->core = loop.core();
    l.box_->h = std::make_shared<const ConnHandlers>(std::move(h));
    l.box_->read_limit = o.read_buffer_limit;
    static const duplex_conn_cbs cbs = detail::conn_trampolines();
    duplex_framing fr;
    duplex_conn_opts co = Conn::c_opts(
        o, &cbs, static_cast<detail::BoxBase *>(l.box_.get()), &fr);
    duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
    lo.conn_opts = &co;
    lo.backlog = backlog;
    lo.mode = mode;
    detail::check(make(&l.l_, &lo), "listen");
    return l;
  }
  duplex_listener *l_ = nullptr;
  std::shared_ptr<detail::ListenerBox> box_;
  std::shared_ptr<detail::LoopCore> core_; // outlives the Loop if need be
};

} // namespace duplex
