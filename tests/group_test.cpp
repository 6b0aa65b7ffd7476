// Loop groups: N loops on library-owned threads, listeners that spread
// conns over them, the least-loaded pick, per-loop figures.
//
// Peers are plain blocking POSIX sockets. Shares are checked with a stated
// tolerance (balanced: every loop within one conn of the others, which the
// strategy guarantees when no conn closes meanwhile); nothing depends on
// timing.
#include "fixture.hpp"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/un.h>

#include <algorithm>
#include <map>
#include <set>

using namespace dtest;

namespace {

// A group of @p n loops, started, freed at scope exit unless free() ran.
struct Group {
  duplex_loop_group *g = nullptr;
  std::vector<duplex_loop *> loops;
  explicit Group(unsigned n, unsigned flags = 0, bool start = true) {
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.loops = n;
    o.flags = flags;
    REQUIRE(duplex_group_new(&g, &o) == 0);
    unsigned count = 0;
    REQUIRE(duplex_group_get_count(g, &count) == 0);
    for (unsigned i = 0; i < count; i++) {
      duplex_loop *l = nullptr;
      REQUIRE(duplex_group_get_loop(g, i, &l) == 0);
      loops.push_back(l);
    }
    if (start)
      REQUIRE(duplex_group_start(g) == 0);
  }
  ~Group() { free(); }
  void free() {
    if (g != nullptr)
      CHECK(duplex_group_free(g) == 0);
    g = nullptr;
  }
  // The index of the loop whose thread calls this, or -1.
  int current() const {
    for (size_t i = 0; i < loops.size(); i++)
      if (duplex_loop_on_thread(loops[i]) == 1)
        return static_cast<int>(i);
    return -1;
  }
  duplex_loop_stats stats(unsigned i) const {
    duplex_loop_stats st = DUPLEX_LOOP_STATS_INIT;
    REQUIRE(duplex_loop_get_stats(loops[i], &st) == 0);
    return st;
  }
};

struct Server;

// Per-conn record: the loop it opened on and every callback's loop.
struct ConnRec {
  Server *srv = nullptr;
  int loop = -1;
  std::thread::id thread;
  std::atomic<int> migrations{0};
  std::atomic<int> closes{0};
};

// An echo server whose accepted conns record where each callback runs.
struct Server {
  Group *group = nullptr;
  std::mutex mu;
  std::vector<std::unique_ptr<ConnRec>> recs;
  std::vector<duplex_conn *> held; // references taken in on_open (hold=true)
  bool hold = false;
  std::atomic<int> opens{0}, closes{0}, errors{0}, migrations{0};
  std::atomic<int> not_canceled{0}; // close reasons other than ECANCELED
  std::atomic<int> opens_after_close{0};
  std::atomic<bool> closed{false};
  std::atomic<int> last_error{0};
  std::atomic<duplex_listener *> error_listener{nullptr};
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;

  explicit Server(Group &g) : group(&g) {
    cbs.on_open = on_open;
    cbs.on_read = on_read;
    cbs.on_eof = on_eof;
    cbs.on_close = on_close;
    copts.cbs = &cbs;
    copts.user = this;
    lopts.conn_opts = &copts;
    lopts.on_error = on_error;
    lopts.user = this;
  }
  ~Server() {
    for (duplex_conn *c : held)
      duplex_conn_unref(c);
  }
  static Server *of(void *u) { return static_cast<Server *>(u); }
  static void check(duplex_conn *c) {
    void *u = nullptr;
    duplex_conn_get_user(c, &u);
    auto *r = static_cast<ConnRec *>(u);
    if (r->thread != std::this_thread::get_id())
      r->migrations++;
  }
  static void on_open(duplex_conn *c, void *u) {
    Server *s = of(u);
    auto rec = std::make_unique<ConnRec>();
    rec->srv = s;
    rec->loop = s->group->current();
    duplex_loop *own = nullptr;
    if (duplex_conn_get_loop(c, &own) != 0 || rec->loop < 0 ||
        own != s->group->loops[static_cast<size_t>(rec->loop)])
      rec->migrations++; // its loop is the one running its callbacks
    rec->thread = std::this_thread::get_id();
    if (s->closed.load())
      s->opens_after_close++;
    duplex_conn_set_user(c, rec.get());
    std::lock_guard<std::mutex> lk(s->mu);
    s->recs.push_back(std::move(rec));
    if (s->hold) {
      duplex_conn_ref(c);
      s->held.push_back(c);
    }
    s->opens++;
  }
  static void on_read(duplex_conn *c, const void *d, size_t n, void *) {
    check(c);
    duplex_conn_write(c, d, n, nullptr, nullptr);
  }
  static void on_eof(duplex_conn *c, void *) {
    check(c);
    duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL);
  }
  // Accepted conns get on_open first, so the user pointer is the record.
  static void on_close(duplex_conn *, int reason, void *u) {
    auto *r = static_cast<ConnRec *>(u);
    if (reason != DUPLEX_ECANCELED)
      r->srv->not_canceled++;
    if (r->thread != std::this_thread::get_id())
      r->migrations++;
    r->closes++;
    r->srv->closes++;
  }
  static void on_error(duplex_listener *l, int status, void *u) {
    Server *s = of(u);
    s->errors++;
    s->last_error = status;
    s->error_listener = l;
  }
  std::map<int, int> shares() {
    std::lock_guard<std::mutex> lk(mu);
    std::map<int, int> m;
    for (auto &r : recs)
      m[r->loop]++;
    return m;
  }
  int total_migrations() {
    std::lock_guard<std::mutex> lk(mu);
    int n = 0;
    for (auto &r : recs)
      n += r->migrations.load();
    return n;
  }
  int bad_close_counts() {
    std::lock_guard<std::mutex> lk(mu);
    int n = 0;
    for (auto &r : recs)
      n += r->closes.load() != 1;
    return n;
  }
};

Fd tcp_connect(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  REQUIRE_MESSAGE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0,
                  "connect: " << std::strerror(errno));
  return fd;
}

Fd unix_connect(const std::string &path) {
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  return fd;
}

// Send a line and expect it back.
bool echoes(int fd, const std::string &msg) {
  if (write_all(fd, msg.data(), msg.size()) != 0)
    return false;
  std::string got(msg.size(), '\0');
  return read_exactly(fd, got.data(), got.size()) && got == msg;
}

uint16_t port_of(duplex_listener *l) {
  uint16_t p = 0;
  REQUIRE(duplex_listener_get_port(l, &p) == 0);
  return p;
}

// Every loop of the group has finished what it was doing (a post on each
// ran after everything queued before it).
void settle(Group &g) {
  for (duplex_loop *l : g.loops)
    REQUIRE(on_loop(l, [] {}));
}

} // namespace

TEST_CASE("a group's loops run on their own threads, one thread per loop") {
  Group g(3);
  REQUIRE(g.loops.size() == 3);
  std::set<std::thread::id> threads;
  for (unsigned i = 0; i < 3; i++) {
    duplex_loop_group *owner = nullptr;
    unsigned index = 99;
    CHECK(duplex_loop_get_group(g.loops[i], &owner, &index) == 0);
    CHECK(owner == g.g);
    CHECK(index == i);
    std::thread::id id;
    int seen = -2;
    REQUIRE(on_loop(g.loops[i], [&] {
      id = std::this_thread::get_id();
      seen = g.current();
    }));
    CHECK(seen == static_cast<int>(i));
    CHECK(id != std::this_thread::get_id());
    threads.insert(id);
  }
  CHECK(threads.size() == 3);
  // The group owns its loops' lifecycle.
  CHECK(duplex_loop_run(g.loops[0], DUPLEX_RUN_NOWAIT) == DUPLEX_EBUSY);
  CHECK(duplex_loop_start(g.loops[1]) == DUPLEX_EBUSY);
  CHECK(duplex_loop_free(g.loops[2]) == DUPLEX_EBUSY);
  CHECK(duplex_group_start(g.g) == DUPLEX_EBUSY);
  // Stop and free are refused on the group's own threads.
  int stop_rc = 0, free_rc = 0;
  REQUIRE(on_loop(g.loops[1], [&] {
    stop_rc = duplex_group_stop(g.g);
    free_rc = duplex_group_free(g.g);
  }));
  CHECK(stop_rc == DUPLEX_EDEADLK);
  CHECK(free_rc == DUPLEX_EDEADLK);
}

TEST_CASE("loops = 0 makes one loop per CPU of the affinity mask") {
  cpu_set_t set;
  REQUIRE(sched_getaffinity(0, sizeof set, &set) == 0);
  Group g(0, 0, false);
  CHECK(g.loops.size() == static_cast<size_t>(CPU_COUNT(&set)));
}

TEST_CASE("DUPLEX_GROUP_PIN pins each loop's thread to one allowed CPU") {
  cpu_set_t allowed;
  REQUIRE(sched_getaffinity(0, sizeof allowed, &allowed) == 0);
  std::vector<int> cpus;
  for (int i = 0; i < CPU_SETSIZE; i++)
    if (CPU_ISSET(i, &allowed))
      cpus.push_back(i);
  Group g(3, DUPLEX_GROUP_PIN);
  for (unsigned i = 0; i < 3; i++) {
    cpu_set_t mine;
    CPU_ZERO(&mine);
    REQUIRE(on_loop(g.loops[i], [&] {
      pthread_getaffinity_np(pthread_self(), sizeof mine, &mine);
    }));
    CHECK(CPU_COUNT(&mine) == 1);
    CHECK(CPU_ISSET(cpus[i % cpus.size()], &mine));
  }
}

TEST_CASE("stop keeps queued work for start; free cancels it exactly once") {
  Group g(2);
  std::atomic<int> ran{0}, canceled{0};
  auto post = [&](duplex_loop *l) {
    struct Arg {
      std::atomic<int> *ran, *canceled;
    };
    auto *a = new Arg{&ran, &canceled};
    REQUIRE(duplex_loop_post(l, [](duplex_loop *, int status, void *p) {
      std::unique_ptr<Arg> arg(static_cast<Arg *>(p));
      (status == 0 ? *arg->ran : *arg->canceled)++;
    }, a) == 0);
  };
  REQUIRE(duplex_group_stop(g.g) == 0);
  CHECK(duplex_group_stop(g.g) == 0); // not running: nothing to do
  for (duplex_loop *l : g.loops)
    post(l);
  // Nothing runs while stopped (the posts wait in the inboxes) ...
  std::this_thread::sleep_for(20ms);
  CHECK(ran.load() == 0);
  // ... and everything runs once started again.
  REQUIRE(duplex_group_start(g.g) == 0);
  CHECK(wait_until([&] { return ran.load() == 2; }));
  REQUIRE(duplex_group_stop(g.g) == 0);
  for (duplex_loop *l : g.loops)
    post(l);
  g.free();
  CHECK(ran.load() == 2);
  CHECK(canceled.load() == 2);
}

TEST_CASE("balanced group listener: a burst of clients spreads evenly, conns never migrate") {
  constexpr unsigned kLoops = 4;
  const int kClients = kSanitized ? 40 : 80;
  Group g(kLoops);
  Server srv(g);
  duplex_listener *l = nullptr;
  REQUIRE(duplex_group_listen_tcp(&l, g.g, "127.0.0.1", 0, &srv.lopts) == 0);
  uint16_t port = port_of(l);
  // Connect them all first (a burst in the backlog), then talk.
  std::vector<Fd> clients;
  for (int i = 0; i < kClients; i++)
    clients.push_back(tcp_connect(port));
  for (int round = 0; round < 3; round++)
    for (int i = 0; i < kClients; i++)
      REQUIRE(echoes(clients[i].get(), "msg " + std::to_string(i) + "/" +
                                           std::to_string(round) + "\n"));
  REQUIRE(wait_until([&] { return srv.opens.load() == kClients; }));
  auto shares = srv.shares();
  CHECK(shares.count(-1) == 0); // every on_open ran on one of the loops
  int lo = INT32_MAX, hi = 0;
  uint64_t accepted = 0;
  for (unsigned i = 0; i < kLoops; i++) {
    int n = shares[static_cast<int>(i)];
    lo = std::min(lo, n);
    hi = std::max(hi, n);
    duplex_loop_stats st = g.stats(i);
    CHECK(st.conns == static_cast<uint64_t>(n)); // live conns, per loop
    CHECK(st.accepted == static_cast<uint64_t>(n));
    accepted += st.accepted;
    MESSAGE("loop " << i << ": " << n << " conns");
  }
  CHECK(accepted == static_cast<uint64_t>(kClients));
  CHECK(hi - lo <= 1); // the stated tolerance of the balanced strategy
  // Half the clients leave; each close runs on the conn's own loop.
  for (int i = 0; i < kClients; i += 2)
    ::shutdown(clients[i].get(), SHUT_WR);
  REQUIRE(wait_until([&] { return srv.closes.load() == kClients / 2; }));
  uint64_t live = 0;
  for (unsigned i = 0; i < kLoops; i++)
    live += g.stats(i).conns;
  CHECK(live == static_cast<uint64_t>(kClients / 2));
  clients.clear();
  REQUIRE(wait_until([&] { return srv.closes.load() == kClients; }));
  CHECK(srv.total_migrations() == 0);
  CHECK(srv.bad_close_counts() == 0);
  CHECK(srv.errors.load() == 0);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_close(l) == DUPLEX_ECLOSED);
  CHECK(duplex_listener_unref(l) == 0);
}

TEST_CASE("REUSEPORT group listener: one socket per loop, every client served") {
  constexpr unsigned kLoops = 3;
  const int kClients = 48;
  Group g(kLoops);
  Server srv(g);
  duplex_listener_opts lo = srv.lopts;
  lo.flags = DUPLEX_LISTEN_REUSEPORT;
  duplex_listener *l = nullptr;
  REQUIRE(duplex_group_listen_tcp(&l, g.g, "127.0.0.1", 0, &lo) == 0);
  uint16_t port = port_of(l);
  char addr[64];
  REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
  CHECK(std::string(addr) == "127.0.0.1:" + std::to_string(port));
  std::vector<Fd> clients;
  for (int i = 0; i < kClients; i++) {
    clients.push_back(tcp_connect(port));
    REQUIRE(echoes(clients.back().get(), "r" + std::to_string(i)));
  }
  auto shares = srv.shares();
  int used = 0, sum = 0;
  for (unsigned i = 0; i < kLoops; i++) {
    used += shares[static_cast<int>(i)] > 0;
    sum += shares[static_cast<int>(i)];
    CHECK(g.stats(i).accepted == static_cast<uint64_t>(shares[static_cast<int>(i)]));
    MESSAGE("loop " << i << ": " << shares[static_cast<int>(i)] << " conns (kernel hash)");
  }
  CHECK(sum == kClients);
  // 48 clients from distinct ports all hashed to one socket: ~3^-47.
  CHECK(used >= 2);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  clients.clear();
  REQUIRE(wait_until([&] { return srv.closes.load() == kClients; }));
  CHECK(srv.total_migrations() == 0);
  // Every socket is closed: nobody listens on the port any more.
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  CHECK(wait_until([&] {
    Fd probe(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    return ::connect(probe.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) != 0 &&
           errno == ECONNREFUSED;
  }));
}

TEST_CASE("UNIX group listener balances too and removes its file on close") {
  TempDir dir;
  std::string path = dir.file("group.sock");
  Group g(2);
  Server srv(g);
  duplex_listener *l = nullptr;
  REQUIRE(duplex_group_listen_unix(&l, g.g, path.c_str(), &srv.lopts) == 0);
  char addr[256];
  REQUIRE(duplex_listener_get_address(l, addr, sizeof addr) == 0);
  CHECK(std::string(addr) == path);
  uint16_t p;
  CHECK(duplex_listener_get_port(l, &p) == DUPLEX_ENOTSUP);
  std::vector<Fd> clients;
  for (int i = 0; i < 10; i++)
    clients.push_back(unix_connect(path));
  for (int i = 0; i < 10; i++)
    REQUIRE(echoes(clients[i].get(), "u" + std::to_string(i)));
  auto shares = srv.shares();
  CHECK(shares[0] == 5);
  CHECK(shares[1] == 5);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  CHECK(wait_until([&] { return !std::filesystem::exists(path); }));
  clients.clear();
  REQUIRE(wait_until([&] { return srv.closes.load() == 10; }));
}

TEST_CASE("group free with live conns and pending cross-thread writes: every completion once") {
  constexpr int kConns = 8;
  Group g(3);
  Server srv(g);
  srv.hold = true;
  srv.copts.high_watermark = 256 * 1024; // small queues: refusals come soon
  srv.copts.hard_limit = 1024 * 1024;
  duplex_listener *l = nullptr;
  REQUIRE(duplex_group_listen_tcp(&l, g.g, "127.0.0.1", 0, &srv.lopts) == 0);
  std::vector<Fd> clients;
  for (int i = 0; i < kConns; i++) {
    clients.push_back(tcp_connect(port_of(l)));
    REQUIRE(echoes(clients.back().get(), "hello"));
  }
  std::vector<duplex_conn *> conns;
  {
    std::lock_guard<std::mutex> lk(srv.mu);
    conns = srv.held;
  }
  REQUIRE(conns.size() == kConns);
  // The clients stop reading; writers on other threads queue until the
  // conns refuse more.
  WriteCounter wc;
  std::atomic<uint64_t> issued{0};
  std::vector<std::thread> writers;
  std::vector<char> block(16 * 1024, 'w');
  for (int t = 0; t < 2; t++)
    writers.emplace_back([&, t] {
      // Each conn until it refuses a write: the kernel's buffers toward the
      // client (who reads nothing) are full and the queue is at its limit.
      // (A refused write waits for room; a conn that stays full for
      // 100 ms has nothing left to drain into.)
      for (int i = t; i < kConns; i += 2)
        for (int n = 0; n < 100000; n++) {
          int rc = duplex_conn_write(conns[i], block.data(), block.size(), WriteCounter::cb, &wc);
          if (rc == 0) {
            issued++;
            continue;
          }
          if (rc != DUPLEX_EWOULDBLOCK ||
              duplex_conn_wait_room(conns[i], block.size(), 100) != 0)
            break;
        }
    });
  for (auto &w : writers)
    w.join();
  uint64_t queued = 0;
  for (unsigned i = 0; i < g.loops.size(); i++)
    queued += g.stats(i).queued;
  CHECK(queued > 0); // the figures see the backlog
  CHECK(duplex_listener_unref(l) == 0); // the group's free closes it
  g.free();
  CHECK(wc.total.load() == issued.load());
  CHECK(wc.failed.load() == 0);
  CHECK(srv.closes.load() == kConns);
  CHECK(srv.bad_close_counts() == 0);
  // References held past the free answer ECLOSED.
  for (duplex_conn *c : conns)
    CHECK(duplex_conn_write(c, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
}

TEST_CASE("listener close while clients keep connecting: no conn opens after it returns") {
  Group g(2);
  Server srv(g);
  duplex_listener *l = nullptr;
  REQUIRE(duplex_group_listen_tcp(&l, g.g, "127.0.0.1", 0, &srv.lopts) == 0);
  uint16_t port = port_of(l);
  std::atomic<bool> stop{false};
  std::atomic<int> attempts{0};
  PeerThread storm([&] {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    while (!stop.load()) {
      Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (::connect(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0)
        attempts++;
      else
        std::this_thread::sleep_for(1ms);
    }
  });
  REQUIRE(wait_until([&] { return srv.opens.load() >= 20; }));
  REQUIRE(duplex_listener_close(l) == 0);
  // An on_open that began before the close finished inside it; none may
  // begin after it returned, on any loop (hand-offs in flight included).
  int opened = srv.opens.load();
  srv.closed = true;
  std::this_thread::sleep_for(50ms);
  settle(g);
  stop = true;
  storm.join();
  CHECK(srv.opens.load() == opened);
  CHECK(srv.opens_after_close.load() == 0);
  CHECK(duplex_listener_unref(l) == 0);
  REQUIRE(wait_until([&] { return srv.closes.load() == srv.opens.load(); }));
}

TEST_CASE("group listener out of descriptors: reported once with the group listener, then serves") {
  struct rlimit old;
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
  Group g(2);
  Server srv(g);
  duplex_listener *l = nullptr;
  REQUIRE(duplex_group_listen_tcp(&l, g.g, "127.0.0.1", 0, &srv.lopts) == 0);
  uint16_t port = port_of(l);
  // Clients connect first (their sockets exist), then every free
  // descriptor is taken: the kernel queues the clients in the backlog.
  std::vector<Fd> clients;
  std::vector<Fd> fillers;
  {
    // Keep the limit small so filling is quick.
    int highest = 0;
    DIR *d = ::opendir("/proc/self/fd");
    REQUIRE(d != nullptr);
    while (dirent *e = ::readdir(d))
      highest = std::max(highest, std::atoi(e->d_name));
    ::closedir(d);
    struct rlimit lim = old;
    lim.rlim_cur = static_cast<rlim_t>(highest + 64);
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &lim) == 0);
  }
  REQUIRE(duplex_group_stop(g.g) == 0); // nothing accepts while we fill
  for (int i = 0; i < 4; i++)
    clients.push_back(tcp_connect(port));
  for (;;) {
    int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      break;
    fillers.emplace_back(fd);
  }
  REQUIRE(duplex_group_start(g.g) == 0);
  REQUIRE(wait_until([&] { return srv.errors.load() >= 1; }));
  std::this_thread::sleep_for(50ms); // back-off retries keep failing
  CHECK(srv.errors.load() == 1);     // once per episode
  CHECK(srv.last_error.load() == DUPLEX_EMFILE);
  CHECK(srv.error_listener.load() == l); // the user's handle, not a member
  fillers.clear();
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &old) == 0);
  for (size_t i = 0; i < clients.size(); i++)
    CHECK(echoes(clients[i].get(), "back " + std::to_string(i)));
  CHECK(srv.opens.load() == 4);
  CHECK(duplex_listener_close(l) == 0);
  CHECK(duplex_listener_unref(l) == 0);
  clients.clear();
  REQUIRE(wait_until([&] { return srv.closes.load() == 4; }));
}

TEST_CASE("duplex_group_pick places outgoing conns on the least-loaded loop") {
  constexpr unsigned kLoops = 3;
  Group g(kLoops);
  Server srv(g);
  // A plain (single-loop) listener elsewhere receives the conns.
  duplex_loop *server_loop = nullptr;
  REQUIRE(duplex_loop_new(&server_loop, nullptr) == 0);
  REQUIRE(duplex_loop_start(server_loop) == 0);
  std::atomic<int> server_opens{0};
  duplex_conn_cbs scbs = DUPLEX_CONN_CBS_INIT;
  scbs.on_open = [](duplex_conn *, void *u) { (*static_cast<std::atomic<int> *>(u))++; };
  duplex_conn_opts sco = DUPLEX_CONN_OPTS_INIT;
  sco.cbs = &scbs;
  sco.user = &server_opens;
  duplex_listener_opts slo = DUPLEX_LISTENER_OPTS_INIT;
  slo.conn_opts = &sco;
  duplex_listener *sl = nullptr;
  REQUIRE(duplex_listener_tcp(&sl, server_loop, "127.0.0.1", 0, &slo) == 0);
  // Picks in a burst: each new conn counts from its creation.
  std::vector<duplex_conn *> out;
  std::map<duplex_loop *, int> per_loop;
  for (int i = 0; i < 12; i++) {
    duplex_loop *pick = nullptr;
    REQUIRE(duplex_group_pick(g.g, &pick) == 0);
    per_loop[pick]++;
    duplex_conn *c = nullptr;
    REQUIRE(duplex_conn_connect_tcp(&c, pick, "127.0.0.1", port_of(sl), nullptr) == 0);
    out.push_back(c);
  }
  for (duplex_loop *loop : g.loops)
    CHECK(per_loop[loop] == 4);
  REQUIRE(wait_until([&] { return server_opens.load() == 12; }));
  for (unsigned i = 0; i < kLoops; i++)
    CHECK(g.stats(i).conns == 4);
  for (duplex_conn *c : out) {
    CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  for (unsigned i = 0; i < kLoops; i++)
    CHECK(wait_until([&] { return g.stats(i).conns == 0; }));
  CHECK(duplex_listener_close(sl) == 0);
  CHECK(duplex_listener_unref(sl) == 0);
  CHECK(duplex_loop_free(server_loop) == 0);
}

TEST_CASE("group free with both ends of each conn in the group: every conn closes with ECANCELED") {
  Group g(2);
  Server srv(g);
  duplex_listener *l = nullptr;
  REQUIRE(duplex_group_listen_tcp(&l, g.g, "127.0.0.1", 0, &srv.lopts) == 0);
  struct Client {
    std::atomic<int> opens{0}, closes{0}, other_reasons{0};
    static void on_open(duplex_conn *, void *u) { static_cast<Client *>(u)->opens++; }
    static void on_close(duplex_conn *, int reason, void *u) {
      auto *c = static_cast<Client *>(u);
      if (reason != DUPLEX_ECANCELED)
        c->other_reasons++;
      c->closes++;
    }
  } cl;
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = Client::on_open;
  cbs.on_close = Client::on_close;
  duplex_conn_opts co = DUPLEX_CONN_OPTS_INIT;
  co.cbs = &cbs;
  co.user = &cl;
  std::vector<duplex_conn *> conns;
  constexpr int kConns = 6;
  for (int i = 0; i < kConns; i++) {
    duplex_loop *pick = nullptr;
    REQUIRE(duplex_group_pick(g.g, &pick) == 0);
    duplex_conn *c = nullptr;
    REQUIRE(duplex_conn_connect_tcp(&c, pick, "127.0.0.1", port_of(l), &co) == 0);
    conns.push_back(c);
  }
  REQUIRE(wait_until([&] { return cl.opens.load() == kConns && srv.opens.load() == kConns; }));
  // Writes queued while the group is stopped: their pumps wait in the
  // inboxes when the free begins, and loop 0's conns go before loop 1's.
  REQUIRE(duplex_group_stop(g.g) == 0);
  std::vector<char> block(64 * 1024, 'z');
  WriteCounter wc;
  uint64_t issued = 0;
  for (int r = 0; r < 8; r++)
    for (duplex_conn *c : conns)
      issued += duplex_conn_write(c, block.data(), block.size(), WriteCounter::cb, &wc) == 0;
  CHECK(duplex_listener_unref(l) == 0);
  g.free();
  CHECK(cl.closes.load() == kConns);
  CHECK(cl.other_reasons.load() == 0);
  CHECK(srv.closes.load() == kConns);
  CHECK(srv.not_canceled.load() == 0);
  CHECK(wc.total.load() == issued);
  for (duplex_conn *c : conns)
    CHECK(duplex_conn_unref(c) == 0);
}
