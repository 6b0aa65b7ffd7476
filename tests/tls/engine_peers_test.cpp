// The TLS engine against peers nobody here wrote: the openssl command's
// s_server (our engine as the client) and s_client (our engine as the
// server), over loopback TCP, with the engine driven by the blocking
// SockDriver of tls_support.hpp (what the conn code will do on the loop).
#include "tls_support.hpp"

#include <thread>

using namespace ttest;

namespace {

// openssl s_server on an ephemeral loopback port. Its stdin stays open (a
// pipe we hold), or it would stop at once.
struct SServer {
  Proc proc;
  int port = 0;
  explicit SServer(std::vector<std::string> extra)
      : proc(args(std::move(extra))) {
    REQUIRE_MESSAGE(proc.wait_for("ACCEPT"), proc.output());
    // "ACCEPT 127.0.0.1:PORT\n"
    REQUIRE(proc.wait_for("\n"));
    const std::string &o = proc.output();
    size_t at = o.find("ACCEPT");
    size_t colon = o.find(':', at);
    REQUIRE(colon != std::string::npos);
    port = std::atoi(o.c_str() + colon + 1);
    REQUIRE(port > 0);
  }
  static std::vector<std::string> args(std::vector<std::string> extra) {
    const Certs &k = Certs::get();
    std::vector<std::string> a = {openssl_cmd(), "s_server", "-accept", "127.0.0.1:0",
                                  "-cert", k.pem("server"), "-key", k.key("server")};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
};

// openssl s_client to our listening socket; data we send to its stdin goes
// to our server, what our server sends shows up in its output. Unless
// @p commands, a line starting with a command letter (Q, R, k, K) is data.
std::vector<std::string> sclient_args(int port, std::vector<std::string> extra,
                                      bool commands = false) {
  const Certs &k = Certs::get();
  std::vector<std::string> a = {openssl_cmd(), "s_client", "-connect",
                                "127.0.0.1:" + std::to_string(port),
                                "-servername", "localhost", "-CAfile", k.pem("ca"),
                                "-verify_return_error", "-verify_hostname", "localhost",
                                "-quiet", "-no_ign_eof"};
  if (!commands)
    a.push_back("-nocommands");
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::string printable(size_t n, unsigned seed) {
  std::string s(n, 'a');
  uint32_t x = seed | 1;
  for (size_t i = 0; i < n; i++) {
    x = x * 1103515245u + 12345u;
    s[i] = static_cast<char>('a' + (x >> 16) % 26);
    if (i % 64 == 63)
      s[i] = '\n';
  }
  return s;
}

} // namespace

TEST_CASE("client engine against openssl s_server: TLS 1.3 and 1.2, ALPN, echo, close_notify") {
  Config cc;
  {
    static const char *alpn[] = {"h2", "http/1.1"};
    auto co = client_opts();
    co.alpn = alpn;
    co.alpn_count = 2;
    cc = make_config(co);
  }
  for (const char *ver : {"-tls1_3", "-tls1_2"}) {
    CAPTURE(ver);
    SServer srv({"-naccept", "1", "-rev", ver, "-alpn", "http/1.1"});
    Engine e(cc, "localhost");
    SockDriver d(e, tcp_connect(srv.port));
    REQUIRE_MESSAGE(d.handshake() == 0, why(e));
    dpx_tls_info info;
    dpx_tls_get_info(e, &info);
    CHECK(info.version == (std::string(ver) == "-tls1_3" ? DPX_TLS_V1_3 : DPX_TLS_V1_2));
    CHECK(std::string(info.alpn) == "http/1.1");
    char subj[128];
    CHECK(dpx_tls_peer_subject(e, subj, sizeof subj) > 0);
    CHECK(std::string(subj) == "CN=localhost");

    // -rev answers each line reversed.
    d.write_all("hello\nworld\n");
    REQUIRE(d.read_until([](const std::string &g) { return g.find("dlrow\n") != std::string::npos; }));
    CHECK(d.got == "olleh\ndlrow\n");

    // Our close_notify; s_server answers with its own: a clean end.
    d.shutdown_write();
    int end = d.read_to_end();
    CHECK_MESSAGE(end == DPX_TLS_EOF, st(end) << " " << why(e));
    CHECK(dpx_tls_got_close(e));
  }
}

TEST_CASE("client engine: s_server killed mid-stream is a truncation, not an EOF") {
  Config cc = make_config(client_opts());
  SServer srv({"-naccept", "1", "-rev"});
  Engine e(cc, "localhost");
  SockDriver d(e, tcp_connect(srv.port));
  REQUIRE_MESSAGE(d.handshake() == 0, why(e));
  d.write_all("abc\n");
  REQUIRE(d.read_until([](const std::string &g) { return g == "cba\n"; }));
  srv.proc.kill_now(); // the kernel closes its socket: FIN, no close_notify
  int end = d.read_to_end();
  CHECK_MESSAGE(end == DPX_TLS_ETRUNCATED, st(end));
  CHECK(d.got == "cba\n");
  MESSAGE(why(e));
}

TEST_CASE("client engine: session resumption with s_server") {
  for (const char *ver : {"-tls1_3", "-tls1_2"}) {
    CAPTURE(ver);
    Config cc = make_config(client_opts());
    SServer srv({"-naccept", "2", "-rev", ver});
    for (int i = 0; i < 2; i++) {
      Engine e(cc, "localhost", "localhost:s_server");
      SockDriver d(e, tcp_connect(srv.port));
      REQUIRE_MESSAGE(d.handshake() == 0, why(e));
      // A round trip, so the TLS 1.3 tickets have arrived.
      d.write_all("ticket\n");
      REQUIRE(d.read_until([](const std::string &g) { return g == "tekcit\n"; }));
      dpx_tls_info info;
      dpx_tls_get_info(e, &info);
      CHECK(info.resumed == (i == 1));
      d.shutdown_write();
      d.read_to_end();
    }
  }
}

TEST_CASE("client engine: s_server with an expired certificate or asking for ours") {
  const Certs &k = Certs::get();
  SUBCASE("expired") {
    Config cc = make_config(client_opts());
    SServer srv({"-naccept", "1", "-cert", k.pem("expired"), "-key", k.key("expired")});
    Engine e(cc, "localhost");
    SockDriver d(e, tcp_connect(srv.port));
    CHECK(d.handshake() == DPX_TLS_EVERIFY);
    CHECK(dpx_tls_verify_error(e) == DPX_TLS_VERIFY_EXPIRED);
    MESSAGE(why(e));
  }
  SUBCASE("mutual TLS: s_server -Verify verifies our client certificate") {
    auto co = client_opts();
    co.cert_file = k.pem("client");
    co.key_file = k.key("client");
    Config cc = make_config(co);
    SServer srv({"-naccept", "1", "-rev", "-Verify", "1", "-CAfile", k.pem("ca"),
                 "-verify_return_error"});
    Engine e(cc, "localhost");
    SockDriver d(e, tcp_connect(srv.port));
    REQUIRE_MESSAGE(d.handshake() == 0, why(e));
    d.write_all("mtls\n");
    REQUIRE(d.read_until([](const std::string &g) { return g == "sltm\n"; }));
    CHECK(srv.proc.wait_for("CN = client"));
  }
  SUBCASE("mutual TLS refused: s_server alerts, the engine says EALERT") {
    Config cc = make_config(client_opts()); // no certificate
    SServer srv({"-naccept", "1", "-rev", "-Verify", "1", "-CAfile", k.pem("ca"),
                 "-verify_return_error", "-tls1_3"});
    Engine e(cc, "localhost");
    SockDriver d(e, tcp_connect(srv.port));
    int r = d.handshake(); // TLS 1.3: the client finishes first
    if (r == 0)
      r = d.read_to_end();
    CHECK_MESSAGE(r == DPX_TLS_EALERT, st(r) << " " << why(e));
    MESSAGE(why(e));
  }
}

TEST_CASE("server engine against openssl s_client: data both ways, close_notify is a clean EOF") {
  for (const char *ver : {"-tls1_3", "-tls1_2"}) {
    CAPTURE(ver);
    static const char *alpn[] = {"h2"};
    auto so = server_opts();
    so.alpn = alpn;
    so.alpn_count = 1;
    Config sc = make_config(so);
    int port = 0;
    int lfd = tcp_listen(&port);
    Proc cli(sclient_args(port, {ver, "-alpn", "h2"}));
    Engine e(sc, nullptr);
    SockDriver d(e, tcp_accept(lfd));
    close(lfd);
    REQUIRE_MESSAGE(d.handshake() == 0, why(e));
    dpx_tls_info info;
    dpx_tls_get_info(e, &info);
    CHECK(std::string(info.sni) == "localhost");
    CHECK(std::string(info.alpn) == "h2");

    cli.send("ping from s_client\n");
    REQUIRE(d.read_until([](const std::string &g) { return g.find('\n') != std::string::npos; }));
    CHECK(d.got == "ping from s_client\n");
    d.write_all("pong from the engine\n");
    CHECK(cli.wait_for("pong from the engine\n"));

    // s_client sends close_notify when its stdin ends.
    cli.close_stdin();
    int end = d.read_to_end();
    CHECK_MESSAGE(end == DPX_TLS_EOF, st(end) << " " << why(e));
    d.shutdown_write();
    CHECK(cli.wait_exit() == 0);
  }
}

TEST_CASE("server engine: s_client's TLS 1.3 key updates are followed") {
  Config sc = make_config(server_opts());
  int port = 0;
  int lfd = tcp_listen(&port);
  Proc cli(sclient_args(port, {"-tls1_3"}, true));
  Engine e(sc, nullptr);
  SockDriver d(e, tcp_accept(lfd));
  close(lfd);
  REQUIRE_MESSAGE(d.handshake() == 0, why(e));
  int round = 0;
  // "k": s_client updates its keys; "K": and asks us to update ours.
  for (const char *cmd : {"k\n", "K\n", "K\n"}) {
    cli.send(cmd);
    // The command must be a read of its own: wait for s_client to act.
    size_t want = static_cast<size_t>(round) + 1;
    REQUIRE(cli.wait_until([&](const std::string &o) {
      size_t k = 0;
      for (size_t at = o.find("KEYUPDATE"); at != std::string::npos;
           at = o.find("KEYUPDATE", at + 1))
        k++;
      return k >= want;
    }));
    std::string line = "after update " + std::to_string(round) + "\n";
    cli.send(line);
    REQUIRE(d.read_until([&](const std::string &g) { return g.find(line) != std::string::npos; }));
    std::string back = "answer " + std::to_string(round++) + "\n";
    d.write_all(back);
    CHECK(cli.wait_for(back));
  }
  CHECK(d.got == "after update 0\nafter update 1\nafter update 2\n");
  cli.close_stdin();
  CHECK(d.read_to_end() == DPX_TLS_EOF);
}

TEST_CASE("server engine: 4 MiB each way with s_client, bounded queues") {
  Config sc = make_config(server_opts());
  int port = 0;
  int lfd = tcp_listen(&port);
  Proc cli(sclient_args(port, {}));
  dpx_tls_opts o{};
  o.in_cap = 32 * 1024;
  o.out_cap = 64 * 1024;
  dpx_tls *t = nullptr;
  REQUIRE(dpx_tls_new(&t, sc, &o) == 0);
  Engine e; // owns t
  e.t = t;
  SockDriver d(e, tcp_accept(lfd));
  close(lfd);
  REQUIRE_MESSAGE(d.handshake() == 0, why(e));

  const size_t n = 4u << 20;
  const std::string up = printable(n, 1), down = printable(n, 2);
  // s_client's stdin and stdout are pipes: feed one and drain the other on
  // threads, so nobody waits on a full pipe. If a check fails, killing the
  // child ends both threads (SIGPIPE is ignored here).
  signal(SIGPIPE, SIG_IGN);
  std::atomic<bool> sent{false}, seen{false};
  std::thread writer([&] { sent = cli.send_raw(up); });
  std::thread reader([&] { seen = cli.wait_for(down.substr(down.size() - 200)); });
  struct Join {
    Proc &p;
    std::thread &a, &b;
    ~Join() {
      if (a.joinable() || b.joinable())
        p.kill_now();
      if (a.joinable())
        a.join();
      if (b.joinable())
        b.join();
    }
  } join{cli, writer, reader};
  d.write_all(down);
  REQUIRE(d.read_until([&](const std::string &g) { return g.size() >= n; }));
  writer.join();
  reader.join();
  CHECK(sent);
  CHECK(seen);
  CHECK(d.got == up);
  CHECK(cli.output().find(down) != std::string::npos);
  CHECK(dpx_tls_out_pending(e) == 0);
  CHECK(dpx_tls_buffer_bytes(e) == 0);
  cli.close_stdin();
  CHECK(d.read_to_end() == DPX_TLS_EOF);
}

TEST_CASE("server engine: mutual TLS with s_client") {
  const Certs &k = Certs::get();
  auto so = server_opts();
  so.verify = DPX_TLS_VERIFY_REQUIRE;
  Config sc = make_config(so);
  SUBCASE("with a trusted client certificate") {
    int port = 0;
    int lfd = tcp_listen(&port);
    Proc cli(sclient_args(port, {"-cert", k.pem("client"), "-key", k.key("client")}));
    Engine e(sc, nullptr);
    SockDriver d(e, tcp_accept(lfd));
    close(lfd);
    REQUIRE_MESSAGE(d.handshake() == 0, why(e));
    char subj[128];
    CHECK(dpx_tls_peer_subject(e, subj, sizeof subj) > 0);
    CHECK(std::string(subj) == "CN=client");
  }
  SUBCASE("without one: EVERIFY, NO_CERT") {
    int port = 0;
    int lfd = tcp_listen(&port);
    Proc cli(sclient_args(port, {}));
    Engine e(sc, nullptr);
    SockDriver d(e, tcp_accept(lfd));
    close(lfd);
    CHECK(d.handshake() == DPX_TLS_EVERIFY);
    CHECK(dpx_tls_verify_error(e) == DPX_TLS_VERIFY_NO_CERT);
    MESSAGE(why(e));
    CHECK(cli.wait_exit() != 0);
  }
}
