// The C++20 layer's loop groups (duplex::LoopGroup, group listeners) and
// signal watchers (duplex::Signal): conns accepted by a group listener run
// every callback on their own loop's thread, with that loop's exception
// capture; coroutines work on every loop; freeing the group closes them.
#include <duplex/duplex.hpp>

#include "fixture.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using namespace dtest;

int connect_client(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  return fd;
}

int connect_unix(const std::string &path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof a.sun_path);
  std::memcpy(a.sun_path, path.data(), path.size());
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  return fd;
}

// The thread each member loop runs on.
std::vector<std::thread::id> loop_threads(duplex::LoopGroup &g) {
  std::vector<std::thread::id> ids(g.size());
  std::atomic<unsigned> n{0};
  for (unsigned i = 0; i < g.size(); i++)
    g.loop(i).post([&, i] {
      ids[i] = std::this_thread::get_id();
      n++;
    });
  REQUIRE(wait_until([&] { return n.load() == g.size(); }));
  return ids;
}

// Connect @p n clients, wait until each is open on the server, send each
// a line and check its echo, then close them.
void echo_clients(duplex::Listener &l, unsigned n, std::atomic<unsigned> &opened) {
  unsigned before = opened.load();
  std::vector<int> fds;
  for (unsigned i = 0; i < n; i++)
    fds.push_back(connect_client(l.port()));
  REQUIRE(wait_until([&] { return opened.load() == before + n; }));
  for (unsigned i = 0; i < n; i++) {
    std::string msg = "hello " + std::to_string(i) + "\n";
    REQUIRE(write_all(fds[i], msg.data(), msg.size()) == 0);
    std::string got(msg.size(), '\0');
    REQUIRE(read_exactly(fds[i], got.data(), got.size()));
    CHECK(got == msg);
  }
  for (int fd : fds)
    ::close(fd);
}

} // namespace

TEST_CASE("LoopGroup: size, distinct threads, run/close of a member are the group's") {
  duplex::LoopGroup g(3);
  REQUIRE(g.size() == 3);
  auto ids = loop_threads(g);
  CHECK(std::set<std::thread::id>(ids.begin(), ids.end()).size() == 3);
  CHECK_FALSE(g.loop(0).on_thread());
  try {
    g.loop(1).run();
    FAIL("run() on a group loop");
  } catch (const duplex::error &e) {
    CHECK(e.code() == duplex::errc::DUPLEX_EBUSY);
  }
  g.loop(1).close(); // a no-op
  std::atomic<bool> ran{false};
  g.loop(1).post([&] { ran = true; });
  CHECK(wait_until([&] { return ran.load(); }));
  duplex::Loop &p = g.pick();
  CHECK((&p == &g.loop(0) || &p == &g.loop(1) || &p == &g.loop(2)));
  g.stop();
  g.start();
  duplex::LoopGroup moved = std::move(g);
  CHECK(moved.size() == 3);
  moved.close();
  moved.close(); // idempotent
}

TEST_CASE("group listener: 30 clients get their echo, every callback on the conn's loop thread, even shares") {
  duplex::LoopGroup g(3);
  auto ids = loop_threads(g);
  std::mutex mu;
  std::map<duplex_conn *, std::thread::id> thread_of;
  std::atomic<unsigned> opened{0}, closed{0}, wrong{0};
  auto same = [&](duplex::ConnRef c) {
    std::lock_guard<std::mutex> lk(mu);
    if (thread_of.at(c.native()) != std::this_thread::get_id())
      wrong++;
  };
  duplex::ConnHandlers h;
  h.on_open = [&](duplex::ConnRef c) {
    if (!g.loop_of(c).on_thread())
      wrong++;
    {
      std::lock_guard<std::mutex> lk(mu);
      thread_of[c.native()] = std::this_thread::get_id();
    }
    opened++;
  };
  h.on_read = [&](duplex::ConnRef c, std::span<const std::byte> d) {
    same(c);
    (void)c.write(d);
  };
  h.on_eof = [&](duplex::ConnRef c) {
    same(c);
    c.close();
  };
  h.on_close = [&](duplex::ConnRef c, std::error_code) {
    same(c);
    closed++;
  };
  auto l = duplex::Listener::tcp(g, "127.0.0.1", 0, h);
  REQUIRE(l.port() != 0);
  echo_clients(l, 30, opened);
  REQUIRE(wait_until([&] { return closed.load() == 30; }));
  CHECK(wrong.load() == 0);
  std::set<std::thread::id> used;
  for (auto &[c, t] : thread_of)
    used.insert(t);
  CHECK(used == std::set<std::thread::id>(ids.begin(), ids.end()));
  uint64_t lo = UINT64_MAX, hi = 0, total = 0;
  for (unsigned i = 0; i < 3; i++) {
    uint64_t a = g.stats(i).accepted;
    lo = std::min(lo, a);
    hi = std::max(hi, a);
    total += a;
  }
  CHECK(total == 30);
  CHECK(hi - lo <= 1);
  CHECK_NOTHROW(g.rethrow());
}

namespace {
duplex::task<void> co_echo(duplex::Conn conn, std::atomic<unsigned> *done) {
  for (;;) {
    auto r = co_await conn.read();
    if (!r.ok())
      break;
    auto ec = co_await conn.async_write(std::string(r.data));
    if (ec)
      break;
  }
  conn.close();
  (*done)++;
}
} // namespace

TEST_CASE("group listener: a coroutine echo on accepted conns works on every loop") {
  duplex::LoopGroup g(3);
  std::atomic<unsigned> opened{0}, done{0};
  std::mutex mu;
  std::set<duplex::Loop *> loops;
  duplex::ConnHandlers h;
  h.on_open = [&](duplex::ConnRef c) {
    duplex::Loop &lp = g.loop_of(c);
    {
      std::lock_guard<std::mutex> lk(mu);
      loops.insert(&lp);
    }
    duplex::spawn(lp, co_echo(duplex::Conn(c), &done));
    opened++;
  };
  auto l = duplex::Listener::tcp(g, "127.0.0.1", 0, h);
  echo_clients(l, 9, opened);
  REQUIRE(wait_until([&] { return done.load() == 9; }));
  CHECK(loops.size() == 3);
  CHECK_NOTHROW(g.rethrow());
}

TEST_CASE("group: an exception thrown in a handler on loop 2 surfaces from rethrow()") {
  duplex::LoopGroup g(3);
  std::atomic<unsigned> opened{0};
  duplex::ConnHandlers h;
  h.on_open = [&](duplex::ConnRef c) {
    opened++;
    if (&g.loop_of(c) == &g.loop(2))
      throw std::runtime_error("on loop 2");
  };
  auto l = duplex::Listener::tcp(g, "127.0.0.1", 0, h);
  std::vector<int> fds;
  for (int i = 0; i < 3; i++)
    fds.push_back(connect_client(l.port()));
  REQUIRE(wait_until([&] { return opened.load() == 3; }));
  REQUIRE(g.stats(2).accepted == 1);
  std::string what;
  REQUIRE(wait_until([&] {
    try {
      g.rethrow();
    } catch (const std::runtime_error &e) {
      what = e.what();
    }
    return !what.empty();
  }));
  CHECK(what == "on loop 2");
  CHECK_NOTHROW(g.rethrow()); // raised once
  // A posted callback's exception on a member loop, too.
  g.loop(1).post([] { throw std::logic_error("posted"); });
  what.clear();
  REQUIRE(wait_until([&] {
    try {
      g.rethrow();
    } catch (const std::logic_error &e) {
      what = e.what();
    }
    return !what.empty();
  }));
  for (int fd : fds)
    ::close(fd);
}

TEST_CASE("group: destroyed with live conns, every conn closes; the listener outlives it") {
  std::atomic<unsigned> opened{0}, closed{0};
  std::vector<int> fds;
  duplex::Listener l;
  uint16_t port = 0;
  {
    duplex::LoopGroup g(3);
    duplex::ConnHandlers h;
    h.on_open = [&](duplex::ConnRef c) {
      opened++;
      // Some conns also hold a coroutine reader and a Conn of their own.
      if (&g.loop_of(c) != &g.loop(0))
        duplex::spawn(g.loop_of(c), [](duplex::Conn conn) -> duplex::task<void> {
          for (;;) {
            auto r = co_await conn.read();
            if (!r.ok())
              co_return;
          }
        }(duplex::Conn(c)));
    };
    h.on_close = [&](duplex::ConnRef, std::error_code) { closed++; };
    l = duplex::Listener::tcp(g, "127.0.0.1", 0, h);
    port = l.port();
    for (int i = 0; i < 6; i++)
      fds.push_back(connect_client(port));
    REQUIRE(wait_until([&] { return opened.load() == 6; }));
    // A sleeper on a member loop resumes cancelled when the group goes.
    duplex::spawn(g.loop(1), [](duplex::Loop &lp) -> duplex::task<void> {
      co_await lp.sleep(std::chrono::hours(1));
    }(g.loop(1)));
  }
  CHECK(closed.load() == 6);
  CHECK(l.port() == port);
  CHECK_FALSE(l.address().empty());
  for (int fd : fds) {
    char b;
    CHECK(::read(fd, &b, 1) <= 0); // the server side closed
    ::close(fd);
  }
  l.close();
}

TEST_CASE("Signal: a SIGUSR1 watcher on a group loop runs its handler on that loop's thread; close stops it") {
  duplex::LoopGroup g(3);
  auto ids = loop_threads(g);
  std::atomic<unsigned> n1{0}, n0{0};
  std::atomic<bool> right_thread{true};
  duplex::Signal s1(g.loop(1), SIGUSR1, [&](int signum) {
    if (signum != SIGUSR1 || std::this_thread::get_id() != ids[1])
      right_thread = false;
    n1++;
  });
  CHECK(s1.signum() == SIGUSR1);
  // Another watcher keeps SIGUSR1 caught after s1 closes.
  duplex::Signal s0(g.loop(0), SIGUSR1, [&](int) { n0++; });
  REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
  REQUIRE(wait_until([&] { return n1.load() >= 1 && n0.load() >= 1; }));
  CHECK(right_thread.load());
  s1.close();
  s1.close(); // idempotent
  unsigned before1 = n1.load(), before0 = n0.load();
  REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
  REQUIRE(wait_until([&] { return n0.load() > before0; }));
  std::this_thread::sleep_for(20ms);
  CHECK(n1.load() == before1);
  // A handler's exception goes to the group's rethrow().
  duplex::Signal s2(g.loop(2), SIGUSR1, [](int) { throw std::runtime_error("sig"); });
  REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
  bool got = false;
  REQUIRE(wait_until([&] {
    try {
      g.rethrow();
    } catch (const std::runtime_error &) {
      got = true;
    }
    return got;
  }));
  s0.close();
  g.close(); // s2 outlives its loop
  s2.close();
}

TEST_CASE("group listeners: a UNIX socket, and SO_REUSEPORT sockets (Linux)") {
  duplex::LoopGroup g(3);
  std::atomic<unsigned> opened{0}, closed{0}, wrong{0};
  duplex::ConnHandlers h;
  h.on_open = [&](duplex::ConnRef c) {
    if (!g.loop_of(c).on_thread())
      wrong++;
    opened++;
  };
  h.on_read = [&](duplex::ConnRef c, std::span<const std::byte> d) {
    if (!g.loop_of(c).on_thread())
      wrong++;
    (void)c.write(d);
  };
  h.on_eof = [](duplex::ConnRef c) { c.close(); };
  h.on_close = [&](duplex::ConnRef, std::error_code) { closed++; };

  std::string path = "/tmp/duplex-cppg-" + std::to_string(::getpid()) + ".sock";
  ::unlink(path.c_str());
  {
    auto l = duplex::Listener::unix_path(g, path, h);
    std::vector<int> fds;
    for (int i = 0; i < 6; i++)
      fds.push_back(connect_unix(path));
    REQUIRE(wait_until([&] { return opened.load() == 6; }));
    for (int fd : fds) {
      REQUIRE(write_all(fd, "ping", 4) == 0);
      char b[4];
      REQUIRE(read_exactly(fd, b, 4));
      CHECK(std::string(b, 4) == "ping");
      ::close(fd);
    }
    REQUIRE(wait_until([&] { return closed.load() == 6; }));
  }
  ::unlink(path.c_str());
#ifdef __linux__
  auto l = duplex::Listener::tcp(g, "127.0.0.1", 0, h, {},
                                 duplex::ListenerOptions{.reuse_port = true});
  echo_clients(l, 12, opened);
  REQUIRE(wait_until([&] { return closed.load() == 18; }));
  uint64_t total = 0;
  for (unsigned i = 0; i < 3; i++)
    total += g.stats(i).accepted;
  CHECK(total == 18);
#endif
  CHECK(wrong.load() == 0);
  CHECK_NOTHROW(g.rethrow());
}
