// The C++ layer's coroutine path allocates nothing in the steady state.
//
// This file replaces the global operator new / delete and, outside
// sanitizer builds (whose runtimes own malloc), malloc, calloc, realloc,
// free and the aligned forms too, forwarding to glibc and counting calls
// made by any thread while `armed`. Each test echoes 64-byte messages
// ping-pong over TCP between a blocking peer thread (which allocates
// nothing) and a server coroutine: a warm-up first (the block cache, the
// loop's buffers), then N messages counted, for two values of N. Every
// count must be zero: not just independent of N.
#include <duplex/duplex.hpp>

#include "fixture.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

namespace counting {
std::atomic<bool> armed{false};
std::atomic<long> news{0};    // operator new (every form)
std::atomic<long> mallocs{0}; // malloc & co. (not in sanitizer builds)
inline void count(std::atomic<long> &c) noexcept {
  if (armed.load(std::memory_order_relaxed))
    c.fetch_add(1, std::memory_order_relaxed);
}
} // namespace counting

// ---- operator new / delete -------------------------------------------------

[[gnu::noinline]] void *operator new(std::size_t n) {
  counting::count(counting::news);
  if (void *p = std::malloc(n != 0 ? n : 1))
    return p;
  throw std::bad_alloc();
}
void *operator new[](std::size_t n) { return ::operator new(n); }
void *operator new(std::size_t n, const std::nothrow_t &) noexcept {
  counting::count(counting::news);
  return std::malloc(n != 0 ? n : 1);
}
void *operator new[](std::size_t n, const std::nothrow_t &t) noexcept {
  return ::operator new(n, t);
}
void operator delete(void *p) noexcept { std::free(p); }
void operator delete[](void *p) noexcept { std::free(p); }
void operator delete(void *p, std::size_t) noexcept { std::free(p); }
void operator delete[](void *p, std::size_t) noexcept { std::free(p); }

// ---- malloc & co. (glibc's own underneath) ----------------------------------

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||    \
    __has_feature(memory_sanitizer)
#define COUNT_MALLOC 0
#endif
#endif
#ifndef COUNT_MALLOC
#define COUNT_MALLOC 1
#endif

#if COUNT_MALLOC
extern "C" {
void *__libc_malloc(size_t);
void *__libc_calloc(size_t, size_t);
void *__libc_realloc(void *, size_t);
void *__libc_memalign(size_t, size_t);
void __libc_free(void *);

void *malloc(size_t n) {
  counting::count(counting::mallocs);
  return __libc_malloc(n);
}
void *calloc(size_t n, size_t m) {
  counting::count(counting::mallocs);
  return __libc_calloc(n, m);
}
void *realloc(void *p, size_t n) {
  counting::count(counting::mallocs);
  return __libc_realloc(p, n);
}
void *memalign(size_t a, size_t n) {
  counting::count(counting::mallocs);
  return __libc_memalign(a, n);
}
void *aligned_alloc(size_t a, size_t n) {
  counting::count(counting::mallocs);
  return __libc_memalign(a, n);
}
int posix_memalign(void **out, size_t a, size_t n) {
  counting::count(counting::mallocs);
  void *p = __libc_memalign(a, n);
  if (p == nullptr)
    return ENOMEM;
  *out = p;
  return 0;
}
void free(void *p) { __libc_free(p); }
}
#endif

namespace {

using namespace std::chrono_literals;

struct Counts {
  long news = -1, mallocs = -1;
  bool echoed = false;
};

int connect_tcp(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) != 0)
    return -1;
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

// What a server coroutine gets: its conn, and the loop to stop at the end.
using Serve = duplex::task<void> (*)(duplex::Loop &, duplex::Conn);

// Echo @p warm, then @p n messages of @p size bytes ping-pong through a
// conn served by @p serve; the counts cover the n only.
Counts pingpong(Serve serve, int warm, int n, std::size_t size = 64) {
  duplex::Loop loop;
  duplex::Timer guard(loop, [&loop] {
    FAIL_CHECK("hang guard fired");
    loop.stop();
  });
  guard.start(dtest::kGuard);
  auto server = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open = [&loop, serve](duplex::ConnRef c) {
        duplex::spawn(loop, serve(loop, duplex::Conn(c)));
      }});
  uint16_t port = server.port();
  Counts got;
  dtest::PeerThread peer([&] {
    dtest::Fd fd(connect_tcp(port));
    if (fd.get() < 0)
      return;
    std::string msg(size, '\0'), back(size, '\0');
    bool ok = true;
    auto one = [&](int i) {
      for (std::size_t k = 0; k < size; k++)
        msg[k] = static_cast<char>('a' + (i + k) % 26);
      ok = ok && dtest::write_all(fd.get(), msg.data(), size) == 0 &&
           dtest::read_exactly(fd.get(), back.data(), size) && back == msg;
    };
    for (int i = 0; i < warm; i++)
      one(i);
    long n0 = counting::news.load(), m0 = counting::mallocs.load();
    counting::armed = true;
    for (int i = 0; i < n; i++)
      one(warm + i);
    counting::armed = false;
    got.news = counting::news.load() - n0;
    got.mallocs = counting::mallocs.load() - m0;
    got.echoed = ok;
    ::shutdown(fd.get(), SHUT_WR); // the server coroutine ends at EOF
  });
  loop.run(); // until the server coroutine saw EOF
  peer.join();
  return got;
}

void check_steady_state(Serve serve, std::size_t size = 64) {
  const int warm = 200;
  for (int n : {dtest::kSanitized ? 300 : 1000, dtest::kSanitized ? 1200 : 5000}) {
    CAPTURE(n);
    Counts c = pingpong(serve, warm, n, size);
    CHECK(c.echoed);
    CHECK(c.news == 0);
    if (COUNT_MALLOC)
      CHECK(c.mallocs == 0);
  }
}

// ---- the servers -------------------------------------------------------------

// The echo of docs/cpp.md: read a chunk, write it back.
duplex::task<void> echo(duplex::Loop &loop, duplex::Conn c) {
  for (;;) {
    auto r = co_await c.read();
    if (!r.ok())
      break;
    if (co_await c.async_write(r.data))
      break;
  }
  loop.stop();
}

// The same, one sub-task per message: each call makes a coroutine frame,
// recycled through the block cache.
duplex::task<bool> echo_one(duplex::ConnRef c) {
  auto r = co_await c.read();
  if (!r.ok())
    co_return false;
  co_return !(co_await c.async_write(r.data));
}
duplex::task<void> echo_by_task(duplex::Loop &loop, duplex::Conn c) {
  for (;;) { // not `while (co_await echo_one(c))`: GCC 12 miscompiles that
    bool more = co_await echo_one(c);
    if (!more)
      break;
  }
  loop.stop();
}

// Waiting on the conn or a channel (nothing is ever sent to it) at once.
duplex::task<void> echo_first_of(duplex::Loop &loop, duplex::Conn c) {
  duplex::Channel<int> ch(loop);
  for (;;) {
    auto ev = co_await duplex::first_of(c.read(), ch.receive());
    if (ev.index() != 0)
      break;
    auto &r = std::get<0>(ev);
    if (!r.ok())
      break;
    if (co_await c.async_write(r.data))
      break;
  }
  ch.close();
  loop.stop();
}

// Every read with a timeout that never expires.
duplex::task<void> echo_with_timeout(duplex::Loop &loop, duplex::Conn c) {
  for (;;) {
    auto ev = co_await duplex::first_of(c.read(), loop.sleep(1h));
    if (ev.index() != 0)
      break;
    auto &r = std::get<0>(ev);
    if (!r.ok())
      break;
    if (co_await c.async_write(r.data))
      break;
  }
  loop.stop();
}

} // namespace

TEST_CASE("a coroutine echo (read, async_write) allocates nothing per message") {
  check_steady_state(&echo);
}

TEST_CASE("... nor with 4 KiB messages") { check_steady_state(&echo, 4096); }

TEST_CASE("... nor with a sub-task per message (frames are recycled)") {
  check_steady_state(&echo_by_task);
}

TEST_CASE("... nor waiting in first_of(read, receive)") {
  check_steady_state(&echo_first_of);
}

TEST_CASE("... nor with a timeout on every read: first_of(read, sleep)") {
  check_steady_state(&echo_with_timeout);
}

TEST_CASE("the block cache hands a freed block back for the next one of its size") {
  using duplex::detail::block_cache;
  void *a = block_cache::get(100);
  block_cache::put(a, 100);
  void *b = block_cache::get(112); // the same 16-byte class
  CHECK(b == a);
  block_cache::put(b, 112);
  void *big = block_cache::get(block_cache::kLargeMax + 1); // never cached
  std::size_t before = block_cache::cached();
  block_cache::put(big, block_cache::kLargeMax + 1);
  CHECK(block_cache::cached() == before);
}
