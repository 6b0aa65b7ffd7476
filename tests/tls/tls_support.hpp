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

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace ttest {

using namespace std::chrono_literals;

// How long any single wait may take before the test gives up (hang guard).
inline constexpr std::chrono::seconds kGuard{60};

// The openssl command: $OPENSSL_PROG (set by meson), else from PATH.
inline std::string openssl_cmd() {
  const char *p = std::getenv("OPENSSL_PROG");
  return p != nullptr && *p != '\0' ? p : "openssl";
}

// A reason as a std::string (doctest prints a char pointer as an address).
inline std::string why(dpx_tls *t) { return dpx_tls_reason(t); }

inline std::string st(int s) {
  return std::string(dpx_tls_status_name(s)) + " (" + std::to_string(s) + ")";
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

// Made once per process by the openssl command; removed at exit.
//   ca                 the trusted CA ("duplex test CA")
//   otherca            a CA nobody trusts
//   server             CN=localhost, SAN DNS:localhost IP:127.0.0.1, by ca
//   client             CN=client, clientAuth, by ca
//   wronghost          SAN DNS:wrong.example, by ca
//   expired            CN=localhost, valid in January 2020 only, by ca
//   untrusted          CN=localhost, by otherca
//   client_untrusted   CN=client, by otherca
//   encrypted.key      server.key under a passphrase
class Certs {
public:
  static const Certs &get() {
    static Certs c;
    return c;
  }
  // Paths as C strings that stay valid for the whole run.
  const char *pem(const std::string &name) const { return path(name + ".pem"); }
  const char *key(const std::string &name) const { return path(name + ".key"); }
  const char *path(const std::string &file) const {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = paths_.find(file);
    if (it == paths_.end())
      it = paths_.emplace(file, dir_ + "/" + file).first;
    return it->second.c_str();
  }
  const std::string &dir() const { return dir_; }
  static std::string slurp(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

private:
  Certs() {
    char tmpl[] = "/tmp/duplex-tls-XXXXXX";
    char *d = mkdtemp(tmpl);
    REQUIRE(d != nullptr);
    dir_ = d;
    std::ofstream(dir_ + "/gen.sh") << kScript;
    std::string cmd = "cd '" + dir_ + "' && sh ./gen.sh >gen.log 2>&1";
    int rc = std::system(cmd.c_str());
    if (rc != 0)
      FAIL("certificate generation failed: " << slurp(dir_ + "/gen.log"));
  }
  ~Certs() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string dir_;
  mutable std::mutex mu_;
  mutable std::map<std::string, std::string> paths_;

  static constexpr const char *kScript = R"SH(set -e
OPENSSL="${OPENSSL_PROG:-openssl}"
cat > x.cnf <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[wronghost]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:wrong.example
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
[ca]
default_ca = testca
[testca]
dir = .
database = index.txt
new_certs_dir = .
certificate = ca.pem
private_key = ca.key
serial = serial
default_md = sha256
policy = anything
copy_extensions = none
unique_subject = no
[anything]
commonName = supplied
CNF
key() { "$OPENSSL" genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
mkca() {
  key "$1.key"
  "$OPENSSL" req -x509 -new -key "$1.key" -subj "/CN=$2" -days 3650 \
    -config x.cnf -extensions v3_ca -out "$1.pem"
}
leaf() {
  key "$1.key"
  "$OPENSSL" req -new -key "$1.key" -subj "/CN=$2" -config x.cnf -out "$1.csr"
  "$OPENSSL" x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -CAcreateserial \
    -days 3650 -extfile x.cnf -extensions "$4" -out "$1.pem"
}
mkca ca "duplex test CA"
mkca otherca "duplex other CA"
leaf server localhost ca server
leaf client client ca client
leaf wronghost localhost ca wronghost
leaf untrusted localhost otherca server
leaf client_untrusted client otherca client
key expired.key
"$OPENSSL" req -new -key expired.key -subj "/CN=localhost" -config x.cnf -out expired.csr
: > index.txt
echo 1000 > serial
"$OPENSSL" ca -batch -config x.cnf -in expired.csr -out expired.pem \
  -startdate 20200101000000Z -enddate 20200201000000Z -extensions server -notext
"$OPENSSL" pkey -in server.key -aes128 -passout pass:secret -out encrypted.key
)SH";
};

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
// Processes and sockets (plain POSIX) for the openssl command as a peer
// ---------------------------------------------------------------------------

inline std::chrono::steady_clock::time_point deadline() {
  return std::chrono::steady_clock::now() + kGuard;
}

inline int ms_left(std::chrono::steady_clock::time_point d) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      d - std::chrono::steady_clock::now());
  return left.count() > 0 ? static_cast<int>(left.count()) : 0;
}

// A child process with its stdin and (stdout + stderr) on pipes.
class Proc {
public:
  explicit Proc(const std::vector<std::string> &argv) {
    int in[2], out[2];
    REQUIRE(pipe(in) == 0);
    REQUIRE(pipe(out) == 0);
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      dup2(in[0], 0);
      dup2(out[1], 1);
      dup2(out[1], 2);
      for (int fd : {in[0], in[1], out[0], out[1]})
        close(fd);
      std::vector<char *> args;
      for (const auto &a : argv)
        args.push_back(const_cast<char *>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    stdin_ = in[1];
    stdout_ = out[0];
    fcntl(stdout_, F_SETFD, FD_CLOEXEC);
    fcntl(stdin_, F_SETFD, FD_CLOEXEC);
  }
  Proc(const Proc &) = delete;
  Proc &operator=(const Proc &) = delete;
  ~Proc() {
    close_stdin();
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (stdout_ >= 0)
      close(stdout_);
  }

  void send(const std::string &s) {
    REQUIRE(stdin_ >= 0);
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::write(stdin_, s.data() + off, s.size() - off);
      REQUIRE(n > 0);
      off += static_cast<size_t>(n);
    }
  }
  // For another thread: no assertion; false if the child stopped reading.
  bool send_raw(const std::string &s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::write(stdin_, s.data() + off, s.size() - off);
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }
  void close_stdin() {
    if (stdin_ >= 0) {
      close(stdin_);
      stdin_ = -1;
    }
  }
  // Read the child's output until it contains @p needle (true) or the
  // child's output ends or the guard runs out (false).
  bool wait_for(const std::string &needle) {
    auto d = deadline();
    size_t from = 0; // only the new bytes are searched (output may be MiBs)
    for (;;) {
      if (out_.find(needle, from) != std::string::npos)
        return true;
      if (out_.size() >= needle.size())
        from = out_.size() - needle.size() + 1;
      if (!read_some(ms_left(d)))
        return out_.find(needle, from) != std::string::npos;
    }
  }
  // Read until @p pred(output) holds (true) or the output ends or the
  // guard runs out (false).
  bool wait_until(const std::function<bool(const std::string &)> &pred) {
    auto d = deadline();
    while (!pred(out_))
      if (!read_some(ms_left(d)))
        return pred(out_);
    return true;
  }
  // Wait for the child to exit; its exit status, or -1 on the guard.
  int wait_exit() {
    auto d = deadline();
    while (read_some(ms_left(d))) {
    }
    for (;;) {
      int status = 0;
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      if (ms_left(d) == 0)
        return -1;
      usleep(2000);
    }
  }
  void kill_now() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }
  const std::string &output() const { return out_; }

private:
  bool read_some(int timeout_ms) {
    if (stdout_ < 0)
      return false;
    pollfd p{stdout_, POLLIN, 0};
    int r = poll(&p, 1, timeout_ms);
    if (r <= 0)
      return false;
    char buf[65536];
    ssize_t n = ::read(stdout_, buf, sizeof buf);
    if (n <= 0) {
      close(stdout_);
      stdout_ = -1;
      return false;
    }
    out_.append(buf, static_cast<size_t>(n));
    return true;
  }
  pid_t pid_ = -1;
  int stdin_ = -1, stdout_ = -1;
  std::string out_;
};

inline int tcp_connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  return fd;
}

// A listening loopback socket on an ephemeral port.
inline int tcp_listen(int *port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  REQUIRE(listen(fd, 8) == 0);
  socklen_t len = sizeof a;
  REQUIRE(getsockname(fd, reinterpret_cast<sockaddr *>(&a), &len) == 0);
  *port = ntohs(a.sin_port);
  return fd;
}

inline int tcp_accept(int lfd) {
  pollfd p{lfd, POLLIN, 0};
  REQUIRE(poll(&p, 1, static_cast<int>(kGuard.count() * 1000)) == 1);
  int fd = accept(lfd, nullptr, nullptr);
  REQUIRE(fd >= 0);
  return fd;
}

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
