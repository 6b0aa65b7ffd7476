// Test support for the TLS engine suites (core/src/tls/engine.h).
//
// The engine is tested on its own, without a loop: certificates are made at
// test time by the `openssl` command in a temporary directory; two engines
// are paired in memory (Pair), or one engine is driven over a loopback
// socket by a small blocking harness (SockDriver) against `openssl s_server`
// and `openssl s_client` (Proc). Time appears only as a hang guard (kGuard);
// no assertion depends on how long anything takes.
#ifndef DUPLEX_TESTS_TLS_SUPPORT_HPP
#define DUPLEX_TESTS_TLS_SUPPORT_HPP

#include "engine.h"

#include "tls_common.hpp"

namespace ttest {

// A reason as a std::string (doctest prints a char pointer as an address).
inline std::string why(dpx_tls *t) { return dpx_tls_reason(t); }

inline std::string st(int s) {
  return std::string(dpx_tls_status_name(s)) + " (" + std::to_string(s) + ")";
}

// ---------------------------------------------------------------------------
// Configs and engines (RAII)
// ---------------------------------------------------------------------------

struct Config {
  dpx_tls_config *c = nullptr;
  Config() = default;
  explicit Config(dpx_tls_config *p) : c(p) {}
  Config(const Config &) = delete;
  Config &operator=(const Config &) = delete;
  Config(Config &&o) noexcept : c(std::exchange(o.c, nullptr)) {}
  Config &operator=(Config &&o) noexcept {
    std::swap(c, o.c);
    return *this;
  }
  ~Config() { dpx_tls_config_unref(c); }
  operator dpx_tls_config *() const { return c; }
};

inline dpx_tls_config_opts server_opts(const std::string &cert = "server") {
  const Certs &k = Certs::get();
  dpx_tls_config_opts o{};
  o.role = DPX_TLS_SERVER;
  o.cert_file = k.pem(cert);
  o.key_file = k.key(cert);
  o.ca_file = k.pem("ca");
  return o;
}

inline dpx_tls_config_opts client_opts() {
  dpx_tls_config_opts o{};
  o.role = DPX_TLS_CLIENT;
  o.ca_file = Certs::get().pem("ca");
  return o;
}

inline Config make_config(const dpx_tls_config_opts &o) {
  dpx_tls_config *c = nullptr;
  char err[256];
  int rc = dpx_tls_config_new(&c, &o, err, sizeof err);
  INFO("config: " << err);
  REQUIRE(rc == 0);
  REQUIRE(c != nullptr);
  return Config(c);
}

struct Engine {
  dpx_tls *t = nullptr;
  Engine() = default;
  Engine(dpx_tls_config *cfg, const char *host, const char *session_key = nullptr,
         size_t in_cap = 0, size_t out_cap = 0) {
    dpx_tls_opts o{};
    o.host = host;
    o.session_key = session_key;
    o.in_cap = in_cap;
    o.out_cap = out_cap;
    int rc = dpx_tls_new(&t, cfg, &o);
    REQUIRE(rc == 0);
  }
  Engine(const Engine &) = delete;
  Engine &operator=(const Engine &) = delete;
  ~Engine() { dpx_tls_free(t); }
  operator dpx_tls *() const { return t; }
};

// Every pending output byte of @p t, consumed.
inline std::string take_output(dpx_tls *t) {
  std::string s;
  dpx_tls_buf b[16];
  for (;;) {
    size_t n = dpx_tls_out_peek(t, 0, b, 16);
    if (n == 0)
      break;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
      s.append(static_cast<const char *>(b[i].base), b[i].len);
      total += b[i].len;
    }
    dpx_tls_out_consume(t, total);
  }
  return s;
}

// ---------------------------------------------------------------------------
// Two engines paired in memory
// ---------------------------------------------------------------------------

struct Side {
  dpx_tls *t = nullptr;
  std::string got;    // plaintext read
  int last = DPX_TLS_WANT_INPUT; // status of the last read
  std::string tap;    // every ciphertext byte this side sent (if tapping)
  bool tapping = false;
};

class Pair {
public:
  Pair(dpx_tls *client, dpx_tls *server) {
    c.t = client;
    s.t = server;
  }
  Side c, s;
  size_t max_chunk = SIZE_MAX; // largest piece moved per feed
  size_t read_cap = 16384;     // reader buffer
  size_t read_limit = SIZE_MAX; // plaintext each side reads per round

  // Move what @p from has pending into @p to, as far as @p to takes it.
  size_t transfer(Side &from, Side &to) {
    size_t moved = 0;
    dpx_tls_buf b[4];
    while (dpx_tls_out_pending(from.t) > 0 && dpx_tls_can_feed(to.t)) {
      size_t n = dpx_tls_out_peek(from.t, 0, b, 4);
      REQUIRE(n > 0);
      size_t len = std::min(b[0].len, max_chunk);
      int r = dpx_tls_feed(to.t, b[0].base, len);
      REQUIRE_MESSAGE(r == DPX_TLS_OK, st(r));
      if (from.tapping)
        from.tap.append(static_cast<const char *>(b[0].base), len);
      dpx_tls_out_consume(from.t, len);
      moved += len;
    }
    return moved;
  }

  // Read plaintext until the engine has nothing more (or read_limit).
  size_t read_side(Side &x) {
    std::vector<char> buf(read_cap);
    size_t total = 0;
    while (total < read_limit) {
      size_t n = 0;
      size_t cap = std::min(read_cap, read_limit - total);
      int r = dpx_tls_read(x.t, buf.data(), cap, &n);
      x.last = r;
      if (r != DPX_TLS_OK)
        break;
      x.got.append(buf.data(), n);
      total += n;
    }
    return total;
  }

  // One round each way; returns whether anything moved.
  bool round() {
    size_t p = 0;
    p += transfer(c, s);
    p += read_side(s);
    p += transfer(s, c);
    p += read_side(c);
    return p > 0;
  }

  // Rounds until nothing moves (bounded: a hang guard).
  void settle(int max_rounds = 100000) {
    for (int i = 0; i < max_rounds; i++)
      if (!round())
        return;
    FAIL("pair did not settle");
  }

  // Client hello, then rounds until both sides finished or one failed.
  void handshake() {
    int r = dpx_tls_handshake(c.t);
    REQUIRE_MESSAGE((r == DPX_TLS_WANT_INPUT || r == DPX_TLS_OK), st(r));
    settle();
  }

  bool both_open() const {
    return dpx_tls_handshake_done(c.t) && dpx_tls_handshake_done(s.t) &&
           dpx_tls_error(c.t) == 0 && dpx_tls_error(s.t) == 0;
  }

  // Write all of @p data on @p x (a whole write), moving and reading as
  // needed when the output queue is full.
  void write_all(Side &x, const void *data, size_t len) {
    const char *p = static_cast<const char *>(data);
    int guard = 0;
    while (len > 0) {
      size_t taken = 0;
      int r = dpx_tls_write(x.t, p, len, &taken);
      REQUIRE_MESSAGE((r == DPX_TLS_OK || r == DPX_TLS_FULL), st(r));
      p += taken;
      len -= taken;
      if (r == DPX_TLS_FULL || taken == 0) {
        REQUIRE(round());
        REQUIRE(++guard < 1000000);
      }
    }
  }
  void write_all(Side &x, const std::string &s_) { write_all(x, s_.data(), s_.size()); }
};

// ---------------------------------------------------------------------------
// The engine on a socket
// ---------------------------------------------------------------------------

// One engine over a socket, driven with poll(): what the conn code will do
// on the loop, written the simplest way. Sending never stops reading, so
// two peers writing at each other at once cannot deadlock.
class SockDriver {
public:
  SockDriver(dpx_tls *t, int fd) : t_(t), fd_(fd) {}
  ~SockDriver() {
    if (fd_ >= 0)
      close(fd_);
  }
  std::string got;               // plaintext read
  int last = DPX_TLS_WANT_INPUT; // last read status
  bool sock_eof = false;

  // Send every pending output byte, reading meanwhile whenever the socket
  // has bytes and the engine takes them.
  void flush() {
    auto d = deadline();
    dpx_tls_buf b[8];
    while (dpx_tls_out_pending(t_) > 0) {
      pollfd p{fd_, POLLOUT, 0};
      if (!sock_eof && dpx_tls_can_feed(t_))
        p.events |= POLLIN;
      if (poll(&p, 1, ms_left(d)) != 1)
        return; // the guard: failures show up in the caller's checks
      if (p.revents & POLLIN)
        receive();
      if (p.revents & (POLLOUT | POLLERR | POLLHUP)) {
        size_t n = dpx_tls_out_peek(t_, 0, b, 8);
        REQUIRE(n > 0);
        ssize_t w = ::send(fd_, b[0].base, b[0].len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EINTR || errno == EAGAIN))
          continue;
        if (w <= 0)
          return; // the peer is gone; reads will tell
        dpx_tls_out_consume(t_, static_cast<size_t>(w));
      }
    }
  }
  // Wait for socket bytes (or EOF) once, feed them, read plaintext, send
  // what that produced. False when the guard ran out or the stream ended.
  bool step(std::chrono::steady_clock::time_point d) {
    flush();
    read_plain();
    flush();
    if (sock_eof || last < 0 || last == DPX_TLS_EOF)
      return false;
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, ms_left(d)) != 1)
      return false;
    receive();
    flush();
    return true;
  }
  // Handshake; returns the engine's error or 0.
  int handshake() {
    int r = dpx_tls_handshake(t_);
    flush();
    auto d = deadline();
    while (r == DPX_TLS_WANT_INPUT) {
      if (!step(d))
        break;
      r = dpx_tls_handshake(t_);
      flush();
    }
    return dpx_tls_error(t_);
  }
  // Read until @p pred(got) or the end of the stream.
  bool read_until(const std::function<bool(const std::string &)> &pred) {
    auto d = deadline();
    read_plain();
    while (!pred(got))
      if (!step(d))
        return pred(got);
    return true;
  }
  // Read to the end: EOF (close_notify) or an error such as ETRUNCATED.
  int read_to_end() {
    auto d = deadline();
    read_plain();
    while (last == DPX_TLS_OK || last == DPX_TLS_WANT_INPUT || last == DPX_TLS_FULL)
      if (!step(d))
        break;
    return last;
  }
  void write_all(const std::string &s) {
    auto d = deadline();
    size_t off = 0;
    while (off < s.size()) {
      size_t taken = 0;
      int r = dpx_tls_write(t_, s.data() + off, s.size() - off, &taken);
      REQUIRE_MESSAGE((r == DPX_TLS_OK || r == DPX_TLS_FULL), st(r));
      off += taken;
      flush();
      REQUIRE(ms_left(d) > 0);
    }
  }
  void shutdown_write() {
    REQUIRE(dpx_tls_shutdown(t_) == DPX_TLS_OK);
    flush();
  }

private:
  // One recv into the engine (the socket is readable).
  void receive() {
    char buf[65536];
    ssize_t n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN)
        return;
      n = 0; // a reset ends the stream like an EOF (without close_notify)
    }
    if (n == 0) {
      sock_eof = true;
      dpx_tls_feed_eof(t_);
    } else {
      int r = dpx_tls_feed(t_, buf, static_cast<size_t>(n));
      REQUIRE_MESSAGE((r == DPX_TLS_OK || r < 0), st(r));
    }
    read_plain();
  }
  // Read plaintext out of the engine while it has any.
  void read_plain() {
    char buf[16384];
    for (;;) {
      size_t n = 0;
      last = dpx_tls_read(t_, buf, sizeof buf, &n);
      if (last != DPX_TLS_OK)
        break;
      got.append(buf, n);
    }
  }

  dpx_tls *t_;
  int fd_;
};

} // namespace ttest

#endif
