// The C++ layer's TLS: duplex::Tls (loading, errors, copies), TLS conns
// made by Conn::connect_tcp / adopt (ConnOptions::tls) and by listeners
// (ListenerOptions::tls), STARTTLS (ConnRef::start_tls, async_start_tls),
// tls_info() and tls_error(); with callbacks and with coroutines, whose
// reads and writes are unchanged on TLS conns.
//
// Certificates are made once per process by the openssl command
// ($OPENSSL_PROG, else from PATH) in a temporary directory. Every conn is
// on loopback or a socketpair. Time appears only as a hang guard.
#include <duplex/duplex.hpp>

#include "fixture.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using dtest::kGuard;
using duplex::errc;

// ---- certificates --------------------------------------------------------

//   ca, otherca   two CAs; only ca is trusted by the clients here
//   server        CN=localhost, SAN DNS:localhost IP:127.0.0.1, by ca
//   client        CN=client, clientAuth, by ca
//   untrusted     like server, by otherca
class Certs {
public:
  static const Certs &get() {
    static Certs c;
    return c;
  }
  std::string pem(const char *name) const { return dir_.file(std::string(name) + ".pem"); }
  std::string key(const char *name) const { return dir_.file(std::string(name) + ".key"); }
  static std::string slurp(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

private:
  Certs() {
    std::ofstream(dir_.file("gen.sh")) << kScript;
    std::string cmd = "cd '" + dir_.path() + "' && sh ./gen.sh >gen.log 2>&1";
    if (std::system(cmd.c_str()) != 0)
      FAIL("openssl could not make the test certificates: "
           << slurp(dir_.file("gen.log")));
  }
  dtest::TempDir dir_;

  static constexpr const char *kScript = R"SH(set -e
O="${OPENSSL_PROG:-openssl}"
cat > ext.cnf <<'EOF'
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[server_ext]
basicConstraints = CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client_ext]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
EOF
newkey() { "$O" genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key"; }
ca() {
  newkey "$1"
  "$O" req -x509 -new -key "$1.key" -subj "/CN=$2" -days 3650 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$1.pem"
}
leaf() { # name CN issuer extensions
  newkey "$1"
  "$O" req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  "$O" x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -CAcreateserial \
    -days 3650 -extfile ext.cnf -extensions "$4" -out "$1.pem"
}
ca ca "duplex cpp test CA"
ca otherca "duplex cpp other CA"
leaf server localhost ca server_ext
leaf client client ca client_ext
leaf untrusted localhost otherca server_ext
)SH";
};

duplex::Tls server_tls() {
  const auto &c = Certs::get();
  return duplex::Tls(duplex::TlsConfig::server(c.pem("server"), c.key("server")));
}
duplex::Tls client_tls() {
  return duplex::Tls(duplex::TlsConfig::client(Certs::get().pem("ca")));
}

// ---- helpers -------------------------------------------------------------

// A hang guard for loop.run(): stops the loop and fails if it fires.
struct Guard {
  duplex::Timer t;
  explicit Guard(duplex::Loop &loop)
      : t(loop, [&loop] {
          FAIL_CHECK("hang guard fired");
          loop.stop();
        }) {
    t.start(kGuard);
  }
};

std::string pattern(size_t n, size_t seed = 0) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i++)
    s[i] = static_cast<char>('a' + (i * 7 + seed) % 26);
  return s;
}

bool contains(const std::string &hay, const std::string &needle) {
  return hay.find(needle) != std::string::npos;
}

// A coroutine echo: every chunk back until EOF, then half-close.
duplex::task<void> echo(duplex::Conn c, int *finished) {
  for (;;) {
    auto r = co_await c.read();
    if (!r.ok())
      break;
    auto ec = co_await c.async_write(r.data);
    if (ec)
      break;
  }
  std::error_code ec;
  c.shutdown(ec);
  ++*finished;
}

} // namespace

// ---------------------------------------------------------------------------
// duplex::Tls
// ---------------------------------------------------------------------------

TEST_CASE("duplex::Tls loads a configuration; copies share it") {
  REQUIRE(duplex::Tls::available());
  CHECK_FALSE(duplex::Tls::backend().empty());
  duplex::Tls empty;
  CHECK_FALSE(empty);
  CHECK(empty.native() == nullptr);

  duplex::Tls s = server_tls();
  REQUIRE(s);
  duplex::Tls copy = s; // a reference, the same C object
  CHECK(copy.native() == s.native());
  duplex::Tls moved = std::move(s);
  CHECK_FALSE(s);
  CHECK(moved.native() == copy.native());
  moved = {};
  CHECK(copy); // still valid: its own reference

  // From PEM text instead of files.
  const auto &c = Certs::get();
  duplex::TlsConfig cfg;
  cfg.role = duplex::TlsRole::server;
  cfg.cert_pem = Certs::slurp(c.pem("server"));
  cfg.key_pem = Certs::slurp(c.key("server"));
  CHECK(duplex::Tls(cfg));
  duplex::TlsConfig cli;
  cli.ca_pem = Certs::slurp(c.pem("ca"));
  cli.alpn = {"h2", "http/1.1"};
  cli.min_version = duplex::TlsVersion::v1_3;
  cli.handshake_timeout = 5s;
  CHECK(duplex::Tls(cli));

  // Shared with C: Tls::ref takes a reference of its own.
  duplex::Tls shared = duplex::Tls::ref(copy.native());
  CHECK(shared.native() == copy.native());
}

TEST_CASE("duplex::Tls throws duplex::error with the library's reason") {
  const auto &c = Certs::get();
  SUBCASE("a certificate file that does not exist: DUPLEX_ETLSCONFIG") {
    try {
      duplex::Tls t(duplex::TlsConfig::server(c.pem("missing"), c.key("server")));
      FAIL("no exception");
    } catch (const duplex::error &e) {
      CHECK(e.code() == errc::DUPLEX_ETLSCONFIG);
      std::string what = e.what();
      CHECK(contains(what, "duplex_tls_new: "));
      // The reason follows, and then the code's message.
      CHECK(what.size() > std::string("duplex_tls_new: ").size() +
                              std::string(duplex_strerror(DUPLEX_ETLSCONFIG)).size());
    }
  }
  SUBCASE("a key that does not match the certificate: DUPLEX_ETLSCONFIG") {
    CHECK_THROWS_AS(duplex::Tls(duplex::TlsConfig::server(c.pem("server"),
                                                          c.key("client"))),
                    duplex::error);
    std::error_code ec;
    std::string why;
    auto t = duplex::Tls::make(duplex::TlsConfig::server(c.pem("server"),
                                                         c.key("client")),
                               ec, &why);
    CHECK_FALSE(t);
    CHECK(ec == errc::DUPLEX_ETLSCONFIG);
    CHECK_FALSE(why.empty());
  }
  SUBCASE("a server without a certificate: DUPLEX_EINVAL") {
    std::error_code ec;
    duplex::TlsConfig cfg;
    cfg.role = duplex::TlsRole::server;
    auto t = duplex::Tls::make(cfg, ec);
    CHECK_FALSE(t);
    CHECK(ec == errc::DUPLEX_EINVAL);
    CHECK(ec == std::errc::invalid_argument);
  }
}

// ---------------------------------------------------------------------------
// Callbacks
// ---------------------------------------------------------------------------

TEST_CASE("callbacks: a C++ client and a C++ server echo over TLS, with close_notify at the end") {
  duplex::Loop loop;
  Guard g(loop);
  const std::string payload = pattern(300 * 1024, 1);
  std::string server_got, echoed;
  std::optional<duplex::TlsInfo> sinfo, cinfo;
  int closed = 0, server_eofs = 0, client_eofs = 0;
  std::error_code server_why = errc::DUPLEX_EUNKNOWN,
                  client_why = errc::DUPLEX_EUNKNOWN;
  std::string server_tls_error = "unset";
  auto finish = [&] {
    if (++closed == 2)
      loop.stop();
  };

  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open = [&](duplex::ConnRef c) { sinfo = c.tls_info(); },
       .on_read =
           [&](duplex::ConnRef c, std::span<const std::byte> b) {
             server_got.append(reinterpret_cast<const char *>(b.data()), b.size());
             (void)c.write(b);
           },
       .on_eof =
           [&](duplex::ConnRef c) {
             server_eofs++;
             c.shutdown(); // close_notify after the echoes
           },
       .on_close =
           [&](duplex::ConnRef c, std::error_code why) {
             server_why = why;
             server_tls_error = c.tls_error();
             finish();
           }},
      {}, {.tls = server_tls()});

  auto c = duplex::Conn::connect_tcp(
      loop, "localhost", l.port(),
      {.on_open =
           [&](duplex::ConnRef cr) {
             cinfo = cr.tls_info();
             (void)cr.write(payload);
             cr.shutdown(); // close_notify after the payload
           },
       .on_read =
           [&](duplex::ConnRef, std::span<const std::byte> b) {
             echoed.append(reinterpret_cast<const char *>(b.data()), b.size());
           },
       .on_eof = [&](duplex::ConnRef) { client_eofs++; },
       .on_close =
           [&](duplex::ConnRef, std::error_code why) {
             client_why = why;
             finish();
           }},
      {.tls = client_tls()}); // verifies "localhost", the host connected to
  loop.run();

  CHECK(server_got == payload);
  CHECK(echoed == payload);
  CHECK(server_eofs == 1); // the client's close_notify
  CHECK(client_eofs == 1); // the server's
  CHECK_FALSE(server_why);
  CHECK_FALSE(client_why);
  CHECK(server_tls_error.empty());
  CHECK(c.tls_error().empty());
  REQUIRE(sinfo);
  REQUIRE(cinfo);
  CHECK(cinfo->version == sinfo->version);
  CHECK((cinfo->version == duplex::TlsVersion::v1_2 ||
         cinfo->version == duplex::TlsVersion::v1_3));
  CHECK(contains(cinfo->version_name, "TLS"));
  CHECK_FALSE(cinfo->cipher.empty());
  CHECK(cinfo->cipher == sinfo->cipher);
  CHECK(cinfo->alpn.empty());
  CHECK(sinfo->sni == "localhost");
  CHECK(cinfo->peer_cert);
  CHECK(contains(cinfo->peer_subject, "CN=localhost"));
  CHECK_FALSE(sinfo->peer_cert);
  CHECK(sinfo->peer_subject.empty());
  CHECK_FALSE(cinfo->resumed);
  // Once closed, the info is gone but the reason stays readable.
  std::error_code ec;
  (void)c.tls_info(ec);
  CHECK(ec == errc::DUPLEX_ECLOSED);
}

TEST_CASE("callbacks: a failed verification closes the client with DUPLEX_ETLSVERIFY, and on_open never runs") {
  const auto &certs = Certs::get();
  std::string server_cert = certs.pem("server"), server_key = certs.key("server");
  std::string host;
  SUBCASE("a server certificate from a CA the client does not trust") {
    server_cert = certs.pem("untrusted");
    server_key = certs.key("untrusted");
  }
  SUBCASE("a host name the server certificate does not name") {
    host = "wrong.example";
  }
  duplex::Loop loop;
  Guard g(loop);
  int opens = 0, closed = 0;
  std::error_code client_why, server_why;
  std::string client_tls_error;
  auto finish = [&] {
    if (++closed == 2)
      loop.stop();
  };
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open = [&](duplex::ConnRef) { opens++; },
       .on_close =
           [&](duplex::ConnRef, std::error_code why) {
             server_why = why;
             finish();
           }},
      {},
      {.tls = duplex::Tls(duplex::TlsConfig::server(server_cert, server_key))});
  auto c = duplex::Conn::connect_tcp(
      loop, "127.0.0.1", l.port(),
      {.on_open = [&](duplex::ConnRef) { opens++; },
       .on_close =
           [&](duplex::ConnRef cr, std::error_code why) {
             client_why = why;
             client_tls_error = cr.tls_error();
             finish();
           }},
      {.tls = client_tls(), .tls_host = host.empty() ? "localhost" : host});
  loop.run();
  CHECK(opens == 0);
  CHECK(client_why == errc::DUPLEX_ETLSVERIFY);
  CHECK(client_why.message() == duplex_strerror(DUPLEX_ETLSVERIFY));
  CHECK_FALSE(client_tls_error.empty());
  CHECK(c.tls_error() == client_tls_error); // readable after the close too
  CHECK(contains(client_tls_error, "verif"));
  CHECK(server_why); // the client's alert, or the transport going
}

TEST_CASE("callbacks: mutual TLS and ALPN, as tls_info() reports them") {
  const auto &certs = Certs::get();
  duplex::TlsConfig scfg = duplex::TlsConfig::server(certs.pem("server"),
                                                     certs.key("server"));
  scfg.verify = duplex::TlsVerify::require;
  scfg.ca_file = certs.pem("ca");
  scfg.alpn = {"x-duplex", "http/1.1"};
  duplex::TlsConfig ccfg = duplex::TlsConfig::client(certs.pem("ca"));
  ccfg.cert_file = certs.pem("client");
  ccfg.key_file = certs.key("client");
  ccfg.alpn = {"http/1.1", "x-duplex"};

  duplex::Loop loop;
  Guard g(loop);
  std::optional<duplex::TlsInfo> sinfo, cinfo;
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open =
           [&](duplex::ConnRef c) {
             sinfo = c.tls_info();
             if (cinfo)
               loop.stop();
           }},
      {}, {.tls = duplex::Tls(scfg)});
  auto c = duplex::Conn::connect_tcp(
      loop, "127.0.0.1", l.port(),
      {.on_open =
           [&](duplex::ConnRef cr) {
             cinfo = cr.tls_info();
             if (sinfo)
               loop.stop();
           }},
      {.tls = duplex::Tls(ccfg), .tls_host = "localhost"});
  loop.run();
  REQUIRE(sinfo);
  REQUIRE(cinfo);
  CHECK(sinfo->alpn == "x-duplex"); // the server's preference
  CHECK(cinfo->alpn == "x-duplex");
  CHECK(sinfo->peer_cert);
  CHECK(contains(sinfo->peer_subject, "CN=client"));
  CHECK(contains(cinfo->peer_subject, "CN=localhost"));
  c.close();
}

// ---------------------------------------------------------------------------
// Coroutines
// ---------------------------------------------------------------------------

TEST_CASE("coroutines: read() and async_write() echo 1 MiB over TLS unchanged") {
  duplex::Loop loop;
  Guard g(loop);
  const std::string payload = pattern(1 << 20, 2);
  int echoes_finished = 0;
  std::string got;
  std::optional<duplex::TlsInfo> info;
  std::error_code write_ec = errc::DUPLEX_EUNKNOWN;
  bool client_eof = false;

  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open =
           [&](duplex::ConnRef c) {
             duplex::spawn(loop, echo(duplex::Conn(c), &echoes_finished));
           }},
      {}, {.tls = server_tls()});
  // No handlers: the conn's bytes go to read(). The writes are made before
  // the handshake is done: they are encrypted after it, in order.
  auto c = duplex::Conn::connect_tcp(loop, "127.0.0.1", l.port(), {},
                                     {.tls = client_tls(), .tls_host = "localhost"});
  auto client = [&](duplex::Conn conn) -> duplex::task<void> {
    write_ec = co_await conn.async_write(payload);
    info = conn.tls_info();
    conn.shutdown();
    for (;;) {
      auto r = co_await conn.read();
      if (!r.ok()) {
        client_eof = r.eof;
        break;
      }
      got.append(r.data);
    }
    loop.stop();
  };
  duplex::spawn(loop, client(c));
  loop.run();
  CHECK_FALSE(write_ec);
  CHECK(client_eof);
  CHECK(got.size() == payload.size());
  CHECK(got == payload);
  CHECK(echoes_finished == 1);
  REQUIRE(info);
  CHECK(contains(info->peer_subject, "CN=localhost"));
}

TEST_CASE("coroutines: framing works on the decrypted stream") {
  duplex::Loop loop;
  Guard g(loop);
  std::vector<std::string> frames;
  duplex::ConnOptions so;
  so.framing = duplex::Framing::length_prefix(4);
  auto server = [&](duplex::Conn conn) -> duplex::task<void> {
    for (;;) {
      auto r = co_await conn.read();
      if (!r.ok())
        break;
      frames.emplace_back(r.data);
      (void)conn.write_frame("ack:" + std::string(r.data));
    }
    conn.shutdown();
  };
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open = [&](duplex::ConnRef c) { duplex::spawn(loop, server(duplex::Conn(c))); }},
      so, {.tls = server_tls()});
  duplex::ConnOptions co;
  co.framing = duplex::Framing::length_prefix(4);
  co.tls = client_tls();
  co.tls_host = "localhost";
  auto c = duplex::Conn::connect_tcp(loop, "127.0.0.1", l.port(), {}, co);
  std::vector<std::string> acks;
  auto client = [&](duplex::Conn conn) -> duplex::task<void> {
    (void)conn.write_frame("one");
    (void)conn.write_frame(pattern(100000, 5));
    (void)conn.write_frame("");
    conn.shutdown();
    for (;;) {
      auto r = co_await conn.read();
      if (!r.ok())
        break;
      acks.emplace_back(r.data);
    }
    loop.stop();
  };
  duplex::spawn(loop, client(c));
  loop.run();
  CHECK(frames == std::vector<std::string>{"one", pattern(100000, 5), ""});
  CHECK(acks == std::vector<std::string>{"ack:one", "ack:" + pattern(100000, 5), "ack:"});
}

TEST_CASE("coroutines: a failed handshake resumes a waiting read() with DUPLEX_ETLSVERIFY") {
  const auto &certs = Certs::get();
  duplex::Loop loop;
  Guard g(loop);
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0, {}, {},
      {.tls = duplex::Tls(duplex::TlsConfig::server(certs.pem("untrusted"),
                                                    certs.key("untrusted")))});
  auto c = duplex::Conn::connect_tcp(loop, "127.0.0.1", l.port(), {},
                                     {.tls = client_tls(), .tls_host = "localhost"});
  std::optional<duplex::ReadResult> got;
  std::error_code write_ec;
  bool write_done = false;
  // A write queued before the handshake fails with it.
  (void)c.write(std::as_bytes(std::span(std::string_view("never sent"))),
                [&](std::error_code e) {
                  write_ec = e;
                  write_done = true;
                });
  auto client = [&](duplex::Conn conn) -> duplex::task<void> {
    got = co_await conn.read(); // resumes inside on_close, with its reason
    loop.stop();
  };
  duplex::spawn(loop, client(c));
  loop.run();
  for (int i = 0; i < 1000 && !write_done; i++)
    loop.run_nowait();
  CHECK(write_done);
  REQUIRE(got);
  CHECK_FALSE(got->ok());
  CHECK_FALSE(got->eof);
  CHECK(got->error == errc::DUPLEX_ETLSVERIFY);
  CHECK(write_ec); // the conn closed before the bytes could go
  CHECK(contains(c.tls_error(), "verif"));
}

TEST_CASE("coroutines: a LoopGroup listener serves TLS on every member loop") {
  duplex::LoopGroup group(2);
  std::atomic<int> served{0};
  auto server = [&served](duplex::Conn c) -> duplex::task<void> {
    for (;;) {
      auto r = co_await c.read();
      if (!r.ok())
        break;
      co_await c.async_write(r.data);
    }
    c.shutdown();
    served++;
  };
  auto l = duplex::Listener::tcp(
      group, "127.0.0.1", 0,
      {.on_open =
           [&](duplex::ConnRef c) {
             duplex::spawn(group.loop_of(c), server(duplex::Conn(c)));
           }},
      {}, {.tls = server_tls()});

  duplex::Loop loop;
  Guard g(loop);
  constexpr int kClients = 6;
  int done = 0;
  std::vector<std::string> got(kClients);
  auto client = [&](duplex::Conn c, int i) -> duplex::task<void> {
    const std::string msg = pattern(20000 + static_cast<size_t>(i), static_cast<size_t>(i));
    co_await c.async_write(msg);
    c.shutdown();
    for (;;) {
      auto r = co_await c.read();
      if (!r.ok())
        break;
      got[static_cast<size_t>(i)].append(r.data);
    }
    if (++done == kClients)
      loop.stop();
  };
  std::vector<duplex::Conn> conns;
  for (int i = 0; i < kClients; i++) {
    conns.push_back(duplex::Conn::connect_tcp(
        loop, "127.0.0.1", l.port(), {},
        {.tls = client_tls(), .tls_host = "localhost"}));
    duplex::spawn(loop, client(conns.back(), i));
  }
  loop.run();
  for (int i = 0; i < kClients; i++)
    CHECK(got[static_cast<size_t>(i)] ==
          pattern(20000 + static_cast<size_t>(i), static_cast<size_t>(i)));
  CHECK(dtest::wait_until([&] { return served.load() == kClients; }));
  group.rethrow();
  l.close();
  group.close(); // before the coroutines' closure and counter go
}

TEST_CASE("a TLS listener closed while a client is mid-handshake: the conn finishes with the listener's handlers") {
  duplex::Loop loop;
  Guard g(loop);
  int opens = 0, closes = 0;
  std::string got;
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open = [&](duplex::ConnRef) { opens++; },
       .on_read =
           [&](duplex::ConnRef c, std::span<const std::byte> b) {
             got.append(reinterpret_cast<const char *>(b.data()), b.size());
             c.shutdown();
           },
       .on_close =
           [&](duplex::ConnRef, std::error_code) {
             closes++;
             loop.stop();
           }},
      {}, {.tls = server_tls()});
  // A plain socket connects: the server accepts it and waits for its
  // ClientHello, which nobody sends yet.
  dtest::Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd.get() >= 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(l.port());
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
  auto accepted = [&] {
    duplex_loop_stats st = DUPLEX_LOOP_STATS_INIT;
    return duplex_loop_get_stats(loop.native(), &st) == 0 && st.accepted == 1;
  };
  for (int i = 0; i < 100000 && !accepted(); i++)
    loop.run_nowait();
  REQUIRE(accepted());
  l.close();
  for (int i = 0; i < 10; i++)
    loop.run_nowait(); // whatever the close left to the loop runs now
  // The socket becomes a TLS client: the server's handshake completes now.
  auto c = duplex::Conn::adopt(
      loop, fd.release(),
      {.on_open =
           [](duplex::ConnRef cr) {
             (void)cr.write("late");
             cr.shutdown();
           }},
      {.tls = client_tls(), .tls_host = "localhost"});
  loop.run();
  CHECK(opens == 1);
  CHECK(got == "late");
  CHECK(closes == 1);
  c.close(true);
}

// ---------------------------------------------------------------------------
// STARTTLS
// ---------------------------------------------------------------------------

namespace {

// The server side of a small STARTTLS protocol: "STARTTLS\n" in plaintext,
// "GO\n" back, then TLS; echoes one message over TLS and finishes. The
// "GO\n" write is queued before start_tls, in the same callback, so no
// byte can be read in between: the client's ClientHello comes after it.
duplex::task<void> starttls_server(duplex::Conn conn, duplex::Tls tls,
                                   std::string *log) {
  auto r = co_await conn.read();
  if (!r.ok() || r.data != "STARTTLS\n")
    co_return;
  *log += "plain:" + std::string(r.data);
  std::error_code ec;
  (void)conn.tls_info(ec);
  *log += ec == errc::DUPLEX_ENOTSUP ? "notls;" : "tls?;";
  (void)conn.write("GO\n");
  ec = co_await conn.async_start_tls(std::move(tls));
  if (ec) {
    *log += "failed:" + ec.message();
    co_return;
  }
  *log += "up:" + conn.tls_info().version_name + ";";
  for (;;) {
    auto m = co_await conn.read();
    if (!m.ok())
      break;
    *log += "tls:" + std::string(m.data) + ";";
    co_await conn.async_write(m.data);
  }
  conn.shutdown();
}

} // namespace

TEST_CASE("start_tls upgrades a plaintext conn: coroutine server, callback or coroutine client") {
  bool callback_client = false;
  SUBCASE("client: co_await async_start_tls") {}
  SUBCASE("client: start_tls with a callback") { callback_client = true; }

  duplex::Loop loop;
  Guard g(loop);
  std::string server_log;
  duplex::Tls stls = server_tls();
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open =
           [&](duplex::ConnRef c) {
             duplex::spawn(loop, starttls_server(duplex::Conn(c), stls, &server_log));
           }});
  auto c = duplex::Conn::connect_tcp(loop, "127.0.0.1", l.port());
  std::string client_log;
  std::optional<duplex::TlsInfo> info;
  auto client = [&](duplex::Conn conn) -> duplex::task<void> {
    co_await conn.async_write("STARTTLS\n");
    auto r = co_await conn.read();
    if (!r.ok() || r.data != "GO\n") {
      client_log += "no GO";
      loop.stop();
      co_return;
    }
    std::error_code ec;
    if (callback_client) {
      // The callback form: wait for it in a sleep loop (the handshake runs
      // meanwhile); exactly one call.
      int calls = 0;
      conn.start_tls(client_tls(), "localhost", [&](std::error_code e) {
        ec = e;
        calls++;
      });
      while (calls == 0)
        if (co_await loop.sleep(1ms))
          co_return; // the loop went
      CHECK(calls == 1);
    } else {
      ec = co_await conn.async_start_tls(client_tls(), "localhost");
    }
    if (ec) {
      client_log += "failed:" + ec.message() + ":" + conn.tls_error();
      loop.stop();
      co_return;
    }
    info = conn.tls_info();
    co_await conn.async_write("over tls");
    auto m = co_await conn.read();
    client_log += std::string(m.data);
    conn.shutdown();
    auto end = co_await conn.read();
    if (end.eof)
      client_log += ";eof";
    loop.stop();
  };
  duplex::spawn(loop, client(c));
  loop.run();
  CHECK(client_log == "over tls;eof");
  CHECK(contains(server_log, "plain:STARTTLS\nnotls;up:TLSv1."));
  CHECK(contains(server_log, "tls:over tls;"));
  REQUIRE(info);
  CHECK(contains(info->peer_subject, "CN=localhost"));
  CHECK(info->peer_cert);
}

TEST_CASE("start_tls is refused on a TLS conn (EBUSY), a closed one (ECLOSED), and without a host to verify (EINVAL)") {
  duplex::Loop loop;
  Guard g(loop);
  duplex::Tls ctls = client_tls();
  SUBCASE("an upgrade already queued, or a conn that is TLS already") {
    auto sp = dtest::socket_pair();
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    c.start_tls(ctls, "localhost");
    try {
      c.start_tls(ctls, "localhost");
      FAIL("no exception");
    } catch (const duplex::error &e) {
      CHECK(e.code() == errc::DUPLEX_EBUSY);
    }
    std::error_code ec;
    auto tc = duplex::Conn::adopt(loop, sp.peer.release(), {},
                                  {.tls = ctls, .tls_host = "localhost"});
    tc.start_tls(ctls, "localhost", ec);
    CHECK(ec == errc::DUPLEX_EBUSY);
    c.close(true);
    tc.close(true);
  }
  SUBCASE("a closed conn; the awaitable resumes at once with the code") {
    auto sp = dtest::socket_pair();
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    c.close(true);
    loop.run_nowait();
    std::error_code ec;
    c.start_tls(ctls, "localhost", ec);
    CHECK(ec == errc::DUPLEX_ECLOSED);
    std::error_code awaited = errc::DUPLEX_EUNKNOWN;
    auto t = [&]() -> duplex::task<void> {
      awaited = co_await c.async_start_tls(ctls, "localhost");
      loop.stop();
    };
    duplex::spawn(loop, t());
    loop.run();
    CHECK(awaited == errc::DUPLEX_ECLOSED);
  }
  SUBCASE("a verifying client with no host (an adopted conn)") {
    auto sp = dtest::socket_pair();
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    CHECK_THROWS_AS(c.start_tls(ctls), duplex::error);
    std::error_code ec;
    c.start_tls(ctls, "", ec);
    CHECK(ec == errc::DUPLEX_EINVAL);
    c.close(true);
  }
  SUBCASE("no configuration") {
    auto sp = dtest::socket_pair();
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    std::error_code ec;
    c.start_tls(duplex::Tls(), "localhost", ec);
    CHECK(ec == errc::DUPLEX_EINVAL);
    c.close(true);
  }
  loop.run_nowait();
}

TEST_CASE("a plain conn has no TLS info and no TLS error") {
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  std::error_code ec;
  (void)c.tls_info(ec);
  CHECK(ec == errc::DUPLEX_ENOTSUP);
  CHECK_THROWS_AS((void)c.tls_info(), duplex::error);
  CHECK(c.tls_error().empty());
  c.close(true);
  loop.run_nowait();
}

// ---------------------------------------------------------------------------
// Truncation
// ---------------------------------------------------------------------------

TEST_CASE("a transport EOF without close_notify closes the conn with DUPLEX_ETLSTRUNC, never as EOF") {
  duplex::Loop loop;
  Guard g(loop);
  auto sp = dtest::socket_pair();
  // A second descriptor of the client's socket: shutting it down ends the
  // transport under the client's TLS, with no close_notify.
  dtest::Fd spare(::dup(sp.peer.get()));
  REQUIRE(spare.get() >= 0);

  int server_eofs = 0;
  std::error_code server_why;
  std::string server_tls_error;
  std::optional<duplex::ReadResult> server_read;
  auto server = duplex::Conn::adopt(
      loop, sp.ours.release(),
      {.on_eof = [&](duplex::ConnRef) { server_eofs++; },
       .on_close =
           [&](duplex::ConnRef c, std::error_code why) {
             server_why = why;
             server_tls_error = c.tls_error();
           }});
  server.start_tls(server_tls()); // the server role needs no host
  auto reader = [&](duplex::Conn conn) -> duplex::task<void> {
    std::string data;
    for (;;) {
      auto r = co_await conn.read();
      if (!r.ok()) {
        server_read = std::move(r);
        break;
      }
      data.append(r.data);
    }
    CHECK(data == "before the cut");
    loop.stop();
  };
  duplex::spawn(loop, reader(server));

  // Once "before the cut" is with the kernel (an empty async_write waits
  // for what was queued before it), cut the transport.
  auto cutter = [&](duplex::Conn conn) -> duplex::task<void> {
    co_await conn.async_write("");
    ::shutdown(spare.get(), SHUT_WR);
  };
  auto client = duplex::Conn::adopt(
      loop, sp.peer.release(),
      {.on_open =
           [&](duplex::ConnRef c) {
             (void)c.write("before the cut");
             duplex::spawn(loop, cutter(duplex::Conn(c)));
           }},
      {.tls = client_tls(), .tls_host = "localhost"});
  loop.run();
  REQUIRE(server_read);
  CHECK_FALSE(server_read->eof);
  CHECK(server_read->error == errc::DUPLEX_ETLSTRUNC);
  CHECK(server_eofs == 0);
  CHECK(server_why == errc::DUPLEX_ETLSTRUNC);
  CHECK_FALSE(server_tls_error.empty());
  client.close(true);
  loop.run_nowait();
}
