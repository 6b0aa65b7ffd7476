// Bad input, table-driven: every public function called with NULL pointers,
// zero and huge sizes, unknown flags, wrong struct sizes, bad fds and refs to
// closed conns returns the exact documented code, never crashes, and on
// failure leaves out-params NULL and owned resources with the caller.
//
// The table must cover every DUPLEX_API function: the public header is
// parsed at run time (path from -DDUPLEX_HEADER_PATH) and compared with it.
//
// Single-threaded: the loop is never started; it is pumped on this thread.
#include "fixture.hpp"

#include <csignal>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#ifndef DUPLEX_HEADER_PATH
#error "DUPLEX_HEADER_PATH must name core/include/duplex.h"
#endif

using namespace dtest;

namespace {

struct Case {
  const char *fn;   // the DUPLEX_API function under test
  std::string what; // the bad input
  std::function<int()> call;
  int expect;
};

// Shared objects for the table: one loop (never started), an open conn, a
// closed conn still referenced, two listeners.
struct Ctx {
  TempDir dir;
  duplex_loop *loop = nullptr;
  ConnEvents ev_open, ev_closed;
  duplex_conn *open_conn = nullptr;
  duplex_conn *closed_conn = nullptr;
  Fd peer_open, peer_closed;
  duplex_listener *tcp = nullptr;
  duplex_listener *unx = nullptr;
  std::string unix_path;
  // Things that must never happen.
  std::atomic<int> posts_run{0};
  ZcCounter zc; // releases of refused zero-copy writes
  WriteCounter refused_writes;
  int closed_user_tag = 0;
  char one_byte[1] = {'x'};
  // Channels: one open, one closed (still referenced); a timer never
  // started. A release function called for a refused pointer message, or a
  // timer callback, must never happen.
  duplex_channel *open_ch = nullptr;
  duplex_channel *closed_ch = nullptr;
  std::atomic<int> ch_closes{0};
  std::atomic<int> bad_releases{0};
  std::atomic<int> timer_fires{0};
  duplex_timer *timer = nullptr;
  char ptr_msg[8] = {0};
  // TLS (when the library has it): a client config that verifies nothing
  // (no files needed) and one that verifies (the system store).
  bool have_tls = duplex_tls_backend() != nullptr;
  duplex_tls *tls_lax = nullptr;
  duplex_tls *tls_verify = nullptr;

  static void ch_message(duplex_channel *, void *, size_t, void *) {}
  static void ch_close(duplex_channel *, int, void *user) {
    static_cast<Ctx *>(user)->ch_closes++;
  }
  static void never_release(void *, size_t, int, void *user) {
    static_cast<Ctx *>(user)->bad_releases++;
  }
  static void never_fire(duplex_timer *, void *user) {
    static_cast<Ctx *>(user)->timer_fires++;
  }
  duplex_channel_opts ch_opts(size_t capacity = 0) {
    duplex_channel_opts o = DUPLEX_CHANNEL_OPTS_INIT;
    o.on_message = ch_message;
    o.on_close = ch_close;
    o.user = this;
    o.capacity = capacity;
    return o;
  }

  Ctx() {
    REQUIRE(duplex_loop_new(&loop, nullptr) == 0);
    auto a = socket_pair();
    auto oa = ev_open.opts();
    open_conn = adopt(loop, a.ours, &oa);
    peer_open = std::move(a.peer);
    auto b = socket_pair();
    auto ob = ev_closed.opts();
    closed_conn = adopt(loop, b.ours, &ob);
    peer_closed = std::move(b.peer);
    REQUIRE(duplex_conn_close(closed_conn, DUPLEX_CLOSE_ABORT) == 0);
    REQUIRE(pump_until(loop, [&] {
      return ev_closed.closes.load() == 1 && ev_open.opens.load() == 1;
    }));
    REQUIRE(duplex_listener_tcp(&tcp, loop, "127.0.0.1", 0, nullptr) == 0);
    unix_path = dir.file("bad.sock");
    REQUIRE(duplex_listener_unix(&unx, loop, unix_path.c_str(), nullptr) == 0);
    auto co = ch_opts();
    REQUIRE(duplex_channel_new(&open_ch, loop, &co) == 0);
    REQUIRE(duplex_channel_new(&closed_ch, loop, &co) == 0);
    REQUIRE(duplex_channel_close(closed_ch) == 0);
    REQUIRE(pump_until(loop, [&] { return ch_closes.load() == 1; }));
    REQUIRE(duplex_timer_new(&timer, loop, never_fire, this) == 0);
    if (have_tls) {
      duplex_tls_config tc = DUPLEX_TLS_CONFIG_INIT;
      tc.role = DUPLEX_TLS_CLIENT;
      REQUIRE(duplex_tls_new(&tls_verify, &tc, nullptr, 0) == 0);
      tc.verify = DUPLEX_TLS_VERIFY_NONE;
      REQUIRE(duplex_tls_new(&tls_lax, &tc, nullptr, 0) == 0);
    }
  }
  ~Ctx() {
    if (tcp)
      CHECK(duplex_listener_close(tcp) == 0);
    if (unx)
      CHECK(duplex_listener_close(unx) == 0);
    CHECK(duplex_listener_unref(tcp) == 0);
    CHECK(duplex_listener_unref(unx) == 0);
    CHECK(duplex_timer_close(timer) == 0);
    CHECK(duplex_timer_unref(timer) == 0);
    CHECK(duplex_conn_unref(open_conn) == 0);
    CHECK(duplex_conn_unref(closed_conn) == 0);
    CHECK(duplex_channel_unref(open_ch) == 0);
    CHECK(duplex_channel_unref(closed_ch) == 0);
    if (tls_lax != nullptr)
      CHECK(duplex_tls_unref(tls_lax) == 0);
    if (tls_verify != nullptr)
      CHECK(duplex_tls_unref(tls_verify) == 0);
    CHECK(duplex_loop_free(loop) == 0);
    CHECK(bad_releases.load() == 0);
    CHECK(timer_fires.load() == 0);
    CHECK(posts_run.load() == 0);
    CHECK(zc.released.load() == 0);
    CHECK(refused_writes.total.load() == 0);
    CHECK(ev_closed.closes.load() == 1);
  }
};

void never_post(duplex_loop *, int, void *arg) {
  static_cast<Ctx *>(arg)->posts_run++;
}

// A conn/listener out-param must be NULL after a failure: map a non-NULL
// result to a distinct code so the table reports it.
constexpr int kOutNotNull = 424242;
template <class T> int out_null(int rc, T *out) {
  return (rc != 0 && out != nullptr) ? kOutNotNull : rc;
}

std::string long_path(size_t n) { return "/tmp/" + std::string(n, 'p'); }

// Open fds of various kinds, for adopt. Each is closed by its Fd.
Fd regular_file(Ctx &c) {
  std::string p = c.dir.file("regular");
  Fd fd(::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(fd);
  return fd;
}
Fd directory(Ctx &c) {
  Fd fd(::open(c.dir.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  REQUIRE(fd);
  return fd;
}
int closed_fd_number() {
  int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  ::close(fd);
  return fd; // single-threaded: nobody reuses the number before the call
}

// adopt with an fd that must be refused and left open with the caller.
int adopt_refused(Ctx &c, int fd, const duplex_conn_opts *opts, bool null_loop = false) {
  duplex_conn *out = reinterpret_cast<duplex_conn *>(&c);
  bool was_open = fd >= 0 && fd_is_open(fd);
  int rc = duplex_conn_adopt(&out, null_loop ? nullptr : c.loop, fd, opts);
  if (rc == 0) {
    duplex_conn_close(out, DUPLEX_CLOSE_ABORT);
    duplex_conn_unref(out);
    return 0;
  }
  if (was_open && !fd_is_open(fd))
    return 515151; // refused, but the fd was closed
  return out_null(rc, out);
}

std::vector<Case> make_table(Ctx &c) {
  std::vector<Case> t;
  auto add = [&](const char *fn, std::string what, std::function<int()> call,
                 int expect) { t.push_back({fn, std::move(what), std::move(call), expect}); };

  // ---- errors and version -------------------------------------------------
  add("duplex_strerror", "INT_MIN, INT_MAX, 0: static strings",
      [] {
        return duplex_strerror(INT_MIN) && duplex_strerror(INT_MAX) &&
                       duplex_strerror(0) && *duplex_strerror(INT_MIN)
                   ? 0
                   : -1;
      },
      0);
  add("duplex_err_name", "INT_MIN, INT_MAX, 0: static strings",
      [] {
        return duplex_err_name(INT_MIN) && duplex_err_name(INT_MAX) &&
                       duplex_err_name(0) && *duplex_err_name(INT_MIN)
                   ? 0
                   : -1;
      },
      0);
  add("duplex_version", "no input: equals the header's",
      [] { return duplex_version() == unsigned(DUPLEX_VERSION_HEX) ? 0 : -1; }, 0);
  add("duplex_version_string", "no input: non-NULL",
      [] { return duplex_version_string() != nullptr ? 0 : -1; }, 0);

  // ---- loop ---------------------------------------------------------------
  add("duplex_loop_opts_init", "NULL", [] { return duplex_loop_opts_init(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_loop_new", "NULL out", [] { return duplex_loop_new(nullptr, nullptr); },
      DUPLEX_EINVAL);
  for (size_t size : {size_t(0), size_t(1)}) {
    add("duplex_loop_new", "opts->size " + std::to_string(size), [size] {
      duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
      o.size = size;
      duplex_loop *out = reinterpret_cast<duplex_loop *>(&o);
      int rc = duplex_loop_new(&out, &o);
      return out_null(rc, out);
    }, DUPLEX_EVERSION);
  }
  add("duplex_loop_new", "unknown flags", [] {
    duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
    o.flags = 0x10;
    duplex_loop *out = reinterpret_cast<duplex_loop *>(&o);
    int rc = duplex_loop_new(&out, &o);
      return out_null(rc, out);
  }, DUPLEX_EINVAL);
  add("duplex_loop_new", "read_buffer_size over 16 MiB", [] {
    duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
    o.read_buffer_size = UINT32_MAX;
    duplex_loop *out = reinterpret_cast<duplex_loop *>(&o);
    int rc = duplex_loop_new(&out, &o);
      return out_null(rc, out);
  }, DUPLEX_EINVAL);
  add("duplex_loop_run", "NULL loop", [] { return duplex_loop_run(nullptr, DUPLEX_RUN_NOWAIT); },
      DUPLEX_EINVAL);
  for (unsigned mode : {3u, 0x100u, ~0u})
    add("duplex_loop_run", "unknown mode " + std::to_string(mode),
        [&c, mode] { return duplex_loop_run(c.loop, mode); }, DUPLEX_EINVAL);
  add("duplex_loop_start", "NULL", [] { return duplex_loop_start(nullptr); }, DUPLEX_EINVAL);
  add("duplex_loop_stop", "NULL", [] { return duplex_loop_stop(nullptr); }, DUPLEX_EINVAL);
  add("duplex_loop_post", "NULL loop",
      [&c] { return duplex_loop_post(nullptr, never_post, &c); }, DUPLEX_EINVAL);
  add("duplex_loop_post", "NULL fn",
      [&c] { return duplex_loop_post(c.loop, nullptr, &c); }, DUPLEX_EINVAL);
  add("duplex_loop_on_thread", "NULL", [] { return duplex_loop_on_thread(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_loop_free", "NULL", [] { return duplex_loop_free(nullptr); }, DUPLEX_EINVAL);

  // ---- conn options -------------------------------------------------------
  add("duplex_conn_opts_init", "NULL", [] { return duplex_conn_opts_init(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_conn_cbs_init", "NULL", [] { return duplex_conn_cbs_init(nullptr); },
      DUPLEX_EINVAL);

  // Bad conn option sets, shared by every constructor.
  struct BadOpts {
    std::string what;
    std::function<void(duplex_conn_opts &, duplex_conn_cbs &)> mutate;
    int expect;
  };
  std::vector<BadOpts> bad_opts = {
      {"opts->size 0", [](auto &o, auto &) { o.size = 0; }, DUPLEX_EVERSION},
      {"opts->size 1", [](auto &o, auto &) { o.size = 1; }, DUPLEX_EVERSION},
      {"unknown conn flag", [](auto &o, auto &) { o.flags = 0x100; }, DUPLEX_EINVAL},
      {"every bit in flags", [](auto &o, auto &) { o.flags = ~0u; }, DUPLEX_EINVAL},
      {"low watermark == high",
       [](auto &o, auto &) { o.high_watermark = 4096; o.low_watermark = 4096; },
       DUPLEX_EINVAL},
      {"low watermark > high",
       [](auto &o, auto &) { o.high_watermark = 4096; o.low_watermark = 8192; },
       DUPLEX_EINVAL},
      {"hard limit < high",
       [](auto &o, auto &) { o.high_watermark = 8192; o.hard_limit = 4096; },
       DUPLEX_EINVAL},
      {"cbs->size 0", [](auto &o, auto &cb) { cb.size = 0; o.cbs = &cb; }, DUPLEX_EVERSION},
  };

  // ---- connect_tcp --------------------------------------------------------
  auto tcp = [&c](duplex_loop *loop, const char *host, uint16_t port,
                  const duplex_conn_opts *o) {
    duplex_conn *out = reinterpret_cast<duplex_conn *>(&c);
    int rc = duplex_conn_connect_tcp(&out, loop, host, port, o);
    if (rc == 0) {
      duplex_conn_close(out, DUPLEX_CLOSE_ABORT);
      duplex_conn_unref(out);
      return 0;
    }
    return out_null(rc, out);
  };
  add("duplex_conn_connect_tcp", "NULL loop",
      [tcp] { return tcp(nullptr, "127.0.0.1", 1, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_connect_tcp", "NULL host",
      [tcp, &c] { return tcp(c.loop, nullptr, 1, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_connect_tcp", "empty host",
      [tcp, &c] { return tcp(c.loop, "", 1, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_connect_tcp", "port 0",
      [tcp, &c] { return tcp(c.loop, "127.0.0.1", 0, nullptr); }, DUPLEX_EINVAL);
  for (auto &b : bad_opts)
    add("duplex_conn_connect_tcp", b.what, [tcp, &c, b] {
      duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
      duplex_conn_cbs cb = DUPLEX_CONN_CBS_INIT;
      b.mutate(o, cb);
      return tcp(c.loop, "127.0.0.1", 1, &o);
    }, b.expect);

  // ---- connect_unix -------------------------------------------------------
  auto unx = [&c](duplex_loop *loop, const char *path, const duplex_conn_opts *o) {
    duplex_conn *out = reinterpret_cast<duplex_conn *>(&c);
    int rc = duplex_conn_connect_unix(&out, loop, path, o);
    if (rc == 0) {
      duplex_conn_close(out, DUPLEX_CLOSE_ABORT);
      duplex_conn_unref(out);
      return 0;
    }
    return out_null(rc, out);
  };
  add("duplex_conn_connect_unix", "NULL loop",
      [unx, &c] { return unx(nullptr, c.unix_path.c_str(), nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_connect_unix", "NULL path",
      [unx, &c] { return unx(c.loop, nullptr, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_connect_unix", "empty path",
      [unx, &c] { return unx(c.loop, "", nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_connect_unix", "path longer than sun_path",
      [unx, &c] { return unx(c.loop, long_path(300).c_str(), nullptr); },
      DUPLEX_ENAMETOOLONG);
  add("duplex_conn_connect_unix", "opts->size 0", [unx, &c] {
    duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
    o.size = 0;
    return unx(c.loop, c.unix_path.c_str(), &o);
  }, DUPLEX_EVERSION);

  // ---- adopt --------------------------------------------------------------
  add("duplex_conn_adopt", "NULL loop", [&c] {
    auto sp = socket_pair();
    return adopt_refused(c, sp.ours.get(), nullptr, true);
  }, DUPLEX_EINVAL);
  add("duplex_conn_adopt", "fd -1", [&c] { return adopt_refused(c, -1, nullptr); },
      DUPLEX_EBADF);
  add("duplex_conn_adopt", "a closed fd",
      [&c] { return adopt_refused(c, closed_fd_number(), nullptr); }, DUPLEX_EBADF);
  add("duplex_conn_adopt", "fd 1000000", [&c] { return adopt_refused(c, 1000000, nullptr); },
      DUPLEX_EBADF);
  add("duplex_conn_adopt", "a regular file", [&c] {
    Fd f = regular_file(c);
    return adopt_refused(c, f.get(), nullptr);
  }, DUPLEX_ENOTSOCK);
  add("duplex_conn_adopt", "a directory", [&c] {
    Fd f = directory(c);
    return adopt_refused(c, f.get(), nullptr);
  }, DUPLEX_ENOTSOCK);
  add("duplex_conn_adopt", "a UDP socket (not a stream)", [&c] {
    Fd f(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    REQUIRE(f);
    return adopt_refused(c, f.get(), nullptr);
  }, DUPLEX_ENOTSOCK);
  for (auto &b : bad_opts)
    add("duplex_conn_adopt", b.what, [&c, b] {
      auto sp = socket_pair();
      duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
      duplex_conn_cbs cb = DUPLEX_CONN_CBS_INIT;
      b.mutate(o, cb);
      return adopt_refused(c, sp.ours.get(), &o);
    }, b.expect);

  // ---- adopt_pair ---------------------------------------------------------
  auto pair = [&c](duplex_loop *loop, int r, int w, const duplex_conn_opts *o) {
    duplex_conn *out = reinterpret_cast<duplex_conn *>(&c);
    bool r_open = r >= 0 && fd_is_open(r), w_open = w >= 0 && fd_is_open(w);
    int rc = duplex_conn_adopt_pair(&out, loop, r, w, o);
    if (rc == 0) {
      duplex_conn_close(out, DUPLEX_CLOSE_ABORT);
      duplex_conn_unref(out);
      return 0;
    }
    if ((r_open && !fd_is_open(r)) || (w_open && !fd_is_open(w)))
      return 515151; // refused, but an fd was closed
    return out_null(rc, out);
  };
  auto pipes = [] {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    return std::make_pair(Fd(p[0]), Fd(p[1]));
  };
  add("duplex_conn_adopt_pair", "NULL loop", [pair, pipes] {
    auto [r, w] = pipes();
    return pair(nullptr, r.get(), w.get(), nullptr);
  }, DUPLEX_EINVAL);
  add("duplex_conn_adopt_pair", "the same fd twice", [pair, &c] {
    auto sp = socket_pair();
    return pair(c.loop, sp.ours.get(), sp.ours.get(), nullptr);
  }, DUPLEX_EINVAL);
  add("duplex_conn_adopt_pair", "read fd -1", [pair, pipes, &c] {
    auto [r, w] = pipes();
    return pair(c.loop, -1, w.get(), nullptr);
  }, DUPLEX_EBADF);
  add("duplex_conn_adopt_pair", "write fd closed", [pair, pipes, &c] {
    auto [r, w] = pipes();
    return pair(c.loop, r.get(), closed_fd_number(), nullptr);
  }, DUPLEX_EBADF);
  add("duplex_conn_adopt_pair", "write fd a regular file", [pair, pipes, &c] {
    auto [r, w] = pipes();
    Fd f = regular_file(c);
    return pair(c.loop, r.get(), f.get(), nullptr);
  }, DUPLEX_ENOTSOCK);
  add("duplex_conn_adopt_pair", "opts->size 0", [pair, pipes, &c] {
    auto [r, w] = pipes();
    duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
    o.size = 0;
    return pair(c.loop, r.get(), w.get(), &o);
  }, DUPLEX_EVERSION);

  // ---- ref counting -------------------------------------------------------
  add("duplex_conn_ref", "NULL", [] { return duplex_conn_ref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_unref", "NULL", [] { return duplex_conn_unref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_ref", "closed conn (still referenced): ref + unref", [&c] {
    int rc = duplex_conn_ref(c.closed_conn);
    return rc == 0 ? duplex_conn_unref(c.closed_conn) : rc;
  }, 0);

  // ---- writes -------------------------------------------------------------
  WriteCounter *rw = &c.refused_writes;
  add("duplex_conn_write", "NULL conn",
      [rw] { return duplex_conn_write(nullptr, "x", 1, WriteCounter::cb, rw); }, DUPLEX_EINVAL);
  add("duplex_conn_write", "NULL data, len 5",
      [rw, &c] { return duplex_conn_write(c.open_conn, nullptr, 5, WriteCounter::cb, rw); },
      DUPLEX_EINVAL);
  add("duplex_conn_write", "len DUPLEX_WRITE_MAX + 1", [rw, &c] {
    return duplex_conn_write(c.open_conn, c.one_byte, DUPLEX_WRITE_MAX + 1, WriteCounter::cb, rw);
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_write", "len SIZE_MAX", [rw, &c] {
    return duplex_conn_write(c.open_conn, c.one_byte, SIZE_MAX, WriteCounter::cb, rw);
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_write", "closed conn",
      [rw, &c] { return duplex_conn_write(c.closed_conn, "x", 1, WriteCounter::cb, rw); },
      DUPLEX_ECLOSED);
  add("duplex_conn_write", "NULL data, len 0 (flush marker: accepted)",
      [&c] { return duplex_conn_write(c.open_conn, nullptr, 0, nullptr, nullptr); }, 0);

  add("duplex_conn_writev", "NULL conn", [rw] {
    duplex_buf b = {"x", 1};
    return duplex_conn_writev(nullptr, &b, 1, WriteCounter::cb, rw);
  }, DUPLEX_EINVAL);
  add("duplex_conn_writev", "NULL bufs, nbufs 1",
      [rw, &c] { return duplex_conn_writev(c.open_conn, nullptr, 1, WriteCounter::cb, rw); },
      DUPLEX_EINVAL);
  add("duplex_conn_writev", "1025 buffers", [rw, &c] {
    std::vector<duplex_buf> v(1025, duplex_buf{"x", 1});
    return duplex_conn_writev(c.open_conn, v.data(), v.size(), WriteCounter::cb, rw);
  }, DUPLEX_EINVAL);
  add("duplex_conn_writev", "NULL base with len 1", [rw, &c] {
    duplex_buf v[2] = {{"a", 1}, {nullptr, 1}};
    return duplex_conn_writev(c.open_conn, v, 2, WriteCounter::cb, rw);
  }, DUPLEX_EINVAL);
  add("duplex_conn_writev", "total > DUPLEX_WRITE_MAX", [rw, &c] {
    duplex_buf v[2] = {{c.one_byte, DUPLEX_WRITE_MAX / 2 + 1}, {c.one_byte, DUPLEX_WRITE_MAX / 2}};
    return duplex_conn_writev(c.open_conn, v, 2, WriteCounter::cb, rw);
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_writev", "total overflows size_t", [rw, &c] {
    duplex_buf v[2] = {{c.one_byte, SIZE_MAX}, {c.one_byte, 2}};
    return duplex_conn_writev(c.open_conn, v, 2, WriteCounter::cb, rw);
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_writev", "closed conn", [rw, &c] {
    duplex_buf b = {"x", 1};
    return duplex_conn_writev(c.closed_conn, &b, 1, WriteCounter::cb, rw);
  }, DUPLEX_ECLOSED);
  add("duplex_conn_writev", "exactly 1024 buffers (accepted)", [&c] {
    std::vector<duplex_buf> v(1024, duplex_buf{"v", 1});
    return duplex_conn_writev(c.open_conn, v.data(), v.size(), nullptr, nullptr);
  }, 0);
  add("duplex_conn_writev", "NULL bufs, nbufs 0 (accepted)",
      [&c] { return duplex_conn_writev(c.open_conn, nullptr, 0, nullptr, nullptr); }, 0);

  ZcCounter *zc = &c.zc;
  add("duplex_conn_write_zc", "NULL conn", [zc, &c] {
    return duplex_conn_write_zc(nullptr, c.one_byte, 1, ZcCounter::release, zc);
  }, DUPLEX_EINVAL);
  add("duplex_conn_write_zc", "NULL data, len 1", [zc, &c] {
    return duplex_conn_write_zc(c.open_conn, nullptr, 1, ZcCounter::release, zc);
  }, DUPLEX_EINVAL);
  add("duplex_conn_write_zc", "len DUPLEX_WRITE_MAX + 1", [zc, &c] {
    return duplex_conn_write_zc(c.open_conn, c.one_byte, DUPLEX_WRITE_MAX + 1,
                                ZcCounter::release, zc);
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_write_zc", "closed conn", [zc, &c] {
    return duplex_conn_write_zc(c.closed_conn, c.one_byte, 1, ZcCounter::release, zc);
  }, DUPLEX_ECLOSED);

  add("duplex_conn_shutdown", "NULL", [] { return duplex_conn_shutdown(nullptr, nullptr, nullptr); },
      DUPLEX_EINVAL);
  add("duplex_conn_shutdown", "closed conn", [rw, &c] {
    return duplex_conn_shutdown(c.closed_conn, WriteCounter::cb, rw);
  }, DUPLEX_ECLOSED);

  add("duplex_conn_close", "NULL",
      [] { return duplex_conn_close(nullptr, DUPLEX_CLOSE_GRACEFUL); }, DUPLEX_EINVAL);
  for (unsigned how : {2u, 0x100u, ~0u})
    add("duplex_conn_close", "unknown how " + std::to_string(how),
        [&c, how] { return duplex_conn_close(c.open_conn, how); }, DUPLEX_EINVAL);
  add("duplex_conn_close", "closed conn, graceful",
      [&c] { return duplex_conn_close(c.closed_conn, DUPLEX_CLOSE_GRACEFUL); }, DUPLEX_ECLOSED);
  add("duplex_conn_close", "closed conn, abort",
      [&c] { return duplex_conn_close(c.closed_conn, DUPLEX_CLOSE_ABORT); }, DUPLEX_ECLOSED);

  add("duplex_conn_pause", "NULL", [] { return duplex_conn_pause(nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_pause", "closed conn", [&c] { return duplex_conn_pause(c.closed_conn); },
      DUPLEX_ECLOSED);
  add("duplex_conn_resume", "NULL", [] { return duplex_conn_resume(nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_resume", "closed conn", [&c] { return duplex_conn_resume(c.closed_conn); },
      DUPLEX_ECLOSED);

  add("duplex_conn_wait_writable", "NULL", [] { return duplex_conn_wait_writable(nullptr, 0); },
      DUPLEX_EINVAL);
  add("duplex_conn_wait_writable", "closed conn, poll",
      [&c] { return duplex_conn_wait_writable(c.closed_conn, 0); }, DUPLEX_ECLOSED);
  add("duplex_conn_wait_writable", "closed conn, wait",
      [&c] { return duplex_conn_wait_writable(c.closed_conn, 1000); }, DUPLEX_ECLOSED);
  add("duplex_conn_wait_room", "NULL", [] { return duplex_conn_wait_room(nullptr, 1, 0); },
      DUPLEX_EINVAL);
  add("duplex_conn_wait_room", "timeout -2",
      [&c] { return duplex_conn_wait_room(c.open_conn, 1, -2); }, DUPLEX_EINVAL);
  add("duplex_conn_wait_room", "closed conn, wait",
      [&c] { return duplex_conn_wait_room(c.closed_conn, 1, 1000); }, DUPLEX_ECLOSED);
  add("duplex_conn_wait_room", "SIZE_MAX into an empty queue fits",
      [&c] { return duplex_conn_wait_room(c.open_conn, SIZE_MAX, 0); }, 0);

  add("duplex_conn_get_queued", "NULL conn", [] {
    size_t q;
    return duplex_conn_get_queued(nullptr, &q);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_queued", "NULL out",
      [&c] { return duplex_conn_get_queued(c.open_conn, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_get_queued", "closed conn: 0 bytes", [&c] {
    size_t q = 99;
    int rc = duplex_conn_get_queued(c.closed_conn, &q);
    return rc == 0 && q != 0 ? -1 : rc;
  }, 0);

  add("duplex_conn_get_user", "NULL conn", [] {
    void *u;
    return duplex_conn_get_user(nullptr, &u);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_user", "NULL out",
      [&c] { return duplex_conn_get_user(c.open_conn, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_set_user", "NULL conn", [] { return duplex_conn_set_user(nullptr, nullptr); },
      DUPLEX_EINVAL);
  add("duplex_conn_set_user", "closed conn: set then get back", [&c] {
    int rc = duplex_conn_set_user(c.closed_conn, &c.closed_user_tag);
    if (rc != 0)
      return rc;
    void *u = nullptr;
    rc = duplex_conn_get_user(c.closed_conn, &u);
    return rc == 0 && u != &c.closed_user_tag ? -1 : rc;
  }, 0);

  add("duplex_conn_get_local", "NULL conn", [] {
    char b[8];
    return duplex_conn_get_local(nullptr, b, sizeof b);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_local", "NULL buf",
      [&c] { return duplex_conn_get_local(c.open_conn, nullptr, 8); }, DUPLEX_EINVAL);
  add("duplex_conn_get_local", "zero length", [&c] {
    char b[1] = {'x'};
    return duplex_conn_get_local(c.open_conn, b, 0);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_local", "closed conn (still referenced)", [&c] {
    char b[64];
    return duplex_conn_get_local(c.closed_conn, b, sizeof b);
  }, DUPLEX_ECLOSED);
  add("duplex_conn_get_peer", "NULL conn", [] {
    char b[8];
    return duplex_conn_get_peer(nullptr, b, sizeof b);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_peer", "NULL buf",
      [&c] { return duplex_conn_get_peer(c.open_conn, nullptr, 8); }, DUPLEX_EINVAL);

  // ---- deadlines -----------------------------------------------------------
  add("duplex_conn_set_timeout", "NULL",
      [] { return duplex_conn_set_timeout(nullptr, DUPLEX_TIMEOUT_IDLE, 10); }, DUPLEX_EINVAL);
  for (int kind : {-1, 4, INT_MAX, INT_MIN})
    add("duplex_conn_set_timeout", "unknown kind " + std::to_string(kind),
        [&c, kind] { return duplex_conn_set_timeout(c.open_conn, kind, 10); }, DUPLEX_EINVAL);
  add("duplex_conn_set_timeout", "closed conn",
      [&c] { return duplex_conn_set_timeout(c.closed_conn, DUPLEX_TIMEOUT_IDLE, 10); },
      DUPLEX_ECLOSED);
  for (int kind : {DUPLEX_TIMEOUT_CONNECT, DUPLEX_TIMEOUT_IDLE, DUPLEX_TIMEOUT_READ,
                   DUPLEX_TIMEOUT_FLUSH})
    add("duplex_conn_set_timeout", "kind " + std::to_string(kind) + " off (0): accepted",
        [&c, kind] { return duplex_conn_set_timeout(c.open_conn, kind, 0); }, 0);

  // ---- framing --------------------------------------------------------------
  add("duplex_framing_init", "NULL", [] { return duplex_framing_init(nullptr); }, DUPLEX_EINVAL);

  // Bad framing structs, given to every constructor through opts.framing.
  struct BadFraming {
    std::string what;
    std::function<void(duplex_framing &)> mutate;
    int expect;
  };
  std::vector<BadFraming> bad_framing = {
      {"framing->size 0", [](auto &f) { f.kind = DUPLEX_FRAME_NONE; f.size = 0; },
       DUPLEX_EVERSION},
      {"framing->size 1", [](auto &f) { f.size = 1; }, DUPLEX_EVERSION},
      {"framing->size one short",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_DELIMITED;
         f.delimiter[0] = '\n';
         f.delimiter_len = 1;
         f.size = sizeof(duplex_framing) - 1;
       },
       DUPLEX_EVERSION},
      {"framing kind 4", [](auto &f) { f.kind = 4; }, DUPLEX_EINVAL},
      {"framing kind -1", [](auto &f) { f.kind = -1; }, DUPLEX_EINVAL},
      {"unknown framing flag",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
         f.prefix_bytes = 4;
         f.flags = 0x2;
       },
       DUPLEX_EINVAL},
      {"length prefix of 3 bytes",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
         f.prefix_bytes = 3;
       },
       DUPLEX_EINVAL},
      {"length prefix of 0 bytes",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
         f.prefix_bytes = 0;
       },
       DUPLEX_EINVAL},
      {"length prefix of 16 bytes",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
         f.prefix_bytes = 16;
       },
       DUPLEX_EINVAL},
      {"delimiter_len 0",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_DELIMITED;
         f.delimiter_len = 0;
       },
       DUPLEX_EINVAL},
      {"delimiter_len 5",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_DELIMITED;
         f.delimiter[0] = '\n';
         f.delimiter_len = 5;
       },
       DUPLEX_EINVAL},
      {"custom framing without a framer",
       [](auto &f) {
         f.kind = DUPLEX_FRAME_CUSTOM;
         f.custom = nullptr;
       },
       DUPLEX_EINVAL},
  };
  for (auto &b : bad_framing) {
    add("duplex_conn_adopt", b.what, [&c, b] {
      auto sp = socket_pair();
      duplex_framing f = DUPLEX_FRAMING_INIT;
      b.mutate(f);
      duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
      o.framing = &f;
      return adopt_refused(c, sp.ours.get(), &o);
    }, b.expect);
    add("duplex_conn_connect_tcp", b.what, [tcp, &c, b] {
      duplex_framing f = DUPLEX_FRAMING_INIT;
      b.mutate(f);
      duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
      o.framing = &f;
      return tcp(c.loop, "127.0.0.1", 1, &o);
    }, b.expect);
    add("duplex_conn_connect_unix", b.what, [unx, &c, b] {
      duplex_framing f = DUPLEX_FRAMING_INIT;
      b.mutate(f);
      duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
      o.framing = &f;
      return unx(c.loop, c.unix_path.c_str(), &o);
    }, b.expect);
    add("duplex_conn_adopt_pair", b.what, [pair, pipes, &c, b] {
      auto [r, w] = pipes();
      duplex_framing f = DUPLEX_FRAMING_INIT;
      b.mutate(f);
      duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
      o.framing = &f;
      return pair(c.loop, r.get(), w.get(), &o);
    }, b.expect);
  }

  // duplex_conn_write_frame: generic bad input on the plain open conn, and
  // what a framing cannot carry on framed conns made for the row.
  add("duplex_conn_write_frame", "NULL conn",
      [rw] { return duplex_conn_write_frame(nullptr, "x", 1, WriteCounter::cb, rw); },
      DUPLEX_EINVAL);
  add("duplex_conn_write_frame", "NULL data, len 5", [rw, &c] {
    return duplex_conn_write_frame(c.open_conn, nullptr, 5, WriteCounter::cb, rw);
  }, DUPLEX_EINVAL);
  add("duplex_conn_write_frame", "len DUPLEX_WRITE_MAX + 1", [rw, &c] {
    return duplex_conn_write_frame(c.open_conn, c.one_byte, DUPLEX_WRITE_MAX + 1,
                                   WriteCounter::cb, rw);
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_write_frame", "closed conn",
      [rw, &c] { return duplex_conn_write_frame(c.closed_conn, "x", 1, WriteCounter::cb, rw); },
      DUPLEX_ECLOSED);
  auto framed_write = [&c, rw](duplex_framing f, const void *data, size_t len) {
    auto sp = socket_pair();
    duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
    o.framing = &f;
    duplex_conn *conn = adopt(c.loop, sp.ours, &o);
    int rc = duplex_conn_write_frame(conn, data, len, WriteCounter::cb, rw);
    duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
    duplex_conn_unref(conn);
    return rc;
  };
  add("duplex_conn_write_frame", "1-byte prefix, 256 bytes", [framed_write] {
    static const std::vector<char> buf(256, 'p');
    duplex_framing f = DUPLEX_FRAMING_INIT;
    f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
    f.prefix_bytes = 1;
    return framed_write(f, buf.data(), buf.size());
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_write_frame", "over max_frame", [framed_write] {
    static const std::vector<char> buf(65, 'p');
    duplex_framing f = DUPLEX_FRAMING_INIT;
    f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
    f.prefix_bytes = 4;
    f.max_frame = 64;
    return framed_write(f, buf.data(), buf.size());
  }, DUPLEX_EMSGSIZE);
  add("duplex_conn_write_frame", "delimited payload containing the delimiter", [framed_write] {
    duplex_framing f = DUPLEX_FRAMING_INIT;
    f.kind = DUPLEX_FRAME_DELIMITED;
    f.delimiter[0] = '\n';
    f.delimiter_len = 1;
    return framed_write(f, "a\nb", 3);
  }, DUPLEX_EINVAL);

  // ---- channels -------------------------------------------------------------
  add("duplex_channel_opts_init", "NULL", [] { return duplex_channel_opts_init(nullptr); },
      DUPLEX_EINVAL);
  auto chnew = [&c](duplex_loop *loop, const duplex_channel_opts *o) {
    duplex_channel *out = reinterpret_cast<duplex_channel *>(&c);
    int rc = duplex_channel_new(&out, loop, o);
    if (rc == 0) {
      duplex_channel_close(out);
      duplex_channel_unref(out);
      return 0;
    }
    return out_null(rc, out);
  };
  add("duplex_channel_new", "NULL out", [&c] {
    auto o = c.ch_opts();
    return duplex_channel_new(nullptr, c.loop, &o);
  }, DUPLEX_EINVAL);
  add("duplex_channel_new", "NULL loop", [chnew, &c] {
    auto o = c.ch_opts();
    return chnew(nullptr, &o);
  }, DUPLEX_EINVAL);
  add("duplex_channel_new", "NULL opts (on_message is required)",
      [chnew, &c] { return chnew(c.loop, nullptr); }, DUPLEX_EINVAL);
  for (size_t size : {size_t(0), size_t(1), sizeof(duplex_channel_opts) - 1})
    add("duplex_channel_new", "opts->size " + std::to_string(size), [chnew, &c, size] {
      auto o = c.ch_opts();
      o.size = size;
      return chnew(c.loop, &o);
    }, DUPLEX_EVERSION);
  add("duplex_channel_new", "no on_message", [chnew, &c] {
    auto o = c.ch_opts();
    o.on_message = nullptr;
    return chnew(c.loop, &o);
  }, DUPLEX_EINVAL);
  for (unsigned flags : {1u, ~0u})
    add("duplex_channel_new", "flags " + std::to_string(flags), [chnew, &c, flags] {
      auto o = c.ch_opts();
      o.flags = flags;
      return chnew(c.loop, &o);
    }, DUPLEX_EINVAL);

  // A bounded channel of capacity 1, filled, for one row (the table's loop
  // never runs on another thread: nothing drains it during the call).
  auto full_channel = [&c](const std::function<int(duplex_channel *)> &fn) {
    auto o = c.ch_opts(1);
    duplex_channel *ch = nullptr;
    REQUIRE(duplex_channel_new(&ch, c.loop, &o) == 0);
    REQUIRE(duplex_channel_send(ch, "f", 1, 0) == 0);
    int rc = fn(ch);
    duplex_channel_close(ch);
    duplex_channel_unref(ch);
    return rc;
  };

  add("duplex_channel_send", "NULL channel",
      [] { return duplex_channel_send(nullptr, "x", 1, 0); }, DUPLEX_EINVAL);
  add("duplex_channel_send", "NULL data, len 5",
      [&c] { return duplex_channel_send(c.open_ch, nullptr, 5, 0); }, DUPLEX_EINVAL);
  add("duplex_channel_send", "len DUPLEX_WRITE_MAX + 1", [&c] {
    return duplex_channel_send(c.open_ch, c.one_byte, DUPLEX_WRITE_MAX + 1, 0);
  }, DUPLEX_EMSGSIZE);
  add("duplex_channel_send", "len SIZE_MAX",
      [&c] { return duplex_channel_send(c.open_ch, c.one_byte, SIZE_MAX, 0); }, DUPLEX_EMSGSIZE);
  for (int to : {-2, -1000, INT_MIN})
    add("duplex_channel_send", "timeout " + std::to_string(to),
        [&c, to] { return duplex_channel_send(c.open_ch, "x", 1, to); }, DUPLEX_EINVAL);
  add("duplex_channel_send", "closed channel, timeout 0",
      [&c] { return duplex_channel_send(c.closed_ch, "x", 1, 0); }, DUPLEX_ECLOSED);
  add("duplex_channel_send", "closed channel, timeout -1",
      [&c] { return duplex_channel_send(c.closed_ch, "x", 1, -1); }, DUPLEX_ECLOSED);
  add("duplex_channel_send", "full bounded channel, timeout 0", [full_channel] {
    return full_channel([](duplex_channel *ch) { return duplex_channel_send(ch, "x", 1, 0); });
  }, DUPLEX_EWOULDBLOCK);
  add("duplex_channel_send", "full bounded channel, nobody draining, timeout 5", [full_channel] {
    return full_channel([](duplex_channel *ch) { return duplex_channel_send(ch, "x", 1, 5); });
  }, DUPLEX_ETIMEDOUT);
  add("duplex_channel_send", "NULL data, len 0 (an empty message: accepted)",
      [&c] { return duplex_channel_send(c.open_ch, nullptr, 0, 0); }, 0);

  Ctx *cp = &c;
  add("duplex_channel_send_ptr", "NULL channel", [cp] {
    return duplex_channel_send_ptr(nullptr, cp->ptr_msg, 8, Ctx::never_release, cp, 0);
  }, DUPLEX_EINVAL);
  add("duplex_channel_send_ptr", "NULL ptr", [cp] {
    return duplex_channel_send_ptr(cp->open_ch, nullptr, 8, Ctx::never_release, cp, 0);
  }, DUPLEX_EINVAL);
  add("duplex_channel_send_ptr", "len DUPLEX_WRITE_MAX + 1", [cp] {
    return duplex_channel_send_ptr(cp->open_ch, cp->ptr_msg, DUPLEX_WRITE_MAX + 1,
                                   Ctx::never_release, cp, 0);
  }, DUPLEX_EMSGSIZE);
  for (int to : {-2, INT_MIN})
    add("duplex_channel_send_ptr", "timeout " + std::to_string(to), [cp, to] {
      return duplex_channel_send_ptr(cp->open_ch, cp->ptr_msg, 8, Ctx::never_release, cp, to);
    }, DUPLEX_EINVAL);
  add("duplex_channel_send_ptr", "closed channel", [cp] {
    return duplex_channel_send_ptr(cp->closed_ch, cp->ptr_msg, 8, Ctx::never_release, cp, -1);
  }, DUPLEX_ECLOSED);
  add("duplex_channel_send_ptr", "full bounded channel, timeout 0", [full_channel, cp] {
    return full_channel([cp](duplex_channel *ch) {
      return duplex_channel_send_ptr(ch, cp->ptr_msg, 8, Ctx::never_release, cp, 0);
    });
  }, DUPLEX_EWOULDBLOCK);
  add("duplex_channel_send_ptr", "full bounded channel, nobody draining, timeout 5",
      [full_channel, cp] {
        return full_channel([cp](duplex_channel *ch) {
          return duplex_channel_send_ptr(ch, cp->ptr_msg, 8, Ctx::never_release, cp, 5);
        });
      },
      DUPLEX_ETIMEDOUT);

  add("duplex_channel_close", "NULL", [] { return duplex_channel_close(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_channel_close", "closed channel",
      [&c] { return duplex_channel_close(c.closed_ch); }, DUPLEX_ECLOSED);

  add("duplex_channel_get_pending", "NULL channel", [] {
    size_t n;
    return duplex_channel_get_pending(nullptr, &n);
  }, DUPLEX_EINVAL);
  add("duplex_channel_get_pending", "NULL out",
      [&c] { return duplex_channel_get_pending(c.open_ch, nullptr); }, DUPLEX_EINVAL);
  add("duplex_channel_get_pending", "closed channel: 0 pending", [&c] {
    size_t n = 99;
    int rc = duplex_channel_get_pending(c.closed_ch, &n);
    return rc == 0 && n != 0 ? -1 : rc;
  }, 0);

  add("duplex_channel_ref", "NULL", [] { return duplex_channel_ref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_channel_unref", "NULL", [] { return duplex_channel_unref(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_channel_ref", "closed channel (still referenced): ref + unref", [&c] {
    int rc = duplex_channel_ref(c.closed_ch);
    return rc == 0 ? duplex_channel_unref(c.closed_ch) : rc;
  }, 0);

  // ---- timers ---------------------------------------------------------------
  auto tnew = [cp](duplex_loop *loop, duplex_timer_cb cb) {
    duplex_timer *out = reinterpret_cast<duplex_timer *>(cp);
    int rc = duplex_timer_new(&out, loop, cb, cp);
    if (rc == 0) {
      duplex_timer_close(out);
      duplex_timer_unref(out);
      return 0;
    }
    return out_null(rc, out);
  };
  add("duplex_timer_new", "NULL out",
      [cp] { return duplex_timer_new(nullptr, cp->loop, Ctx::never_fire, cp); }, DUPLEX_EINVAL);
  add("duplex_timer_new", "NULL loop", [tnew] { return tnew(nullptr, Ctx::never_fire); },
      DUPLEX_EINVAL);
  add("duplex_timer_new", "NULL callback", [tnew, cp] { return tnew(cp->loop, nullptr); },
      DUPLEX_EINVAL);
  add("duplex_timer_start", "NULL", [] { return duplex_timer_start(nullptr, 1, 0); },
      DUPLEX_EINVAL);
  add("duplex_timer_start", "UINT64_MAX timeout and repeat (accepted; stopped again)", [cp] {
    int rc = duplex_timer_start(cp->timer, UINT64_MAX, UINT64_MAX);
    return rc == 0 ? duplex_timer_stop(cp->timer) : rc;
  }, 0);
  add("duplex_timer_stop", "NULL", [] { return duplex_timer_stop(nullptr); }, DUPLEX_EINVAL);
  add("duplex_timer_stop", "never started (accepted)",
      [cp] { return duplex_timer_stop(cp->timer); }, 0);
  add("duplex_timer_close", "NULL", [] { return duplex_timer_close(nullptr); }, DUPLEX_EINVAL);
  add("duplex_timer_close", "a started timer, right after new (accepted)", [cp] {
    duplex_timer *tm = nullptr;
    int rc = duplex_timer_new(&tm, cp->loop, Ctx::never_fire, cp);
    if (rc == 0)
      rc = duplex_timer_start(tm, 60000, 0);
    if (rc == 0)
      rc = duplex_timer_close(tm);
    duplex_timer_unref(tm);
    return rc;
  }, 0);
  add("duplex_timer_close", "second close through the caller's reference", [cp] {
    duplex_timer *tm = nullptr;
    int rc = duplex_timer_new(&tm, cp->loop, Ctx::never_fire, cp);
    if (rc != 0)
      return rc;
    rc = duplex_timer_close(tm);
    int spins = 0;
    pump_until(cp->loop, [&spins] { return ++spins > 20; });
    if (rc == 0)
      rc = duplex_timer_close(tm);
    int rs = duplex_timer_start(tm, 1, 0);
    duplex_timer_unref(tm);
    return rc == DUPLEX_ECLOSED && rs != DUPLEX_ECLOSED ? -1 : rc;
  }, DUPLEX_ECLOSED);
  add("duplex_timer_ref", "NULL", [] { return duplex_timer_ref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_timer_unref", "NULL", [] { return duplex_timer_unref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_timer_ref", "open timer: ref + unref", [cp] {
    int rc = duplex_timer_ref(cp->timer);
    return rc == 0 ? duplex_timer_unref(cp->timer) : rc;
  }, 0);

  // ---- listeners ----------------------------------------------------------
  add("duplex_listener_opts_init", "NULL", [] { return duplex_listener_opts_init(nullptr); },
      DUPLEX_EINVAL);
  auto ltcp = [&c](duplex_loop *loop, const char *host, uint16_t port,
                   const duplex_listener_opts *o) {
    duplex_listener *out = reinterpret_cast<duplex_listener *>(&c);
    int rc = duplex_listener_tcp(&out, loop, host, port, o);
    if (rc == 0) {
      duplex_listener_close(out);
      duplex_listener_unref(out);
      return 0;
    }
    return out_null(rc, out);
  };
  add("duplex_listener_tcp", "NULL out",
      [&c] { return duplex_listener_tcp(nullptr, c.loop, "127.0.0.1", 0, nullptr); },
      DUPLEX_EINVAL);
  add("duplex_listener_tcp", "NULL loop",
      [ltcp] { return ltcp(nullptr, "127.0.0.1", 0, nullptr); }, DUPLEX_EINVAL);
  for (const char *host : {"not an address", "256.1.1.1", "127.0.0.1.5", "::g", "example.com"})
    add("duplex_listener_tcp", std::string("host \"") + host + "\"",
        [ltcp, &c, host] { return ltcp(c.loop, host, 0, nullptr); }, DUPLEX_EINVAL);
  add("duplex_listener_tcp", "opts->size 0", [ltcp, &c] {
    duplex_listener_opts o = DUPLEX_LISTENER_OPTS_INIT;
    o.size = 0;
    return ltcp(c.loop, "127.0.0.1", 0, &o);
  }, DUPLEX_EVERSION);
  add("duplex_listener_tcp", "unknown listen flag", [ltcp, &c] {
    duplex_listener_opts o = DUPLEX_LISTENER_OPTS_INIT;
    o.flags = 0x2;
    return ltcp(c.loop, "127.0.0.1", 0, &o);
  }, DUPLEX_EINVAL);
  for (auto &b : bad_framing)
    add("duplex_listener_tcp", "conn_opts with " + b.what, [ltcp, &c, b] {
      duplex_framing f = DUPLEX_FRAMING_INIT;
      b.mutate(f);
      duplex_conn_opts co = DUPLEX_CONN_OPTS_INIT;
      co.framing = &f;
      duplex_listener_opts o = DUPLEX_LISTENER_OPTS_INIT;
      o.conn_opts = &co;
      return ltcp(c.loop, "127.0.0.1", 0, &o);
    }, b.expect);
  add("duplex_listener_tcp", "port already in use", [ltcp, &c] {
    uint16_t port = 0;
    REQUIRE(duplex_listener_get_port(c.tcp, &port) == 0);
    return ltcp(c.loop, "127.0.0.1", port, nullptr);
  }, DUPLEX_EADDRINUSE);

  auto lunix = [&c](duplex_loop *loop, const char *path, const duplex_listener_opts *o) {
    duplex_listener *out = reinterpret_cast<duplex_listener *>(&c);
    int rc = duplex_listener_unix(&out, loop, path, o);
    if (rc == 0) {
      duplex_listener_close(out);
      duplex_listener_unref(out);
      return 0;
    }
    return out_null(rc, out);
  };
  add("duplex_listener_unix", "NULL out",
      [&c] { return duplex_listener_unix(nullptr, c.loop, c.dir.file("x").c_str(), nullptr); },
      DUPLEX_EINVAL);
  add("duplex_listener_unix", "NULL loop",
      [lunix, &c] { return lunix(nullptr, c.dir.file("x").c_str(), nullptr); }, DUPLEX_EINVAL);
  add("duplex_listener_unix", "NULL path",
      [lunix, &c] { return lunix(c.loop, nullptr, nullptr); }, DUPLEX_EINVAL);
  add("duplex_listener_unix", "empty path", [lunix, &c] { return lunix(c.loop, "", nullptr); },
      DUPLEX_EINVAL);
  add("duplex_listener_unix", "path longer than sun_path",
      [lunix, &c] { return lunix(c.loop, long_path(300).c_str(), nullptr); },
      DUPLEX_ENAMETOOLONG);
  add("duplex_listener_unix", "opts->size 0", [lunix, &c] {
    duplex_listener_opts o = DUPLEX_LISTENER_OPTS_INIT;
    o.size = 0;
    return lunix(c.loop, c.dir.file("y").c_str(), &o);
  }, DUPLEX_EVERSION);
  add("duplex_listener_unix", "our own live socket",
      [lunix, &c] { return lunix(c.loop, c.unix_path.c_str(), nullptr); }, DUPLEX_EADDRINUSE);

  add("duplex_listener_get_port", "NULL listener", [] {
    uint16_t p;
    return duplex_listener_get_port(nullptr, &p);
  }, DUPLEX_EINVAL);
  add("duplex_listener_get_port", "NULL out",
      [&c] { return duplex_listener_get_port(c.tcp, nullptr); }, DUPLEX_EINVAL);
  add("duplex_listener_get_port", "UNIX listener", [&c] {
    uint16_t p;
    return duplex_listener_get_port(c.unx, &p);
  }, DUPLEX_ENOTSUP);
  add("duplex_listener_get_address", "NULL listener", [] {
    char b[64];
    return duplex_listener_get_address(nullptr, b, sizeof b);
  }, DUPLEX_EINVAL);
  add("duplex_listener_get_address", "NULL buf",
      [&c] { return duplex_listener_get_address(c.tcp, nullptr, 64); }, DUPLEX_EINVAL);
  add("duplex_listener_get_address", "3-byte buffer", [&c] {
    char b[3] = {'x', 'x', 'x'};
    int rc = duplex_listener_get_address(c.tcp, b, sizeof b);
    return rc == DUPLEX_ENOBUFS && b[0] != '\0' ? -1 : rc;
  }, DUPLEX_ENOBUFS);
  add("duplex_listener_close", "NULL", [] { return duplex_listener_close(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_listener_close", "second close through the caller's reference", [&c] {
    duplex_listener *l = nullptr;
    int rc = duplex_listener_tcp(&l, c.loop, "127.0.0.1", 0, nullptr);
    if (rc != 0)
      return rc;
    rc = duplex_listener_close(l);
    int spins = 0;
    pump_until(c.loop, [&spins] { return ++spins > 20; });
    if (rc == 0)
      rc = duplex_listener_close(l);
    duplex_listener_unref(l);
    return rc;
  }, DUPLEX_ECLOSED);
  add("duplex_listener_ref", "NULL", [] { return duplex_listener_ref(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_listener_unref", "NULL", [] { return duplex_listener_unref(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_listener_ref", "open listener: ref + unref", [&c] {
    int rc = duplex_listener_ref(c.tcp);
    return rc == 0 ? duplex_listener_unref(c.tcp) : rc;
  }, 0);

  // ---- loop references ------------------------------------------------------
  add("duplex_loop_ref", "NULL", [] { return duplex_loop_ref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_loop_unref", "NULL", [] { return duplex_loop_unref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_loop_unref", "the last reference of a live loop", [&c] {
    return duplex_loop_unref(c.loop);
  }, DUPLEX_EBUSY);
  add("duplex_loop_free", "second free through a held reference", [] {
    duplex_loop *l = nullptr;
    int rc = duplex_loop_new(&l, nullptr);
    if (rc != 0)
      return rc;
    duplex_loop_ref(l);
    rc = duplex_loop_free(l);
    if (rc == 0)
      rc = duplex_loop_free(l);
    int rp = duplex_loop_post(l, [](duplex_loop *, int, void *) {}, nullptr);
    int rr = duplex_loop_run(l, DUPLEX_RUN_NOWAIT);
    duplex_loop_unref(l);
    return rp == DUPLEX_ECLOSED && rr == DUPLEX_ECLOSED ? rc : -1;
  }, DUPLEX_ECLOSED);

  add("duplex_conn_get_loop", "NULL conn", [] {
    duplex_loop *l = reinterpret_cast<duplex_loop *>(1);
    int rc = duplex_conn_get_loop(nullptr, &l);
    return out_null(rc, l);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_loop", "NULL out",
      [&c] { return duplex_conn_get_loop(c.open_conn, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_get_loop", "closed conn (still referenced)", [&c] {
    duplex_loop *l = reinterpret_cast<duplex_loop *>(1);
    int rc = duplex_conn_get_loop(c.closed_conn, &l);
    return out_null(rc, l);
  }, DUPLEX_ECLOSED);
  add("duplex_conn_get_loop", "open conn: its loop", [&c] {
    duplex_loop *l = nullptr;
    int rc = duplex_conn_get_loop(c.open_conn, &l);
    return rc == 0 && l != c.loop ? -1 : rc;
  }, 0);

  // ---- signals --------------------------------------------------------------
  add("duplex_signal_new", "NULL out", [&c] {
    return duplex_signal_new(nullptr, c.loop, SIGUSR1, [](duplex_signal *, int, void *) {},
                             nullptr);
  }, DUPLEX_EINVAL);
  add("duplex_signal_new", "NULL loop", [] {
    duplex_signal *s = reinterpret_cast<duplex_signal *>(1);
    int rc = duplex_signal_new(&s, nullptr, SIGUSR1, [](duplex_signal *, int, void *) {},
                               nullptr);
    return out_null(rc, s);
  }, DUPLEX_EINVAL);
  add("duplex_signal_new", "NULL callback", [&c] {
    duplex_signal *s = nullptr;
    int rc = duplex_signal_new(&s, c.loop, SIGUSR1, nullptr, nullptr);
    return out_null(rc, s);
  }, DUPLEX_EINVAL);
  for (int bad : {0, -1, 100000, SIGKILL, SIGSTOP})
    add("duplex_signal_new", "signum " + std::to_string(bad), [&c, bad] {
      duplex_signal *s = nullptr;
      int rc = duplex_signal_new(&s, c.loop, bad, [](duplex_signal *, int, void *) {},
                                 nullptr);
      return out_null(rc, s);
    }, DUPLEX_EINVAL);
  add("duplex_signal_close", "NULL", [] { return duplex_signal_close(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_signal_get_signum", "NULL", [] {
    int n;
    return duplex_signal_get_signum(nullptr, &n);
  }, DUPLEX_EINVAL);
  add("duplex_signal_ref", "NULL", [] { return duplex_signal_ref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_signal_unref", "NULL", [] { return duplex_signal_unref(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_signal_close", "second close through the caller's reference", [&c] {
    duplex_signal *s = nullptr;
    int rc = duplex_signal_new(&s, c.loop, SIGWINCH, [](duplex_signal *, int, void *) {},
                               nullptr);
    if (rc != 0)
      return rc;
    rc = duplex_signal_close(s);
    int spins = 0;
    pump_until(c.loop, [&spins] { return ++spins > 5; });
    if (rc == 0)
      rc = duplex_signal_close(s);
    duplex_signal_unref(s);
    return rc;
  }, DUPLEX_ECLOSED);

  // ---- loop figures and groups ----------------------------------------------
  add("duplex_loop_get_stats", "NULL loop", [] {
    duplex_loop_stats st = DUPLEX_LOOP_STATS_INIT;
    return duplex_loop_get_stats(nullptr, &st);
  }, DUPLEX_EINVAL);
  add("duplex_loop_get_stats", "NULL out",
      [&c] { return duplex_loop_get_stats(c.loop, nullptr); }, DUPLEX_EINVAL);
  add("duplex_loop_get_stats", "size 0", [&c] {
    duplex_loop_stats st{};
    return duplex_loop_get_stats(c.loop, &st);
  }, DUPLEX_EVERSION);
  add("duplex_loop_get_group", "NULL loop", [] {
    return duplex_loop_get_group(nullptr, nullptr, nullptr);
  }, DUPLEX_EINVAL);
  add("duplex_loop_get_group", "plain loop: no group, index 0", [&c] {
    duplex_loop_group *g = reinterpret_cast<duplex_loop_group *>(&c);
    unsigned i = 7;
    int rc = duplex_loop_get_group(c.loop, &g, &i);
    return rc == 0 && (g != nullptr || i != 0) ? -1 : rc;
  }, 0);
  add("duplex_group_opts_init", "NULL", [] { return duplex_group_opts_init(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_group_new", "NULL out", [] { return duplex_group_new(nullptr, nullptr); },
      DUPLEX_EINVAL);
  add("duplex_group_new", "unknown flag", [] {
    duplex_loop_group *g = reinterpret_cast<duplex_loop_group *>(1);
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.flags = 0x80;
    int rc = duplex_group_new(&g, &o);
    return out_null(rc, g);
  }, DUPLEX_EINVAL);
  add("duplex_group_new", "too many loops", [] {
    duplex_loop_group *g = nullptr;
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.loops = DUPLEX_GROUP_MAX_LOOPS + 1;
    int rc = duplex_group_new(&g, &o);
    return out_null(rc, g);
  }, DUPLEX_EINVAL);
  add("duplex_group_new", "opts size 0", [] {
    duplex_loop_group *g = nullptr;
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.size = 0;
    int rc = duplex_group_new(&g, &o);
    return out_null(rc, g);
  }, DUPLEX_EVERSION);
  add("duplex_group_new", "bad loop opts", [] {
    duplex_loop_group *g = nullptr;
    duplex_loop_opts lo = DUPLEX_LOOP_OPTS_INIT;
    lo.flags = 1;
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.loops = 2;
    o.loop_opts = &lo;
    int rc = duplex_group_new(&g, &o);
    return out_null(rc, g);
  }, DUPLEX_EINVAL);
  add("duplex_group_start", "NULL", [] { return duplex_group_start(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_group_stop", "NULL", [] { return duplex_group_stop(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_group_free", "NULL", [] { return duplex_group_free(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_group_ref", "NULL", [] { return duplex_group_ref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_group_unref", "NULL", [] { return duplex_group_unref(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_group_get_count", "NULL", [] {
    unsigned n;
    return duplex_group_get_count(nullptr, &n);
  }, DUPLEX_EINVAL);
  add("duplex_group_get_loop", "NULL", [] {
    duplex_loop *l;
    return duplex_group_get_loop(nullptr, 0, &l);
  }, DUPLEX_EINVAL);
  add("duplex_group_pick", "NULL", [] {
    duplex_loop *l;
    return duplex_group_pick(nullptr, &l);
  }, DUPLEX_EINVAL);
  add("duplex_group_listen_tcp", "NULL group", [] {
    duplex_listener *l = reinterpret_cast<duplex_listener *>(1);
    int rc = duplex_group_listen_tcp(&l, nullptr, "127.0.0.1", 0, nullptr);
    return out_null(rc, l);
  }, DUPLEX_EINVAL);
  add("duplex_group_listen_unix", "NULL group", [] {
    duplex_listener *l = reinterpret_cast<duplex_listener *>(1);
    int rc = duplex_group_listen_unix(&l, nullptr, "/tmp/x.sock", nullptr);
    return out_null(rc, l);
  }, DUPLEX_EINVAL);
  add("duplex_listener_tcp", "REUSEPORT on a single-loop listener", [&c] {
    duplex_listener *l = nullptr;
    duplex_listener_opts o = DUPLEX_LISTENER_OPTS_INIT;
    o.flags = DUPLEX_LISTEN_REUSEPORT;
    int rc = duplex_listener_tcp(&l, c.loop, "127.0.0.1", 0, &o);
    return out_null(rc, l);
  }, DUPLEX_EINVAL);
  // One group, used after it was freed through a held reference: every
  // call answers ECLOSED and nothing is dropped twice.
  add("duplex_group_free", "use after free through a held reference", [] {
    duplex_loop_group *g = nullptr;
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.loops = 2;
    int rc = duplex_group_new(&g, &o);
    if (rc != 0)
      return rc;
    duplex_loop *l0 = nullptr;
    duplex_group_get_loop(g, 0, &l0);
    duplex_loop_ref(l0);
    duplex_group_ref(g);
    if (duplex_group_unref(g) != 0 || duplex_group_unref(g) != DUPLEX_EBUSY)
      return -2; // the last reference of a live group stays
    duplex_group_ref(g);
    rc = duplex_group_free(g);
    unsigned n;
    duplex_loop *l;
    duplex_listener *ls = nullptr;
    bool all = rc == 0 && duplex_group_free(g) == DUPLEX_ECLOSED &&
               duplex_group_start(g) == DUPLEX_ECLOSED &&
               duplex_group_stop(g) == DUPLEX_ECLOSED &&
               duplex_group_get_count(g, &n) == DUPLEX_ECLOSED &&
               duplex_group_get_loop(g, 0, &l) == DUPLEX_ECLOSED &&
               duplex_group_pick(g, &l) == DUPLEX_ECLOSED &&
               duplex_group_listen_tcp(&ls, g, "127.0.0.1", 0, nullptr) == DUPLEX_ECLOSED &&
               duplex_loop_get_group(l0, nullptr, nullptr) == DUPLEX_ECLOSED &&
               duplex_loop_post(l0, [](duplex_loop *, int, void *) {}, nullptr) ==
                   DUPLEX_ECLOSED;
    duplex_loop_unref(l0);
    duplex_group_unref(g);
    return all ? 0 : -1;
  }, 0);
  add("duplex_group_get_loop", "index out of range", [] {
    duplex_loop_group *g = nullptr;
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.loops = 1;
    int rc = duplex_group_new(&g, &o);
    if (rc != 0)
      return rc;
    duplex_loop *l = reinterpret_cast<duplex_loop *>(1);
    rc = duplex_group_get_loop(g, 1, &l);
    // A group's loop is run, started and freed only by its group.
    duplex_loop *l0 = nullptr;
    duplex_group_get_loop(g, 0, &l0);
    bool owned = duplex_loop_run(l0, DUPLEX_RUN_NOWAIT) == DUPLEX_EBUSY &&
                 duplex_loop_start(l0) == DUPLEX_EBUSY &&
                 duplex_loop_free(l0) == DUPLEX_EBUSY;
    duplex_group_free(g);
    return owned ? out_null(rc, l) : -1;
  }, DUPLEX_EINVAL);
  add("duplex_group_listen_unix", "REUSEPORT", [] {
    duplex_loop_group *g = nullptr;
    duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
    o.loops = 1;
    int rc = duplex_group_new(&g, &o);
    if (rc != 0)
      return rc;
    duplex_listener *l = nullptr;
    duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
    lo.flags = DUPLEX_LISTEN_REUSEPORT;
    rc = duplex_group_listen_unix(&l, g, "/tmp/duplex-bad-reuse.sock", &lo);
    rc = out_null(rc, l);
    duplex_group_free(g);
    return rc;
  }, DUPLEX_ENOTSUP);

  // ---- TLS ------------------------------------------------------------------
  // Built without TLS (no OpenSSL 3) the calls that would need it return
  // DUPLEX_ENOTSUP; NULL arguments are DUPLEX_EINVAL in both builds.
  const bool tls = c.have_tls;
  auto tls_or = [tls](int with, int without) { return tls ? with : without; };
  add("duplex_tls_config_init", "NULL", [] { return duplex_tls_config_init(nullptr); },
      DUPLEX_EINVAL);
  add("duplex_tls_config_init", "fills the macro's values", [] {
    duplex_tls_config a = DUPLEX_TLS_CONFIG_INIT, b;
    std::memset(&b, 0x5a, sizeof b);
    int rc = duplex_tls_config_init(&b);
    bool same = b.size == sizeof b && b.role == a.role && b.cert_file == a.cert_file &&
                b.key_file == a.key_file && b.ca_file == a.ca_file && b.ca_dir == a.ca_dir &&
                b.cert_pem == a.cert_pem && b.key_pem == a.key_pem && b.ca_pem == a.ca_pem &&
                b.cert_pem_len == 0 && b.key_pem_len == 0 && b.ca_pem_len == 0 &&
                b.system_ca == 0 && b.verify == 0 && b.alpn == nullptr &&
                b.alpn_count == 0 && b.min_version == 0 && b.max_version == 0 &&
                b.session_cache == 0 && b.keylog_file == nullptr &&
                b.handshake_timeout_ms == 0;
    return rc == 0 && !same ? -1 : rc;
  }, 0);
  add("duplex_tls_new", "NULL out", [] {
    duplex_tls_config tc = DUPLEX_TLS_CONFIG_INIT;
    tc.role = DUPLEX_TLS_CLIENT;
    return duplex_tls_new(nullptr, &tc, nullptr, 0);
  }, DUPLEX_EINVAL);
  add("duplex_tls_new", "NULL config", [] {
    duplex_tls *out = reinterpret_cast<duplex_tls *>(1);
    char err[64];
    int rc = duplex_tls_new(&out, nullptr, err, sizeof err);
    return out_null(rc, out);
  }, DUPLEX_EINVAL);
  add("duplex_tls_new", "config size 0", [] {
    duplex_tls *out = reinterpret_cast<duplex_tls *>(1);
    duplex_tls_config tc = DUPLEX_TLS_CONFIG_INIT;
    tc.role = DUPLEX_TLS_CLIENT;
    tc.size = 0;
    int rc = duplex_tls_new(&out, &tc, nullptr, 0);
    return out_null(rc, out);
  }, tls_or(DUPLEX_EVERSION, DUPLEX_ENOTSUP));
  add("duplex_tls_new", "no role", [] {
    duplex_tls *out = reinterpret_cast<duplex_tls *>(1);
    duplex_tls_config tc = DUPLEX_TLS_CONFIG_INIT;
    char err[128];
    int rc = duplex_tls_new(&out, &tc, err, sizeof err);
    return out_null(rc, out);
  }, tls_or(DUPLEX_EINVAL, DUPLEX_ENOTSUP));
  add("duplex_tls_new", "a server without a certificate", [] {
    duplex_tls *out = reinterpret_cast<duplex_tls *>(1);
    duplex_tls_config tc = DUPLEX_TLS_CONFIG_INIT;
    tc.role = DUPLEX_TLS_SERVER;
    int rc = duplex_tls_new(&out, &tc, nullptr, 0);
    return out_null(rc, out);
  }, tls_or(DUPLEX_EINVAL, DUPLEX_ENOTSUP));
  add("duplex_tls_new", "a CA file that does not exist", [] {
    duplex_tls *out = reinterpret_cast<duplex_tls *>(1);
    duplex_tls_config tc = DUPLEX_TLS_CONFIG_INIT;
    tc.role = DUPLEX_TLS_CLIENT;
    tc.ca_file = "/nonexistent/duplex-badinput/ca.pem";
    char err[256] = "";
    int rc = duplex_tls_new(&out, &tc, err, sizeof err);
    if (rc != 0 && err[0] == '\0')
      return -1; // a failure says why
    return out_null(rc, out);
  }, tls_or(DUPLEX_ETLSCONFIG, DUPLEX_ENOTSUP));
  add("duplex_tls_ref", "NULL", [] { return duplex_tls_ref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_tls_unref", "NULL", [] { return duplex_tls_unref(nullptr); }, DUPLEX_EINVAL);
  add("duplex_tls_backend", "no input: a name with TLS, NULL without", [tls] {
    const char *b = duplex_tls_backend();
    return (b != nullptr && *b != '\0') == tls ? 0 : -1;
  }, 0);
  add("duplex_conn_start_tls", "NULL conn", [&c] {
    return duplex_conn_start_tls(nullptr, c.tls_lax, "localhost", nullptr, nullptr);
  }, DUPLEX_EINVAL);
  add("duplex_conn_start_tls", "NULL tls", [&c] {
    return duplex_conn_start_tls(c.open_conn, nullptr, "localhost", nullptr, nullptr);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_tls_info", "NULL conn", [] {
    duplex_tls_info i{};
    i.size = sizeof i;
    return duplex_conn_get_tls_info(nullptr, &i);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_tls_info", "NULL info",
      [&c] { return duplex_conn_get_tls_info(c.open_conn, nullptr); }, DUPLEX_EINVAL);
  add("duplex_conn_get_tls_info", "info->size 0", [&c] {
    duplex_tls_info i{};
    return duplex_conn_get_tls_info(c.open_conn, &i);
  }, DUPLEX_EVERSION);
  add("duplex_conn_get_tls_info", "a plaintext conn", [&c] {
    duplex_tls_info i{};
    i.size = sizeof i;
    return duplex_conn_get_tls_info(c.open_conn, &i);
  }, DUPLEX_ENOTSUP);
  add("duplex_conn_get_tls_error", "NULL conn", [] {
    char b[8];
    return duplex_conn_get_tls_error(nullptr, b, sizeof b);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_tls_error", "NULL buf",
      [&c] { return duplex_conn_get_tls_error(c.open_conn, nullptr, 8); }, DUPLEX_EINVAL);
  add("duplex_conn_get_tls_error", "len 0", [&c] {
    char b[1] = {'x'};
    return duplex_conn_get_tls_error(c.open_conn, b, 0);
  }, DUPLEX_EINVAL);
  add("duplex_conn_get_tls_error", "a plaintext conn: \"\"", [&c] {
    char b[8];
    std::memset(b, 'x', sizeof b);
    int rc = duplex_conn_get_tls_error(c.open_conn, b, sizeof b);
    return rc == 0 && b[0] != '\0' ? -1 : rc;
  }, 0);
  add("duplex_conn_get_tls_error", "closed conn (still referenced): \"\"", [&c] {
    char b[8];
    std::memset(b, 'x', sizeof b);
    int rc = duplex_conn_get_tls_error(c.closed_conn, b, sizeof b);
    return rc == 0 && b[0] != '\0' ? -1 : rc;
  }, 0);
  if (tls) {
    add("duplex_conn_start_tls", "closed conn (still referenced)", [&c] {
      return duplex_conn_start_tls(c.closed_conn, c.tls_lax, "localhost", nullptr, nullptr);
    }, DUPLEX_ECLOSED);
    add("duplex_conn_start_tls", "a verifying client with no host (adopted conn)", [&c] {
      return duplex_conn_start_tls(c.open_conn, c.tls_verify, nullptr, nullptr, nullptr);
    }, DUPLEX_EINVAL);
    add("duplex_conn_adopt", "a verifying TLS client without tls_host", [&c] {
      auto sp = socket_pair();
      duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
      o.tls = c.tls_verify;
      return adopt_refused(c, sp.ours.get(), &o);
    }, DUPLEX_EINVAL);
    add("duplex_listener_tcp", "tls in conn_opts (a listener's is in its own opts)", [&c] {
      duplex_listener *l = reinterpret_cast<duplex_listener *>(1);
      duplex_conn_opts co = DUPLEX_CONN_OPTS_INIT;
      co.tls = c.tls_lax;
      duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
      lo.conn_opts = &co;
      int rc = duplex_listener_tcp(&l, c.loop, "127.0.0.1", 0, &lo);
      return out_null(rc, l);
    }, DUPLEX_EINVAL);
    add("duplex_listener_tcp", "a client-role tls", [&c] {
      duplex_listener *l = reinterpret_cast<duplex_listener *>(1);
      duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
      lo.tls = c.tls_lax;
      int rc = duplex_listener_tcp(&l, c.loop, "127.0.0.1", 0, &lo);
      return out_null(rc, l);
    }, DUPLEX_EINVAL);
  }
  return t;
}

// Every `DUPLEX_API <type> duplex_name(` declaration in the public header.
std::set<std::string> header_functions() {
  std::ifstream f(DUPLEX_HEADER_PATH);
  REQUIRE_MESSAGE(f.good(), "cannot open " << DUPLEX_HEADER_PATH);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string text = ss.str();
  std::regex decl(R"(DUPLEX_API[ \t]+[^;(\n]*?\b(duplex_[a-z0-9_]+)\s*\()");
  std::set<std::string> names;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), decl);
       it != std::sregex_iterator(); ++it)
    names.insert((*it)[1].str());
  return names;
}

} // namespace

TEST_CASE("every public function returns the documented code on bad input") {
  Ctx ctx;
  std::vector<Case> table = make_table(ctx);
  for (const Case &cs : table) {
    std::string fn = cs.fn;
    INFO(fn << ": " << cs.what);
    int rc = cs.call();
    CHECK_MESSAGE(rc == cs.expect, fn << "(" << cs.what << ") returned " << err_str(rc)
                                         << ", documented " << err_str(cs.expect));
    // Pump the loop between calls: anything wrongly queued gets a chance to
    // run (and to be caught by the counters in ~Ctx).
    duplex_loop_run(ctx.loop, DUPLEX_RUN_NOWAIT);
  }
  // The open conn survived all of it.
  CHECK(ctx.ev_open.closes.load() == 0);
  CHECK(duplex_conn_write(ctx.open_conn, "ok", 2, nullptr, nullptr) == 0);
}

TEST_CASE("the bad-input table covers every DUPLEX_API function in duplex.h") {
  std::set<std::string> declared = header_functions();
  MESSAGE(declared.size() << " DUPLEX_API functions in " << DUPLEX_HEADER_PATH);
  CHECK(declared.size() >= 38);
  Ctx ctx;
  std::vector<Case> table = make_table(ctx);
  std::set<std::string> covered;
  for (const Case &cs : table)
    covered.insert(cs.fn);
  for (const auto &name : declared) {
    INFO(name);
    CHECK_MESSAGE(covered.count(name) == 1, name << " has no bad-input case");
  }
  for (const auto &name : covered) {
    INFO(name);
    CHECK_MESSAGE(declared.count(name) == 1, name << " is not declared in duplex.h");
  }
}

TEST_CASE("option initialisers agree with their macros") {
  duplex_conn_opts a = DUPLEX_CONN_OPTS_INIT, b;
  std::memset(&b, 0x5a, sizeof b);
  REQUIRE(duplex_conn_opts_init(&b) == 0);
  CHECK(b.size == sizeof(duplex_conn_opts));
  CHECK(std::memcmp(&a.size, &b.size, sizeof a.size) == 0);
  CHECK(b.cbs == a.cbs);
  CHECK(b.user == a.user);
  CHECK(b.high_watermark == a.high_watermark);
  CHECK(b.low_watermark == a.low_watermark);
  CHECK(b.hard_limit == a.hard_limit);
  CHECK(b.flags == a.flags);

  duplex_conn_cbs ca = DUPLEX_CONN_CBS_INIT, cb;
  std::memset(&cb, 0x5a, sizeof cb);
  REQUIRE(duplex_conn_cbs_init(&cb) == 0);
  CHECK(cb.size == sizeof(duplex_conn_cbs));
  CHECK((cb.on_open == ca.on_open));
  CHECK((cb.on_read == ca.on_read));
  CHECK((cb.on_eof == ca.on_eof));
  CHECK((cb.on_backpressure == ca.on_backpressure));
  CHECK((cb.on_writable == ca.on_writable));
  CHECK((cb.on_close == ca.on_close));

  CHECK(b.framing == a.framing);
  CHECK(b.connect_timeout_ms == a.connect_timeout_ms);
  CHECK(b.idle_timeout_ms == a.idle_timeout_ms);
  CHECK(b.read_timeout_ms == a.read_timeout_ms);
  CHECK(b.flush_timeout_ms == a.flush_timeout_ms);

  duplex_channel_opts cha = DUPLEX_CHANNEL_OPTS_INIT, chb;
  std::memset(&chb, 0x5a, sizeof chb);
  REQUIRE(duplex_channel_opts_init(&chb) == 0);
  CHECK(chb.size == sizeof(duplex_channel_opts));
  CHECK((chb.on_message == cha.on_message));
  CHECK((chb.on_close == cha.on_close));
  CHECK(chb.user == cha.user);
  CHECK(chb.capacity == cha.capacity);
  CHECK(chb.flags == cha.flags);

  duplex_framing fa = DUPLEX_FRAMING_INIT, fb;
  std::memset(&fb, 0x5a, sizeof fb);
  REQUIRE(duplex_framing_init(&fb) == 0);
  CHECK(fb.size == sizeof(duplex_framing));
  CHECK(fb.kind == DUPLEX_FRAME_NONE);
  CHECK(fb.kind == fa.kind);
  CHECK(fb.flags == fa.flags);
  CHECK(std::memcmp(fb.delimiter, fa.delimiter, sizeof fa.delimiter) == 0);
  CHECK(fb.delimiter_len == fa.delimiter_len);
  CHECK(fb.prefix_bytes == fa.prefix_bytes);
  CHECK(fb.max_frame == fa.max_frame);
  CHECK((fb.custom == fa.custom));
  CHECK(fb.custom_user == fa.custom_user);

  duplex_listener_opts la = DUPLEX_LISTENER_OPTS_INIT, lb;
  std::memset(&lb, 0x5a, sizeof lb);
  REQUIRE(duplex_listener_opts_init(&lb) == 0);
  CHECK(lb.size == sizeof(duplex_listener_opts));
  CHECK(lb.conn_opts == la.conn_opts);
  CHECK((lb.on_error == la.on_error));
  CHECK(lb.user == la.user);
  CHECK(lb.backlog == la.backlog);
  CHECK(lb.flags == la.flags);
  CHECK(lb.mode == la.mode);
}
