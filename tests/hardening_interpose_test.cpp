// Regression tests for review defects 5, 8 and 11, whose races are widened by
// interposing a function the library (or libuv) calls through the PLT. This
// executable defines uv_mutex_unlock, uv_stop and getaddrinfo (exported with
// export_dynamic so that libduplex and libuv bind to them); each forwards to
// the real function and only waits when a case arms it, so every other call
// behaves normally.
//
// A fixed library may no longer call the interposed function on the path a
// case widens. The cases therefore never require the hook to run: a hook that
// is never reached simply leaves the window narrow, and the assertions (which
// are about the library's results and their order) still hold.
#include "hardening.hpp"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netdb.h>
#include <netinet/in.h>

using namespace dtest;
using namespace hard;

// ---------------------------------------------------------------------------
// The interposed functions
// ---------------------------------------------------------------------------

struct uv_loop_s;

namespace {
// uv_mutex_unlock: the calling thread's next unlock, once armed, waits (after
// really unlocking) until the test says so or 3 s pass.
thread_local bool t_delay_next_unlock = false;
std::atomic<bool> g_unlock_delaying{false};
std::atomic<bool> g_unlock_release{false};

// uv_stop: once armed, waits (after really stopping) until the asker thread
// has entered its call, then 300 ms more for it to queue its request.
std::atomic<bool> g_stop_armed{false};
std::atomic<bool> g_stop_entered{false};
std::atomic<bool> g_asker_entered{false};

// getaddrinfo: names under .hardening.invalid "hang": 3 s, then EAI_AGAIN.
constexpr int kStuckSlots = 2;
std::atomic<bool> g_gai_entered[kStuckSlots];
std::atomic<bool> g_gai_returned[kStuckSlots];

template <class Pred> void wait_flag(Pred &&pred, std::chrono::milliseconds cap) {
  auto end = std::chrono::steady_clock::now() + cap;
  while (!pred() && std::chrono::steady_clock::now() < end)
    ::usleep(1000);
}
} // namespace

extern "C" void uv_mutex_unlock(pthread_mutex_t *m) {
  using fn_t = void (*)(pthread_mutex_t *);
  static fn_t real = reinterpret_cast<fn_t>(::dlsym(RTLD_NEXT, "uv_mutex_unlock"));
  real(m);
  if (t_delay_next_unlock) {
    t_delay_next_unlock = false;
    g_unlock_delaying = true;
    wait_flag([] { return g_unlock_release.load(); }, std::chrono::seconds(3));
  }
}

extern "C" void uv_stop(uv_loop_s *l) {
  using fn_t = void (*)(uv_loop_s *);
  static fn_t real = reinterpret_cast<fn_t>(::dlsym(RTLD_NEXT, "uv_stop"));
  real(l);
  if (g_stop_armed.exchange(false)) {
    g_stop_entered = true;
    wait_flag([] { return g_asker_entered.load(); }, std::chrono::seconds(5));
    ::usleep(300 * 1000);
  }
}

extern "C" int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                           struct addrinfo **res) {
  int slot = -1;
  if (node != nullptr && std::strcmp(node, "stuck-0.hardening.invalid") == 0)
    slot = 0;
  else if (node != nullptr && std::strcmp(node, "stuck-1.hardening.invalid") == 0)
    slot = 1;
  if (slot >= 0) {
    g_gai_entered[slot] = true;
    ::sleep(3); // a resolver that does not answer
    g_gai_returned[slot] = true;
    return EAI_AGAIN;
  }
  using fn_t = int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
  static fn_t real = reinterpret_cast<fn_t>(::dlsym(RTLD_NEXT, "getaddrinfo"));
  return real(node, service, hints, res);
}

namespace {

// A TCP listener on the loop whose first accepted conn is kept (with a
// reference) in `accepted`.
struct AcceptOne {
  ConnEvents ev;
  std::atomic<duplex_conn *> accepted{nullptr};
  duplex_conn_opts co{};
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  duplex_listener *l = nullptr;
  uint16_t port = 0;

  AcceptOne() = default;
  AcceptOne(const AcceptOne &) = delete;
  AcceptOne &operator=(const AcceptOne &) = delete;
  ~AcceptOne() { listener_unref(l); } // after the loop's free

  void listen(duplex_loop *loop) {
    ev.open_hook = [this](duplex_conn *c) {
      duplex_conn *expected = nullptr;
      duplex_conn_ref(c);
      if (!accepted.compare_exchange_strong(expected, c))
        duplex_conn_unref(c);
    };
    co = ev.opts();
    lo.conn_opts = &co;
    REQUIRE(duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) == 0);
    REQUIRE(duplex_listener_get_port(l, &port) == 0);
  }
};

Fd tcp_client(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sa.sin_port = htons(port);
  REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
  return fd;
}

std::string local_name(int fd) {
  sockaddr_in sa{};
  socklen_t len = sizeof sa;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr *>(&sa), &len) == 0);
  return "127.0.0.1:" + std::to_string(ntohs(sa.sin_port));
}

} // namespace

// ---------------------------------------------------------------------------
// Defect 5 (peer_vs_free.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 5: duplex_conn_get_peer racing duplex_loop_free returns 0 or "
          "DUPLEX_ECLOSED and touches no freed memory") {
  Watchdog wd("defect 5", std::chrono::seconds(90));
  g_unlock_release = false;
  g_unlock_delaying = false;
  AcceptOne srv;
  duplex_loop *loop = nullptr;
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  srv.listen(loop);
  REQUIRE(duplex_loop_start(loop) == 0);
  Fd client = tcp_client(srv.port);
  REQUIRE(wait_until([&] { return srv.accepted.load() != nullptr; }, kHang));
  duplex_conn *c = srv.accepted.load();

  std::atomic<int> rc{kUnset};
  std::atomic<bool> asking{false};
  std::string name;
  std::thread asker([&] {
    char buf[128];
    asking = true;
    t_delay_next_unlock = true; // the first unlock inside get_peer waits
    int r = duplex_conn_get_peer(c, buf, sizeof buf);
    t_delay_next_unlock = false;
    if (r == 0)
      name = buf;
    rc = r;
  });
  REQUIRE(wait_until([&] { return asking.load(); }, kHang));
  // Free while get_peer is inside the library (if the hook is reached).
  wait_flag([&] { return g_unlock_delaying.load() || rc.load() != kUnset; },
            std::chrono::seconds(2));
  {
    Watchdog fw("defect 5: duplex_loop_free while get_peer runs");
    CHECK(duplex_loop_free(loop) == 0);
  }
  g_unlock_release = true;
  asker.join();
  CHECK_MESSAGE((rc.load() == 0 || rc.load() == DUPLEX_ECLOSED),
                "get_peer returned " << err_str(rc.load()));
  if (rc.load() == 0)
    CHECK(name == local_name(client.get()));
  // The conn stays a valid handle after its loop is gone.
  char buf[128];
  int again = duplex_conn_get_peer(c, buf, sizeof buf);
  CHECK((again == 0 || again == DUPLEX_ECLOSED));
  duplex_conn_unref(c);
  CHECK(srv.ev.closes.load() == 1);
}

// ---------------------------------------------------------------------------
// Defect 8 (connect_timeout_dns.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 8: connect_timeout_ms covers a name lookup that does not answer: "
          "on_close(DUPLEX_ETIMEDOUT) and duplex_loop_free come before the lookup returns") {
  Watchdog wd("defect 8", std::chrono::seconds(90));
  for (auto &f : g_gai_entered)
    f = false;
  for (auto &f : g_gai_returned)
    f = false;
  ConnEvents ev;
  std::atomic<int> returned_at_close{-1};
  ev.close_hook = [&](duplex_conn *, int) {
    returned_at_close = g_gai_returned[0].load() ? 1 : 0;
  };
  ConnEvents ev2;
  duplex_loop *loop = nullptr;
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  REQUIRE(duplex_loop_start(loop) == 0);

  duplex_conn_opts o = ev.opts();
  o.connect_timeout_ms = 200;
  REQUIRE(duplex_conn_connect_tcp(nullptr, loop, "stuck-0.hardening.invalid", 80, &o) == 0);
  REQUIRE(ev.wait_closed(kHang));
  CHECK_MESSAGE(ev.close_reason.load() == DUPLEX_ETIMEDOUT,
                "on_close reason " << err_str(ev.close_reason.load()));
  CHECK_MESSAGE(returned_at_close.load() == 0,
                "on_close ran only after the stuck getaddrinfo returned");
  CHECK(ev.opens.load() == 0);

  // Freeing the loop while a lookup is in flight does not wait for it.
  duplex_conn_opts o2 = ev2.opts();
  REQUIRE(duplex_conn_connect_tcp(nullptr, loop, "stuck-1.hardening.invalid", 80, &o2) == 0);
  wait_flag([] { return g_gai_entered[1].load(); }, std::chrono::seconds(2));
  bool lookup_running = g_gai_entered[1].load() && !g_gai_returned[1].load();
  {
    Watchdog fw("defect 8: duplex_loop_free with a lookup in flight");
    CHECK(duplex_loop_free(loop) == 0);
  }
  bool returned_at_free = g_gai_returned[1].load();
  if (lookup_running)
    CHECK_MESSAGE(!returned_at_free,
                  "duplex_loop_free returned only after the stuck getaddrinfo did");
  CHECK(ev2.closes.load() == 1);
  CHECK(ev2.opens.load() == 0);
  // Let the stuck lookups finish inside this case, so that whatever they
  // touch when they return (nothing of the freed loop, for a fixed library)
  // happens while the case runs.
  for (int s = 0; s < kStuckSlots; s++)
    if (g_gai_entered[s].load())
      CHECK(wait_until([&] { return g_gai_returned[s].load(); }, kHang));
  ::usleep(200 * 1000);
}

// ---------------------------------------------------------------------------
// Defect 11 (exec_after_stop.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 11: a blocking get_peer queued as duplex_loop_run returns does not stay "
          "blocked on the stopped loop") {
  Watchdog wd("defect 11", std::chrono::seconds(90));
  g_stop_armed = false;
  g_stop_entered = false;
  g_asker_entered = false;
  AcceptOne srv;
  duplex_loop *loop = nullptr;
  REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
  srv.listen(loop);
  auto runner = std::make_unique<LoopRunner>(loop);
  Fd client = tcp_client(srv.port);
  REQUIRE(wait_until([&] { return srv.accepted.load() != nullptr; }, kHang));
  duplex_conn *c = srv.accepted.load();

  // Stop the loop; the loop thread lingers in uv_stop (if it calls it) until
  // the asker has queued its request.
  g_stop_armed = true;
  REQUIRE(duplex_loop_stop(loop) == 0);
  wait_flag([] { return g_stop_entered.load(); }, std::chrono::seconds(2));
  std::atomic<int> rc{kUnset};
  std::string name;
  std::thread asker([&] {
    char buf[128];
    g_asker_entered = true;
    int r = duplex_conn_get_peer(c, buf, sizeof buf); // first ask: needs the loop
    if (r == 0)
      name = buf;
    rc = r;
  });
  CHECK(runner->join() == 0); // duplex_loop_run returned; nobody runs the loop now
  g_stop_armed = false;

  bool returned = wait_until([&] { return rc.load() != kUnset; }, kHang);
  CHECK_MESSAGE(returned, "duplex_conn_get_peer stayed blocked on a loop that nobody runs");
  if (!returned) {
    // Release it the way the repro does, so that the case ends cleanly.
    duplex_loop_run(loop, DUPLEX_RUN_NOWAIT);
    if (!wait_until([&] { return rc.load() != kUnset; }, kHang))
      die("defect 11: get_peer stayed blocked even after the loop ran again");
  }
  asker.join();
  CHECK_MESSAGE(rc.load() == 0, "get_peer returned " << err_str(rc.load()));
  if (rc.load() == 0)
    CHECK(name == local_name(client.get()));
  runner.reset();
  {
    Watchdog fw("defect 11: duplex_loop_free");
    CHECK(duplex_loop_free(loop) == 0);
  }
  duplex_conn_unref(c);
}
