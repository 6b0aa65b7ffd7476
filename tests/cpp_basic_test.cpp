// The C++20 layer (cpp/include/duplex): errors, Loop, ownership of Conn,
// Listener, Timer and Channel, the exception boundary, and writes (copied,
// zero-copy, would-block).
//
// Linked with cpp_odr_test.cpp into one executable: both translation units
// include the headers, so any non-inline definition in them fails the link.
// Built with -Wall -Wextra -Wpedantic -Werror.
//
// Zero-copy releases are counted exactly: this file replaces the global
// operator new/delete (malloc/free underneath, so ASan still sees every
// block) and counts the frees of watched pointers. A second release of the
// same buffer is a double free, which ASan (and glibc) reports.
#include <duplex/duplex.hpp>

#include "fixture.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------
// Watched frees (see the file comment)
// ---------------------------------------------------------------------------

namespace watch {

constexpr int kSlots = 32;
std::atomic<void *> slot[kSlots];
std::atomic<int> frees[kSlots];

// Count the next free of @p p; returns its slot. The slot clears itself on
// that free, so a later block at the same address is not counted.
int add(const void *p) {
  for (int i = 0; i < kSlots; i++) {
    void *expect = nullptr;
    frees[i].store(0);
    if (slot[i].compare_exchange_strong(expect, const_cast<void *>(p)))
      return i;
  }
  FAIL("watch: out of slots");
  return -1;
}
int freed(int i) { return frees[i].load(); }
void forget(int i) { slot[i].store(nullptr); }

void on_free(void *p) noexcept {
  if (p == nullptr)
    return;
  for (int i = 0; i < kSlots; i++) {
    void *expect = p;
    if (slot[i].load(std::memory_order_relaxed) == p &&
        slot[i].compare_exchange_strong(expect, nullptr))
      frees[i]++;
  }
}

} // namespace watch

// Out of line, so that GCC does not pair the inlined malloc with a delete
// (-Wmismatched-new-delete).
[[gnu::noinline]] void *operator new(std::size_t n) {
  if (void *p = std::malloc(n != 0 ? n : 1))
    return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void *operator new[](std::size_t n) { return ::operator new(n); }
[[gnu::noinline]] void operator delete(void *p) noexcept {
  watch::on_free(p);
  std::free(p);
}
[[gnu::noinline]] void operator delete[](void *p) noexcept { ::operator delete(p); }
[[gnu::noinline]] void operator delete(void *p, std::size_t) noexcept {
  ::operator delete(p);
}
[[gnu::noinline]] void operator delete[](void *p, std::size_t) noexcept {
  ::operator delete(p);
}

// Defined here, compared in cpp_odr_test.cpp.
const std::error_category *basic_tu_category() { return &duplex::category(); }

namespace {

using namespace std::chrono_literals;
using namespace std::string_view_literals;
using dtest::kGuard;
using duplex::errc;

std::span<const std::byte> as_span(std::string_view s) {
  return std::as_bytes(std::span(s));
}

// Run @p loop on this thread until @p pred holds (hang guard only).
template <class P> bool pump(duplex::Loop &loop, P &&pred) {
  auto deadline = std::chrono::steady_clock::now() + kGuard;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline)
      return pred();
    loop.run_nowait();
    std::this_thread::sleep_for(50us);
  }
  return true;
}

// Run @p fn on a started loop's thread and wait for it.
bool on_loop(duplex::Loop &loop, std::function<void()> fn) {
  auto done = std::make_shared<dtest::Event>();
  loop.post([fn = std::move(fn), done] {
    fn();
    done->set();
  });
  return done->wait();
}

// An exception type that says which callback threw it.
struct Thrown : std::runtime_error {
  explicit Thrown(const std::string &where) : std::runtime_error(where) {}
};

// Counts live instances, to prove values are destroyed exactly once.
struct Counted {
  static inline std::atomic<int> live{0};
  int v = 0;
  explicit Counted(int x) : v(x) { live++; }
  Counted(const Counted &o) : v(o.v) { live++; }
  Counted(Counted &&o) noexcept : v(o.v) { live++; }
  Counted &operator=(const Counted &) = default;
  Counted &operator=(Counted &&) = default;
  ~Counted() { live--; }
};

// A socketpair whose library end ("ours") cannot send anything until the
// peer reads: its kernel send buffer is full. `junk` bytes precede whatever
// the conn writes.
struct Clogged {
  dtest::SocketPair sp = dtest::socket_pair();
  size_t junk = dtest::fill_send_buffer(sp.ours.get());
};

// Small limits: a write into an empty queue is always taken, then anything
// that takes the queue past 8192 bytes is refused.
duplex::ConnOptions small_limits() {
  duplex::ConnOptions o;
  o.high_watermark = 2048;
  o.low_watermark = 512;
  o.hard_limit = 8192;
  return o;
}

} // namespace

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

TEST_CASE("errc has every C code, with the same value, and duplex_strerror's message") {
  static_assert(std::is_error_code_enum_v<errc>);
  CHECK(std::string(duplex::category().name()) == "duplex");
  struct Row {
    errc e;
    int value;
    const char *msg;
  };
  static const Row rows[] = {
#define ROW_(name, val_, msg) {errc::DUPLEX_##name, DUPLEX_##name, msg},
      DUPLEX_ERRNO_MAP(ROW_)
#undef ROW_
  };
  std::set<std::string> messages;
  int n = 0;
  for (const Row &r : rows) {
    CAPTURE(r.value);
    std::error_code ec = r.e;
    CHECK(ec.value() == r.value);
    CHECK(ec.category() == duplex::category());
    CHECK(ec.message() == r.msg);
    CHECK(ec.message() == duplex_strerror(r.value));
    CHECK(ec == duplex::make_error_code(r.e));
    CHECK(ec == duplex::to_error_code(r.value));
    CHECK(static_cast<bool>(ec));
    messages.insert(ec.message());
    n++;
  }
  CHECK(n > 40);
  CHECK(messages.size() == static_cast<size_t>(n));
  // An unknown code still has a (static) message.
  CHECK(duplex::category().message(-12345) == "unknown error");
}

TEST_CASE("to_error_code maps 0 to success; duplex::error carries the code and context") {
  CHECK_FALSE(duplex::to_error_code(0));
  CHECK(duplex::to_error_code(DUPLEX_ECLOSED) == errc::DUPLEX_ECLOSED);
  CHECK(duplex::to_error_code(DUPLEX_ECLOSED) != errc::DUPLEX_ECANCELED);
  // Codes from other categories never compare equal to library codes.
  CHECK(duplex::make_error_code(errc::DUPLEX_ECLOSED) !=
        std::error_code(DUPLEX_ECLOSED, std::generic_category()));

  try {
    throw duplex::error(DUPLEX_EMSGSIZE, "write");
  } catch (const std::system_error &e) {
    CHECK(e.code() == errc::DUPLEX_EMSGSIZE);
    CHECK(std::string(e.what()).find("write") != std::string::npos);
    CHECK(std::string(e.what()).find("message too long") != std::string::npos);
  }
}

// Every code named after an errno compares equal to that std::errc (both
// ways round, and through std::error_condition); the library's own codes
// and the resolver's match no generic condition. The expected table is
// written by name here, independently of the header: a code added to
// DUPLEX_ERRNO_MAP and classified in neither list fails the test.
TEST_CASE("library codes named after an errno compare equal to that std::errc; the others to none") {
  static const std::map<std::string, std::vector<std::errc>> generic = {
      {"EINVAL", {std::errc::invalid_argument}},
      {"ENOMEM", {std::errc::not_enough_memory}},
      {"EWOULDBLOCK", {std::errc::resource_unavailable_try_again,
                       std::errc::operation_would_block}},
      {"ECANCELED", {std::errc::operation_canceled}},
      {"EBUSY", {std::errc::device_or_resource_busy}},
      {"EBADF", {std::errc::bad_file_descriptor}},
      {"EMSGSIZE", {std::errc::message_size}},
      {"ENOTSUP", {std::errc::not_supported}},
      {"ENOTSOCK", {std::errc::not_a_socket}},
      {"ETIMEDOUT", {std::errc::timed_out}},
      {"ESHUTDOWN", {}}, // an errno with no std::errc: checked below
      {"EPIPE", {std::errc::broken_pipe}},
      {"ECONNRESET", {std::errc::connection_reset}},
      {"ECONNREFUSED", {std::errc::connection_refused}},
      {"ECONNABORTED", {std::errc::connection_aborted}},
      {"ENOTCONN", {std::errc::not_connected}},
      {"EADDRINUSE", {std::errc::address_in_use}},
      {"EADDRNOTAVAIL", {std::errc::address_not_available}},
      {"EAFNOSUPPORT", {std::errc::address_family_not_supported}},
      {"ENETUNREACH", {std::errc::network_unreachable}},
      {"EHOSTUNREACH", {std::errc::host_unreachable}},
      {"EACCES", {std::errc::permission_denied}},
      {"EPERM", {std::errc::operation_not_permitted}},
      {"ENOENT", {std::errc::no_such_file_or_directory}},
      {"ENAMETOOLONG", {std::errc::filename_too_long}},
      {"EMFILE", {std::errc::too_many_files_open}},
      {"ENFILE", {std::errc::too_many_files_open_in_system}},
      {"ENOBUFS", {std::errc::no_buffer_space}},
      {"EINTR", {std::errc::interrupted}},
      {"EIO", {std::errc::io_error}},
      {"EPROTO", {std::errc::protocol_error}},
      {"ENOSPC", {std::errc::no_space_on_device}},
      {"EDEADLK", {std::errc::resource_deadlock_would_occur}},
  };
  static const std::set<std::string> library_only = {
      "EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA", "EAI_FAMILY",
      "EAI_OTHER", "ECLOSED", "EVERSION", "EWRONGTHREAD", "EUNKNOWN",
      "ETLS", "ETLSVERIFY", "ETLSTRUNC", "ETLSCONFIG",
  };
  // Every std::errc a code could be confused with.
  std::set<std::errc> all_errc;
  for (const auto &[name, conds] : generic)
    all_errc.insert(conds.begin(), conds.end());

  struct Row {
    const char *name;
    int value;
  };
  static const Row rows[] = {
#define ROW_(name, val_, msg) {#name, DUPLEX_##name},
      DUPLEX_ERRNO_MAP(ROW_)
#undef ROW_
  };
  size_t mapped = 0, unmapped = 0;
  for (const Row &r : rows) {
    CAPTURE(r.name);
    const std::error_code ec = duplex::make_error_code(static_cast<duplex_error>(r.value));
    CHECK(ec == duplex::to_error_code(r.value));
    CHECK(ec == duplex::make_error_code(static_cast<errc>(r.value)));
    const std::error_condition cond = ec.default_error_condition();
    auto it = generic.find(r.name);
    if (it != generic.end()) {
      mapped++;
      CHECK(library_only.count(r.name) == 0);
      // An errno-named code: its generic condition is that errno.
      CHECK(cond.category() == std::generic_category());
      CHECK(cond.value() != 0);
      CHECK(ec == cond);
      for (std::errc e : all_errc) {
        bool expect = std::find(it->second.begin(), it->second.end(), e) !=
                      it->second.end();
        CAPTURE(static_cast<int>(e));
        CHECK((ec == e) == expect);
        CHECK((e == ec) == expect);
        CHECK((ec == std::make_error_condition(e)) == expect);
        CHECK((ec != e) == !expect);
      }
    } else {
      unmapped++;
      CHECK_MESSAGE(library_only.count(r.name) == 1,
                    "classify the new code in this test");
      CHECK(cond.category() == duplex::category());
      CHECK(cond.value() == r.value);
      for (std::errc e : all_errc) {
        CAPTURE(static_cast<int>(e));
        CHECK(ec != e);
      }
    }
  }
  CHECK(mapped == generic.size());
  CHECK(unmapped == library_only.size());

  // ESHUTDOWN has no std::errc name; it is the generic ESHUTDOWN errno.
  CHECK(duplex::make_error_code(DUPLEX_ESHUTDOWN) ==
        std::error_condition(ESHUTDOWN, std::generic_category()));

  // The examples, spelled as a user would.
  std::error_code ec = duplex::make_error_code(DUPLEX_ECONNRESET);
  CHECK(ec == std::errc::connection_reset);
  CHECK(duplex::to_error_code(DUPLEX_ETIMEDOUT) == std::errc::timed_out);
  CHECK(duplex::to_error_code(DUPLEX_EAGAIN) == std::errc::operation_would_block);
  CHECK(std::error_code(errc::DUPLEX_ECANCELED) == std::errc::operation_canceled);
  CHECK(duplex::make_error_code(DUPLEX_EDEADLK) ==
        std::errc::resource_deadlock_would_occur);
  // Equality of codes stays exact: a generic error_code is another code.
  CHECK(ec != std::make_error_code(std::errc::connection_reset));
  // A thrown duplex::error matches too.
  try {
    throw duplex::error(DUPLEX_ECONNREFUSED, "connect");
  } catch (const std::system_error &e) {
    CHECK(e.code() == std::errc::connection_refused);
  }
  // Unknown codes map to nothing.
  CHECK(duplex::category().default_error_condition(-12345).category() ==
        duplex::category());
  CHECK_FALSE(duplex::to_error_code(-12345) == std::errc::invalid_argument);
}

TEST_CASE("each fallible call has a throwing form and an error_code& form that agree") {
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());

  std::error_code ec = errc::DUPLEX_EUNKNOWN;
  CHECK(c.write("x", ec));
  CHECK_FALSE(ec);
  c.shutdown(ec);
  CHECK_FALSE(ec);
  // After the shutdown: ESHUTDOWN both ways, nothing taken.
  CHECK_FALSE(c.write("y", ec));
  CHECK(ec == errc::DUPLEX_ESHUTDOWN);
  CHECK_FALSE(c.write(as_span("y"), ec));
  CHECK(ec == errc::DUPLEX_ESHUTDOWN);
  try {
    (void)c.write(as_span("y"));
    FAIL("no exception");
  } catch (const duplex::error &e) {
    CHECK(e.code() == errc::DUPLEX_ESHUTDOWN);
  }
  c.shutdown(ec);
  CHECK(ec == errc::DUPLEX_ESHUTDOWN);
  CHECK_THROWS_AS(c.shutdown(), duplex::error);

  c.close(true);
  CHECK(pump(loop, [&] { return !c.write("z", ec) && ec == errc::DUPLEX_ECLOSED; }));
  CHECK_THROWS_AS((void)c.write(std::string_view("z")), duplex::error);

  duplex::Channel<int> ch(loop);
  CHECK(ch.send(1, 0ms, ec));
  CHECK_FALSE(ec);
  ch.close();
  CHECK_FALSE(ch.send(2, 0ms, ec));
  CHECK(ec == errc::DUPLEX_ECLOSED);
  try {
    (void)ch.send(3);
    FAIL("no exception");
  } catch (const duplex::error &e) {
    CHECK(e.code() == errc::DUPLEX_ECLOSED);
  }
}

// ---------------------------------------------------------------------------
// Loop
// ---------------------------------------------------------------------------

TEST_CASE("posts from 4 threads run on the loop thread, in per-thread order, until stop()") {
  constexpr int kThreads = 4, kEach = 2000;
  std::array<int, kThreads> next{}; // loop thread only
  int ran = 0, out_of_order = 0, off_thread = 0;
  duplex::Loop loop;
  CHECK_FALSE(loop.on_thread());
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; t++)
    ts.emplace_back([&, t] {
      for (int i = 0; i < kEach; i++)
        loop.post([&, t, i] {
          off_thread += !loop.on_thread();
          out_of_order += next[static_cast<size_t>(t)]++ != i;
          if (++ran == kThreads * kEach)
            loop.stop();
        });
    });
  loop.run();
  for (auto &t : ts)
    t.join();
  CHECK(ran == kThreads * kEach);
  CHECK(out_of_order == 0);
  CHECK(off_thread == 0);
  CHECK_FALSE(loop.on_thread());

  // The loop can run again after stop().
  loop.post([&] { loop.stop(); });
  loop.run();
  CHECK(ran == kThreads * kEach);
}

TEST_CASE("a post never runs inside post(); a loop freed first destroys it unrun") {
  auto token = std::make_shared<int>(0);
  {
    duplex::Loop loop;
    bool inside = true, ran_inside = false;
    loop.post([&] {
      ran_inside = inside;
      loop.stop();
    });
    inside = false;
    loop.run();
    CHECK_FALSE(ran_inside);

    loop.post([token] { (*token)++; });
    CHECK(token.use_count() == 2);
  } // freed before it ran
  CHECK(*token == 0);
  CHECK(token.use_count() == 1);
}

TEST_CASE("a moved Loop keeps its loop; move-assigning frees the old one") {
  auto token = std::make_shared<int>(0);
  duplex::Loop a;
  duplex::Loop b(std::move(a));
  int ran = 0;
  b.post([&] {
    ran++;
    b.stop();
  });
  b.run();
  CHECK(ran == 1);

  duplex::Loop c;
  c.post([token] { (*token)++; }); // pending on c's old loop
  c = std::move(b);                // frees it: the post is destroyed unrun
  CHECK(token.use_count() == 1);
  c.post([&] {
    ran++;
    c.stop();
  });
  c.run();
  CHECK(ran == 2);
  CHECK(*token == 0);
}

// ---------------------------------------------------------------------------
// The exception boundary
// ---------------------------------------------------------------------------

TEST_CASE("an exception thrown by a callback is rethrown by run(), once, and the loop keeps working") {
  duplex::Loop loop;
  int after = 0;
  loop.post([&] {
    loop.stop();
    throw Thrown("post");
  });
  loop.post([] { throw Thrown("second"); }); // same iteration: only the first is kept
  loop.post([&] { after++; });               // still runs
  try {
    loop.run();
    FAIL("run() did not throw");
  } catch (const Thrown &e) {
    CHECK(std::string(e.what()) == "post");
  }
  // The second exception was dropped, not kept for the next run.
  loop.post([&] { loop.stop(); });
  CHECK_NOTHROW(loop.run());
  CHECK(after == 1);
  CHECK_NOTHROW(loop.rethrow());
}

TEST_CASE("exceptions from every kind of callback stop at the C boundary and come out of run()") {
  int closes = 0, dones = 0, reads = 0;
  std::error_code close_reason = errc::DUPLEX_EUNKNOWN;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();

  SUBCASE("on_open / on_read / on_eof / on_close") {
    auto c = duplex::Conn::adopt(
        loop, sp.ours.release(),
        {.on_open =
             [&](duplex::ConnRef) {
               loop.stop();
               throw Thrown("on_open");
             },
         .on_read =
             [&](duplex::ConnRef, std::span<const std::byte>) {
               reads++;
               loop.stop();
               throw Thrown("on_read");
             },
         .on_eof =
             [&](duplex::ConnRef) {
               loop.stop();
               throw Thrown("on_eof");
             },
         .on_close =
             [&](duplex::ConnRef, std::error_code ec) {
               closes++;
               close_reason = ec;
               loop.stop();
               throw Thrown("on_close");
             }});
    CHECK_THROWS_WITH_AS(loop.run(), "on_open", Thrown);
    REQUIRE(dtest::write_all(sp.peer.get(), "abc", 3) == 0);
    CHECK_THROWS_WITH_AS(loop.run(), "on_read", Thrown);
    ::shutdown(sp.peer.get(), SHUT_WR);
    // Reads may come in more than one callback; each throws.
    for (;;) {
      try {
        loop.run();
        FAIL("run() did not throw");
        break;
      } catch (const Thrown &e) {
        if (std::string(e.what()) == "on_eof")
          break;
        CHECK(std::string(e.what()) == "on_read");
      }
    }
    c.shutdown(); // both directions done: closes with reason 0
    CHECK_THROWS_WITH_AS(loop.run(), "on_close", Thrown);
    CHECK(closes == 1);
    CHECK_FALSE(close_reason);
  }

  SUBCASE("a write's done callback") {
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    CHECK(c.write(as_span("hello"), [&](std::error_code ec) {
      dones++;
      CHECK_FALSE(ec);
      loop.stop();
      throw Thrown("done");
    }));
    CHECK_THROWS_WITH_AS(loop.run(), "done", Thrown);
    CHECK(dones == 1);
    char buf[5];
    CHECK(dtest::read_exactly(sp.peer.get(), buf, 5));
  }

  SUBCASE("on_backpressure / on_writable") {
    Clogged cl;
    auto o = small_limits();
    auto c = duplex::Conn::adopt(loop, cl.sp.ours.release(),
                                 {.on_backpressure =
                                      [&](duplex::ConnRef, size_t) {
                                        loop.stop();
                                        throw Thrown("on_backpressure");
                                      },
                                  .on_writable =
                                      [&](duplex::ConnRef) {
                                        loop.stop();
                                        throw Thrown("on_writable");
                                      }},
                                 o);
    CHECK(c.write(std::string(4000, 'b')));
    CHECK_THROWS_WITH_AS(loop.run(), "on_backpressure", Thrown);
    std::thread peer([&] {
      CHECK(dtest::drain_exactly(cl.sp.peer.get(), cl.junk + 4000));
    });
    CHECK_THROWS_WITH_AS(loop.run(), "on_writable", Thrown);
    peer.join();
  }

  SUBCASE("a timer") {
    duplex::Timer t(loop, [&] {
      loop.stop();
      throw Thrown("timer");
    });
    t.start(0ms);
    CHECK_THROWS_WITH_AS(loop.run(), "timer", Thrown);
  }

  SUBCASE("a channel handler") {
    duplex::Channel<Counted> ch(loop, [&](Counted &&v) {
      loop.stop();
      throw Thrown("message " + std::to_string(v.v));
    });
    CHECK(ch.send(Counted(7)));
    CHECK_THROWS_WITH_AS(loop.run(), "message 7", Thrown);
    CHECK(Counted::live.load() == 0); // the value died with the throw
  }

  // In every case the loop still works afterwards.
  loop.post([&] { loop.stop(); });
  CHECK_NOTHROW(loop.run());
}

// Without any stop() call: the exception alone makes run() return (the
// trampoline asks the loop to stop), and run() rethrows it. A hang guard
// fails the test if run() keeps running instead.
TEST_CASE("an exception from any callback makes run() return and rethrow it, with no stop() call") {
  bool guard_fired = false;
  duplex::Loop loop;
  duplex::Timer guard(loop, [&] {
    guard_fired = true;
    loop.stop();
  });
  guard.start(kGuard);
  auto sp = dtest::socket_pair();

  SUBCASE("a post") {
    loop.post([] { throw Thrown("post"); });
    CHECK_THROWS_WITH_AS(loop.run(), "post", Thrown);
  }

  SUBCASE("on_open / on_read / on_eof / on_close") {
    auto c = duplex::Conn::adopt(
        loop, sp.ours.release(),
        {.on_open = [](duplex::ConnRef) { throw Thrown("on_open"); },
         .on_read = [](duplex::ConnRef,
                       std::span<const std::byte>) { throw Thrown("on_read"); },
         .on_eof = [](duplex::ConnRef) { throw Thrown("on_eof"); },
         .on_close = [](duplex::ConnRef, std::error_code) { throw Thrown("on_close"); }});
    CHECK_THROWS_WITH_AS(loop.run(), "on_open", Thrown);
    REQUIRE(dtest::write_all(sp.peer.get(), "a", 1) == 0);
    CHECK_THROWS_WITH_AS(loop.run(), "on_read", Thrown);
    ::shutdown(sp.peer.get(), SHUT_WR);
    CHECK_THROWS_WITH_AS(loop.run(), "on_eof", Thrown);
    c.close();
    CHECK_THROWS_WITH_AS(loop.run(), "on_close", Thrown);
  }

  SUBCASE("a write's done callback") {
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    CHECK(c.write(as_span("x"), [](std::error_code) { throw Thrown("done"); }));
    CHECK_THROWS_WITH_AS(loop.run(), "done", Thrown);
  }

  SUBCASE("on_backpressure / on_writable") {
    Clogged cl;
    auto c = duplex::Conn::adopt(
        loop, cl.sp.ours.release(),
        {.on_backpressure = [](duplex::ConnRef,
                               size_t) { throw Thrown("on_backpressure"); },
         .on_writable = [](duplex::ConnRef) { throw Thrown("on_writable"); }},
        small_limits());
    CHECK(c.write(std::string(4000, 'b')));
    CHECK_THROWS_WITH_AS(loop.run(), "on_backpressure", Thrown);
    std::thread peer([&] {
      CHECK(dtest::drain_exactly(cl.sp.peer.get(), cl.junk + 4000));
    });
    CHECK_THROWS_WITH_AS(loop.run(), "on_writable", Thrown);
    peer.join();
  }

  SUBCASE("a timer") {
    duplex::Timer t(loop, [] { throw Thrown("timer"); });
    t.start(0ms, 1ms); // repeating: run() must still return
    CHECK_THROWS_WITH_AS(loop.run(), "timer", Thrown);
  }

  SUBCASE("a channel handler") {
    duplex::Channel<int> ch(loop, [](int &&v) { throw Thrown("message " + std::to_string(v)); });
    CHECK(ch.send(3));
    CHECK_THROWS_WITH_AS(loop.run(), "message 3", Thrown);
  }

  SUBCASE("an accepted conn's on_open") {
    auto l = duplex::Listener::tcp(
        loop, "127.0.0.1", 0,
        {.on_open = [](duplex::ConnRef) { throw Thrown("accepted"); }});
    auto client = duplex::Conn::connect_tcp(loop, "127.0.0.1", l.port());
    CHECK_THROWS_WITH_AS(loop.run(), "accepted", Thrown);
  }

  CHECK_FALSE(guard_fired);
  // The loop still works, and no stop request is left over: run() returns
  // only at the stop() below, after the timer fired.
  bool fired = false;
  duplex::Timer later(loop, [&] {
    fired = true;
    loop.stop();
  });
  later.start(20ms);
  CHECK_NOTHROW(loop.run());
  CHECK(fired);
}

// run_once() / run_nowait() return after their iteration anyway: a throw
// there must not leave a stop request behind that would end the next run()
// early.
TEST_CASE("an exception in run_once() / run_nowait() is rethrown and leaves no stop request behind") {
  duplex::Loop loop;
  loop.post([] { throw Thrown("nowait"); });
  CHECK_THROWS_WITH_AS(loop.run_nowait(), "nowait", Thrown);
  loop.post([] { throw Thrown("once"); });
  CHECK_THROWS_WITH_AS(loop.run_once(), "once", Thrown);
  bool fired = false;
  duplex::Timer later(loop, [&] {
    fired = true;
    loop.stop();
  });
  later.start(20ms);
  CHECK_NOTHROW(loop.run());
  CHECK(fired);
}

TEST_CASE("Loop::rethrow() raises a started loop's callback exception on the calling thread") {
  duplex::Loop loop;
  loop.start();
  CHECK_NOTHROW(loop.rethrow());
  auto after = std::make_shared<dtest::Event>();
  loop.post([] { throw Thrown("started"); });
  loop.post([after] { after->set(); }); // same thread: runs after the throw
  REQUIRE(after->wait());
  CHECK_THROWS_WITH_AS(loop.rethrow(), "started", Thrown);
  CHECK_NOTHROW(loop.rethrow()); // raised once
  // The loop thread survived the exception.
  int ran = 0;
  CHECK(on_loop(loop, [&] { ran++; }));
  CHECK(ran == 1);
}

TEST_CASE("a callback that throws while the Loop is destroyed does not escape ~Loop") {
  static_assert(std::is_nothrow_destructible_v<duplex::Loop>);
  auto sp = dtest::socket_pair();
  int closes = 0;
  std::error_code reason;
  {
    duplex::Loop loop;
    auto c = duplex::Conn::adopt(loop, sp.ours.release(),
                                 {.on_close = [&](duplex::ConnRef, std::error_code ec) {
                                   closes++;
                                   reason = ec;
                                   throw Thrown("on_close during ~Loop");
                                 }});
    loop.run_nowait();
  } // on_close runs here with ECANCELED and throws into the void
  CHECK(closes == 1);
  CHECK(reason == errc::DUPLEX_ECANCELED);
}

// ---------------------------------------------------------------------------
// Ownership
// ---------------------------------------------------------------------------

// Loop-owned objects: move-only owners, no way to copy, no raw pointer.
template <class T> constexpr bool is_move_only_owner =
    !std::is_copy_constructible_v<T> && !std::is_copy_assignable_v<T> &&
    std::is_nothrow_move_constructible_v<T> &&
    std::is_nothrow_move_assignable_v<T>;
static_assert(is_move_only_owner<duplex::Loop>);
static_assert(is_move_only_owner<duplex::Listener>);
static_assert(is_move_only_owner<duplex::Timer>);
// Counted objects copy by reference.
static_assert(std::is_copy_constructible_v<duplex::Conn> &&
              std::is_copy_assignable_v<duplex::Conn> &&
              std::is_nothrow_move_constructible_v<duplex::Conn>);
static_assert(std::is_copy_constructible_v<duplex::Channel<int>> &&
              std::is_copy_assignable_v<duplex::Channel<int>> &&
              std::is_nothrow_move_constructible_v<duplex::Channel<int>>);
// Views are one pointer, trivially copied.
static_assert(sizeof(duplex::ConnRef) == sizeof(void *));
static_assert(std::is_trivially_copyable_v<duplex::ConnRef>);
// No implicit conversion to the C handles (cppzmq's mistake).
static_assert(!std::is_convertible_v<duplex::Loop &, duplex_loop *>);
static_assert(!std::is_convertible_v<duplex::Listener &, duplex_listener *>);
static_assert(!std::is_convertible_v<duplex::Timer &, duplex_timer *>);
static_assert(!std::is_convertible_v<duplex::Conn &, duplex_conn *>);
static_assert(!std::is_convertible_v<duplex::ConnRef, duplex_conn *>);
static_assert(!std::is_convertible_v<duplex::Channel<int> &, duplex_channel *>);
static_assert(!std::is_convertible_v<duplex_conn *, duplex::ConnRef>);
static_assert(!std::is_convertible_v<duplex::ConnRef, duplex::Conn>);
static_assert(!std::is_convertible_v<duplex::Conn, bool>);

TEST_CASE("copying a Conn takes a reference: every copy stays usable after the loop is gone") {
  auto sp = dtest::socket_pair();
  duplex::Conn kept, copy, moved;
  {
    duplex::Loop loop;
    auto c = duplex::Conn::adopt(
        loop, sp.ours.release(),
        {.on_open = [&](duplex::ConnRef r) { kept = duplex::Conn(r); }});
    CHECK(pump(loop, [&] { return static_cast<bool>(kept); }));
    CHECK(kept.native() == c.native());

    copy = c;        // copy-assign: a second reference
    CHECK(copy.native() == c.native());
    duplex::Conn tmp(copy);
    moved = std::move(tmp); // move: no new reference, tmp is empty
    CHECK_FALSE(tmp);
    CHECK(tmp.native() == nullptr);
    CHECK(moved.native() == c.native());
    auto &self = moved;
    moved = self; // self-assignment keeps exactly one reference
    CHECK(moved.native() == c.native());
    CHECK(moved.write("ok"sv));
  } // the loop is freed; the conn closed with ECANCELED
  for (duplex::Conn *h : {&kept, &copy, &moved}) {
    std::error_code ec;
    CHECK_FALSE(h->write("late", ec));
    CHECK(ec == errc::DUPLEX_ECLOSED);
    CHECK(h->queued() == 0);
  }
  // Each drops its reference here; ASan checks none leaks and none is
  // dropped twice.
}

TEST_CASE("a moved Listener keeps accepting; a moved-from one is empty") {
  std::atomic<int> opened{0}, closes{0};
  std::error_code refused;
  duplex::Loop loop;
  loop.start();
  auto a = duplex::Listener::tcp(loop, "127.0.0.1", 0,
                                 {.on_open = [&](duplex::ConnRef) { opened++; }});
  uint16_t port = a.port();
  duplex::Listener b(std::move(a));
  CHECK(a.native() == nullptr);
  CHECK(b.port() == port);
  a.close(); // closing the moved-from owner is a no-op
  duplex::Listener c;
  c = std::move(b);
  CHECK(c.port() == port);
  CHECK(c.address() == "127.0.0.1:" + std::to_string(port));

  auto client = duplex::Conn::connect_tcp(loop, "127.0.0.1", port);
  CHECK(dtest::wait_until([&] { return opened.load() == 1; }));

  // Move-assigning over a live listener closes it: nothing listens there.
  c = duplex::Listener();
  auto late = duplex::Conn::connect_tcp(
      loop, "127.0.0.1", port,
      {.on_close = [&](duplex::ConnRef, std::error_code ec) {
        refused = ec;
        closes++;
      }});
  CHECK(dtest::wait_until([&] { return closes.load() == 1; }));
  CHECK(refused == errc::DUPLEX_ECONNREFUSED);
  CHECK(opened.load() == 1);
}

TEST_CASE("a moved Timer keeps firing; move-assigning over a Timer closes the old one") {
  int a_fired = 0, b_fired = 0;
  duplex::Loop loop;
  duplex::Timer a(loop, [&] { a_fired++; });
  duplex::Timer b(loop, [&] { b_fired++; });
  a.start(0ms);
  b.start(0ms);
  duplex::Timer moved(std::move(a));
  CHECK(a.native() == nullptr);
  a.close();  // no-op
  a.stop();   // no-op on an empty timer
  b = std::move(moved); // b's own timer is closed: it never fires
  CHECK(pump(loop, [&] { return a_fired == 1; }));
  // One more iteration for a late expiry of the closed timer.
  duplex::Timer fence(loop, [&] { loop.stop(); });
  fence.start(1ms);
  loop.run();
  CHECK(a_fired == 1);
  CHECK(b_fired == 0);
}

// Timer and Listener own a reference to their C object: destroyed after
// their Loop, they close nothing (the loop's free did) and free everything
// (ASan: no use of the freed loop, no leak of the C object or the box).
TEST_CASE("a Timer outliving its Loop is safe to use and destroy") {
  auto token = std::make_shared<int>(0);
  int fired = 0;
  std::optional<duplex::Timer> started, pending, idle, on_thread;
  {
    duplex::Loop loop;
    started.emplace(loop, [&fired, token] { fired++; });
    started->start(0ms);
    CHECK(pump(loop, [&] { return fired == 1; }));
    pending.emplace(loop, [token] { FAIL("fired after its loop"); });
    pending->start(1h); // still armed when the loop goes
    idle.emplace(loop, [token] {});
    CHECK(token.use_count() == 4);
  }
  {
    duplex::Loop loop; // a started loop: its thread is joined by ~Loop
    loop.start();
    on_thread.emplace(loop, [token] {});
    on_thread->start(0ms, 1ms);
  }
  for (auto *t : {&started, &pending, &idle, &on_thread}) {
    REQUIRE((*t)->native() != nullptr);
    std::error_code ec;
    (*t)->start(1ms, 0ms, ec);
    CHECK(ec == errc::DUPLEX_ECLOSED);
    CHECK_THROWS_AS((*t)->start(1ms), duplex::error);
    (*t)->stop();
  }
  started->close(); // explicitly, then the destructor: both no-ops after
  CHECK(started->native() == nullptr);
  started.reset();
  pending.reset();
  idle.reset();
  on_thread.reset();
  CHECK(fired == 1);
  CHECK(token.use_count() == 1); // every callback was released
}

TEST_CASE("a Listener outliving its Loop is safe to use and destroy") {
  auto token = std::make_shared<int>(0);
  std::atomic<int> opened{0};
  std::optional<duplex::Listener> tcp, unix_l, idle;
  uint16_t port = 0;
  const std::string path = "/tmp/duplex-cpp-outlive-" + std::to_string(::getpid());
  {
    duplex::Loop loop;
    loop.start();
    tcp.emplace(duplex::Listener::tcp(
        loop, "127.0.0.1", 0, {.on_open = [&opened, token](duplex::ConnRef) { opened++; }}));
    unix_l.emplace(duplex::Listener::unix_path(loop, path, {.on_open = [token](duplex::ConnRef) {}}));
    port = tcp->port();
    auto client = duplex::Conn::connect_tcp(loop, "127.0.0.1", port);
    CHECK(dtest::wait_until([&] { return opened.load() == 1; }));
  }
  {
    duplex::Loop loop; // never run
    idle.emplace(duplex::Listener::tcp(loop, "127.0.0.1", 0, {.on_open = [token](duplex::ConnRef) {}}));
  }
  CHECK(tcp->port() == port); // the reference still answers
  CHECK(tcp->address() == "127.0.0.1:" + std::to_string(port));
  CHECK(unix_l->address() == path);
  tcp->close();
  CHECK(tcp->native() == nullptr);
  tcp.reset();
  unix_l.reset();
  idle.reset();
  CHECK(token.use_count() == 1); // every handler table was released
  CHECK(opened.load() == 1);
}

namespace {

// Non-blocking connects to the UNIX socket at @p path, kept open, until one
// is refused (the listener's backlog is full: nothing accepts) or @p max.
int connects_until_full(const std::string &path, int max) {
  std::vector<dtest::Fd> held;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  while (static_cast<int>(held.size()) < max) {
    dtest::Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (::connect(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) != 0)
      break; // EAGAIN: the backlog is full
    held.push_back(std::move(fd));
  }
  return static_cast<int>(held.size());
}

// The largest descriptor open in this process.
int max_open_fd() {
  int mx = 2;
  for (const auto &e : std::filesystem::directory_iterator("/proc/self/fd")) {
    int fd = std::atoi(e.path().filename().c_str());
    mx = std::max(mx, fd);
  }
  return mx;
}

} // namespace

TEST_CASE("Listener::unix_path takes a backlog (and the mode), positionally or in ListenerOptions") {
  dtest::TempDir dir;
  duplex::Loop loop; // never run: nothing is accepted, clients fill the backlog
  // Linux lets a UNIX listener hold backlog + 1 pending connections.
  {
    auto l = duplex::Listener::unix_path(loop, dir.file("one"), {}, {}, 0600, 1);
    CHECK(connects_until_full(dir.file("one"), 64) == 2);
    struct stat st {};
    REQUIRE(::stat(dir.file("one").c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
  }
  {
    auto l = duplex::Listener::unix_path(loop, dir.file("three"), {}, {},
                                         duplex::ListenerOptions{.backlog = 3, .mode = 0640});
    CHECK(connects_until_full(dir.file("three"), 64) == 4);
    struct stat st {};
    REQUIRE(::stat(dir.file("three").c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0640);
  }
  {
    auto l = duplex::Listener::unix_path(loop, dir.file("default"), {});
    CHECK(connects_until_full(dir.file("default"), 64) == 64); // 511
  }
  // TCP takes the same options.
  auto t = duplex::Listener::tcp(loop, "127.0.0.1", 0, {}, {},
                                 duplex::ListenerOptions{.backlog = 8});
  CHECK(t.port() != 0);
}

TEST_CASE("a Listener's on_error reports running out of descriptors at accept, once; serving resumes") {
  std::vector<std::error_code> errors;
  int opened = 0;
  duplex::Loop loop;
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0, {.on_open = [&](duplex::ConnRef) { opened++; }}, {},
      duplex::ListenerOptions{.on_error = [&](std::error_code ec) { errors.push_back(ec); }});
  // The client's socket first; then this process may open nothing more.
  dtest::Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(client.get() >= 0);
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  std::vector<dtest::Fd> fillers;
  struct Restore { // also when a REQUIRE below throws
    rlimit lim;
    std::vector<dtest::Fd> &f;
    ~Restore() {
      f.clear();
      ::setrlimit(RLIMIT_NOFILE, &lim);
    }
  } restore{saved, fillers};
  rlimit low = saved;
  low.rlim_cur = static_cast<rlim_t>(max_open_fd() + 8);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
  for (;;) {
    int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      break;
    fillers.emplace_back(fd);
  }
  REQUIRE(errno == EMFILE);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(l.port());
  REQUIRE(::connect(client.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  CHECK(pump(loop, [&] { return !errors.empty(); }));
  for (int i = 0; i < 20; i++)
    loop.run_nowait(); // backing off: no second report
  fillers.clear();
  ::setrlimit(RLIMIT_NOFILE, &saved);
  CHECK(pump(loop, [&] { return opened == 1; })); // the client waited in the backlog
  REQUIRE(errors.size() == 1);
  CHECK(errors[0] == errc::DUPLEX_EMFILE);
  CHECK(errors[0] == std::errc::too_many_files_open);
}

TEST_CASE("a Timer destroyed by its own callback stops, and its callback is released after it returns") {
  auto token = std::make_shared<int>(0);
  int fired = 0;
  bool capture_alive_after = false;
  duplex::Loop loop;
  std::optional<duplex::Timer> t;
  t.emplace(loop, [&, token] {
    fired++;
    t.reset(); // destroys the Timer from inside its callback
    capture_alive_after = token.use_count() >= 2; // this lambda still lives
  });
  t->start(0ms, 1ms);
  CHECK(pump(loop, [&] { return fired == 1; }));
  duplex::Timer fence(loop, [&] { loop.stop(); });
  fence.start(5ms);
  loop.run();
  CHECK(fired == 1);
  CHECK(capture_alive_after);
  CHECK(token.use_count() == 1);
}

// ---------------------------------------------------------------------------
// Destruction while the loop still has work
// ---------------------------------------------------------------------------

TEST_CASE("destroying Timer objects while they fire on a started loop is safe") {
  duplex::Loop loop;
  loop.start();
  auto fired = std::make_shared<std::atomic<int>>(0);
  for (int i = 0; i < 200; i++) {
    duplex::Timer t(loop, [fired] { (*fired)++; });
    t.start(0ms, 1ms);
    if (i % 4 == 0)
      dtest::wait_until([&] { return fired->load() > i / 4; }, 5s);
  } // each closes while it may be firing; its box goes after the close
  int settled = -1;
  CHECK(on_loop(loop, [&] { settled = fired->load(); }));
  CHECK(on_loop(loop, [] {}));
  CHECK(fired->load() == settled); // closed timers stay silent
  CHECK(fired->load() >= 50);
}

TEST_CASE("destroying a Listener while clients connect leaves accepted conns working") {
  std::atomic<int> opened{0}, closed{0}, echoed{0}, client_bytes{0};
  duplex::Loop loop;
  loop.start();
  duplex::ConnHandlers echo{
      .on_open = [&](duplex::ConnRef) { opened++; },
      .on_read =
          [&](duplex::ConnRef c, std::span<const std::byte> b) {
            echoed += static_cast<int>(b.size());
            (void)c.write(b);
          },
      .on_eof = [](duplex::ConnRef c) { c.shutdown(); },
      .on_close = [&](duplex::ConnRef, std::error_code) { closed++; }};
  std::vector<duplex::Conn> clients;
  for (int i = 0; i < 20; i++) {
    auto l = duplex::Listener::tcp(loop, "127.0.0.1", 0, echo);
    clients.push_back(duplex::Conn::connect_tcp(
        loop, "127.0.0.1", l.port(),
        {.on_read = [&](duplex::ConnRef, std::span<const std::byte> b) {
          client_bytes += static_cast<int>(b.size());
        }}));
    (void)clients.back().write("ping"sv);
    if (i % 2 == 0) // sometimes after the accept, sometimes racing it
      dtest::wait_until([&] { return opened.load() > i / 2; }, 5s);
  } // ~Listener each time
  // Each accepted conn echoes with the listener's handlers, which it copied.
  CHECK(dtest::wait_until([&] {
    return client_bytes.load() == echoed.load() && echoed.load() == 4 * opened.load();
  }));
  CHECK(opened.load() >= 10);
  for (auto &c : clients)
    c.close();
  CHECK(dtest::wait_until([&] { return closed.load() == opened.load(); }));
}

TEST_CASE("dropping every Conn handle keeps the conn, its handlers and its pending writes") {
  Clogged cl;
  auto token = std::make_shared<int>(0);
  std::atomic<int> dones{0}, ok{0}, closes{0};
  std::error_code reason = errc::DUPLEX_EUNKNOWN;
  duplex::Loop loop;
  loop.start();
  {
    auto c = duplex::Conn::adopt(loop, cl.sp.ours.release(),
                                 {.on_close = [&, token](duplex::ConnRef, std::error_code ec) {
                                   reason = ec;
                                   closes++;
                                 }});
    for (int i = 0; i < 10; i++)
      CHECK(c.write(as_span("0123456789"), [&, token](std::error_code ec) {
        ok += !ec;
        dones++;
      }));
  } // no handle left: the loop's own reference keeps it open
  CHECK(dtest::drain_exactly(cl.sp.peer.get(), cl.junk + 100));
  CHECK(dtest::wait_until([&] { return dones.load() == 10; }));
  CHECK(ok.load() == 10);
  cl.sp.peer.reset(); // EOF (and the conn is never shut down): still open
  CHECK(on_loop(loop, [] {}));
  CHECK(closes.load() == 0);
  CHECK(token.use_count() > 1); // the handlers are alive
  loop.close();
  CHECK(closes.load() == 1);
  CHECK(reason == errc::DUPLEX_ECANCELED);
  CHECK(dones.load() == 10);
  CHECK(token.use_count() == 1); // handlers freed with the conn
}

TEST_CASE("destroying the Loop cancels and releases everything still pending, exactly once") {
  Counted::live = 0;
  Clogged cl;
  auto token = std::make_shared<int>(0);
  int closes = 0, dones = 0, canceled = 0;
  std::error_code reason;
  int ws, wv, wu;
  duplex::Conn survivor;
  duplex::Channel<Counted> ch_survivor;
  {
    duplex::Loop loop; // never run
    auto c = duplex::Conn::adopt(loop, cl.sp.ours.release(),
                                 {.on_close = [&, token](duplex::ConnRef, std::error_code ec) {
                                   closes++;
                                   reason = ec;
                                 }});
    survivor = c;
    for (int i = 0; i < 3; i++)
      CHECK(c.write(as_span("abc"), [&, token](std::error_code ec) {
        dones++;
        canceled += ec == errc::DUPLEX_ECANCELED;
      }));
    std::string s(1000, 's');
    std::vector<std::byte> v(1000, std::byte{'v'});
    auto u = std::make_unique<uint64_t[]>(100);
    ws = watch::add(s.data());
    wv = watch::add(v.data());
    wu = watch::add(u.get());
    CHECK(c.write(std::move(s)));
    CHECK(c.write(std::move(v)));
    CHECK(c.write(std::move(u), 100));
    CHECK(watch::freed(ws) + watch::freed(wv) + watch::freed(wu) == 0);

    duplex::Channel<Counted> ch(loop, [](Counted &&) { FAIL("delivered"); });
    for (int i = 0; i < 5; i++)
      CHECK(ch.send(Counted(i)));
    CHECK(Counted::live.load() == 5);
    ch_survivor = ch;

    loop.post([token] { FAIL("ran"); });
    CHECK(token.use_count() > 3);
  }
  CHECK(closes == 1);
  CHECK(reason == errc::DUPLEX_ECANCELED);
  CHECK(dones == 3);
  CHECK(canceled == 3);
  CHECK(watch::freed(ws) == 1);
  CHECK(watch::freed(wv) == 1);
  CHECK(watch::freed(wu) == 1);
  CHECK(Counted::live.load() == 0);
  CHECK(token.use_count() == 1);
  // Counted handles outlive their loop and answer "closed".
  std::error_code ec;
  CHECK_FALSE(survivor.write("x", ec));
  CHECK(ec == errc::DUPLEX_ECLOSED);
  CHECK_FALSE(ch_survivor.send(Counted(9), 0ms, ec));
  CHECK(ec == errc::DUPLEX_ECLOSED);
  CHECK(Counted::live.load() == 0);
}

// ---------------------------------------------------------------------------
// Writes: zero-copy, would block
// ---------------------------------------------------------------------------

TEST_CASE("zero-copy writes move std::string, std::vector<std::byte> and std::unique_ptr<T[]> in and release each once") {
  auto sp = dtest::socket_pair();
  duplex::Loop loop;
  loop.start();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  constexpr size_t kBig = 256 * 1024; // more than the kernel takes at once

  std::string s(kBig, '\0');
  for (size_t i = 0; i < kBig; i++)
    s[i] = static_cast<char>('a' + i % 26);
  const std::string s_copy = s;
  std::vector<std::byte> v(kBig);
  for (size_t i = 0; i < kBig; i++)
    v[i] = static_cast<std::byte>(i % 251);
  const std::vector<std::byte> v_copy = v;
  constexpr size_t kWords = kBig / 4;
  auto u = std::make_unique<uint32_t[]>(kWords);
  for (size_t i = 0; i < kWords; i++)
    u[i] = static_cast<uint32_t>(i * 2654435761u);
  std::vector<uint32_t> u_copy(u.get(), u.get() + kWords);

  const void *sp_data = s.data(), *vp_data = v.data(), *up_data = u.get();
  int ws = watch::add(sp_data), wv = watch::add(vp_data), wu = watch::add(up_data);

  CHECK(c.write(std::move(s)));
  CHECK(c.write(std::move(v)));
  CHECK(c.write(std::move(u), kWords));
  CHECK(u == nullptr);
  CHECK(static_cast<const void *>(s.data()) != sp_data);
  CHECK(static_cast<const void *>(v.data()) != vp_data);

  std::string got(3 * kBig, '\0');
  REQUIRE(dtest::read_exactly(sp.peer.get(), got.data(), got.size()));
  CHECK(got.compare(0, kBig, s_copy) == 0);
  CHECK(std::memcmp(got.data() + kBig, v_copy.data(), kBig) == 0);
  CHECK(std::memcmp(got.data() + 2 * kBig, u_copy.data(), kBig) == 0);
  CHECK(dtest::wait_until([&] {
    return watch::freed(ws) == 1 && watch::freed(wv) == 1 && watch::freed(wu) == 1;
  }));
  loop.close();
  CHECK(watch::freed(ws) == 1);
  CHECK(watch::freed(wv) == 1);
  CHECK(watch::freed(wu) == 1);
}

TEST_CASE("past the hard limit write() returns false and the caller keeps its bytes") {
  Clogged cl;
  std::atomic<int> dones{0};
  duplex::Loop loop;
  loop.start();
  auto c = duplex::Conn::adopt(loop, cl.sp.ours.release(), {}, small_limits());

  // queued() counts each write's payload plus DUPLEX_WRITE_OVERHEAD.
  constexpr size_t kQueued = 6000 + DUPLEX_WRITE_OVERHEAD;
  CHECK(c.write(std::string(6000, 'A'))); // into an empty queue: always taken
  CHECK(dtest::wait_until([&] { return c.queued() == kQueued; }));

  // Every copying form: false ("would block"), not an exception.
  std::string more(4000, 'B');
  CHECK_FALSE(c.write(more));
  CHECK_FALSE(c.write(as_span(more)));
  CHECK_FALSE(c.write(as_span(more), [&](std::error_code) { dones++; }));
  CHECK_FALSE(c.write_frame(more));
  std::error_code ec = errc::DUPLEX_EUNKNOWN;
  CHECK_FALSE(c.write(as_span(more), ec));
  CHECK_FALSE(ec); // would block is not an error
  // Not writable is false, not an exception, with 0 ms (EWOULDBLOCK in C)
  // as with a wait that runs out (ETIMEDOUT).
  CHECK_FALSE(c.wait_writable(0ms));
  CHECK_FALSE(c.wait_writable(5ms));

  // Every zero-copy form: refused whole, the container still holds it all.
  std::string s(4000, 'S');
  std::vector<std::byte> v(4000, std::byte{'V'});
  auto u = std::make_unique<uint32_t[]>(1000);
  std::fill(u.get(), u.get() + 1000, 0x55555555u);
  const char *s_data = s.data();
  const std::byte *v_data = v.data();
  const uint32_t *u_data = u.get();
  int ws = watch::add(s_data), wv = watch::add(v_data), wu = watch::add(u_data);
  CHECK_FALSE(c.write(std::move(s)));
  CHECK_FALSE(c.write(std::move(v)));
  CHECK_FALSE(c.write(std::move(u), 1000));
  CHECK(s.data() == s_data);
  CHECK(s == std::string(4000, 'S'));
  CHECK(v.data() == v_data);
  CHECK(v.size() == 4000);
  CHECK(u.get() == u_data);
  CHECK(u[999] == 0x55555555u);
  CHECK(watch::freed(ws) + watch::freed(wv) + watch::freed(wu) == 0);
  CHECK(c.queued() == kQueued); // nothing of the refused writes was taken

  // The peer drains: the same writes go through, each released once.
  REQUIRE(dtest::drain_exactly(cl.sp.peer.get(), cl.junk + 6000));
  CHECK(dtest::wait_until([&] { return c.queued() == 0; }));
  // One at a time: two 4000-byte writes fit under the limit, three do not.
  CHECK(c.write(std::move(s)));
  CHECK(dtest::wait_until([&] { return c.queued() == 0; }));
  CHECK(c.write(std::move(v)));
  CHECK(dtest::wait_until([&] { return c.queued() == 0; }));
  CHECK(c.write(std::move(u), 1000));
  std::string got(12000, '\0');
  REQUIRE(dtest::read_exactly(cl.sp.peer.get(), got.data(), got.size()));
  CHECK(got.substr(0, 4000) == std::string(4000, 'S'));
  CHECK(got.substr(4000, 4000) == std::string(4000, 'V'));
  CHECK(got.substr(8000) == std::string(4000, 'U'));
  CHECK(dtest::wait_until([&] {
    return watch::freed(ws) == 1 && watch::freed(wv) == 1 && watch::freed(wu) == 1;
  }));
  CHECK(dones.load() == 0); // the refused write's callback never runs
}

TEST_CASE("a zero-copy write to a closed conn throws and leaves the caller its buffer") {
  bool closed = false;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(
      loop, sp.ours.release(),
      {.on_close = [&](duplex::ConnRef, std::error_code) { closed = true; }});
  c.close();
  CHECK(pump(loop, [&] { return closed; }));

  std::string s(100, 's');
  int ws = watch::add(s.data());
  try {
    (void)c.write(std::move(s));
    FAIL("no exception");
  } catch (const duplex::error &e) {
    CHECK(e.code() == errc::DUPLEX_ECLOSED);
  }
  CHECK(s == std::string(100, 's'));
  auto u = std::make_unique<char[]>(10);
  const char *up = u.get();
  CHECK_THROWS_AS((void)c.write(std::move(u), 10), duplex::error);
  CHECK(u.get() == up);
  std::vector<std::byte> v(10);
  CHECK_THROWS_AS((void)c.write(std::move(v)), duplex::error);
  CHECK(v.size() == 10);
  CHECK(watch::freed(ws) == 0);
  watch::forget(ws);
}

// ---------------------------------------------------------------------------
// Listener, Conn and framing end to end
// ---------------------------------------------------------------------------

TEST_CASE("an echo listener and a TCP client: handlers get ConnRef views, Conn keeps one") {
  int server_opens = 0, server_closes = 0, client_eofs = 0;
  std::string received, peer_seen, server_local;
  std::error_code client_reason = errc::DUPLEX_EUNKNOWN;
  duplex::Conn server_side;
  duplex::Loop loop;
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_open =
           [&](duplex::ConnRef c) {
             server_opens++;
             server_local = c.local();
             server_side = duplex::Conn(c);
           },
       .on_read = [](duplex::ConnRef c,
                     std::span<const std::byte> b) { (void)c.write(b); },
       .on_eof = [](duplex::ConnRef c) { c.shutdown(); },
       .on_close = [&](duplex::ConnRef, std::error_code) { server_closes++; }});
  auto c = duplex::Conn::connect_tcp(
      loop, "127.0.0.1", l.port(),
      {.on_open = [&](duplex::ConnRef r) { peer_seen = r.peer(); },
       .on_read =
           [&](duplex::ConnRef, std::span<const std::byte> b) {
             received.append(reinterpret_cast<const char *>(b.data()), b.size());
           },
       .on_eof = [&](duplex::ConnRef) { client_eofs++; },
       .on_close =
           [&](duplex::ConnRef, std::error_code ec) {
             client_reason = ec;
             loop.stop();
           }});
  (void)c.write(std::string_view("hello, ")); // before the conn opens: queued
  (void)c.write(std::string("world"));
  c.shutdown();
  loop.run();
  CHECK(received == "hello, world");
  CHECK(client_eofs == 1);
  CHECK_FALSE(client_reason);
  CHECK(peer_seen == "127.0.0.1:" + std::to_string(l.port()));
  CHECK(server_local == "127.0.0.1:" + std::to_string(l.port())); // its own end
  CHECK(server_opens == 1);
  CHECK(pump(loop, [&] { return server_closes == 1; }));
  std::error_code ec;
  CHECK_FALSE(server_side.write("x", ec));
  CHECK(ec == errc::DUPLEX_ECLOSED);
}

TEST_CASE("framing options: whole frames in on_read, write_frame adds the delimiter or prefix") {
  std::vector<std::string> frames;
  std::error_code reason;
  bool closed = false;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  duplex::ConnOptions o;

  SUBCASE("lines") {
    o.framing = duplex::Framing::lines();
    auto c = duplex::Conn::adopt(
        loop, sp.ours.release(),
        {.on_read = [&](duplex::ConnRef, std::span<const std::byte> b) {
          frames.emplace_back(reinterpret_cast<const char *>(b.data()), b.size());
        }},
        o);
    REQUIRE(dtest::write_all(sp.peer.get(), "one\ntw", 6) == 0);
    REQUIRE(dtest::write_all(sp.peer.get(), "o\n\nthree\n", 9) == 0);
    CHECK(c.write_frame("reply"));
    CHECK(pump(loop, [&] { return frames.size() == 4; }));
    CHECK(frames == std::vector<std::string>{"one", "two", "", "three"});
    char buf[6];
    REQUIRE(dtest::read_exactly(sp.peer.get(), buf, 6));
    CHECK(std::string(buf, 6) == "reply\n");
  }

  SUBCASE("2-byte big-endian length prefix, with a max frame") {
    o.framing = duplex::Framing::length_prefix(2, false, 8);
    auto c = duplex::Conn::adopt(
        loop, sp.ours.release(),
        {.on_read =
             [&](duplex::ConnRef, std::span<const std::byte> b) {
               frames.emplace_back(reinterpret_cast<const char *>(b.data()), b.size());
             },
         .on_close =
             [&](duplex::ConnRef, std::error_code ec) {
               reason = ec;
               closed = true;
             }},
        o);
    CHECK(c.write_frame("hi"));
    CHECK(pump(loop, [&] { return c.queued() == 0; }));
    char buf[4];
    REQUIRE(dtest::read_exactly(sp.peer.get(), buf, 4));
    CHECK(std::string(buf, 4) == std::string("\0\2hi", 4));
    CHECK_THROWS_AS((void)c.write_frame("123456789"), duplex::error); // > max 8
    REQUIRE(dtest::write_all(sp.peer.get(), "\0\3abc\0\11", 7) == 0); // then 9 > 8
    CHECK(pump(loop, [&] { return closed; }));
    CHECK(frames == std::vector<std::string>{"abc"});
    CHECK(reason == errc::DUPLEX_EMSGSIZE);
  }
}

TEST_CASE("a Channel moves values from threads to its handler, in per-sender order") {
  constexpr int kThreads = 4, kEach = 1000;
  Counted::live = 0;
  std::array<int, kThreads> next{};
  int got = 0, out_of_order = 0;
  duplex::Loop loop;
  duplex::Channel<std::unique_ptr<Counted>> ch(
      loop,
      [&](std::unique_ptr<Counted> &&v) {
        int t = v->v / kEach, i = v->v % kEach;
        out_of_order += next[static_cast<size_t>(t)]++ != i;
        if (++got == kThreads * kEach)
          loop.stop();
      },
      16);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; t++)
    ts.emplace_back([ch, t]() mutable { // a copy: another reference
      for (int i = 0; i < kEach; i++)
        CHECK(ch.send(std::make_unique<Counted>(t * kEach + i)));
    });
  loop.run();
  for (auto &t : ts)
    t.join();
  CHECK(got == kThreads * kEach);
  CHECK(out_of_order == 0);
  CHECK(Counted::live.load() == 0);

  // Full (nobody delivers while the loop is stopped): a send that may not
  // wait returns false and the caller keeps its value.
  duplex::Channel<std::unique_ptr<Counted>> small(
      loop, [](std::unique_ptr<Counted> &&) {}, 1);
  CHECK(small.send(std::make_unique<Counted>(1), 0ms));
  auto keep = std::make_unique<Counted>(2);
  Counted *raw = keep.get();
  CHECK_FALSE(small.send(std::move(keep), 0ms));
  CHECK(keep.get() == raw);
  std::error_code ec = errc::DUPLEX_EUNKNOWN;
  CHECK_FALSE(small.send(std::move(keep), 1ms, ec)); // timed out
  CHECK_FALSE(ec);
  CHECK(keep.get() == raw);
}
