// Test support shared by every TLS suite, with nothing from the library:
// certificates made at test time by the `openssl` command (Certs), child
// processes with piped stdio for peers nobody here wrote (Proc), and plain
// loopback sockets. tls_support.hpp adds the engine harness on top; the
// conn suite (conn_tls_test.cpp) uses this with the public API only.
// Time appears only as a hang guard (kGuard).
#ifndef DUPLEX_TESTS_TLS_COMMON_HPP
#define DUPLEX_TESTS_TLS_COMMON_HPP

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

} // namespace ttest

#endif
