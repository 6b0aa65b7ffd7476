// Transports: TCP (IPv4, IPv6, by name), UNIX sockets (stale files, modes,
// live sockets), adopted socketpairs, adopted pipe pairs; connect failures
// (refused, unresolvable); pause/resume reading from other threads.
// Port 0 and temporary directories only.
#include "fixture.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <fstream>

using namespace dtest;

namespace {

// Echoes every byte back; shuts down its write side on EOF. One accepted
// conn per server (the ConnEvents order checks assume one conn).
struct EchoServer {
  ConnEvents ev;
  duplex_conn_opts copts{};
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  std::atomic<int> echo_errors{0}, listen_errors{0};
  std::mutex mu;
  std::string peer; // the accepted conn's peer address

  EchoServer() {
    ev.read_hook = [this](duplex_conn *c, const uint8_t *d, size_t n) {
      if (duplex_conn_write(c, d, n, nullptr, nullptr) != 0)
        echo_errors++;
    };
    ev.eof_hook = [](duplex_conn *c) { duplex_conn_shutdown(c, nullptr, nullptr); };
    ev.open_hook = [this](duplex_conn *c) {
      char buf[256];
      std::memset(buf, 'x', sizeof buf);
      if (duplex_conn_get_peer(c, buf, sizeof buf) == 0) {
        std::lock_guard<std::mutex> lk(mu);
        peer = buf;
      }
    };
    copts = ev.opts();
    lopts.conn_opts = &copts;
    lopts.on_error = [](duplex_listener *, int, void *user) {
      static_cast<EchoServer *>(user)->listen_errors++;
    };
    lopts.user = this;
  }
  // Every accepted conn has closed (call before this object goes away while
  // the loop still runs).
  bool wait_all_closed() {
    return wait_until([&] {
      return ev.opens.load() > 0 && ev.closes.load() == ev.opens.load();
    });
  }
  std::string peer_address() {
    std::lock_guard<std::mutex> lk(mu);
    return peer;
  }
};

std::string make_payload(size_t n) {
  std::string s(n, '\0');
  fill_pattern(s.data(), n, 0, 99);
  return s;
}

enum class Via { tcp, unix_path };

// Connect, write (before the conn is even open), read the echo back, close.
// Returns the client's view of its peer address.
std::string echo_round_trip(duplex_loop *loop, Via via, const char *where,
                            uint16_t port = 0) {
  ConnEvents cev;
  cev.keep_data = true;
  auto o = cev.opts();
  duplex_conn *c = nullptr;
  int rc = via == Via::tcp ? duplex_conn_connect_tcp(&c, loop, where, port, &o)
                           : duplex_conn_connect_unix(&c, loop, where, &o);
  REQUIRE_MESSAGE(rc == 0, "connect: " << err_str(rc));
  REQUIRE(c != nullptr);
  std::string msg = make_payload(200 * 1024);
  WriteCounter w;
  CHECK(duplex_conn_write(c, msg.data(), msg.size(), WriteCounter::cb, &w) == 0);
  CHECK(cev.wait_bytes(msg.size()));
  CHECK(cev.opens.load() == 1);
  CHECK(cev.closes.load() == 0);
  CHECK(cev.data() == msg);
  char buf[256];
  std::memset(buf, 'x', sizeof buf);
  CHECK(duplex_conn_get_peer(c, buf, sizeof buf) == 0);
  std::string peer = buf;
  // Half-close: the server echoes our EOF, the conn then closes with 0.
  CHECK(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
  CHECK(cev.wait_closed());
  CHECK(cev.eofs.load() == 1);
  CHECK(cev.close_reason.load() == 0);
  CHECK(w.ok.load() == 1);
  CHECK(cev.order_errors.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  return peer;
}

bool is_eai(int rc) {
  return rc == DUPLEX_EAI_NONAME || rc == DUPLEX_EAI_AGAIN ||
         rc == DUPLEX_EAI_FAIL || rc == DUPLEX_EAI_NODATA ||
         rc == DUPLEX_EAI_FAMILY || rc == DUPLEX_EAI_OTHER;
}

Fd raw_unix_socket(const std::string &path, bool listening) {
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof a.sun_path);
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  if (listening)
    REQUIRE(::listen(fd.get(), 4) == 0);
  return fd;
}

bool raw_unix_connect(const std::string &path) {
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  return ::connect(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0;
}

bool is_socket_file(const std::string &path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

bool exists(const std::string &path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

} // namespace

TEST_CASE("TCP on 127.0.0.1 port 0: bound port, address, echo round trip") {
  bool start_first = true;
  SUBCASE("listener made while the loop runs") { start_first = true; }
  SUBCASE("listener made before the loop runs") { start_first = false; }
  EchoServer srv;
  Loop loop(start_first);
  duplex_listener *l = nullptr;
  int rc = duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &srv.lopts);
  REQUIRE_MESSAGE(rc == 0, err_str(rc));
  REQUIRE(l != nullptr);
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);
  CHECK(port != 0);
  char addr[64];
  REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
  CHECK(std::string(addr) == "127.0.0.1:" + std::to_string(port));
  if (!start_first)
    REQUIRE(duplex_loop_start(loop) == 0);

  std::string peer = echo_round_trip(loop, Via::tcp, "127.0.0.1", port);
  CHECK(peer == "127.0.0.1:" + std::to_string(port));
  CHECK(srv.ev.wait_closed());
  CHECK(srv.ev.opens.load() == 1);
  CHECK(srv.ev.close_reason.load() == 0);
  CHECK(srv.echo_errors.load() == 0);
  CHECK(srv.listen_errors.load() == 0);
  CHECK(srv.peer_address().rfind("127.0.0.1:", 0) == 0);
  CHECK(srv.peer_address() != "127.0.0.1:" + std::to_string(port));
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("TCP on ::1 port 0") {
  EchoServer srv;
  Loop loop;
  duplex_listener *l = nullptr;
  int rc = duplex_listener_tcp(&l, loop, "::1", 0, &srv.lopts);
  if (rc == DUPLEX_EADDRNOTAVAIL || rc == DUPLEX_EAFNOSUPPORT) {
    MESSAGE("IPv6 loopback unavailable here (" << err_str(rc) << "): skipped");
    CHECK(l == nullptr);
    CHECK(loop.free() == 0);
    return;
  }
  REQUIRE_MESSAGE(rc == 0, err_str(rc));
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);
  CHECK(port != 0);
  char addr[64];
  REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
  CHECK(std::string(addr) == "[::1]:" + std::to_string(port));
  std::string peer = echo_round_trip(loop, Via::tcp, "::1", port);
  CHECK(peer == "[::1]:" + std::to_string(port));
  CHECK(srv.peer_address().rfind("[::1]:", 0) == 0);
  CHECK(srv.ev.wait_closed());
  CHECK(srv.echo_errors.load() == 0);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("TCP by name: listen on and connect to \"localhost\"") {
  EchoServer srv;
  Loop loop;
  duplex_listener *l = nullptr;
  int rc = duplex_listener_tcp(&l, loop, "localhost", 0, &srv.lopts);
  REQUIRE_MESSAGE(rc == 0, err_str(rc));
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);
  char addr[64];
  REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
  CHECK(std::string(addr) == "127.0.0.1:" + std::to_string(port));
  // "localhost" may resolve to ::1 first (nobody listens there): every
  // resolved address is tried in order.
  std::string peer = echo_round_trip(loop, Via::tcp, "localhost", port);
  CHECK(peer == "127.0.0.1:" + std::to_string(port));
  CHECK(srv.ev.wait_closed());
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("accepted conns outlive the listener that accepted them") {
  EchoServer srv;
  Loop loop;
  duplex_listener *l = nullptr;
  REQUIRE(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &srv.lopts) == 0);
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);
  ConnEvents cev;
  cev.keep_data = true;
  auto o = cev.opts();
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &o) == 0);
  CHECK(srv.ev.wait_open());
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  REQUIRE(duplex_conn_write(c, "still here", 10, nullptr, nullptr) == 0);
  CHECK(cev.wait_bytes(10));
  CHECK(cev.data() == "still here");
  CHECK(srv.ev.closes.load() == 0);
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(cev.wait_closed());
  CHECK(srv.ev.wait_closed());
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("UNIX socket: listen, connect, echo; the file goes on close") {
  TempDir dir;
  std::string path = dir.file("echo.sock");
  EchoServer srv;
  Loop loop;
  duplex_listener *l = nullptr;
  int rc = duplex_listener_unix(&l, loop, path.c_str(), &srv.lopts);
  REQUIRE_MESSAGE(rc == 0, err_str(rc));
  CHECK(is_socket_file(path));
  uint16_t port = 1;
  CHECK(duplex_listener_get_port(l, &port) == DUPLEX_ENOTSUP);
  char addr[256];
  REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
  CHECK(std::string(addr) == path);
  std::string peer = echo_round_trip(loop, Via::unix_path, path.c_str());
  CHECK(peer == path);
  CHECK(srv.ev.wait_closed());
  CHECK(srv.peer_address() == ""); // the client socket is unnamed
  CHECK(srv.echo_errors.load() == 0);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(wait_until([&] { return !exists(path); }));
  CHECK(loop.free() == 0);
}

TEST_CASE("UNIX socket: a stale socket file is replaced") {
  TempDir dir;
  std::string path = dir.file("stale.sock");
  {
    Fd stale = raw_unix_socket(path, true);
  } // closed: the file stays, nobody listens
  REQUIRE(is_socket_file(path));
  REQUIRE_FALSE(raw_unix_connect(path));
  EchoServer srv;
  Loop loop;
  duplex_listener *l = nullptr;
  int rc = duplex_listener_unix(&l, loop, path.c_str(), &srv.lopts);
  REQUIRE_MESSAGE(rc == 0, err_str(rc));
  echo_round_trip(loop, Via::unix_path, path.c_str());
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("UNIX socket: mode bits are applied") {
  TempDir dir;
  Loop loop;
  for (unsigned mode : {0600u, 0640u, 0666u}) {
    INFO("mode " << std::oct << mode);
    std::string path = dir.file("mode" + std::to_string(mode) + ".sock");
    EchoServer srv;
    srv.lopts.mode = mode;
    duplex_listener *l = nullptr;
    int rc = duplex_listener_unix(&l, loop, path.c_str(), &srv.lopts);
    REQUIRE_MESSAGE(rc == 0, err_str(rc));
    struct stat st;
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == mode);
    CHECK(duplex_listener_close(l) == 0);
    CHECK(duplex_listener_unref(l) == 0);
  }
  CHECK(loop.free() == 0);
}

TEST_CASE("UNIX socket: a live socket gives DUPLEX_EADDRINUSE and is kept") {
  TempDir dir;
  Loop loop;
  SUBCASE("someone else listens") {
    std::string path = dir.file("live.sock");
    Fd live = raw_unix_socket(path, true);
    EchoServer srv;
    duplex_listener *l = reinterpret_cast<duplex_listener *>(&srv);
    CHECK(duplex_listener_unix(&l, loop, path.c_str(), &srv.lopts) == DUPLEX_EADDRINUSE);
    CHECK(l == nullptr);
    CHECK(is_socket_file(path));
    CHECK(raw_unix_connect(path)); // the other listener still works
  }
  SUBCASE("our own listener") {
    std::string path = dir.file("ours.sock");
    EchoServer a, b;
    duplex_listener *la = nullptr, *lb = reinterpret_cast<duplex_listener *>(&b);
    REQUIRE(duplex_listener_unix(&la, loop, path.c_str(), &a.lopts) == 0);
    CHECK(duplex_listener_unix(&lb, loop, path.c_str(), &b.lopts) == DUPLEX_EADDRINUSE);
    CHECK(lb == nullptr);
    echo_round_trip(loop, Via::unix_path, path.c_str());
    CHECK(a.wait_all_closed());
    CHECK(duplex_listener_close(la) == 0);
    CHECK(duplex_listener_unref(la) == 0);
  }
  SUBCASE("a path that is not a socket is never removed") {
    std::string path = dir.file("regular");
    {
      std::ofstream f(path);
      f << "keep me";
    }
    EchoServer srv;
    duplex_listener *l = reinterpret_cast<duplex_listener *>(&srv);
    int rc = duplex_listener_unix(&l, loop, path.c_str(), &srv.lopts);
    MESSAGE("listener_unix on a regular file: " << err_str(rc));
    CHECK(rc < 0);
    CHECK(l == nullptr);
    std::ifstream f(path);
    std::string content;
    std::getline(f, content);
    CHECK(content == "keep me");
  }
  CHECK(loop.free() == 0);
}

TEST_CASE("adopted socketpair: both directions, unnamed peer") {
  ConnEvents ev;
  Loop loop;
  ev.keep_data = true;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *c = adopt(loop, sp.ours, &opts);
  CHECK(ev.wait_open());
  char buf[16];
  std::memset(buf, 'x', sizeof buf);
  CHECK(duplex_conn_get_peer(c, buf, sizeof buf) == 0);
  CHECK(std::string(buf) == "");
  REQUIRE(write_all(sp.peer.get(), "ping", 4) == 0);
  CHECK(ev.wait_bytes(4));
  CHECK(ev.data() == "ping");
  REQUIRE(duplex_conn_write(c, "pong", 4, nullptr, nullptr) == 0);
  char got[4];
  CHECK(read_exactly(sp.peer.get(), got, 4));
  CHECK(std::string(got, 4) == "pong");
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(::read(sp.peer.get(), got, 1) == 0); // EOF: the conn closed the fd
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("adopt_pair with two pipes: read one, write the other, EOF both ways") {
  int in[2], out[2];
  REQUIRE(::pipe2(in, O_CLOEXEC) == 0);  // peer -> us
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0); // us -> peer
  Fd in_r(in[0]), in_w(in[1]), out_r(out[0]), out_w(out[1]);
  ConnEvents ev;
  Loop loop;
  PatternChecker in_checker(31);
  ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) { in_checker.feed(d, n); };
  auto opts = ev.opts();
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_adopt_pair(&c, loop, in_r.get(), out_w.get(), &opts) == 0);
  in_r.release();
  out_w.release();
  const size_t kBytes = 1024 * 1024;
  // Peer: writes 1 MiB into `in` then closes it; reads `out` until EOF.
  PatternChecker out_checker(32);
  std::atomic<int> reader_rc{kUnset};
  PeerThread writer([&] {
    auto data = pattern(kBytes, 0, 31);
    CHECK(write_all(in_w.get(), data.data(), data.size()) == 0);
    in_w.reset();
  });
  PeerThread reader([&] {
    reader_rc = read_until_eof(out_r.get(), [&](const uint8_t *d, size_t n) {
      out_checker.feed(d, n);
      return true;
    });
  });
  auto data = pattern(kBytes, 0, 32);
  WriteCounter w, sd;
  REQUIRE(duplex_conn_write(c, data.data(), data.size(), WriteCounter::cb, &w) == 0);
  REQUIRE(duplex_conn_shutdown(c, WriteCounter::cb, &sd) == 0); // closes write_fd
  writer.join();
  reader.join();
  CHECK(reader_rc.load() == 0);
  CHECK(out_checker.ok());
  CHECK(out_checker.offset == kBytes);
  CHECK(ev.wait_closed());
  CHECK(ev.eofs.load() == 1);
  CHECK(ev.bytes_read.load() == kBytes);
  CHECK(in_checker.ok());
  CHECK(ev.close_reason.load() == 0);
  CHECK(w.ok.load() == 1);
  CHECK(sd.ok.load() == 1);
  CHECK(ev.order_errors.load() == 0);
  char buf[8] = "x";
  CHECK(duplex_conn_get_peer(c, buf, sizeof buf) == 0);
  CHECK(std::string(buf) == "");
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("connect refused: on_close(DUPLEX_ECONNREFUSED), never on_open") {
  // A bound, non-listening socket holds the port so nobody else takes it.
  Fd holder(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(holder.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(holder.get(), reinterpret_cast<sockaddr *>(&a), &len) == 0);
  uint16_t port = ntohs(a.sin_port);

  ConnEvents ev;
  Loop loop;
  auto opts = ev.opts();
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &opts) == 0);
  REQUIRE(c != nullptr);
  WriteCounter w;
  int wrc = duplex_conn_write(c, "never", 5, WriteCounter::cb, &w);
  CHECK((wrc == 0 || wrc == DUPLEX_ECLOSED));
  CHECK(ev.wait_closed());
  CHECK(ev.close_reason.load() == DUPLEX_ECONNREFUSED);
  CHECK(ev.opens.load() == 0);
  CHECK(ev.closes.load() == 1);
  if (wrc == 0) {
    CHECK(wait_until([&] { return w.total.load() == 1; }));
    CHECK(w.ok.load() == 0); // never written
  }
  CHECK(duplex_conn_write(c, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
  CHECK(w.total.load() == (wrc == 0 ? 1u : 0u));
}

TEST_CASE("an unresolvable host closes the conn with a DUPLEX_EAI_* code") {
  ConnEvents ev;
  Loop loop;
  auto opts = ev.opts();
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "nonexistent.invalid", 80, &opts) == 0);
  CHECK(ev.wait_closed());
  int reason = ev.close_reason.load();
  MESSAGE("on_close reason: " << err_str(reason));
  CHECK(is_eai(reason));
  CHECK(ev.opens.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("get_peer: DUPLEX_ENOTCONN before open, DUPLEX_ENOBUFS when short") {
  EchoServer srv;
  Loop loop(false);
  duplex_listener *l = nullptr;
  REQUIRE(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &srv.lopts) == 0);
  uint16_t port = 0;
  REQUIRE(duplex_listener_get_port(l, &port) == 0);
  ConnEvents ev;
  auto opts = ev.opts();
  duplex_conn *c = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &opts) == 0);
  char buf[64];
  CHECK(duplex_conn_get_peer(c, buf, sizeof buf) == DUPLEX_ENOTCONN); // loop not running
  REQUIRE(duplex_loop_start(loop) == 0);
  CHECK(ev.wait_open());
  std::string expect = "127.0.0.1:" + std::to_string(port);
  REQUIRE(duplex_conn_get_peer(c, buf, sizeof buf) == 0);
  CHECK(std::string(buf) == expect);
  std::memset(buf, 'x', sizeof buf);
  CHECK(duplex_conn_get_peer(c, buf, expect.size()) == DUPLEX_ENOBUFS); // no room for NUL
  CHECK(buf[0] == '\0');
  CHECK(duplex_conn_get_peer(c, buf, expect.size() + 1) == 0);
  CHECK(std::string(buf) == expect);
  char small[4];
  CHECK(duplex_listener_get_address(l, small, sizeof small) == DUPLEX_ENOBUFS);
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("pause and resume reading from another thread (flow control)") {
  ConnEvents ev;
  Loop loop;
  PatternChecker checker(55);
  ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) { checker.feed(d, n); };
  auto sp = socket_pair();
  auto opts = ev.opts(0, 0, 0, DUPLEX_CONN_START_PAUSED);
  duplex_conn *c = adopt(loop, sp.ours, &opts);
  CHECK(ev.wait_open());

  // Peer writes without blocking until the kernel refuses: only possible
  // if nobody reads the other end. Bounded, in case reading never stops.
  uint64_t sent = 0;
  auto fill = [&]() -> bool {
    set_nonblocking(sp.peer.get(), true);
    std::vector<uint8_t> chunk(16 * 1024);
    for (;;) {
      fill_pattern(chunk.data(), chunk.size(), sent, 55);
      ssize_t n = ::send(sp.peer.get(), chunk.data(), chunk.size(), MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<uint64_t>(n);
        if (sent > 256u * 1024 * 1024)
          return false; // someone is reading
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        break;
      return false;
    }
    set_nonblocking(sp.peer.get(), false);
    return true;
  };
  CHECK(fill()); // paused from the start: the kernel buffers fill up
  CHECK(ev.reads.load() == 0);

  std::atomic<int> rc{kUnset};
  std::thread([&] { rc = duplex_conn_resume(c); }).join();
  CHECK(rc.load() == 0);
  CHECK(ev.wait_bytes(sent));
  CHECK(ev.bytes_read.load() == sent);

  // Pause from another thread; the peer can fill the buffers again.
  std::thread([&] { rc = duplex_conn_pause(c); }).join();
  CHECK(rc.load() == 0);
  REQUIRE(on_loop(loop, [] {}));
  CHECK(fill());
  std::thread([&] { rc = duplex_conn_resume(c); }).join();
  CHECK(rc.load() == 0);
  CHECK(ev.wait_bytes(sent));
  CHECK(ev.bytes_read.load() == sent);
  CHECK(checker.ok());
  CHECK(ev.closes.load() == 0);
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_pause(c) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_resume(c) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("pause on the loop thread: no read callback runs until resume") {
  ConnEvents ev;
  Loop loop;
  std::atomic<int> reads_while_paused{0};
  std::atomic<bool> paused{false};
  std::atomic<int> pause_rc{kUnset};
  ev.read_hook = [&](duplex_conn *c, const uint8_t *, size_t) {
    if (paused.load())
      reads_while_paused++;
    if (ev.reads.load() == 0) { // first read: pause right here
      pause_rc = duplex_conn_pause(c);
      paused = true;
    }
  };
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *c = adopt(loop, sp.ours, &opts);
  REQUIRE(write_all(sp.peer.get(), "first", 5) == 0);
  CHECK(wait_until([&] { return paused.load(); }));
  // More data arrives while paused.
  std::vector<uint8_t> more(64 * 1024, 'm');
  REQUIRE(write_all(sp.peer.get(), more.data(), more.size()) == 0);
  REQUIRE(on_loop(loop, [] {}));
  REQUIRE(on_loop(loop, [] {}));
  CHECK(ev.reads.load() == 1);
  uint64_t before = ev.bytes_read.load();
  std::atomic<int> resume_rc{kUnset};
  REQUIRE(on_loop(loop, [&] {
    paused = false;
    resume_rc = duplex_conn_resume(c);
  }));
  CHECK(pause_rc.load() == 0);
  CHECK(resume_rc.load() == 0);
  CHECK(ev.wait_bytes(before + more.size()));
  CHECK(reads_while_paused.load() == 0);
  CHECK(ev.bytes_read.load() == 5 + more.size());
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("set_user redirects the callbacks that start after it") {
  Loop loop;
  ConnEvents first, second;
  first.keep_data = second.keep_data = true;
  auto sp = socket_pair();
  auto opts = first.opts();
  duplex_conn *c = adopt(loop, sp.ours, &opts);
  REQUIRE(write_all(sp.peer.get(), "one", 3) == 0);
  CHECK(first.wait_bytes(3));
  void *u = nullptr;
  CHECK(duplex_conn_get_user(c, &u) == 0);
  CHECK(u == &first);
  // The table's callbacks take their state from the user pointer.
  CHECK(duplex_conn_set_user(c, &second) == 0);
  CHECK(duplex_conn_get_user(c, &u) == 0);
  CHECK(u == &second);
  REQUIRE(on_loop(loop, [] {})); // no callback straddles the switch below
  REQUIRE(write_all(sp.peer.get(), "two", 3) == 0);
  CHECK(second.wait_bytes(3));
  CHECK(first.data() == "one");
  CHECK(second.data() == "two");
  sp.peer.reset();
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(wait_until([&] { return second.closes.load() == 1; }));
  CHECK(first.closes.load() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("freeing the loop closes its listeners and removes their socket files") {
  TempDir dir;
  std::string path = dir.file("freed.sock");
  {
    EchoServer srv;
    Loop loop;
    duplex_listener *l = nullptr;
    REQUIRE(duplex_listener_unix(&l, loop, path.c_str(), &srv.lopts) == 0);
    duplex_listener *t = nullptr;
    REQUIRE(duplex_listener_tcp(&t, loop, "127.0.0.1", 0, &srv.lopts) == 0);
    CHECK(is_socket_file(path));
    CHECK(loop.free() == 0);
    // The caller's references outlive the loop: calls return ECLOSED.
    CHECK(duplex_listener_close(l) == DUPLEX_ECLOSED);
    CHECK(duplex_listener_close(t) == DUPLEX_ECLOSED);
    CHECK(duplex_listener_unref(l) == 0);
    CHECK(duplex_listener_unref(t) == 0);
  }
  CHECK_FALSE(exists(path));
}

TEST_CASE("a tiny loop read buffer still delivers every byte in order") {
  duplex_loop_opts lo = DUPLEX_LOOP_OPTS_INIT;
  lo.read_buffer_size = 7;
  ConnEvents ev;
  Loop loop(true, &lo);
  PatternChecker checker(66);
  std::atomic<size_t> biggest{0};
  ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) {
    checker.feed(d, n);
    if (n > biggest.load())
      biggest = n;
  };
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *c = adopt(loop, sp.ours, &opts);
  auto data = pattern(100 * 1000, 0, 66);
  REQUIRE(write_all(sp.peer.get(), data.data(), data.size()) == 0);
  sp.peer.reset();
  CHECK(wait_until([&] { return ev.eofs.load() == 1; }));
  CHECK(ev.bytes_read.load() == data.size());
  CHECK(checker.ok());
  CHECK(biggest.load() <= 7);
  CHECK(ev.closes.load() == 0); // EOF alone does not close: we never shut down
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("adopt on the loop thread: on_open runs later, never inside the call") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  std::atomic<int> rc{kUnset}, opens_at_return{kUnset};
  duplex_conn *c = nullptr;
  auto opts = ev.opts();
  REQUIRE(on_loop(loop, [&] {
    rc = duplex_conn_adopt(&c, loop, sp.ours.get(), &opts);
    opens_at_return = ev.opens.load();
  }));
  REQUIRE(rc.load() == 0);
  sp.ours.release();
  CHECK(opens_at_return.load() == 0);
  CHECK(ev.wait_open());
  CHECK(ev.opens.load() == 1);
  CHECK(duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("TCP on every address: NULL / \"\" are IPv4, \"::\" honours IPV6ONLY") {
  Loop loop;
  SUBCASE("NULL and empty host listen on every IPv4 address") {
    for (const char *host : {static_cast<const char *>(nullptr), ""}) {
      EchoServer srv;
      duplex_listener *l = nullptr;
      REQUIRE(duplex_listener_tcp(&l, loop, host, 0, &srv.lopts) == 0);
      uint16_t port = 0;
      REQUIRE(duplex_listener_get_port(l, &port) == 0);
      char addr[64];
      REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
      CHECK(std::string(addr) == "0.0.0.0:" + std::to_string(port));
      echo_round_trip(loop, Via::tcp, "127.0.0.1", port);
      CHECK(srv.wait_all_closed());
      CHECK(duplex_listener_close(l) == 0);
      CHECK(duplex_listener_unref(l) == 0);
    }
  }
  SUBCASE("\"::\" with and without DUPLEX_LISTEN_IPV6ONLY") {
    for (bool v6only : {false, true}) {
      INFO("v6only " << v6only);
      EchoServer srv;
      srv.lopts.flags = v6only ? DUPLEX_LISTEN_IPV6ONLY : 0u;
      duplex_listener *l = nullptr;
      int rc = duplex_listener_tcp(&l, loop, "::", 0, &srv.lopts);
      if (rc == DUPLEX_EAFNOSUPPORT || rc == DUPLEX_EADDRNOTAVAIL) {
        MESSAGE("IPv6 unavailable here (" << err_str(rc) << "): skipped");
        break;
      }
      REQUIRE_MESSAGE(rc == 0, err_str(rc));
      uint16_t port = 0;
      REQUIRE(duplex_listener_get_port(l, &port) == 0);
      char addr[64];
      REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
      CHECK(std::string(addr) == "[::]:" + std::to_string(port));
      echo_round_trip(loop, Via::tcp, "::1", port);
      // IPv4 reaches a dual-stack listener only.
      ConnEvents ev;
      auto o = ev.opts();
      duplex_conn *c = nullptr;
      REQUIRE(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &o) == 0);
      CHECK(wait_until([&] { return ev.opens.load() == 1 || ev.closes.load() == 1; }));
      if (v6only) {
        CHECK(ev.wait_closed());
        CHECK(ev.close_reason.load() == DUPLEX_ECONNREFUSED);
      } else {
        CHECK(ev.opens.load() == 1);
        CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
        CHECK(ev.wait_closed());
      }
      CHECK(duplex_conn_unref(c) == 0);
      CHECK(srv.wait_all_closed());
      CHECK(duplex_listener_close(l) == 0);
      CHECK(duplex_listener_unref(l) == 0);
    }
  }
  CHECK(loop.free() == 0);
}

TEST_CASE("duplex_conn_get_local names the conn's own end") {
  Loop loop;
  // A raw listening socket, so both ends' names are known independently.
  Fd lfd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(lfd);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(lfd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
  REQUIRE(::listen(lfd.get(), 4) == 0);
  socklen_t sl = sizeof sa;
  REQUIRE(::getsockname(lfd.get(), reinterpret_cast<sockaddr *>(&sa), &sl) == 0);
  const std::string server_addr = "127.0.0.1:" + std::to_string(ntohs(sa.sin_port));

  ConnEvents cev;
  auto co = cev.opts();
  duplex_conn *client = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&client, loop, "127.0.0.1", ntohs(sa.sin_port), &co) == 0);
  REQUIRE(cev.wait_open());
  Fd acc(::accept(lfd.get(), nullptr, nullptr));
  REQUIRE(acc);
  sockaddr_in pa{};
  socklen_t pl = sizeof pa;
  REQUIRE(::getpeername(acc.get(), reinterpret_cast<sockaddr *>(&pa), &pl) == 0);
  const std::string client_addr = "127.0.0.1:" + std::to_string(ntohs(pa.sin_port));

  char buf[128];
  CHECK(duplex_conn_get_local(client, buf, sizeof buf) == 0);
  CHECK(std::string(buf) == client_addr);
  char peer[128];
  CHECK(duplex_conn_get_peer(client, peer, sizeof peer) == 0);
  CHECK(std::string(peer) == server_addr);
  char tiny[4] = {'x', 'x', 'x', 'x'};
  CHECK(duplex_conn_get_local(client, tiny, sizeof tiny) == DUPLEX_ENOBUFS);
  CHECK(tiny[0] == '\0');

  // The accepted end, adopted: its own name is the listening address.
  ConnEvents sev;
  auto so = sev.opts();
  duplex_conn *server = adopt(loop, acc, &so);
  REQUIRE(sev.wait_open());
  CHECK(duplex_conn_get_local(server, buf, sizeof buf) == 0);
  CHECK(std::string(buf) == server_addr);

  // Unnamed ends: "".
  auto sp = socket_pair();
  ConnEvents uev;
  auto uo = uev.opts();
  duplex_conn *unnamed = adopt(loop, sp.ours, &uo);
  REQUIRE(uev.wait_open());
  buf[0] = 'x';
  CHECK(duplex_conn_get_local(unnamed, buf, sizeof buf) == 0);
  CHECK(std::string(buf).empty());

  // Closed: DUPLEX_ECLOSED, before and after the loop is freed.
  REQUIRE(duplex_conn_close(client, DUPLEX_CLOSE_ABORT) == 0);
  REQUIRE(cev.wait_closed());
  CHECK(duplex_conn_get_local(client, buf, sizeof buf) == DUPLEX_ECLOSED);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_get_local(server, buf, sizeof buf) == DUPLEX_ECLOSED);
  for (duplex_conn *c : {client, server, unnamed})
    CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("connect_tcp binds the source address and port asked for") {
  Loop loop;
  Fd lfd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(lfd);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(lfd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
  REQUIRE(::listen(lfd.get(), 4) == 0);
  socklen_t sl = sizeof sa;
  REQUIRE(::getsockname(lfd.get(), reinterpret_cast<sockaddr *>(&sa), &sl) == 0);
  const uint16_t port = ntohs(sa.sin_port);
  // A free source port: take one from the kernel and give it back.
  uint16_t src_port = 0;
  {
    Fd probe(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in pa{};
    pa.sin_family = AF_INET;
    pa.sin_addr.s_addr = htonl(0x7f000002); // 127.0.0.2: loopback too
    REQUIRE(::bind(probe.get(), reinterpret_cast<sockaddr *>(&pa), sizeof pa) == 0);
    socklen_t pl = sizeof pa;
    REQUIRE(::getsockname(probe.get(), reinterpret_cast<sockaddr *>(&pa), &pl) == 0);
    src_port = ntohs(pa.sin_port);
  }
  ConnEvents cev;
  auto co = cev.opts();
  co.local_host = "127.0.0.2";
  co.local_port = src_port;
  duplex_conn *client = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&client, loop, "127.0.0.1", port, &co) == 0);
  REQUIRE(cev.wait_open());
  Fd acc(::accept(lfd.get(), nullptr, nullptr));
  REQUIRE(acc);
  sockaddr_in peer{};
  socklen_t pl = sizeof peer;
  REQUIRE(::getpeername(acc.get(), reinterpret_cast<sockaddr *>(&peer), &pl) == 0);
  CHECK(ntohl(peer.sin_addr.s_addr) == 0x7f000002u);
  CHECK(ntohs(peer.sin_port) == src_port);
  char buf[64];
  CHECK(duplex_conn_get_local(client, buf, sizeof buf) == 0);
  CHECK(std::string(buf) == "127.0.0.2:" + std::to_string(src_port));
  // The same source address and port again while it is in use.
  ConnEvents busy;
  auto bo = busy.opts();
  bo.local_host = "127.0.0.2";
  bo.local_port = src_port;
  duplex_conn *second = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&second, loop, "127.0.0.1", port, &bo) == 0);
  REQUIRE(busy.wait_closed());
  CHECK(busy.opens.load() == 0);
  // bind() takes the pair, connect() finds the 4-tuple in use (Linux):
  // either code names the clash.
  CHECK((busy.close_reason.load() == DUPLEX_EADDRINUSE ||
         busy.close_reason.load() == DUPLEX_EADDRNOTAVAIL));
  // An IPv6 source for an IPv4 destination: no address to try.
  ConnEvents fam;
  auto fo = fam.opts();
  fo.local_host = "::1";
  duplex_conn *third = nullptr;
  REQUIRE(duplex_conn_connect_tcp(&third, loop, "127.0.0.1", port, &fo) == 0);
  REQUIRE(fam.wait_closed());
  CHECK(fam.close_reason.load() == DUPLEX_EAFNOSUPPORT);
  CHECK(loop.free() == 0);
  for (duplex_conn *c : {client, second, third})
    CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("a source address is refused where it means nothing") {
  Loop loop;
  duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
  o.local_host = "not an address";
  duplex_conn *c = nullptr;
  CHECK(duplex_conn_connect_tcp(&c, loop, "127.0.0.1", 9, &o) == DUPLEX_EINVAL);
  CHECK(c == nullptr);
  o.local_host = "127.0.0.1";
  CHECK(duplex_conn_connect_unix(&c, loop, "/tmp/nowhere.sock", &o) == DUPLEX_EINVAL);
  auto sp = socket_pair();
  CHECK(duplex_conn_adopt(&c, loop, sp.ours.get(), &o) == DUPLEX_EINVAL);
  CHECK(fd_is_open(sp.ours.get())); // still the caller's
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  lo.conn_opts = &o;
  duplex_listener *l = nullptr;
  CHECK(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == DUPLEX_EINVAL);
  o.local_host = nullptr;
  o.local_port = 1;
  CHECK(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == DUPLEX_EINVAL);
  CHECK(l == nullptr);
}
