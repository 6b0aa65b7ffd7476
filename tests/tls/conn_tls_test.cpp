// TLS conns end to end, through the public API only (<duplex.h>), against
// peers nobody here wrote: the openssl command's s_server and s_client,
// Python's ssl module (peers/tls_peer.py, which drives an SSLObject by hand
// so it can half-close, truncate or upgrade after plaintext), Go's
// crypto/tls (peers/tls_peer.go), socat's OPENSSL address, and libduplex
// itself on the other end.
//
// Certificates are made at test time by the openssl command (tls_common.hpp):
// a CA, a server for localhost and 127.0.0.1, a client for mutual TLS, an
// expired server, a server for another name, and a CA nobody trusts.
//
// Every case checks what a user sees: bytes in == bytes out and in order,
// exactly-once callbacks, the documented codes, and a non-empty
// duplex_conn_get_tls_error() where TLS failed. Time is only a hang guard:
// no assertion depends on how long anything takes.
#include "fixture.hpp"
#include "tls_common.hpp"

#include <algorithm>
#include <cctype>
#include <map>
#include <optional>

using namespace dtest;
namespace tt = ttest;

namespace {

// ---------------------------------------------------------------------------
// Small tools
// ---------------------------------------------------------------------------

const tt::Certs &certs() { return tt::Certs::get(); }

std::string lower(std::string s) {
  for (char &ch : s)
    ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

bool contains(const std::string &hay, const std::string &needle) {
  return hay.find(needle) != std::string::npos;
}

// CRC-32 (the zlib one), to compare a stream with a peer's zlib.crc32.
uint32_t crc32_update(uint32_t crc, const void *data, size_t len) {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(256);
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++)
        c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  const auto *p = static_cast<const uint8_t *>(data);
  crc = ~crc;
  for (size_t i = 0; i < len; i++)
    crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

std::string hex32(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "%08x", v);
  return b;
}

// The pattern stream the peers also make (tls_peer.py pattern(), the Go
// peer's pattern()): byte i depends on i % 65536 and the seed.
inline uint8_t pat_byte(uint64_t i, int seed) {
  uint64_t j = i % 65536;
  return static_cast<uint8_t>(j * 31 + static_cast<uint64_t>(seed) * 7 + (j >> 8));
}
std::vector<uint8_t> pat(uint64_t off, size_t n, int seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i++)
    v[i] = pat_byte(off + i, seed);
  return v;
}

std::string env_str(const char *name) {
  const char *v = std::getenv(name);
  return v != nullptr ? v : "";
}

// Whether @p prog is on PATH (or is an existing path).
bool have_program(const std::string &prog) {
  if (prog.empty())
    return false;
  if (prog.find('/') != std::string::npos)
    return ::access(prog.c_str(), X_OK) == 0;
  std::string cmd = "command -v '" + prog + "' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

// ---------------------------------------------------------------------------
// TLS configs (RAII)
// ---------------------------------------------------------------------------

class Tls {
public:
  Tls() = default;
  explicit Tls(duplex_tls *p) : p_(p) {}
  Tls(const Tls &) = delete;
  Tls &operator=(const Tls &) = delete;
  Tls(Tls &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  Tls &operator=(Tls &&o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  ~Tls() {
    if (p_ != nullptr)
      CHECK(duplex_tls_unref(p_) == 0);
  }
  duplex_tls *get() const { return p_; }
  operator duplex_tls *() const { return p_; }

private:
  duplex_tls *p_ = nullptr;
};

duplex_tls_config server_cfg(const std::string &name = "server") {
  duplex_tls_config c = DUPLEX_TLS_CONFIG_INIT;
  c.role = DUPLEX_TLS_SERVER;
  c.cert_file = certs().pem(name);
  c.key_file = certs().key(name);
  c.ca_file = certs().pem("ca");
  return c;
}

duplex_tls_config client_cfg() {
  duplex_tls_config c = DUPLEX_TLS_CONFIG_INIT;
  c.role = DUPLEX_TLS_CLIENT;
  c.ca_file = certs().pem("ca");
  return c;
}

Tls make_tls(const duplex_tls_config &c) {
  duplex_tls *p = nullptr;
  char err[512] = "";
  int rc = duplex_tls_new(&p, &c, err, sizeof err);
  REQUIRE_MESSAGE(rc == 0, "duplex_tls_new: " << err_str(rc) << ": " << std::string(err));
  REQUIRE(p != nullptr);
  return Tls(p);
}

std::string tls_error(const duplex_conn *c) {
  char buf[1024] = "";
  int rc = duplex_conn_get_tls_error(c, buf, sizeof buf);
  CHECK((rc == 0 || rc == DUPLEX_ENOBUFS));
  return buf;
}

// ---------------------------------------------------------------------------
// One side of a TLS conn: ConnEvents plus what on_open and on_close saw
// ---------------------------------------------------------------------------

struct TlsSide {
  ConnEvents ev;
  std::atomic<int> info_rc{kUnset};
  // Hooks of the test, run after the bookkeeping (loop thread).
  std::function<void(duplex_conn *)> on_open;
  std::function<void(duplex_conn *, int)> on_close;

  TlsSide() {
    ev.open_hook = [this](duplex_conn *c) {
      duplex_tls_info i{};
      i.size = sizeof i;
      int rc = duplex_conn_get_tls_info(c, &i);
      {
        std::lock_guard<std::mutex> lk(mu_);
        info_ = i;
      }
      info_rc = rc;
      if (on_open)
        on_open(c);
    };
    ev.close_hook = [this](duplex_conn *c, int reason) {
      std::string e = tls_error(c);
      {
        std::lock_guard<std::mutex> lk(mu_);
        close_err_ = e;
      }
      if (on_close)
        on_close(c, reason);
    };
  }
  TlsSide(const TlsSide &) = delete;
  TlsSide &operator=(const TlsSide &) = delete;

  duplex_conn_opts opts() { return ev.opts(); }
  // What on_open read (on_open's bookkeeping may still be running when
  // ev.opens says it began: wait for it, bounded).
  duplex_tls_info info() {
    if (ev.opens.load() > 0)
      wait_until([&] { return info_rc.load() != kUnset; });
    std::lock_guard<std::mutex> lk(mu_);
    return info_;
  }
  // duplex_conn_get_tls_error() as on_close saw it.
  std::string close_err() {
    std::lock_guard<std::mutex> lk(mu_);
    return close_err_;
  }
  // Echo every byte back; at the peer's EOF (close_notify) shut down.
  void echo() {
    ev.read_hook = [](duplex_conn *c, const uint8_t *d, size_t n) {
      CHECK(duplex_conn_write(c, d, n, nullptr, nullptr) == 0);
    };
    ev.eof_hook = [](duplex_conn *c) { CHECK(duplex_conn_shutdown(c, nullptr, nullptr) == 0); };
  }

private:
  std::mutex mu_;
  duplex_tls_info info_{};
  std::string close_err_;
};

// A TLS listener on 127.0.0.1, an ephemeral port.
class Server {
public:
  Server(duplex_loop *loop, duplex_tls *tls, const duplex_conn_opts &co) {
    duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
    lo.conn_opts = &co;
    lo.tls = tls;
    int rc = duplex_listener_tcp(&l_, loop, "127.0.0.1", 0, &lo);
    REQUIRE_MESSAGE(rc == 0, "duplex_listener_tcp: " << err_str(rc));
    REQUIRE(duplex_listener_get_port(l_, &port) == 0);
  }
  Server(const Server &) = delete;
  Server &operator=(const Server &) = delete;
  ~Server() {
    duplex_listener_close(l_); // ECLOSED once the loop was freed
    CHECK(duplex_listener_unref(l_) == 0);
  }
  uint16_t port = 0;

private:
  duplex_listener *l_ = nullptr;
};

// A TLS client conn to 127.0.0.1:@p port, checking the name @p host.
duplex_conn *connect_tls(duplex_loop *loop, uint16_t port, duplex_tls *tls, TlsSide &s,
                         const char *host = "localhost",
                         std::function<void(duplex_conn_opts &)> tweak = nullptr) {
  duplex_conn_opts o = s.opts();
  o.tls = tls;
  o.tls_host = host;
  if (tweak)
    tweak(o);
  duplex_conn *c = nullptr;
  int rc = duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &o);
  REQUIRE_MESSAGE(rc == 0, "duplex_conn_connect_tcp: " << err_str(rc));
  REQUIRE(c != nullptr);
  return c;
}

uint64_t accepted(duplex_loop *loop) {
  duplex_loop_stats st = DUPLEX_LOOP_STATS_INIT;
  REQUIRE(duplex_loop_get_stats(loop, &st) == 0);
  return st.accepted;
}

// ---------------------------------------------------------------------------
// Peer processes
// ---------------------------------------------------------------------------

// The text from @p tag to the end of its line, once the peer printed it
// ("" if the peer ended or the guard ran out first).
std::string line_of(tt::Proc &p, const std::string &tag) {
  bool ok = p.wait_until([&](const std::string &o) {
    size_t at = o.find(tag);
    return at != std::string::npos && o.find('\n', at) != std::string::npos;
  });
  if (!ok)
    return "";
  const std::string &o = p.output();
  size_t at = o.find(tag);
  return o.substr(at, o.find('\n', at) - at);
}

// The port after @p tag ("PORT 4242", "ACCEPT 127.0.0.1:4242", ...).
uint16_t port_of(tt::Proc &p, const std::string &tag) {
  std::string l = line_of(p, tag);
  REQUIRE_MESSAGE(!l.empty(), "the peer printed no port:\n" << p.output());
  int port = std::atoi(l.c_str() + tag.size());
  REQUIRE_MESSAGE(port > 0, l);
  return static_cast<uint16_t>(port);
}

// The value of "key=value" in a RESULT line.
std::string field(const std::string &line, const std::string &key) {
  size_t at = line.find(" " + key + "=");
  if (at == std::string::npos)
    return "";
  at += key.size() + 2;
  size_t end = line.find(' ', at);
  return line.substr(at, end == std::string::npos ? std::string::npos : end - at);
}

std::vector<std::string> py_argv(const std::string &mode, std::vector<std::string> extra) {
  std::string script = env_str("TLS_PEER_PY");
  REQUIRE_MESSAGE(!script.empty(), "TLS_PEER_PY is not set (meson sets it)");
  std::string py = env_str("PYTHON3");
  std::vector<std::string> a = {py.empty() ? "python3" : py, "-u", script, mode};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// tls_peer.py as a server: listening when the constructor returns.
struct PyServer {
  tt::Proc proc;
  uint16_t port = 0;
  PyServer(const std::string &mode, std::vector<std::string> extra,
           const std::string &cert = "server")
      : proc(py_argv(mode, with_identity(std::move(extra), cert))) {
    port = port_of(proc, "PORT ");
  }
  static std::vector<std::string> with_identity(std::vector<std::string> a,
                                                const std::string &cert) {
    a.insert(a.end(), {"--cert", certs().pem(cert), "--key", certs().key(cert)});
    return a;
  }
  std::string result() { return line_of(proc, "RESULT"); }
};

// tls_peer.py as a client of 127.0.0.1:@p port.
struct PyClient {
  tt::Proc proc;
  PyClient(const std::string &mode, uint16_t port, std::vector<std::string> extra = {})
      : proc(py_argv(mode, with_target(std::move(extra), port))) {}
  static std::vector<std::string> with_target(std::vector<std::string> a, uint16_t port) {
    a.insert(a.end(), {"--connect", std::to_string(port), "--ca", certs().pem("ca")});
    return a;
  }
  std::string result() { return line_of(proc, "RESULT"); }
};

// openssl s_server on an ephemeral loopback port (its stdin is a pipe we
// hold: it stops at stdin's end otherwise).
struct SServer {
  tt::Proc proc;
  uint16_t port = 0;
  explicit SServer(std::vector<std::string> extra, const std::string &cert = "server")
      : proc(args(std::move(extra), cert)) {
    port = port_of(proc, "ACCEPT 127.0.0.1:");
  }
  static std::vector<std::string> args(std::vector<std::string> extra,
                                       const std::string &cert) {
    std::vector<std::string> a = {tt::openssl_cmd(), "s_server", "-accept", "127.0.0.1:0",
                                  "-cert", certs().pem(cert), "-key", certs().key(cert)};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
};

// openssl s_client to 127.0.0.1:@p port; what goes into its stdin is sent,
// what it receives shows in its output. Stdin's end makes it close.
std::vector<std::string> sclient_args(uint16_t port, std::vector<std::string> extra) {
  std::vector<std::string> a = {tt::openssl_cmd(), "s_client", "-connect",
                                "127.0.0.1:" + std::to_string(port), "-servername",
                                "localhost", "-CAfile", certs().pem("ca"),
                                "-verify_return_error", "-verify_hostname", "localhost",
                                "-quiet", "-no_ign_eof", "-nocommands"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::string version_name(int v) { return v == DUPLEX_TLS_V1_3 ? "TLSv1.3" : "TLSv1.2"; }

} // namespace

// ===========================================================================
// 1. Handshakes, both roles, TLS 1.2 and 1.3, and what on_open can read
// ===========================================================================

TEST_CASE("client against openssl s_server: TLS 1.3 and 1.2, info in on_open, echo, close_notify") {
  static const char *const alpn[] = {"h2", "http/1.1"};
  for (int v : {DUPLEX_TLS_V1_3, DUPLEX_TLS_V1_2}) {
    CAPTURE(v);
    duplex_tls_config cfg = client_cfg();
    cfg.alpn = alpn;
    cfg.alpn_count = 2;
    cfg.min_version = v;
    cfg.max_version = v;
    Tls tls = make_tls(cfg);
    SServer srv({"-naccept", "1", "-rev", "-alpn", "http/1.1"});

    Loop loop;
    TlsSide s;
    s.ev.keep_data = true;
    duplex_conn *c = connect_tls(loop, srv.port, tls, s);
    // Written before the handshake: sent after it, in order.
    REQUIRE(duplex_conn_write(c, "hello\n", 6, nullptr, nullptr) == 0);
    REQUIRE(duplex_conn_write(c, "world\n", 6, nullptr, nullptr) == 0);
    REQUIRE(s.ev.wait_open());
    REQUIRE_MESSAGE(s.ev.opens.load() == 1, "closed: " << err_str(s.ev.close_reason.load())
                                                       << " " << s.close_err()
                                                       << "\n" << srv.proc.output());
    duplex_tls_info i = s.info();
    CHECK(s.info_rc.load() == 0);
    CHECK(i.version == v);
    CHECK(std::string(i.version_name) == version_name(v));
    CHECK(std::string(i.cipher) != "");
    CHECK(std::string(i.alpn) == "http/1.1");
    CHECK(std::string(i.peer_subject) == "CN=localhost");
    CHECK(i.peer_cert == 1);
    CHECK(i.resumed == 0);

    // The same from another thread (it asks the loop).
    duplex_tls_info j{};
    j.size = sizeof j;
    CHECK(duplex_conn_get_tls_info(c, &j) == 0);
    CHECK(j.version == v);
    CHECK(std::string(j.cipher) == i.cipher);
    CHECK(tls_error(c) == "");

    // -rev answers each line reversed.
    CHECK(wait_until([&] { return s.ev.data().size() >= 12 || s.ev.closes.load() > 0; }));
    CHECK(s.ev.data() == "olleh\ndlrow\n");

    // Our close_notify; s_server answers with its own: on_eof, then the
    // conn closes by itself with reason 0.
    WriteCounter sd;
    REQUIRE(duplex_conn_shutdown(c, WriteCounter::cb, &sd) == 0);
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.eofs.load() == 1);
    CHECK(s.ev.close_reason.load() == 0);
    CHECK(sd.ok.load() == 1);
    CHECK(s.close_err() == "");
    CHECK(s.ev.order_errors.load() == 0);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
    CHECK(sd.total.load() == 1);
  }
}

TEST_CASE("server against openssl s_client: TLS 1.3 and 1.2, SNI and ALPN in on_open, echo") {
  static const char *const alpn[] = {"http/1.1"};
  duplex_tls_config cfg = server_cfg();
  cfg.alpn = alpn;
  cfg.alpn_count = 1;
  Tls tls = make_tls(cfg);
  for (const char *ver : {"-tls1_3", "-tls1_2"}) {
    CAPTURE(ver);
    const int v = std::string(ver) == "-tls1_3" ? DUPLEX_TLS_V1_3 : DUPLEX_TLS_V1_2;
    Loop loop;
    TlsSide s;
    s.echo();
    Server srv(loop, tls, s.opts());
    tt::Proc cli(sclient_args(srv.port, {ver, "-alpn", "http/1.1"}));
    cli.send("ping one\n");
    CHECK_MESSAGE(cli.wait_for("ping one\n"), cli.output());
    cli.send("ping two\n");
    CHECK_MESSAGE(cli.wait_for("ping two\n"), cli.output());
    REQUIRE(s.ev.opens.load() == 1);
    duplex_tls_info i = s.info();
    CHECK(s.info_rc.load() == 0);
    CHECK(i.version == v);
    CHECK(std::string(i.version_name) == version_name(v));
    CHECK(std::string(i.cipher) != "");
    CHECK(std::string(i.alpn) == "http/1.1");
    CHECK(std::string(i.sni) == "localhost");
    CHECK(std::string(i.peer_subject) == "");
    CHECK(i.peer_cert == 0);
    // Stdin's end: s_client sends close_notify and closes; the server sees
    // EOF (not an error) and closes.
    cli.close_stdin();
    CHECK(cli.wait_exit() == 0);
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.eofs.load() == 1);
    // Our close_notify may meet a socket s_client already closed.
    int r = s.ev.close_reason.load();
    CHECK_MESSAGE((r == 0 || r == DUPLEX_ECONNRESET || r == DUPLEX_EPIPE), err_str(r));
    CHECK(s.ev.order_errors.load() == 0);
    CHECK(loop.free() == 0);
  }
}

TEST_CASE("libduplex client and server: versions by min/max, info on both sides, echo") {
  struct Row {
    int client_min, client_max, server_min, server_max;
    int expect; // the version, or 0: no common version
  };
  for (Row r : {Row{0, 0, 0, 0, DUPLEX_TLS_V1_3},
                Row{0, DUPLEX_TLS_V1_2, 0, 0, DUPLEX_TLS_V1_2},
                Row{0, 0, 0, DUPLEX_TLS_V1_2, DUPLEX_TLS_V1_2},
                Row{DUPLEX_TLS_V1_3, 0, 0, 0, DUPLEX_TLS_V1_3},
                Row{0, DUPLEX_TLS_V1_2, DUPLEX_TLS_V1_3, 0, 0}}) {
    CAPTURE(r.client_max);
    CAPTURE(r.server_min);
    duplex_tls_config sc = server_cfg(), cc = client_cfg();
    cc.min_version = r.client_min;
    cc.max_version = r.client_max;
    sc.min_version = r.server_min;
    sc.max_version = r.server_max;
    Tls stls = make_tls(sc), ctls = make_tls(cc);
    Loop loop;
    TlsSide srv, cli;
    srv.echo();
    Server L(loop, stls, srv.opts());
    const size_t kBytes = 300 * 1024;
    std::vector<uint8_t> out = pat(0, kBytes, 3);
    uint32_t crc_in = 0;
    cli.ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) {
      crc_in = crc32_update(crc_in, d, n);
    };
    cli.ev.eof_hook = [](duplex_conn *) {};
    duplex_conn *c = connect_tls(loop, L.port, ctls, cli);
    WriteCounter w;
    uint64_t taken = 0;
    for (size_t off = 0; off < kBytes; off += 30 * 1024) {
      int rc = duplex_conn_write(c, out.data() + off, 30 * 1024, WriteCounter::cb, &w);
      // A failed handshake may close the conn while these are made.
      if (rc == DUPLEX_ECLOSED && r.expect == 0)
        break;
      REQUIRE(rc == 0);
      taken++;
    }
    if (r.expect == 0) {
      // No version in common: both sides fail the handshake; nobody opens.
      CHECK(cli.ev.wait_closed());
      CHECK(wait_until([&] { return srv.ev.closes.load() == 1; }));
      CHECK(cli.ev.opens.load() == 0);
      CHECK(srv.ev.opens.load() == 0);
      CHECK(cli.ev.close_reason.load() == DUPLEX_ETLS);
      CHECK(srv.ev.close_reason.load() == DUPLEX_ETLS);
      CHECK(cli.close_err() != "");
      CHECK(srv.close_err() != "");
      MESSAGE("no common version: client '" << cli.close_err() << "', server '"
                                            << srv.close_err() << "'");
      CHECK(wait_until([&] { return w.total.load() == taken; }));
      CHECK(w.ok.load() == 0);
    } else {
      REQUIRE(cli.ev.wait_open());
      REQUIRE_MESSAGE(cli.ev.opens.load() == 1, cli.close_err());
      CHECK(cli.ev.wait_bytes(kBytes));
      REQUIRE(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
      CHECK(cli.ev.wait_closed());
      CHECK(wait_until([&] { return srv.ev.closes.load() == 1; }));
      CHECK(cli.ev.bytes_read.load() == kBytes);
      CHECK(crc_in == crc32_update(0, out.data(), out.size()));
      CHECK(cli.ev.close_reason.load() == 0);
      CHECK(srv.ev.close_reason.load() == 0);
      CHECK(cli.ev.eofs.load() == 1);
      CHECK(srv.ev.eofs.load() == 1);
      CHECK(taken == 10);
      CHECK(w.ok.load() == 10);
      duplex_tls_info ci = cli.info(), si = srv.info();
      CHECK(ci.version == r.expect);
      CHECK(si.version == r.expect);
      CHECK(std::string(ci.cipher) == si.cipher);
      CHECK(std::string(ci.cipher) != "");
      CHECK(std::string(si.sni) == "localhost");
      CHECK(std::string(ci.peer_subject) == "CN=localhost");
      CHECK(std::string(si.peer_subject) == "");
      CHECK(std::string(ci.alpn) == "");
    }
    CHECK(cli.ev.order_errors.load() == 0);
    CHECK(srv.ev.order_errors.load() == 0);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
  }
}

TEST_CASE("tls_host NULL checks the connect host: an IP against the IP SAN") {
  Tls stls = make_tls(server_cfg()), ctls = make_tls(client_cfg());
  Tls wrong = make_tls(server_cfg("wronghost"));
  Loop loop;
  TlsSide srv, cli;
  srv.echo();
  Server L(loop, stls, srv.opts());
  duplex_conn *c = connect_tls(loop, L.port, ctls, cli, nullptr);
  REQUIRE(cli.ev.wait_open());
  CHECK_MESSAGE(cli.ev.opens.load() == 1, cli.close_err());
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(cli.ev.wait_closed());
  CHECK(cli.ev.close_reason.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);

  // The wrong-host certificate names neither 127.0.0.1 nor localhost.
  TlsSide srv2, cli2;
  Server L2(loop, wrong, srv2.opts());
  duplex_conn *c2 = connect_tls(loop, L2.port, ctls, cli2, nullptr);
  CHECK(cli2.ev.wait_closed());
  CHECK(cli2.ev.opens.load() == 0);
  CHECK(cli2.ev.close_reason.load() == DUPLEX_ETLSVERIFY);
  CHECK(cli2.close_err() != "");
  CHECK(duplex_conn_unref(c2) == 0);
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 2. Eight threads into one TLS conn, read by Python's ssl
// ===========================================================================

namespace {

// A message: [magic u32][tid u32][seq u32][len u32][crc32(payload) u32]
// then payload (little-endian), as tls_peer.py check_frames() reads it.
constexpr size_t kFrameHeader = 20;
constexpr uint32_t kFrameMagic = 0x46585044;

void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = static_cast<uint8_t>(v >> (8 * i));
}

void make_frame(std::vector<uint8_t> &buf, uint32_t tid, uint32_t seq, size_t len) {
  buf.resize(len);
  for (size_t i = kFrameHeader; i < len; i++)
    buf[i] = static_cast<uint8_t>(tid * 37u + seq * 11u + i * 7u + (i >> 9));
  put32(&buf[0], kFrameMagic);
  put32(&buf[4], tid);
  put32(&buf[8], seq);
  put32(&buf[12], static_cast<uint32_t>(len));
  put32(&buf[16], crc32_update(0, buf.data() + kFrameHeader, len - kFrameHeader));
}

} // namespace

TEST_CASE("8 threads x many writes into one TLS conn: every byte, per-thread order, no split") {
  const unsigned kThreads = 8;
  const uint32_t kPerThread = kSanitized ? 120 : 300;
  Tls tls = make_tls(client_cfg());
  PyServer peer("frames", {"--threads", std::to_string(kThreads)});

  Loop loop;
  TlsSide s;
  duplex_conn *c = connect_tls(loop, peer.port, tls, s);

  // The producers start at once: their first writes are queued during the
  // handshake and go out after it.
  WriteCounter w;
  std::atomic<uint64_t> bytes{0}, refused{0};
  std::atomic<int> failures{0};
  std::vector<std::thread> producers;
  for (unsigned t = 0; t < kThreads; t++) {
    producers.emplace_back([&, t] {
      Rng rng(t + 1);
      std::vector<uint8_t> buf;
      for (uint32_t seq = 0; seq < kPerThread; seq++) {
        size_t kind = rng.range(0, 9), len;
        if (kind < 6)
          len = rng.range(kFrameHeader, 300); // small
        else if (kind < 9)
          len = rng.range(300, 6000); // medium
        else
          len = rng.range(16 * 1024 + 1, 70 * 1024); // several records
        make_frame(buf, t, seq, len);
        int rc;
        if (seq % 3 == 1) {
          // Header and payload as two buffers of one unsplittable write.
          duplex_buf b[2] = {{buf.data(), kFrameHeader},
                             {buf.data() + kFrameHeader, len - kFrameHeader}};
          rc = retry_wouldblock(c, [&] { return duplex_conn_writev(c, b, 2, WriteCounter::cb, &w); },
                                &refused);
        } else {
          rc = retry_wouldblock(
              c, [&] { return duplex_conn_write(c, buf.data(), len, WriteCounter::cb, &w); },
              &refused);
        }
        if (rc != 0) {
          failures++;
          return;
        }
        bytes += len;
      }
    });
  }
  for (auto &p : producers)
    p.join();
  REQUIRE(failures.load() == 0);
  // Everything written: close_notify after the last write.
  WriteCounter sd;
  REQUIRE(duplex_conn_shutdown(c, WriteCounter::cb, &sd) == 0);
  std::string res = peer.result();
  INFO(peer.proc.output());
  CHECK(field(res, "frames") == std::to_string(kThreads * kPerThread));
  CHECK(field(res, "bytes") == std::to_string(bytes.load()));
  CHECK(field(res, "end") == "clean");
  CHECK(contains(res, "RESULT ok"));
  // The peer's close_notify ends our reading: EOF, then a clean close.
  CHECK(s.ev.wait_closed());
  CHECK(s.ev.opens.load() == 1);
  CHECK(s.ev.eofs.load() == 1);
  CHECK(s.ev.close_reason.load() == 0);
  CHECK(w.total.load() == uint64_t(kThreads) * kPerThread);
  CHECK(w.ok.load() == w.total.load());
  CHECK(sd.ok.load() == 1);
  CHECK(s.ev.order_errors.load() == 0);
  MESSAGE(bytes.load() << " bytes in " << w.total.load() << " writes, " << refused.load()
                       << " refused and retried");
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 3. Half-close with close_notify, graceful close, abort
// ===========================================================================

TEST_CASE("duplex_conn_shutdown: the peer sees a clean EOF and can still send") {
  Tls tls = make_tls(client_cfg());
  const size_t kOut = 1 << 20, kReply = 256 * 1024;
  PyServer peer("sink", {"--reply-bytes", std::to_string(kReply)});
  Loop loop;
  TlsSide s;
  uint32_t crc_in = 0;
  std::atomic<uint64_t> at_eof{0};
  s.ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) {
    crc_in = crc32_update(crc_in, d, n);
  };
  s.ev.eof_hook = [&](duplex_conn *) { at_eof = s.ev.bytes_read.load(); };
  duplex_conn *c = connect_tls(loop, peer.port, tls, s);
  std::vector<uint8_t> out = pat(0, kOut, 5);
  WriteCounter w, sd;
  for (size_t off = 0; off < kOut; off += 64 * 1024)
    REQUIRE(duplex_conn_write(c, out.data() + off, 64 * 1024, WriteCounter::cb, &w) == 0);
  REQUIRE(duplex_conn_shutdown(c, WriteCounter::cb, &sd) == 0);
  CHECK(duplex_conn_write(c, "x", 1, nullptr, nullptr) == DUPLEX_ESHUTDOWN);

  std::string res = peer.result();
  INFO(peer.proc.output());
  CHECK(field(res, "bytes") == std::to_string(kOut));
  CHECK(field(res, "crc") == hex32(crc32_update(0, out.data(), out.size())));
  CHECK(field(res, "end") == "clean");
  // The reply after our close_notify arrives whole, then the peer's
  // close_notify is on_eof and the conn closes by itself with 0.
  CHECK(s.ev.wait_closed());
  std::vector<uint8_t> reply = pat(0, kReply, 7);
  CHECK(s.ev.bytes_read.load() == kReply);
  CHECK(at_eof.load() == kReply);
  CHECK(crc_in == crc32_update(0, reply.data(), reply.size()));
  CHECK(s.ev.eofs.load() == 1);
  CHECK(s.ev.close_reason.load() == 0);
  CHECK(w.ok.load() == kOut / (64 * 1024));
  CHECK(sd.total.load() == 1);
  CHECK(sd.ok.load() == 1);
  CHECK(s.close_err() == "");
  CHECK(s.ev.order_errors.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("the peer's close_notify is on_eof, not an error; writing goes on after it") {
  Tls tls = make_tls(client_cfg());
  const size_t kAfter = 512 * 1024;
  PyServer peer("firstclose", {"--text", "bye\n"});
  Loop loop;
  TlsSide s;
  s.ev.keep_data = true;
  std::vector<uint8_t> out = pat(0, kAfter, 11);
  std::atomic<int> closes_at_eof{kUnset}, write_rc{kUnset}, shutdown_rc{kUnset};
  WriteCounter w, sd;
  s.ev.eof_hook = [&](duplex_conn *c) {
    closes_at_eof = s.ev.closes.load();
    int rc = 0;
    for (size_t off = 0; off < kAfter && rc == 0; off += 32 * 1024)
      rc = duplex_conn_write(c, out.data() + off, 32 * 1024, WriteCounter::cb, &w);
    write_rc = rc;
    shutdown_rc = duplex_conn_shutdown(c, WriteCounter::cb, &sd);
  };
  duplex_conn *c = connect_tls(loop, peer.port, tls, s);
  std::string res = peer.result();
  INFO(peer.proc.output());
  CHECK(s.ev.wait_closed());
  CHECK(s.ev.data() == "bye\n");
  CHECK(s.ev.eofs.load() == 1);
  CHECK(closes_at_eof.load() == 0);
  CHECK(write_rc.load() == 0);
  CHECK(shutdown_rc.load() == 0);
  CHECK(field(res, "bytes") == std::to_string(kAfter));
  CHECK(field(res, "crc") == hex32(crc32_update(0, out.data(), out.size())));
  CHECK(field(res, "end") == "clean");
  CHECK(s.ev.close_reason.load() == 0);
  CHECK(w.ok.load() == kAfter / (32 * 1024));
  CHECK(sd.ok.load() == 1);
  CHECK(s.ev.order_errors.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("graceful close sends close_notify after the queued writes; abort sends none") {
  Tls tls = make_tls(client_cfg());
  SUBCASE("graceful") {
    // TLS 1.2: the server sends nothing after its handshake (see the TLS 1.3
    // case below for what late session tickets do to a graceful close).
    duplex_tls_config c12 = client_cfg();
    c12.max_version = DUPLEX_TLS_V1_2;
    Tls tls12 = make_tls(c12);
    const size_t kOut = 2 << 20;
    PyServer peer("sink", {});
    Loop loop;
    TlsSide s;
    duplex_conn *c = connect_tls(loop, peer.port, tls12, s);
    std::vector<uint8_t> out = pat(0, kOut, 13);
    WriteCounter w;
    for (size_t off = 0; off < kOut; off += 64 * 1024)
      REQUIRE(duplex_conn_write(c, out.data() + off, 64 * 1024, WriteCounter::cb, &w) == 0);
    // At once, from this thread: the close waits for the writes before it.
    REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
    CHECK(duplex_conn_write(c, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
    std::string res = peer.result();
    INFO(peer.proc.output());
    CHECK(field(res, "bytes") == std::to_string(kOut));
    CHECK(field(res, "crc") == hex32(crc32_update(0, out.data(), out.size())));
    CHECK(field(res, "end") == "clean");
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.close_reason.load() == 0);
    CHECK(w.total.load() == kOut / (64 * 1024));
    CHECK(w.ok.load() == w.total.load());
    CHECK(s.ev.closes.load() == 1);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
  }
  SUBCASE("abort") {
    PyServer peer("sink", {"--ack", "65536"});
    Loop loop;
    TlsSide s;
    duplex_conn *c = connect_tls(loop, peer.port, tls, s);
    std::vector<uint8_t> out = pat(0, 64 * 1024, 17);
    WriteCounter w;
    REQUIRE(duplex_conn_write(c, out.data(), out.size(), WriteCounter::cb, &w) == 0);
    REQUIRE_MESSAGE(!line_of(peer.proc, "ACK").empty(), peer.proc.output());
    REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
    std::string res = peer.result();
    INFO(peer.proc.output());
    CHECK(field(res, "bytes") == "65536");
    // A reset, or an EOF without close_notify: never a clean end.
    std::string end = field(res, "end");
    CHECK_MESSAGE((end == "reset" || end == "truncated"), res);
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.close_reason.load() == DUPLEX_ECONNABORTED);
    CHECK(s.ev.closes.load() == 1);
    CHECK(w.total.load() == 1);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
  }
}

// A graceful close of a TLS 1.3 client must not lose the tail of its
// writes when the server's session tickets (sent after the handshake) reach
// the client after it sent close_notify: Linux answers data arriving on (or
// left unread in) a closed socket with a RST and drops whatever is still in
// the send queue, so the conn lingers, reading and discarding until the
// peer ends. The peer below holds its tickets until the conn reported its
// close, or for 2 s, which makes a careless close lose bytes every time.
TEST_CASE("graceful close of a TLS 1.3 client: late session tickets do not cost written bytes") {
  Tls tls = make_tls(client_cfg());
  const size_t kOut = 1 << 20;
  PyServer peer("sink", {"--wait-go", "--hold-tickets"});
  Loop loop;
  TlsSide s;
  duplex_conn *c = connect_tls(loop, peer.port, tls, s);
  std::vector<uint8_t> out = pat(0, kOut, 13);
  WriteCounter w;
  for (size_t off = 0; off < kOut; off += 64 * 1024)
    REQUIRE(duplex_conn_write(c, out.data() + off, 64 * 1024, WriteCounter::cb, &w) == 0);
  REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  // The peer reads nothing and holds its tickets until the conn reports
  // its close (a short wait: a library that waits for the peer's answer
  // before closing is fine too).
  s.ev.wait_closed(2000ms);
  peer.proc.send("go\n");
  std::string res = peer.result();
  INFO(peer.proc.output());
  CHECK(s.ev.wait_closed());
  CHECK(s.ev.close_reason.load() == 0);
  CHECK(w.ok.load() == kOut / (64 * 1024));
  CHECK(field(res, "bytes") == std::to_string(kOut));
  CHECK(field(res, "crc") == hex32(crc32_update(0, out.data(), out.size())));
  CHECK(field(res, "end") == "clean");
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 4. Truncation: a transport EOF without close_notify
// ===========================================================================

TEST_CASE("truncation: the peer closes TCP without close_notify -> DUPLEX_ETLSTRUNC, no on_eof") {
  SUBCASE("client conn, Python server") {
    Tls tls = make_tls(client_cfg());
    PyServer peer("truncate", {"--text", "partial data"});
    Loop loop;
    TlsSide s;
    s.ev.keep_data = true;
    duplex_conn *c = connect_tls(loop, peer.port, tls, s);
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.opens.load() == 1);
    CHECK(s.ev.data() == "partial data");
    CHECK(s.ev.eofs.load() == 0);
    CHECK(s.ev.close_reason.load() == DUPLEX_ETLSTRUNC);
    CHECK(s.close_err() != "");
    CHECK(tls_error(c) == s.close_err()); // still readable through our reference
    MESSAGE("truncation: " << s.close_err());
    CHECK(contains(peer.result(), "RESULT sent"));
    CHECK(s.ev.order_errors.load() == 0);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
  }
  SUBCASE("server conn, Python client") {
    Tls tls = make_tls(server_cfg());
    Loop loop;
    TlsSide s;
    s.ev.keep_data = true;
    Server L(loop, tls, s.opts());
    PyClient peer("truncate", L.port, {"--text", "from the client"});
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.opens.load() == 1);
    CHECK(s.ev.data() == "from the client");
    CHECK(s.ev.eofs.load() == 0);
    CHECK(s.ev.close_reason.load() == DUPLEX_ETLSTRUNC);
    CHECK(s.close_err() != "");
    CHECK(loop.free() == 0);
  }
}

// ===========================================================================
// 5. Certificate verification
// ===========================================================================

TEST_CASE("verification: untrusted CA, wrong host, expired -> DUPLEX_ETLSVERIFY; VERIFY_NONE accepts") {
  struct Row {
    const char *cert;
    const char *why; // in the reason text (lower case)
  };
  Tls strict = make_tls(client_cfg());
  duplex_tls_config lax_cfg = client_cfg();
  lax_cfg.verify = DUPLEX_TLS_VERIFY_NONE;
  Tls lax = make_tls(lax_cfg);
  for (Row r : {Row{"untrusted", "issuer"}, Row{"wronghost", "hostname"},
                Row{"expired", "expired"}}) {
    CAPTURE(r.cert);
    Tls stls = make_tls(server_cfg(r.cert));
    Loop loop;
    TlsSide srv, cli;
    srv.echo();
    Server L(loop, stls, srv.opts());
    duplex_conn *c = connect_tls(loop, L.port, strict, cli);
    WriteCounter w;
    REQUIRE(duplex_conn_write(c, "never sent", 10, WriteCounter::cb, &w) == 0);
    CHECK(cli.ev.wait_closed());
    CHECK(cli.ev.opens.load() == 0);
    CHECK(cli.ev.close_reason.load() == DUPLEX_ETLSVERIFY);
    std::string why = cli.close_err();
    CHECK_MESSAGE(contains(lower(why), r.why), why);
    MESSAGE(r.cert << ": " << why);
    CHECK(wait_until([&] { return w.total.load() == 1; }));
    CHECK(w.ok.load() == 0);
    // The server saw the client's alert: it never opened either.
    CHECK(wait_until([&] { return srv.ev.closes.load() == 1; }));
    CHECK(srv.ev.opens.load() == 0);
    CHECK(srv.ev.close_reason.load() != 0);
    CHECK(srv.ev.bytes_read.load() == 0);
    CHECK(duplex_conn_unref(c) == 0);

    // Without verification the same server is accepted.
    TlsSide cli2;
    cli2.ev.keep_data = true;
    duplex_conn *c2 = connect_tls(loop, L.port, lax, cli2);
    REQUIRE(duplex_conn_write(c2, "ping", 4, nullptr, nullptr) == 0);
    CHECK(wait_until([&] { return cli2.ev.bytes_read.load() >= 4 || cli2.ev.closes.load() > 0; }));
    CHECK(cli2.ev.opens.load() == 1);
    CHECK(cli2.ev.data() == "ping");
    CHECK(cli2.info().peer_cert == 1);
    CHECK(duplex_conn_close(c2, DUPLEX_CLOSE_GRACEFUL) == 0);
    CHECK(cli2.ev.wait_closed());
    CHECK(cli2.ev.close_reason.load() == 0);
    CHECK(duplex_conn_unref(c2) == 0);
    CHECK(loop.free() == 0);
  }
}

// ===========================================================================
// 6. Mutual TLS
// ===========================================================================

TEST_CASE("mutual TLS: VERIFY_REQUIRE refuses a client without a certificate, takes the CA's") {
  duplex_tls_config sc = server_cfg();
  sc.verify = DUPLEX_TLS_VERIFY_REQUIRE;
  Tls stls = make_tls(sc);
  duplex_tls_config with = client_cfg(), other = client_cfg();
  with.cert_file = certs().pem("client");
  with.key_file = certs().key("client");
  other.cert_file = certs().pem("client_untrusted");
  other.key_file = certs().key("client_untrusted");

  for (int v : {DUPLEX_TLS_V1_3, DUPLEX_TLS_V1_2}) {
    CAPTURE(v);
    Loop loop;
    TlsSide srv;
    srv.echo();
    Server L(loop, stls, srv.opts());
    // Each client is pinned to version v through its own config copy.
    auto pinned = [v](duplex_tls_config c) {
      c.min_version = v;
      c.max_version = v;
      return make_tls(c);
    };
    Tls bare_v = pinned(client_cfg()), good_v = pinned(with), bad_v = pinned(other);

    // No certificate: the server refuses (it never opens); the client
    // closes with an error (with TLS 1.3 after its own handshake ended).
    TlsSide c1;
    duplex_conn *a = connect_tls(loop, L.port, bare_v, c1);
    CHECK(c1.ev.wait_closed());
    CHECK(wait_until([&] { return srv.ev.closes.load() == 1; }));
    CHECK(srv.ev.opens.load() == 0);
    int sr = srv.ev.close_reason.load();
    CHECK_MESSAGE((sr == DUPLEX_ETLS || sr == DUPLEX_ETLSVERIFY), err_str(sr));
    CHECK(srv.close_err() != "");
    CHECK(c1.ev.close_reason.load() != 0);
    MESSAGE("no client certificate: server '" << srv.close_err() << "', client '"
                                              << c1.close_err() << "'");

    // A certificate from a CA the server does not trust.
    TlsSide c2;
    duplex_conn *b = connect_tls(loop, L.port, bad_v, c2);
    CHECK(c2.ev.wait_closed());
    CHECK(wait_until([&] { return srv.ev.closes.load() == 2; }));
    CHECK(srv.ev.opens.load() == 0);
    CHECK(srv.ev.close_reason.load() == DUPLEX_ETLSVERIFY);
    CHECK(c2.ev.close_reason.load() != 0);

    // The CA's client certificate: accepted, its subject visible.
    TlsSide c3;
    c3.ev.keep_data = true;
    duplex_conn *g = connect_tls(loop, L.port, good_v, c3);
    REQUIRE(duplex_conn_write(g, "mtls", 4, nullptr, nullptr) == 0);
    CHECK(wait_until([&] { return c3.ev.bytes_read.load() >= 4 || c3.ev.closes.load() > 0; }));
    CHECK(c3.ev.data() == "mtls");
    REQUIRE(srv.ev.opens.load() == 1);
    duplex_tls_info si = srv.info();
    CHECK(std::string(si.peer_subject) == "CN=client");
    CHECK(si.peer_cert == 1);
    CHECK(si.version == v);
    CHECK(std::string(c3.info().peer_subject) == "CN=localhost");
    CHECK(duplex_conn_shutdown(g, nullptr, nullptr) == 0);
    CHECK(c3.ev.wait_closed());
    CHECK(c3.ev.close_reason.load() == 0);
    for (duplex_conn *x : {a, b, g})
      CHECK(duplex_conn_unref(x) == 0);
    CHECK(loop.free() == 0);
  }
}

TEST_CASE("mutual TLS optional: a client without a certificate is served, peer_cert 0") {
  duplex_tls_config sc = server_cfg();
  sc.verify = DUPLEX_TLS_VERIFY_OPTIONAL;
  Tls stls = make_tls(sc), ctls = make_tls(client_cfg());
  Loop loop;
  TlsSide srv, cli;
  srv.echo();
  Server L(loop, stls, srv.opts());
  duplex_conn *c = connect_tls(loop, L.port, ctls, cli);
  REQUIRE(duplex_conn_write(c, "hi", 2, nullptr, nullptr) == 0);
  CHECK(cli.ev.wait_bytes(2));
  REQUIRE(srv.ev.opens.load() == 1);
  CHECK(srv.info().peer_cert == 0);
  CHECK(std::string(srv.info().peer_subject) == "");
  CHECK(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
  CHECK(cli.ev.wait_closed());
  CHECK(cli.ev.close_reason.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 7. ALPN
// ===========================================================================

TEST_CASE("ALPN: the negotiated protocol in on_open; no overlap is refused") {
  static const char *const server_protos[] = {"http/1.1", "h2"};
  static const char *const client_protos[] = {"h2", "http/1.1"};
  static const char *const client_other[] = {"imap", "smtp"};
  duplex_tls_config sc = server_cfg();
  sc.alpn = server_protos;
  sc.alpn_count = 2;
  duplex_tls_config cc = client_cfg(), co = client_cfg();
  cc.alpn = client_protos;
  cc.alpn_count = 2;
  co.alpn = client_other;
  co.alpn_count = 2;
  Tls stls = make_tls(sc), ctls = make_tls(cc), otls = make_tls(co);
  Tls plain = make_tls(client_cfg());

  Loop loop;
  TlsSide srv;
  srv.echo();
  Server L(loop, stls, srv.opts());
  // The server picks its first protocol the client offers.
  TlsSide a;
  duplex_conn *ca = connect_tls(loop, L.port, ctls, a);
  REQUIRE(a.ev.wait_open());
  REQUIRE(a.ev.opens.load() == 1);
  CHECK(std::string(a.info().alpn) == "http/1.1");
  CHECK(wait_until([&] { return srv.ev.opens.load() == 1; }));
  CHECK(std::string(srv.info().alpn) == "http/1.1");
  CHECK(duplex_conn_close(ca, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(a.ev.wait_closed());

  // A client without ALPN is served, with no protocol.
  TlsSide b;
  duplex_conn *cb = connect_tls(loop, L.port, plain, b);
  REQUIRE(b.ev.wait_open());
  CHECK(b.ev.opens.load() == 1);
  CHECK(std::string(b.info().alpn) == "");
  CHECK(duplex_conn_close(cb, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(b.ev.wait_closed());

  // No overlap: refused during the handshake; nobody opens.
  CHECK(wait_until([&] { return srv.ev.closes.load() == 2; }));
  TlsSide x;
  duplex_conn *cx = connect_tls(loop, L.port, otls, x);
  CHECK(x.ev.wait_closed());
  CHECK(x.ev.opens.load() == 0);
  CHECK(x.ev.close_reason.load() == DUPLEX_ETLS);
  CHECK(x.close_err() != "");
  CHECK(wait_until([&] { return srv.ev.closes.load() == 3; }));
  CHECK(srv.ev.opens.load() == 2);
  CHECK(srv.ev.close_reason.load() == DUPLEX_ETLS);
  MESSAGE("no ALPN overlap: client '" << x.close_err() << "', server '" << srv.close_err()
                                      << "'");
  for (duplex_conn *c : {ca, cb, cx})
    CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 8. STARTTLS
// ===========================================================================

namespace {

// The server half of the line protocol: "STARTTLS\r\n" -> "OK\r\n", then
// TLS (start_tls right after the OK, and "WELCOME\r\n" queued right after
// start_tls), then echo; at the peer's EOF, shut down.
struct StartTlsServer {
  TlsSide side;
  duplex_tls *tls;
  std::string plain; // loop thread
  bool upgraded = false;
  WriteCounter done;
  std::atomic<int> start_rc{kUnset};
  std::atomic<int> info_version{0};
  explicit StartTlsServer(duplex_tls *t) : tls(t) {
    side.ev.read_hook = [this](duplex_conn *c, const uint8_t *d, size_t n) {
      if (upgraded) {
        CHECK(duplex_conn_write(c, d, n, nullptr, nullptr) == 0);
        return;
      }
      plain.append(reinterpret_cast<const char *>(d), n);
      if (plain != "STARTTLS\r\n")
        return;
      upgraded = true;
      CHECK(duplex_conn_write(c, "OK\r\n", 4, nullptr, nullptr) == 0);
      start_rc = duplex_conn_start_tls(c, tls, nullptr, &StartTlsServer::started, this);
      CHECK(duplex_conn_write(c, "WELCOME\r\n", 9, nullptr, nullptr) == 0);
    };
    side.ev.eof_hook = [](duplex_conn *c) { CHECK(duplex_conn_shutdown(c, nullptr, nullptr) == 0); };
  }
  static void started(duplex_conn *c, int status, void *user) {
    auto *self = static_cast<StartTlsServer *>(user);
    if (status == 0) {
      duplex_tls_info i{};
      i.size = sizeof i;
      if (duplex_conn_get_tls_info(c, &i) == 0)
        self->info_version = i.version;
    }
    WriteCounter::cb(c, status, &self->done);
  }
};

} // namespace

TEST_CASE("STARTTLS: libduplex on both ends; writes queued after start_tls go out encrypted, in order") {
  Tls stls = make_tls(server_cfg()), ctls = make_tls(client_cfg());
  Loop loop;
  StartTlsServer srv(stls);
  duplex_listener *l = nullptr;
  duplex_conn_opts sco = srv.side.opts();
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  lo.conn_opts = &sco;
  REQUIRE(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == 0);
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);

  const int kLines = 200;
  std::string expect_after;
  for (int i = 0; i < kLines; i++)
    expect_after += "line " + std::to_string(i) + "\r\n";

  TlsSide cli;
  std::string got; // loop thread
  bool upgraded = false;
  WriteCounter cdone;
  std::atomic<int> crc{kUnset}, tls_before{kUnset};
  cli.ev.keep_data = true;
  cli.on_open = [&](duplex_conn *c) {
    // A plaintext conn: no TLS info.
    duplex_tls_info i{};
    i.size = sizeof i;
    tls_before = duplex_conn_get_tls_info(c, &i);
    CHECK(duplex_conn_write(c, "STARTTLS\r\n", 10, nullptr, nullptr) == 0);
  };
  cli.ev.read_hook = [&](duplex_conn *c, const uint8_t *d, size_t n) {
    got.append(reinterpret_cast<const char *>(d), n);
    if (!upgraded && got == "OK\r\n") {
      upgraded = true;
      crc = duplex_conn_start_tls(c, ctls, "localhost", WriteCounter::cb, &cdone);
      // Queued right after start_tls: encrypted after the handshake.
      for (int i = 0; i < kLines; i++) {
        std::string line = "line " + std::to_string(i) + "\r\n";
        CHECK(duplex_conn_write(c, line.data(), line.size(), nullptr, nullptr) == 0);
      }
      CHECK(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
    }
  };
  duplex_conn_opts co = cli.opts();
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &co) == 0);
  CHECK(cli.ev.wait_closed());
  CHECK(wait_until([&] { return srv.side.ev.closes.load() == 1; }));
  CHECK(tls_before.load() == DUPLEX_ENOTSUP);
  CHECK(crc.load() == 0);
  CHECK(srv.start_rc.load() == 0);
  CHECK(cli.ev.data() == "OK\r\nWELCOME\r\n" + expect_after);
  CHECK(cli.ev.close_reason.load() == 0);
  CHECK(srv.side.ev.close_reason.load() == 0);
  CHECK(cli.ev.eofs.load() == 1);
  // Each start_tls callback exactly once, with 0.
  CHECK(cdone.total.load() == 1);
  CHECK(cdone.ok.load() == 1);
  CHECK(srv.done.total.load() == 1);
  CHECK(srv.done.ok.load() == 1);
  CHECK(srv.info_version.load() == DUPLEX_TLS_V1_3);
  // A second upgrade of a TLS conn is refused (the conn is closed by now).
  int again = duplex_conn_start_tls(c, ctls, "localhost", nullptr, nullptr);
  CHECK((again == DUPLEX_ECLOSED || again == DUPLEX_EBUSY));
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
  CHECK(cdone.total.load() == 1);
}

TEST_CASE("STARTTLS against a Python ssl client that wraps after the plaintext exchange") {
  Tls stls = make_tls(server_cfg());
  Loop loop;
  StartTlsServer srv(stls);
  duplex_listener *l = nullptr;
  duplex_conn_opts sco = srv.side.opts();
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  lo.conn_opts = &sco;
  REQUIRE(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == 0);
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);
  PyClient peer("starttls", port, {"--lines", "50"});
  std::string res = peer.result();
  INFO(peer.proc.output());
  CHECK(res == "RESULT ok lines=50 end=clean");
  CHECK(wait_until([&] { return srv.side.ev.closes.load() == 1; }));
  CHECK(srv.side.ev.close_reason.load() == 0);
  CHECK(srv.done.total.load() == 1);
  CHECK(srv.done.ok.load() == 1);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 9. Session resumption
// ===========================================================================

TEST_CASE("resumption: a second conn with the same duplex_tls resumes (TLS 1.3 and 1.2)") {
  Tls stls = make_tls(server_cfg());
  for (int v : {DUPLEX_TLS_V1_3, DUPLEX_TLS_V1_2}) {
    CAPTURE(v);
    duplex_tls_config cc = client_cfg();
    cc.max_version = v;
    Tls ctls = make_tls(cc);
    Loop loop;
    TlsSide srv;
    srv.on_open = [](duplex_conn *c) { CHECK(duplex_conn_write(c, "hi", 2, nullptr, nullptr) == 0); };
    srv.echo();
    Server L(loop, stls, srv.opts());
    int resumed[2] = {-1, -1};
    for (int k = 0; k < 2; k++) {
      TlsSide cli;
      duplex_conn *c = connect_tls(loop, L.port, ctls, cli);
      // Reading the server's first bytes also reads the tickets before them.
      CHECK(cli.ev.wait_bytes(2));
      REQUIRE(cli.ev.opens.load() == 1);
      CHECK(cli.info().version == v);
      resumed[k] = cli.info().resumed;
      CHECK(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
      CHECK(cli.ev.wait_closed());
      CHECK(cli.ev.close_reason.load() == 0);
      CHECK(duplex_conn_unref(c) == 0);
      CHECK(wait_until([&] { return srv.ev.closes.load() == k + 1; }));
      CHECK(srv.info().resumed == resumed[k]);
    }
    CHECK(resumed[0] == 0);
    CHECK(resumed[1] == 1);
    CHECK(loop.free() == 0);
  }
}

// ===========================================================================
// 10. A slow reader: the hard limit holds, every byte arrives in order
// ===========================================================================

TEST_CASE("16 MiB into a slow reader: refused past hard_limit, queue bounded, all bytes in order") {
  const size_t kTotal = 16u << 20, kChunk = 32 * 1024;
  const size_t kHigh = 256 * 1024, kLow = 64 * 1024, kHard = 1 << 20;
  Tls tls = make_tls(client_cfg());
  PyServer peer("sink", {"--wait-go", "--chunk", "32768", "--sleep-ms", "1"});
  Loop loop;
  TlsSide s;
  duplex_conn *c = connect_tls(loop, peer.port, tls, s, "localhost", [&](duplex_conn_opts &o) {
    o.high_watermark = kHigh;
    o.low_watermark = kLow;
    o.hard_limit = kHard;
  });
  REQUIRE(s.ev.wait_open());
  REQUIRE(s.ev.opens.load() == 1);

  std::atomic<bool> producing{true};
  std::atomic<size_t> max_queued{0};
  auto note_queued = [&] {
    size_t q = 0;
    if (duplex_conn_get_queued(c, &q) == 0) {
      size_t m = max_queued.load();
      while (q > m && !max_queued.compare_exchange_weak(m, q)) {
      }
    }
  };
  std::thread monitor([&] {
    while (producing.load()) {
      note_queued();
      std::this_thread::sleep_for(100us);
    }
  });

  uint32_t crc = 0;
  std::atomic<uint64_t> refused{0};
  Event first_refusal;
  WriteCounter w;
  std::atomic<int> failed{0};
  std::thread producer([&] {
    std::vector<uint8_t> buf;
    for (size_t off = 0; off < kTotal; off += kChunk) {
      buf = pat(off, kChunk, 21);
      crc = crc32_update(crc, buf.data(), buf.size());
      for (;;) {
        int rc = duplex_conn_write(c, buf.data(), buf.size(), WriteCounter::cb, &w);
        note_queued();
        if (rc == 0)
          break;
        if (rc != DUPLEX_EWOULDBLOCK) {
          failed = rc;
          first_refusal.set();
          return;
        }
        refused++;
        first_refusal.set();
        int r = duplex_conn_wait_writable(c, 1000);
        if (r != 0 && r != DUPLEX_ETIMEDOUT) {
          failed = r;
          return;
        }
      }
    }
    first_refusal.set();
  });
  // The peer reads nothing until the producer has been refused once.
  CHECK(first_refusal.wait());
  CHECK(refused.load() > 0);
  peer.proc.send("go\n");
  producer.join();
  producing = false;
  monitor.join();
  REQUIRE(failed.load() == 0);
  REQUIRE(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
  std::string res = peer.result();
  INFO(peer.proc.output());
  CHECK(field(res, "bytes") == std::to_string(kTotal));
  CHECK(field(res, "crc") == hex32(crc));
  CHECK(field(res, "end") == "clean");
  CHECK(s.ev.wait_closed());
  CHECK(s.ev.close_reason.load() == 0);
  CHECK(w.total.load() == kTotal / kChunk);
  CHECK(w.ok.load() == w.total.load());
  CHECK(max_queued.load() <= kHard);
  CHECK(s.ev.backpressures.load() >= 1);
  CHECK(s.ev.order_errors.load() == 0);
  MESSAGE(refused.load() << " refusals; most queued " << max_queued.load() << " of " << kHard);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 11. Close and loop free with writes pending, and mid-handshake
// ===========================================================================

TEST_CASE("close or free the loop with TLS writes pending: every callback exactly once") {
  Tls stls = make_tls(server_cfg()), ctls = make_tls(client_cfg());
  enum How { kFree, kGraceful, kAbort };
  for (How how : {kFree, kGraceful, kAbort}) {
    CAPTURE(int(how));
    Loop sloop, cloop;
    TlsSide srv, cli;
    // The server stops reading once open: the client's writes back up.
    srv.on_open = [](duplex_conn *c) { CHECK(duplex_conn_pause(c) == 0); };
    Server L(sloop, stls, srv.opts());
    duplex_conn *c = connect_tls(cloop, L.port, ctls, cli, "localhost", [](duplex_conn_opts &o) {
      o.hard_limit = 4 << 20;
    });
    REQUIRE(cli.ev.wait_open());
    REQUIRE_MESSAGE(cli.ev.opens.load() == 1, cli.close_err());
    std::vector<uint8_t> buf = pat(0, 64 * 1024, 1);
    WriteCounter w;
    uint64_t accepted_writes = 0;
    // Until the first refusal: the queue is as full as it gets.
    for (int i = 0; i < 100000; i++) {
      int rc = duplex_conn_write(c, buf.data(), buf.size(), WriteCounter::cb, &w);
      if (rc == DUPLEX_EWOULDBLOCK)
        break;
      REQUIRE(rc == 0);
      accepted_writes++;
      if (i % 16 == 15)
        REQUIRE(on_loop(cloop, [] {})); // let the loop move what it can
    }
    REQUIRE(w.canceled.load() == 0);
    if (how == kGraceful) {
      CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
    } else if (how == kAbort) {
      CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
      CHECK(cli.ev.wait_closed());
      CHECK(cli.ev.close_reason.load() == DUPLEX_ECONNABORTED);
    }
    CHECK(cloop.free() == 0);
    CHECK(w.total.load() == accepted_writes);
    CHECK(w.ok.load() + w.canceled.load() + w.failed.load() == accepted_writes);
    CHECK(w.canceled.load() > 0);
    CHECK(cli.ev.closes.load() == 1);
    if (how == kFree || how == kGraceful)
      CHECK(cli.ev.close_reason.load() == DUPLEX_ECANCELED);
    CHECK(sloop.free() == 0);
    CHECK(srv.ev.closes.load() == 1);
    CHECK(srv.ev.opens.load() == 1);
    CHECK(cli.ev.order_errors.load() == 0);
    CHECK(srv.ev.order_errors.load() == 0);
    CHECK(duplex_conn_write(c, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
    CHECK(duplex_conn_unref(c) == 0);
  }
}

TEST_CASE("mid-handshake: abort or loop free cancels queued writes once; on_open never runs") {
  Tls ctls = make_tls(client_cfg()), stls = make_tls(server_cfg());
  SUBCASE("client: the server never answers") {
    for (bool abort : {true, false}) {
      CAPTURE(abort);
      int port = 0;
      Fd lfd(tt::tcp_listen(&port));
      Loop loop;
      TlsSide cli;
      duplex_conn *c = connect_tls(loop, static_cast<uint16_t>(port), ctls, cli);
      WriteCounter w;
      for (int i = 0; i < 3; i++)
        REQUIRE(duplex_conn_write(c, "queued", 6, WriteCounter::cb, &w) == 0);
      // The ClientHello arrives; nothing answers it.
      Fd peer(tt::tcp_accept(lfd.get()));
      pollfd p{peer.get(), POLLIN, 0};
      REQUIRE(poll(&p, 1, 60000) == 1);
      if (abort) {
        CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
        CHECK(cli.ev.wait_closed());
        CHECK(cli.ev.close_reason.load() == DUPLEX_ECONNABORTED);
      }
      CHECK(loop.free() == 0);
      CHECK(cli.ev.opens.load() == 0);
      CHECK(cli.ev.closes.load() == 1);
      if (!abort)
        CHECK(cli.ev.close_reason.load() == DUPLEX_ECANCELED);
      CHECK(w.total.load() == 3);
      CHECK(w.canceled.load() == 3);
      CHECK(duplex_conn_unref(c) == 0);
    }
  }
  SUBCASE("server: half a ClientHello, then the loop is freed") {
    Loop loop;
    TlsSide srv;
    Server L(loop, stls, srv.opts());
    Fd raw(tt::tcp_connect(L.port));
    const unsigned char partial[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03};
    REQUIRE(write_all(raw.get(), partial, sizeof partial) == 0);
    CHECK(wait_until([&] { return accepted(loop) == 1; }));
    REQUIRE(on_loop(loop, [] {}));
    CHECK(loop.free() == 0);
    CHECK(srv.ev.opens.load() == 0);
    CHECK(srv.ev.closes.load() == 1);
    CHECK(srv.ev.close_reason.load() == DUPLEX_ECANCELED);
  }
  SUBCASE("start_tls queued behind a write that cannot go: canceled once") {
    Loop loop;
    ConnEvents ev;
    auto sp = socket_pair();
    fill_send_buffer(sp.ours.get());
    auto o = ev.opts();
    duplex_conn *c = adopt(loop, sp.ours, &o);
    WriteCounter w, st;
    std::vector<uint8_t> big = pat(0, 256 * 1024, 2);
    REQUIRE(duplex_conn_write(c, big.data(), big.size(), WriteCounter::cb, &w) == 0);
    REQUIRE(duplex_conn_start_tls(c, ctls, "localhost", WriteCounter::cb, &st) == 0);
    // One upgrade at a time.
    CHECK(duplex_conn_start_tls(c, ctls, "localhost", WriteCounter::cb, &st) == DUPLEX_EBUSY);
    REQUIRE(duplex_conn_write(c, "after", 5, WriteCounter::cb, &w) == 0);
    REQUIRE(on_loop(loop, [] {}));
    CHECK(st.total.load() == 0);
    CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
    CHECK(ev.wait_closed());
    CHECK(wait_until([&] { return st.total.load() == 1 && w.total.load() == 2; }));
    CHECK(st.canceled.load() == 1);
    CHECK(w.canceled.load() == 2);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
    CHECK(st.total.load() == 1);
  }
}

// ===========================================================================
// 12. The handshake deadline
// ===========================================================================

TEST_CASE("handshake deadline: a peer that sends nothing -> DUPLEX_ETIMEDOUT, on_open never") {
  SUBCASE("server: a TCP client that connects and sends nothing") {
    duplex_tls_config sc = server_cfg();
    sc.handshake_timeout_ms = 200;
    Tls stls = make_tls(sc);
    Loop loop;
    TlsSide srv;
    Server L(loop, stls, srv.opts());
    Fd raw(tt::tcp_connect(L.port));
    CHECK(srv.ev.wait_closed());
    CHECK(srv.ev.opens.load() == 0);
    CHECK(srv.ev.close_reason.load() == DUPLEX_ETIMEDOUT);
    // The server closed the socket: the raw client reads EOF.
    char b;
    CHECK(::read(raw.get(), &b, 1) == 0);
    CHECK(loop.free() == 0);
  }
  SUBCASE("client: a TCP server that accepts and answers nothing") {
    duplex_tls_config cc = client_cfg();
    cc.handshake_timeout_ms = 200;
    Tls ctls = make_tls(cc);
    int port = 0;
    Fd lfd(tt::tcp_listen(&port));
    Loop loop;
    TlsSide cli;
    duplex_conn *c = connect_tls(loop, static_cast<uint16_t>(port), ctls, cli);
    WriteCounter w;
    REQUIRE(duplex_conn_write(c, "x", 1, WriteCounter::cb, &w) == 0);
    Fd peer(tt::tcp_accept(lfd.get()));
    CHECK(cli.ev.wait_closed());
    CHECK(cli.ev.opens.load() == 0);
    CHECK(cli.ev.close_reason.load() == DUPLEX_ETIMEDOUT);
    CHECK(wait_until([&] { return w.total.load() == 1; }));
    CHECK(w.ok.load() == 0);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
  }
}

// ===========================================================================
// 13. socat's OPENSSL address
// ===========================================================================

namespace {

std::string socat_prog() {
  std::string s = env_str("SOCAT_PROG");
  return s.empty() ? "socat" : s;
}

} // namespace

TEST_CASE("socat OPENSSL-LISTEN echo server, libduplex client") {
  if (!have_program(socat_prog())) {
    MESSAGE("socat not found: skipped");
    return;
  }
  std::string addr = "OPENSSL-LISTEN:0,bind=127.0.0.1,cert=" + std::string(certs().pem("server")) +
                     ",key=" + certs().key("server") + ",verify=0";
  tt::Proc socat({socat_prog(), "-d", "-d", addr, "PIPE"});
  uint16_t port = port_of(socat, "listening on AF=2 127.0.0.1:");
  Tls tls = make_tls(client_cfg());
  Loop loop;
  TlsSide s;
  const size_t kBytes = 200 * 1024;
  std::vector<uint8_t> out = pat(0, kBytes, 23);
  uint32_t crc_in = 0;
  s.ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) {
    crc_in = crc32_update(crc_in, d, n);
  };
  duplex_conn *c = connect_tls(loop, port, tls, s);
  WriteCounter w;
  for (size_t off = 0; off < kBytes; off += 8 * 1024)
    REQUIRE(duplex_conn_write(c, out.data() + off, 8 * 1024, WriteCounter::cb, &w) == 0);
  CHECK(s.ev.wait_bytes(kBytes));
  INFO(socat.output());
  CHECK(s.ev.bytes_read.load() == kBytes);
  CHECK(crc_in == crc32_update(0, out.data(), out.size()));
  CHECK(s.ev.opens.load() == 1);
  CHECK(std::string(s.info().peer_subject) == "CN=localhost");
  // Our close_notify ends socat's input; it ends its side and exits.
  REQUIRE(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
  CHECK(s.ev.wait_closed());
  CHECK(w.ok.load() == kBytes / (8 * 1024));
  int r = s.ev.close_reason.load();
  CHECK_MESSAGE((r == 0 || r == DUPLEX_ETLSTRUNC), err_str(r) << " " << s.close_err());
  MESSAGE("socat ended the stream with " << err_str(r));
  CHECK(s.ev.order_errors.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("socat OPENSSL client, libduplex echo server") {
  if (!have_program(socat_prog())) {
    MESSAGE("socat not found: skipped");
    return;
  }
  Tls tls = make_tls(server_cfg());
  Loop loop;
  TlsSide s;
  s.echo();
  Server L(loop, tls, s.opts());
  std::string addr = "OPENSSL:127.0.0.1:" + std::to_string(L.port) +
                     ",cafile=" + certs().pem("ca") + ",commonname=localhost";
  tt::Proc socat({socat_prog(), "-", addr});
  socat.send("hello through socat\n");
  CHECK_MESSAGE(socat.wait_for("hello through socat\n"), socat.output());
  socat.send("second line\n");
  CHECK_MESSAGE(socat.wait_for("second line\n"), socat.output());
  socat.close_stdin();
  CHECK(socat.wait_exit() == 0);
  CHECK(s.ev.wait_closed());
  CHECK(s.ev.opens.load() == 1);
  CHECK(s.ev.eofs.load() == 1);
  CHECK(s.ev.bytes_read.load() == 32);
  int r = s.ev.close_reason.load();
  CHECK_MESSAGE((r == 0 || r == DUPLEX_ECONNRESET || r == DUPLEX_EPIPE), err_str(r));
  CHECK(loop.free() == 0);
}

// ===========================================================================
// 14. Go's crypto/tls
// ===========================================================================

namespace {

std::string go_peer() {
  std::string p = env_str("TLS_PEER_GO");
  return have_program(p) ? p : "";
}

} // namespace

TEST_CASE("Go crypto/tls echo server, libduplex client: TLS 1.3 and 1.2, ALPN, close_notify both ways") {
  std::string go = go_peer();
  if (go.empty()) {
    MESSAGE("the Go peer was not built (no go): skipped");
    return;
  }
  static const char *const alpn[] = {"h2"};
  for (int v : {DUPLEX_TLS_V1_3, DUPLEX_TLS_V1_2}) {
    CAPTURE(v);
    std::vector<std::string> args = {go, "echo-server", "-cert", certs().pem("server"),
                                     "-key", certs().key("server"), "-alpn", "h2"};
    if (v == DUPLEX_TLS_V1_2)
      args.push_back("-tls12");
    tt::Proc peer(args);
    uint16_t port = port_of(peer, "PORT ");
    duplex_tls_config cc = client_cfg();
    cc.alpn = alpn;
    cc.alpn_count = 1;
    Tls tls = make_tls(cc);
    Loop loop;
    TlsSide s;
    const size_t kBytes = 1 << 20;
    std::vector<uint8_t> out = pat(0, kBytes, 25);
    uint32_t crc_in = 0;
    s.ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) {
      crc_in = crc32_update(crc_in, d, n);
    };
    duplex_conn *c = connect_tls(loop, port, tls, s);
    WriteCounter w;
    for (size_t off = 0; off < kBytes; off += 20 * 1024 + 7) {
      size_t n = std::min<size_t>(20 * 1024 + 7, kBytes - off);
      REQUIRE(duplex_conn_write(c, out.data() + off, n, WriteCounter::cb, &w) == 0);
    }
    REQUIRE(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
    std::string res = line_of(peer, "RESULT");
    INFO(peer.output());
    CHECK(res == "RESULT echoed=" + std::to_string(kBytes) + " end=clean");
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.bytes_read.load() == kBytes);
    CHECK(crc_in == crc32_update(0, out.data(), out.size()));
    CHECK(s.ev.eofs.load() == 1);
    CHECK(s.ev.close_reason.load() == 0);
    CHECK(s.info().version == v);
    CHECK(std::string(s.info().alpn) == "h2");
    CHECK(w.ok.load() == w.total.load());
    CHECK(s.ev.order_errors.load() == 0);
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
  }
}

TEST_CASE("Go crypto/tls client, libduplex echo server; Go server asking for a client certificate") {
  std::string go = go_peer();
  if (go.empty()) {
    MESSAGE("the Go peer was not built (no go): skipped");
    return;
  }
  SUBCASE("Go echo client") {
    Tls tls = make_tls(server_cfg());
    Loop loop;
    TlsSide s;
    s.echo();
    Server L(loop, tls, s.opts());
    tt::Proc peer({go, "echo-client", "-port", std::to_string(L.port), "-ca", certs().pem("ca"),
                   "-bytes", std::to_string(1 << 20)});
    std::string res = line_of(peer, "RESULT");
    INFO(peer.output());
    CHECK(res == "RESULT bytes=" + std::to_string(1 << 20) + " same=1 end=clean");
    CHECK(s.ev.wait_closed());
    CHECK(s.ev.eofs.load() == 1);
    CHECK(s.ev.close_reason.load() == 0);
    CHECK(s.info().version == DUPLEX_TLS_V1_3);
    CHECK(std::string(s.info().sni) == "localhost");
    CHECK(loop.free() == 0);
  }
  SUBCASE("Go server with RequireAndVerifyClientCert") {
    tt::Proc peer({go, "echo-server", "-cert", certs().pem("server"), "-key",
                   certs().key("server"), "-ca", certs().pem("ca"), "-mtls"});
    uint16_t port = port_of(peer, "PORT ");
    duplex_tls_config cc = client_cfg();
    cc.cert_file = certs().pem("client");
    cc.key_file = certs().key("client");
    Tls tls = make_tls(cc);
    Loop loop;
    TlsSide s;
    s.ev.keep_data = true;
    duplex_conn *c = connect_tls(loop, port, tls, s);
    REQUIRE(duplex_conn_write(c, "mutual", 6, nullptr, nullptr) == 0);
    REQUIRE(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
    CHECK(s.ev.wait_closed());
    INFO(peer.output());
    CHECK(s.ev.data() == "mutual");
    CHECK(s.ev.close_reason.load() == 0);
    CHECK(line_of(peer, "PEER") == "PEER client");
    CHECK(line_of(peer, "RESULT") == "RESULT echoed=6 end=clean");
    CHECK(duplex_conn_unref(c) == 0);
    CHECK(loop.free() == 0);
  }
}

// ===========================================================================
// 15. Bad input
// ===========================================================================

TEST_CASE("bad input: duplex_tls_new refuses bad configs with the documented codes") {
  REQUIRE(duplex_tls_backend() != nullptr);
  CHECK(contains(duplex_tls_backend(), "OpenSSL"));
  CHECK(duplex_tls_config_init(nullptr) == DUPLEX_EINVAL);
  duplex_tls_config a = DUPLEX_TLS_CONFIG_INIT, b;
  std::memset(&b, 0x5a, sizeof b);
  REQUIRE(duplex_tls_config_init(&b) == 0);
  CHECK(b.size == sizeof b);
  CHECK(b.role == a.role);
  CHECK(b.cert_file == nullptr);
  CHECK(b.ca_pem_len == 0);
  CHECK(b.verify == a.verify);
  CHECK(b.alpn_count == 0);
  CHECK(b.session_cache == 0);
  CHECK(b.keylog_file == nullptr);
  CHECK(b.handshake_timeout_ms == 0);

  auto attempt = [](const duplex_tls_config *c, std::string *err = nullptr) {
    duplex_tls *t = reinterpret_cast<duplex_tls *>(&t);
    char buf[512];
    std::memset(buf, 'x', sizeof buf);
    int rc = duplex_tls_new(&t, c, buf, sizeof buf);
    CHECK(std::memchr(buf, '\0', sizeof buf) != nullptr); // always terminated
    if (err != nullptr)
      *err = buf;
    if (rc == 0) {
      duplex_tls_unref(t);
      return 0;
    }
    return t == nullptr ? rc : 424242; // *out must be NULL on failure
  };
  duplex_tls *t = nullptr;
  duplex_tls_config ok = client_cfg();
  CHECK(duplex_tls_new(nullptr, &ok, nullptr, 0) == DUPLEX_EINVAL);
  CHECK(attempt(nullptr) == DUPLEX_EINVAL);
  CHECK(attempt(&ok) == 0);
  {
    duplex_tls_config c = ok;
    c.size = 0;
    CHECK(attempt(&c) == DUPLEX_EVERSION);
  }
  {
    duplex_tls_config c = DUPLEX_TLS_CONFIG_INIT; // no role
    CHECK(attempt(&c) == DUPLEX_EINVAL);
    c.role = 7;
    CHECK(attempt(&c) == DUPLEX_EINVAL);
  }
  {
    // Garbage in every field after size.
    duplex_tls_config c;
    std::memset(&c, 0xA7, sizeof c);
    c.size = sizeof c;
    c.cert_file = c.key_file = c.ca_file = c.ca_dir = nullptr;
    c.cert_pem = c.key_pem = c.ca_pem = nullptr;
    c.alpn = nullptr;
    c.keylog_file = nullptr;
    CHECK(attempt(&c) == DUPLEX_EINVAL);
  }
  {
    duplex_tls_config c = DUPLEX_TLS_CONFIG_INIT;
    c.role = DUPLEX_TLS_SERVER; // a server needs a certificate
    CHECK(attempt(&c) == DUPLEX_EINVAL);
  }
  {
    duplex_tls_config c = ok;
    c.verify = DUPLEX_TLS_VERIFY_REQUIRE; // a server setting
    CHECK(attempt(&c) == DUPLEX_EINVAL);
    c.verify = 99;
    CHECK(attempt(&c) == DUPLEX_EINVAL);
  }
  {
    duplex_tls_config c = ok;
    c.min_version = 0x0301; // TLS 1.0
    CHECK(attempt(&c) == DUPLEX_EINVAL);
    c.min_version = DUPLEX_TLS_V1_3;
    c.max_version = DUPLEX_TLS_V1_2; // min above max
    CHECK(attempt(&c) == DUPLEX_EINVAL);
  }
  {
    static const char *const empty[] = {""};
    static const char *const null_name[] = {nullptr};
    duplex_tls_config c = ok;
    c.alpn_count = 1; // NULL list
    CHECK(attempt(&c) == DUPLEX_EINVAL);
    c.alpn = empty;
    CHECK(attempt(&c) == DUPLEX_EINVAL);
    c.alpn = null_name;
    CHECK(attempt(&c) == DUPLEX_EINVAL);
    std::string long_name(256, 'p');
    const char *const too_long[] = {long_name.c_str()};
    c.alpn = too_long;
    CHECK(attempt(&c) == DUPLEX_EINVAL);
  }
  // Files and PEM that do not load: DUPLEX_ETLSCONFIG, with the reason.
  std::string err;
  {
    duplex_tls_config c = server_cfg();
    c.cert_file = "/nonexistent/duplex/cert.pem";
    CHECK(attempt(&c, &err) == DUPLEX_ETLSCONFIG);
    CHECK(err != "");
    MESSAGE("missing cert file: " << err);
  }
  {
    duplex_tls_config c = server_cfg();
    c.key_file = certs().key("client"); // not this certificate's key
    CHECK(attempt(&c, &err) == DUPLEX_ETLSCONFIG);
    CHECK(err != "");
    MESSAGE("mismatched key: " << err);
  }
  {
    duplex_tls_config c = server_cfg();
    c.key_file = certs().path("encrypted.key"); // under a passphrase
    CHECK(attempt(&c, &err) == DUPLEX_ETLSCONFIG);
    CHECK(err != "");
  }
  {
    duplex_tls_config c = ok;
    c.ca_file = "/nonexistent/duplex/ca.pem";
    CHECK(attempt(&c, &err) == DUPLEX_ETLSCONFIG);
    CHECK(err != "");
  }
  {
    duplex_tls_config c = DUPLEX_TLS_CONFIG_INIT;
    c.role = DUPLEX_TLS_SERVER;
    c.cert_pem = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n";
    c.key_pem = "garbage";
    CHECK(attempt(&c, &err) == DUPLEX_ETLSCONFIG);
    CHECK(err != "");
  }
  {
    // The same identity from memory works.
    std::string cert = tt::Certs::slurp(certs().pem("server"));
    std::string key = tt::Certs::slurp(certs().key("server"));
    std::string ca = tt::Certs::slurp(certs().pem("ca"));
    duplex_tls_config c = DUPLEX_TLS_CONFIG_INIT;
    c.role = DUPLEX_TLS_SERVER;
    c.cert_pem = cert.c_str();
    c.key_pem = key.data();
    c.key_pem_len = key.size();
    c.ca_pem = ca.c_str();
    CHECK(attempt(&c) == 0);
  }
  CHECK(duplex_tls_ref(nullptr) == DUPLEX_EINVAL);
  CHECK(duplex_tls_unref(nullptr) == DUPLEX_EINVAL);
  // References: the config outlives the caller's while a ref is held.
  REQUIRE(duplex_tls_new(&t, &ok, nullptr, 0) == 0);
  CHECK(duplex_tls_ref(t) == 0);
  CHECK(duplex_tls_unref(t) == 0);
  CHECK(duplex_tls_unref(t) == 0);
}

TEST_CASE("bad input: TLS options on conns and listeners, start_tls, info and error accessors") {
  Tls stls = make_tls(server_cfg()), ctls = make_tls(client_cfg());
  duplex_tls_config lax_cfg = client_cfg();
  lax_cfg.verify = DUPLEX_TLS_VERIFY_NONE;
  Tls lax = make_tls(lax_cfg);
  Loop loop;
  ConnEvents ev;

  // A server-role config on an outgoing conn.
  {
    duplex_conn_opts o = ev.opts();
    o.tls = stls;
    duplex_conn *c = reinterpret_cast<duplex_conn *>(&o);
    CHECK(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", 9, &o) == DUPLEX_EINVAL);
    CHECK(c == nullptr);
  }
  // A verifying client adopted without a host name to check.
  {
    auto sp = socket_pair();
    duplex_conn_opts o = ev.opts();
    o.tls = ctls;
    duplex_conn *c = reinterpret_cast<duplex_conn *>(&o);
    CHECK(duplex_conn_adopt(&c, loop, sp.ours.get(), &o) == DUPLEX_EINVAL);
    CHECK(c == nullptr);
    CHECK(fd_is_open(sp.ours.get())); // refused: still ours
  }
  // A listener takes TLS from its own opts, never from conn_opts.
  {
    duplex_conn_opts co = ev.opts();
    co.tls = stls;
    duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
    lo.conn_opts = &co;
    duplex_listener *l = reinterpret_cast<duplex_listener *>(&lo);
    CHECK(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == DUPLEX_EINVAL);
    CHECK(l == nullptr);
    // ... and only a server-role config.
    lo.conn_opts = nullptr;
    lo.tls = ctls;
    l = reinterpret_cast<duplex_listener *>(&lo);
    CHECK(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == DUPLEX_EINVAL);
    CHECK(l == nullptr);
  }

  // start_tls, info and error on a plain conn.
  auto sp = socket_pair();
  auto o = ev.opts();
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(ev.wait_open());
  duplex_tls_info i{};
  i.size = sizeof i;
  CHECK(duplex_conn_get_tls_info(c, &i) == DUPLEX_ENOTSUP);
  CHECK(duplex_conn_get_tls_info(c, nullptr) == DUPLEX_EINVAL);
  CHECK(duplex_conn_get_tls_info(nullptr, &i) == DUPLEX_EINVAL);
  duplex_tls_info z{};
  CHECK(duplex_conn_get_tls_info(c, &z) == DUPLEX_EVERSION);
  char buf[64];
  std::memset(buf, 'x', sizeof buf);
  CHECK(duplex_conn_get_tls_error(c, buf, sizeof buf) == 0);
  CHECK(std::string(buf) == "");
  CHECK(duplex_conn_get_tls_error(nullptr, buf, sizeof buf) == DUPLEX_EINVAL);
  CHECK(duplex_conn_get_tls_error(c, nullptr, 10) == DUPLEX_EINVAL);
  CHECK(duplex_conn_start_tls(nullptr, ctls, "localhost", nullptr, nullptr) == DUPLEX_EINVAL);
  CHECK(duplex_conn_start_tls(c, nullptr, "localhost", nullptr, nullptr) == DUPLEX_EINVAL);
  // An adopted conn has no connect host: a verifying client needs one.
  CHECK(duplex_conn_start_tls(c, ctls, nullptr, nullptr, nullptr) == DUPLEX_EINVAL);
  // Twice: the second is refused while the first is queued.
  WriteCounter st;
  CHECK(duplex_conn_start_tls(c, lax, nullptr, WriteCounter::cb, &st) == 0);
  CHECK(duplex_conn_start_tls(c, lax, nullptr, WriteCounter::cb, &st) == DUPLEX_EBUSY);
  CHECK(duplex_conn_start_tls(c, stls, nullptr, WriteCounter::cb, &st) == DUPLEX_EBUSY);
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] { return st.total.load() == 1; }));
  CHECK(st.ok.load() == 0);
  CHECK(duplex_conn_start_tls(c, lax, nullptr, nullptr, nullptr) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_unref(c) == 0);

  // After a shutdown an upgrade cannot begin.
  ConnEvents ev2;
  auto sp2 = socket_pair();
  auto o2 = ev2.opts();
  duplex_conn *c2 = adopt(loop, sp2.ours, &o2);
  CHECK(duplex_conn_shutdown(c2, nullptr, nullptr) == 0);
  CHECK(duplex_conn_start_tls(c2, lax, nullptr, nullptr, nullptr) == DUPLEX_ESHUTDOWN);
  CHECK(duplex_conn_close(c2, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev2.wait_closed());
  CHECK(duplex_conn_unref(c2) == 0);

  // A TLS conn: EBUSY for an upgrade; a too-small error buffer: ENOBUFS
  // and a terminated prefix.
  TlsSide srv, cli;
  Server L(loop, stls, srv.opts());
  duplex_conn *t = connect_tls(loop, L.port, ctls, cli);
  REQUIRE(cli.ev.wait_open());
  REQUIRE(cli.ev.opens.load() == 1);
  CHECK(duplex_conn_start_tls(t, ctls, "localhost", nullptr, nullptr) == DUPLEX_EBUSY);
  CHECK(duplex_conn_close(t, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(cli.ev.wait_closed());
  CHECK(duplex_conn_unref(t) == 0);

  // A failed handshake leaves a reason: read it through a small buffer.
  Tls wrong = make_tls(server_cfg("wronghost"));
  TlsSide srv3, cli3;
  Server L3(loop, wrong, srv3.opts());
  duplex_conn *f = connect_tls(loop, L3.port, ctls, cli3);
  CHECK(cli3.ev.wait_closed());
  CHECK(cli3.ev.close_reason.load() == DUPLEX_ETLSVERIFY);
  std::string full = tls_error(f);
  REQUIRE(full.size() > 4);
  char small[5];
  CHECK(duplex_conn_get_tls_error(f, small, sizeof small) == DUPLEX_ENOBUFS);
  CHECK(std::string(small) == full.substr(0, 4));
  duplex_tls_info fi{};
  fi.size = sizeof fi;
  int firc = duplex_conn_get_tls_info(f, &fi);
  CHECK_MESSAGE((firc == DUPLEX_ECLOSED || firc == DUPLEX_ENOTCONN), err_str(firc));
  CHECK(duplex_conn_unref(f) == 0);
  CHECK(loop.free() == 0);
}
