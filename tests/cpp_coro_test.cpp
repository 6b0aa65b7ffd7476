// The C++20 layer's coroutines: duplex::task, spawn(), and each awaitable
// (conn.read(), conn.async_write(), channel.receive(), loop.sleep(),
// first_of()), cancellation when the loop goes, and exceptions.
//
// Every coroutine here holds an Alive guard, so each test can check that
// every frame that started was also destroyed (ASan's leak check backs the
// count up).
#include <duplex/duplex.hpp>

#include "fixture.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

namespace {

using namespace std::chrono_literals;
using dtest::kGuard;
using duplex::errc;

// Counts coroutine frames: started when the body begins, finished when the
// frame is destroyed (at co_return or while suspended).
struct Frames {
  std::atomic<int> started{0}, finished{0};
};
struct Alive {
  Frames &f;
  explicit Alive(Frames &frames) : f(frames) { f.started++; }
  Alive(const Alive &) = delete;
  Alive &operator=(const Alive &) = delete;
  ~Alive() { f.finished++; }
};

struct Thrown : std::runtime_error {
  explicit Thrown(const std::string &s) : std::runtime_error(s) {}
};

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

// A hang guard for loop.run(): stops the loop and fails if it fires.
struct Guard {
  duplex::Timer t;
  Guard(duplex::Loop &loop)
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

// ---- coroutines used by several tests ------------------------------------

duplex::task<void> read_all(duplex::Loop &loop, duplex::Conn c, Frames &f,
                            std::string *data, int *chunks, bool *off_thread) {
  Alive a(f);
  for (;;) {
    auto r = co_await c.read();
    *off_thread |= !loop.on_thread();
    if (!r.ok()) {
      CHECK(r.eof);
      CHECK_FALSE(r.error);
      break;
    }
    data->append(r.data);
    ++*chunks;
  }
  // EOF sticks: another read returns at once with it.
  auto again = co_await c.read();
  CHECK(again.eof);
  CHECK(again.data.empty());
  loop.stop();
}

} // namespace

// ---------------------------------------------------------------------------
// conn.read()
// ---------------------------------------------------------------------------

TEST_CASE("co_await conn.read() returns every chunk in order, then EOF") {
  Frames f;
  std::string data;
  int chunks = 0;
  bool off_thread = false;
  duplex::Loop loop;
  Guard g(loop);
  auto sp = dtest::socket_pair();
  const std::string sent = pattern(1 << 20);
  std::thread peer([&] {
    CHECK(dtest::write_all(sp.peer.get(), sent.data(), sent.size()) == 0);
    ::shutdown(sp.peer.get(), SHUT_WR);
  });
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  duplex::spawn(loop, read_all(loop, c, f, &data, &chunks, &off_thread));
  loop.run();
  peer.join();
  CHECK(data == sent);
  CHECK(chunks > 1); // 1 MiB does not fit one read
  CHECK_FALSE(off_thread);
  CHECK(f.started == 1);
  CHECK(f.finished == 1);
}

TEST_CASE("co_await conn.read() with framing returns one whole frame per read") {
  Frames f;
  std::vector<std::string> frames;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  duplex::ConnOptions o;
  o.framing = duplex::Framing::lines();
  auto c = duplex::Conn::adopt(loop, sp.ours.release(), {}, o);
  REQUIRE(dtest::write_all(sp.peer.get(), "alpha\nbe", 8) == 0);
  REQUIRE(dtest::write_all(sp.peer.get(), "ta\ngamma\n", 9) == 0);
  ::shutdown(sp.peer.get(), SHUT_WR);
  auto reader = [](duplex::Conn conn, Frames &fr,
                   std::vector<std::string> *out) -> duplex::task<void> {
    Alive a(fr);
    for (;;) {
      auto r = co_await conn.read();
      if (!r.ok())
        break;
      out->emplace_back(r.data);
    }
  };
  duplex::spawn(loop, reader(c, f, &frames));
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  CHECK(frames == std::vector<std::string>{"alpha", "beta", "gamma"});
}

TEST_CASE("co_await conn.read() resumes with the close when the conn closes while it waits") {
  Frames f;
  std::optional<duplex::ReadResult> got;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  auto reader = [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                   std::optional<duplex::ReadResult> *out) -> duplex::task<void> {
    Alive a(fr);
    *out = co_await conn.read();
    // Afterwards every read reports the close at once: the reason while
    // on_close runs (this resumes inside it), DUPLEX_ECLOSED after.
    auto again = co_await conn.read();
    CHECK(again.error == errc::DUPLEX_ECONNABORTED);
    co_await l.sleep(0ms);
    auto later = co_await conn.read();
    CHECK(later.error == errc::DUPLEX_ECLOSED);
  };
  duplex::spawn(loop, reader(loop, c, f, &got));
  CHECK(pump(loop, [&] { return f.started == 1; }));
  loop.run_nowait();
  CHECK_FALSE(got);
  c.close(true);
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  REQUIRE(got);
  CHECK_FALSE(got->ok());
  CHECK_FALSE(got->eof);
  CHECK(got->error == errc::DUPLEX_ECONNABORTED); // on_close's reason for an abort
}

TEST_CASE("a coroutine reader that falls behind pauses the conn and loses nothing") {
  Frames f;
  std::string data;
  duplex::Loop loop;
  Guard g(loop);
  auto sp = dtest::socket_pair();
  const std::string sent = pattern(2 << 20, 3);
  std::thread peer([&] {
    CHECK(dtest::write_all(sp.peer.get(), sent.data(), sent.size()) == 0);
    ::shutdown(sp.peer.get(), SHUT_WR);
  });
  duplex::ConnOptions o;
  o.read_buffer_limit = 4096;
  auto c = duplex::Conn::adopt(loop, sp.ours.release(), {}, o);
  auto slow = [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                 std::string *out) -> duplex::task<void> {
    Alive a(fr);
    for (;;) {
      auto r = co_await conn.read();
      if (!r.ok())
        break;
      out->append(r.data);
      co_await l.sleep(0ms); // let more arrive than the limit allows
    }
    l.stop();
  };
  duplex::spawn(loop, slow(loop, c, f, &data));
  loop.run();
  peer.join();
  CHECK(data.size() == sent.size());
  CHECK(data == sent);
  CHECK(f.finished == 1);
}

// ---------------------------------------------------------------------------
// conn.async_write()
// ---------------------------------------------------------------------------

TEST_CASE("co_await conn.async_write() resumes once its bytes are with the kernel") {
  Frames f;
  std::string received;
  std::vector<size_t> queued_at_resume;
  std::vector<std::error_code> results;
  std::atomic<bool> peer_done{false};
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  const std::string a = pattern(3 << 20, 1), b = pattern(1000, 2);
  std::thread peer([&] {
    dtest::read_until_eof(sp.peer.get(), [&](const uint8_t *p, size_t n) {
      received.append(reinterpret_cast<const char *>(p), n);
      return true;
    });
    peer_done = true;
  });
  auto writer = [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                   std::vector<std::string> msgs, std::vector<size_t> *queued,
                   std::vector<std::error_code> *ecs) -> duplex::task<void> {
    Alive al(fr);
    for (auto &m : msgs) {
      ecs->push_back(co_await conn.async_write(m));
      queued->push_back(conn.queued());
      CHECK(l.on_thread());
    }
    conn.shutdown();
  };
  duplex::spawn(loop, writer(loop, c, f, {a, b, a}, &queued_at_resume, &results));
  CHECK(pump(loop, [&] { return f.finished == 1 && peer_done; })); // EOF: shut down
  peer.join();
  CHECK(results == std::vector<std::error_code>(3));
  CHECK(queued_at_resume == std::vector<size_t>{0, 0, 0});
  CHECK(received == a + b + a);
  CHECK(f.finished == 1);
}

TEST_CASE("co_await conn.async_write() past the hard limit waits out backpressure, then writes") {
  Frames f;
  std::atomic<int> backpressures{0}, writables{0};
  std::error_code result = errc::DUPLEX_EUNKNOWN;
  bool refused_at_attempt = false;
  dtest::Event attempting;
  std::string tail;
  std::atomic<bool> peer_done{false};
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  size_t junk = dtest::fill_send_buffer(sp.ours.get());
  duplex::ConnOptions o;
  o.high_watermark = 4096;
  o.low_watermark = 1024;
  o.hard_limit = 16384;
  auto c = duplex::Conn::adopt(
      loop, sp.ours.release(),
      {.on_backpressure = [&](duplex::ConnRef, size_t) { backpressures++; },
       .on_writable = [&](duplex::ConnRef) { writables++; }},
      o);
  const std::string first(8000, 'A'), second = pattern(10000, 5);
  auto writer = [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                   std::string one, std::string two, bool *refused,
                   dtest::Event *ev, std::error_code *out) -> duplex::task<void> {
    Alive al(fr);
    CHECK(conn.write(std::move(one))); // queued: past the high watermark
    *refused = conn.queued() + two.size() > 16384;
    ev->set(); // the peer may drain from now on
    *out = co_await conn.async_write(two);
    CHECK(l.on_thread());
    conn.shutdown();
  };
  std::thread peer([&] {
    REQUIRE(attempting.wait());
    CHECK(dtest::drain_exactly(sp.peer.get(), junk + 8000));
    dtest::read_until_eof(sp.peer.get(), [&](const uint8_t *p, size_t n) {
      tail.append(reinterpret_cast<const char *>(p), n);
      return true;
    });
    peer_done = true;
  });
  duplex::spawn(loop, writer(loop, c, f, first, second, &refused_at_attempt,
                             &attempting, &result));
  CHECK(pump(loop, [&] { return f.finished == 1 && peer_done; }));
  peer.join();
  CHECK(refused_at_attempt);
  CHECK_FALSE(result);
  CHECK(tail == second);
  CHECK(backpressures.load() >= 1);
  CHECK(writables.load() >= 1);
}

// A write refused at the hard limit while the queue is below the high
// watermark gets no on_writable: async_write must still complete.
TEST_CASE("co_await conn.async_write() refused below the high watermark still completes") {
  Frames f;
  std::error_code result = errc::DUPLEX_EUNKNOWN;
  dtest::Event attempting;
  size_t drained = 0;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  size_t junk = dtest::fill_send_buffer(sp.ours.get());
  duplex::ConnOptions o;
  o.high_watermark = 1024;
  o.low_watermark = 256;
  o.hard_limit = 4096;
  auto c = duplex::Conn::adopt(loop, sp.ours.release(), {}, o);
  auto writer = [](duplex::Conn conn, Frames &fr, dtest::Event *ev,
                   std::error_code *out) -> duplex::task<void> {
    Alive al(fr);
    CHECK(conn.write(std::string(100, 'a'))); // below the high watermark
    ev->set();
    *out = co_await conn.async_write(std::string(8000, 'b')); // refused
    conn.shutdown();
  };
  std::atomic<bool> peer_done{false};
  std::thread peer([&] {
    REQUIRE(attempting.wait());
    dtest::read_until_eof(sp.peer.get(), [&](const uint8_t *, size_t n) {
      drained += n;
      return true;
    });
    peer_done = true;
  });
  duplex::spawn(loop, writer(c, f, &attempting, &result));
  duplex::Timer guard(loop, [&] { c.close(true); });
  guard.start(10s);
  // The shutdown happens on the loop: keep running it until the peer saw EOF.
  CHECK(pump(loop, [&] { return f.finished == 1 && peer_done; }));
  peer.join();
  CHECK_FALSE(result);
  CHECK(drained == junk + 8100);
}

// At the hard limit even the zero-length write async_write uses to wait for
// room is refused (it costs DUPLEX_WRITE_OVERHEAD): it must wait for
// on_writable instead of failing with EWOULDBLOCK.
TEST_CASE("co_await conn.async_write() at the hard limit waits for room") {
  Frames f;
  std::error_code result = errc::DUPLEX_EUNKNOWN;
  dtest::Event attempting;
  size_t drained = 0;
  std::atomic<bool> peer_done{false};
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  size_t junk = dtest::fill_send_buffer(sp.ours.get());
  duplex::ConnOptions o;
  o.high_watermark = 1024;
  o.low_watermark = 256;
  o.hard_limit = 4096;
  auto c = duplex::Conn::adopt(loop, sp.ours.release(), {}, o);
  auto writer = [](duplex::Conn conn, Frames &fr, dtest::Event *ev,
                   std::error_code *out) -> duplex::task<void> {
    Alive al(fr);
    // 4000 + DUPLEX_WRITE_OVERHEAD queued: a zero-length write no longer fits
    CHECK(conn.write(std::string(4000, 'a')));
    ev->set();
    *out = co_await conn.async_write(std::string(8000, 'b'));
    conn.shutdown();
  };
  std::thread peer([&] {
    REQUIRE(attempting.wait());
    dtest::read_until_eof(sp.peer.get(), [&](const uint8_t *, size_t n) {
      drained += n;
      return true;
    });
    peer_done = true;
  });
  duplex::spawn(loop, writer(c, f, &attempting, &result));
  duplex::Timer guard(loop, [&] { c.close(true); });
  guard.start(20s);
  CHECK(pump(loop, [&] { return f.finished == 1 && peer_done; }));
  peer.join();
  CHECK_FALSE(result);
  CHECK(drained == junk + 12000);
}

TEST_CASE("co_await conn.async_write() on a shut down or closed conn returns the error at once") {
  Frames f;
  std::vector<std::error_code> got;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  auto writer = [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                   std::vector<std::error_code> *out) -> duplex::task<void> {
    Alive al(fr);
    conn.shutdown();
    out->push_back(co_await conn.async_write("x"));
    conn.close(true);
    out->push_back(co_await conn.async_write("y"));
    co_await l.sleep(1ms); // the close completes
    out->push_back(co_await conn.async_write("z"));
  };
  duplex::spawn(loop, writer(loop, c, f, &got));
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  REQUIRE(got.size() == 3);
  CHECK(got[0] == errc::DUPLEX_ESHUTDOWN);
  CHECK(got[1] == errc::DUPLEX_ECLOSED);
  CHECK(got[2] == errc::DUPLEX_ECLOSED);
}

// ---------------------------------------------------------------------------
// What the awaitables hold: never the view (or handle) they came from
// ---------------------------------------------------------------------------

namespace {

// Awaits @p aw (any awaitable) and stores its result.
template <class A, class R>
duplex::task<void> await_into(A aw, Frames &fr, R *out) {
  Alive al(fr);
  *out = co_await std::move(aw);
}

} // namespace

// The repro: a callback spawns a task made from its ConnRef
// parameter. Tasks start lazily, so the body runs after the callback (and
// its ConnRef) returned: the task must hold the conn, not a pointer to the
// view (that was a stack-use-after-return, caught by ASan).
TEST_CASE("async_write on a callback's temporary ConnRef, run after the callback returned, writes its bytes") {
  Frames f;
  std::vector<std::error_code> results(2, errc::DUPLEX_EUNKNOWN);
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  duplex::ConnHandlers h;
  h.on_open = [&](duplex::ConnRef r) {
    duplex::spawn(loop, await_into(r.async_write("hello\n"), f, &results[0]));
    // A view made for the expression: a temporary gone at its end.
    duplex::spawn(loop, await_into(duplex::ConnRef(r.native()).async_write("world\n"),
                                   f, &results[1]));
  };
  auto c = duplex::Conn::adopt(loop, sp.ours.release(), std::move(h));
  CHECK(pump(loop, [&] { return f.finished == 2; }));
  CHECK(results == std::vector<std::error_code>(2));
  char buf[12];
  REQUIRE(dtest::read_exactly(sp.peer.get(), buf, sizeof buf));
  CHECK(std::string(buf, sizeof buf) == "hello\nworld\n");
}

// The task holds a reference to the conn: made before every Conn handle
// went and the conn closed and was released by the loop, it still runs
// (and fails cleanly) instead of touching freed memory.
TEST_CASE("an async_write task outliving every Conn handle and the conn's close returns DUPLEX_ECLOSED") {
  Frames f;
  std::error_code result = errc::DUPLEX_EUNKNOWN;
  bool closed = false;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  std::optional<duplex::task<std::error_code>> t;
  {
    auto c = duplex::Conn::adopt(
        loop, sp.ours.release(),
        {.on_close = [&](duplex::ConnRef, std::error_code) { closed = true; }});
    t.emplace(duplex::ConnRef(c.native()).async_write("late"));
    c.close(true);
  } // the last Conn goes
  CHECK(pump(loop, [&] { return closed; }));
  for (int i = 0; i < 5; i++)
    loop.run_nowait(); // the loop has let go of the conn
  duplex::spawn(loop, await_into(std::move(*t), f, &result));
  t.reset();
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  CHECK(result == errc::DUPLEX_ECLOSED);
}

TEST_CASE("conn.read() and channel.receive() awaiters outlive the handle they came from") {
  Frames f;
  duplex::Loop loop;

  SUBCASE("read() on a temporary view of a conn whose handles are all gone") {
    auto sp = dtest::socket_pair();
    std::optional<duplex::ReadResult> first, second;
    std::optional<duplex::ConnRef::read_awaiter> a1, a2;
    {
      auto c = duplex::Conn::adopt(loop, sp.ours.release());
      a1.emplace(duplex::ConnRef(c.native()).read());
      a2.emplace(duplex::ConnRef(c.native()).read());
      c.close(true);
    }
    for (int i = 0; i < 10; i++)
      loop.run_nowait(); // closed; the loop has let go of the conn
    // Both see the close; the second is passed on and awaited elsewhere.
    duplex::spawn(loop, await_into(std::move(*a1), f, &first));
    duplex::spawn(loop, await_into(std::move(*a2), f, &second));
    a1.reset();
    a2.reset();
    CHECK(pump(loop, [&] { return f.finished == 2; }));
    REQUIRE(first);
    REQUIRE(second);
    CHECK(first->error == errc::DUPLEX_ECLOSED);
    CHECK(second->error == errc::DUPLEX_ECLOSED);
  }

  SUBCASE("receive() on a Channel that was dropped and closed") {
    std::optional<std::optional<int>> v1, v2;
    std::optional<duplex::Channel<int>::receive_awaiter> a1, a2;
    {
      duplex::Channel<int> ch(loop);
      CHECK(ch.send(7));
      ch.close();
      a1.emplace(ch.receive());
      a2.emplace(duplex::Channel<int>(ch).receive()); // from a temporary copy
    }
    for (int i = 0; i < 10; i++)
      loop.run_nowait(); // delivered, closed, the C side let go
    duplex::spawn(loop, [](duplex::Channel<int>::receive_awaiter x,
                           duplex::Channel<int>::receive_awaiter y, Frames &fr,
                           std::optional<std::optional<int>> *o1,
                           std::optional<std::optional<int>> *o2)
                      -> duplex::task<void> {
      Alive al(fr);
      *o1 = co_await std::move(x);
      *o2 = co_await std::move(y);
    }(std::move(*a1), std::move(*a2), f, &v1, &v2));
    a1.reset();
    a2.reset();
    CHECK(pump(loop, [&] { return f.finished == 1; }));
    REQUIRE(v1);
    REQUIRE(v2);
    CHECK(*v1 == std::optional<int>(7));
    CHECK(*v2 == std::nullopt);
  }
}

// The awaiter holds a share of the loop's core: awaited after its Loop is
// gone (here from a task on another loop) it resumes at once, cancelled.
TEST_CASE("a loop.sleep() awaiter outliving its Loop resumes at once with DUPLEX_ECANCELED") {
  Frames f;
  std::error_code slept = errc::DUPLEX_EUNKNOWN;
  std::optional<duplex::sleep_awaiter> aw;
  {
    duplex::Loop gone;
    aw.emplace(gone.sleep(1h));
  }
  duplex::Loop loop;
  duplex::spawn(loop, await_into(std::move(*aw), f, &slept));
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  CHECK(slept == errc::DUPLEX_ECANCELED);
}

// ---------------------------------------------------------------------------
// channel.receive() and loop.sleep()
// ---------------------------------------------------------------------------

TEST_CASE("co_await channel.receive() returns values in send order, then nullopt once closed and drained") {
  constexpr int kN = 5000;
  Frames f;
  int got = 0, out_of_order = 0, nullopts = 0;
  bool off_thread = false;
  duplex::Loop loop;
  Guard g(loop);
  duplex::Channel<std::unique_ptr<int>> ch(loop, {}, 32); // move-only values
  auto consumer = [](duplex::Loop &l, duplex::Channel<std::unique_ptr<int>> c,
                     Frames &fr, int *n, int *bad, int *nulls,
                     bool *off) -> duplex::task<void> {
    Alive al(fr);
    for (;;) {
      auto v = co_await c.receive();
      *off |= !l.on_thread();
      if (!v)
        break;
      *bad += **v != *n;
      ++*n;
    }
    // Closed stays closed.
    *nulls += !(co_await c.receive()) ? 1 : 0;
    l.stop();
  };
  duplex::spawn(loop, consumer(loop, ch, f, &got, &out_of_order, &nullopts, &off_thread));
  std::thread producer([ch]() mutable {
    for (int i = 0; i < kN; i++)
      CHECK(ch.send(std::make_unique<int>(i)));
    ch.close();
  });
  loop.run();
  producer.join();
  CHECK(got == kN);
  CHECK(out_of_order == 0);
  CHECK(nullopts == 1);
  CHECK_FALSE(off_thread);
  CHECK(f.finished == 1);
}

TEST_CASE("co_await loop.sleep() resumes each sleeper once, on the loop thread, without error") {
  constexpr int kSleepers = 100;
  Frames f;
  std::atomic<int> ok{0}, on_thread{0};
  duplex::Loop loop;
  loop.start();
  auto sleeper = [](duplex::Loop &l, int ms, Frames &fr, std::atomic<int> *good,
                    std::atomic<int> *here) -> duplex::task<void> {
    Alive al(fr);
    auto ec = co_await l.sleep(std::chrono::milliseconds(ms));
    *good += !ec;
    *here += l.on_thread();
  };
  for (int i = 0; i < kSleepers; i++) // spawned from a thread that is not the loop's
    duplex::spawn(loop, sleeper(loop, i % 5, f, &ok, &on_thread));
  CHECK(dtest::wait_until([&] { return f.finished.load() == kSleepers; }));
  CHECK(ok.load() == kSleepers);
  CHECK(on_thread.load() == kSleepers);
  CHECK(f.started.load() == kSleepers);
}

// ---------------------------------------------------------------------------
// first_of()
// ---------------------------------------------------------------------------

TEST_CASE("first_of() takes the ready side and leaves the other's value queued") {
  Frames f;
  std::vector<std::string> order;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  duplex::ConnOptions o;
  o.framing = duplex::Framing::lines();
  auto c = duplex::Conn::adopt(loop, sp.ours.release(), {}, o);
  duplex::Channel<std::string> ch(loop);
  auto sel = [](duplex::Loop &l, duplex::Conn conn, duplex::Channel<std::string> chan,
                Frames &fr, std::vector<std::string> *out) -> duplex::task<void> {
    Alive al(fr);
    // Nothing is ready: first_of waits, and the channel wins.
    auto e1 = co_await duplex::first_of(conn.read(), chan.receive());
    REQUIRE(e1.index() == 1);
    out->push_back("ch:" + *std::get<1>(e1));
    // Wait until both sides hold a value (the awaiters' ready() only looks).
    while (!(conn.read().ready() && chan.receive().ready()))
      co_await l.sleep(1ms);
    // Both are ready: the first argument wins, the other keeps its value.
    auto e2 = co_await duplex::first_of(conn.read(), chan.receive());
    REQUIRE(e2.index() == 0);
    out->push_back("conn:" + std::string(std::get<0>(e2).data));
    auto e3 = co_await duplex::first_of(chan.receive(), conn.read());
    REQUIRE(e3.index() == 0);
    out->push_back("ch:" + *std::get<0>(e3));
    auto e4 = co_await duplex::first_of(chan.receive(), conn.read());
    REQUIRE(e4.index() == 1);
    out->push_back("conn:" + std::string(std::get<1>(e4).data));
  };
  duplex::spawn(loop, sel(loop, c, ch, f, &order));
  CHECK(pump(loop, [&] { return f.started == 1; }));
  loop.run_nowait();
  CHECK(ch.send(std::string("m1")));
  CHECK(pump(loop, [&] { return order.size() == 1; }));
  CHECK(ch.send(std::string("m2")));
  REQUIRE(dtest::write_all(sp.peer.get(), "l1\nl2\n", 6) == 0);
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  CHECK(order == std::vector<std::string>{"ch:m1", "conn:l1", "ch:m2", "conn:l2"});
}

TEST_CASE("first_of() over a conn and a channel never loses a value") {
  const int kN = dtest::kSanitized ? 5000 : 50000;
  Frames f;
  int lines = 0, values = 0, bad_lines = 0, bad_values = 0;
  int conn_wins = 0, chan_wins = 0;
  duplex::Loop loop;
  Guard g(loop);
  auto sp = dtest::socket_pair();
  duplex::ConnOptions o;
  o.framing = duplex::Framing::lines();
  auto c = duplex::Conn::adopt(loop, sp.ours.release(), {}, o);
  duplex::Channel<int> ch(loop); // unbounded: both sides are often ready at once

  struct Counts {
    int *lines, *values, *bad_lines, *bad_values, *conn_wins, *chan_wins;
  } counts{&lines, &values, &bad_lines, &bad_values, &conn_wins, &chan_wins};
  auto pump_both = [](duplex::Loop &l, duplex::Conn conn, duplex::Channel<int> chan,
                      Frames &fr, Counts n) -> duplex::task<void> {
    Alive al(fr);
    bool conn_open = true, chan_open = true;
    auto on_line = [&](duplex::ReadResult &r) {
      if (!r.ok()) {
        CHECK(r.eof);
        conn_open = false;
        return;
      }
      *n.bad_lines += r.data != std::to_string(*n.lines);
      ++*n.lines;
    };
    auto on_value = [&](std::optional<int> &v) {
      if (!v) {
        chan_open = false;
        return;
      }
      *n.bad_values += *v != *n.values;
      ++*n.values;
    };
    for (unsigned round = 0; conn_open || chan_open; round++) {
      // Alternate which side first_of() prefers, so both win and lose.
      if (conn_open && chan_open && round % 2 == 0) {
        auto ev = co_await duplex::first_of(conn.read(), chan.receive());
        if (ev.index() == 0) {
          ++*n.conn_wins;
          on_line(std::get<0>(ev));
        } else {
          ++*n.chan_wins;
          on_value(std::get<1>(ev));
        }
      } else if (conn_open && chan_open) {
        auto ev = co_await duplex::first_of(chan.receive(), conn.read());
        if (ev.index() == 0) {
          ++*n.chan_wins;
          on_value(std::get<0>(ev));
        } else {
          ++*n.conn_wins;
          on_line(std::get<1>(ev));
        }
      } else if (conn_open) {
        auto r = co_await conn.read();
        on_line(r);
      } else {
        auto v = co_await chan.receive();
        on_value(v);
      }
    }
    l.stop();
  };
  duplex::spawn(loop, pump_both(loop, c, ch, f, counts));
  std::thread producer([ch, kN]() mutable {
    for (int i = 0; i < kN; i++)
      CHECK(ch.send(int(i)));
    ch.close();
  });
  std::thread peer([&, kN] {
    std::string batch;
    for (int i = 0; i < kN; i++) {
      batch += std::to_string(i) + "\n";
      if (batch.size() > 1000 || i == kN - 1) {
        CHECK(dtest::write_all(sp.peer.get(), batch.data(), batch.size()) == 0);
        batch.clear();
      }
    }
    ::shutdown(sp.peer.get(), SHUT_WR);
  });
  loop.run();
  producer.join();
  peer.join();
  CHECK(lines == kN);
  CHECK(values == kN);
  CHECK(bad_lines == 0);
  CHECK(bad_values == 0);
  CHECK(f.finished == 1);
  MESSAGE("first_of wins: conn " << conn_wins << ", channel " << chan_wins);
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

namespace {

struct Outcomes {
  std::optional<duplex::ReadResult> read;
  bool received_nullopt = false;
  std::error_code slept = errc::DUPLEX_EUNKNOWN, wrote = errc::DUPLEX_EUNKNOWN,
                  waited_room = errc::DUPLEX_EUNKNOWN,
                  nested = errc::DUPLEX_EUNKNOWN;
  int first_of_index = -1;
  std::error_code first_of_error = errc::DUPLEX_EUNKNOWN;
  bool first_of_nullopt = false;
};

duplex::task<std::error_code> inner_sleep(duplex::Loop &l, Frames &fr) {
  Alive al(fr);
  co_return co_await l.sleep(1h);
}

// Start one coroutine waiting on each kind of awaitable.
void spawn_waiters(duplex::Loop &loop, Frames &f, Outcomes &out,
                   duplex::Conn reading, duplex::Conn clogged,
                   duplex::Conn selecting, duplex::Channel<int> ch,
                   duplex::Channel<int> ch2) {
  duplex::spawn(loop, [](duplex::Conn c, Frames &fr, Outcomes *o) -> duplex::task<void> {
    Alive al(fr);
    o->read = co_await c.read();
  }(reading, f, &out));
  duplex::spawn(loop, [](duplex::Channel<int> c, Frames &fr, Outcomes *o) -> duplex::task<void> {
    Alive al(fr);
    o->received_nullopt = !(co_await c.receive());
  }(ch, f, &out));
  duplex::spawn(loop, [](duplex::Loop &l, Frames &fr, Outcomes *o) -> duplex::task<void> {
    Alive al(fr);
    o->slept = co_await l.sleep(1h);
  }(loop, f, &out));
  duplex::spawn(loop, [](duplex::Loop &l, Frames &fr, Outcomes *o) -> duplex::task<void> {
    Alive al(fr);
    o->nested = co_await inner_sleep(l, fr);
  }(loop, f, &out));
  // clogged: its kernel buffer is full; the first write waits for the kernel,
  // the second waits for room (past the hard limit).
  duplex::spawn(loop, [](duplex::Conn c, Frames &fr, Outcomes *o) -> duplex::task<void> {
    Alive al(fr);
    o->wrote = co_await c.async_write(std::string(6000, 'w'));
  }(clogged, f, &out));
  duplex::spawn(loop, [](duplex::Conn c, Frames &fr, Outcomes *o) -> duplex::task<void> {
    Alive al(fr);
    o->waited_room = co_await c.async_write(std::string(6000, 'r'));
  }(clogged, f, &out));
  duplex::spawn(loop, [](duplex::Conn c, duplex::Channel<int> chan, Frames &fr,
                         Outcomes *o) -> duplex::task<void> {
    Alive al(fr);
    auto ev = co_await duplex::first_of(c.read(), chan.receive());
    o->first_of_index = static_cast<int>(ev.index());
    if (ev.index() == 0)
      o->first_of_error = std::get<0>(ev).error;
    else
      o->first_of_nullopt = !std::get<1>(ev);
  }(selecting, ch2, f, &out));
}
constexpr int kWaiterFrames = 8; // 7 spawned + 1 nested

void check_outcomes(const Outcomes &out) {
  REQUIRE(out.read);
  CHECK(out.read->error == errc::DUPLEX_ECANCELED);
  CHECK(out.received_nullopt);
  CHECK(out.slept == errc::DUPLEX_ECANCELED);
  CHECK(out.nested == errc::DUPLEX_ECANCELED);
  CHECK(out.wrote == errc::DUPLEX_ECANCELED);
  CHECK(out.waited_room); // an error: canceled or closed
  CHECK(out.waited_room != errc::DUPLEX_EUNKNOWN);
  // Whichever side the teardown cancels first wakes it, with its error.
  REQUIRE(out.first_of_index != -1);
  if (out.first_of_index == 0)
    CHECK(out.first_of_error == errc::DUPLEX_ECANCELED);
  else
    CHECK(out.first_of_nullopt);
}

duplex::ConnOptions hard_8k() {
  duplex::ConnOptions o;
  o.high_watermark = 2048;
  o.low_watermark = 512;
  o.hard_limit = 8192;
  return o;
}

} // namespace

TEST_CASE("destroying the Loop resumes every waiting coroutine with an error and frees every frame") {
  Frames f;
  Outcomes out;
  auto unstarted = std::make_shared<int>(0);
  auto a = dtest::socket_pair(), b = dtest::socket_pair(), d = dtest::socket_pair();
  dtest::fill_send_buffer(b.ours.get());
  {
    duplex::Loop loop;
    auto reading = duplex::Conn::adopt(loop, a.ours.release());
    auto clogged = duplex::Conn::adopt(loop, b.ours.release(), {}, hard_8k());
    auto selecting = duplex::Conn::adopt(loop, d.ours.release());
    duplex::Channel<int> ch(loop), ch2(loop);
    spawn_waiters(loop, f, out, reading, clogged, selecting, ch, ch2);
    CHECK(pump(loop, [&] { return f.started == kWaiterFrames; }));
    for (int i = 0; i < 10; i++)
      loop.run_nowait();
    CHECK(f.finished == 0); // every one is waiting
    // A task spawned now never starts: it is destroyed with the loop.
    duplex::spawn(loop, [](std::shared_ptr<int>) -> duplex::task<void> {
      FAIL("started");
      co_return;
    }(unstarted));
    CHECK(unstarted.use_count() == 2);
  }
  CHECK(f.finished == kWaiterFrames);
  CHECK(unstarted.use_count() == 1);
  check_outcomes(out);
}

TEST_CASE("destroying a started Loop resumes its waiting coroutines with an error") {
  Frames f;
  Outcomes out;
  auto a = dtest::socket_pair(), b = dtest::socket_pair(), d = dtest::socket_pair();
  dtest::fill_send_buffer(b.ours.get());
  {
    duplex::Loop loop;
    loop.start();
    auto reading = duplex::Conn::adopt(loop, a.ours.release());
    auto clogged = duplex::Conn::adopt(loop, b.ours.release(), {}, hard_8k());
    auto selecting = duplex::Conn::adopt(loop, d.ours.release());
    duplex::Channel<int> ch(loop), ch2(loop);
    spawn_waiters(loop, f, out, reading, clogged, selecting, ch, ch2);
    CHECK(dtest::wait_until([&] { return f.started.load() == kWaiterFrames; }));
    auto fence = std::make_shared<dtest::Event>();
    loop.post([fence] { fence->set(); });
    CHECK(fence->wait());
    CHECK(f.finished.load() == 0);
  }
  CHECK(f.finished.load() == kWaiterFrames);
  check_outcomes(out);
}

// A coroutine resumed during ~Loop (here by its read's cancellation) that
// then sleeps resumes at once with DUPLEX_ECANCELED instead of waiting on a
// timer that would never fire: it finishes and its frame is freed.
TEST_CASE("a coroutine that sleeps after ~Loop woke it still finishes") {
  Frames f;
  std::error_code slept = errc::DUPLEX_EUNKNOWN;
  auto sp = dtest::socket_pair();
  {
    duplex::Loop loop;
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    duplex::spawn(loop, [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                           std::error_code *out) -> duplex::task<void> {
      Alive al(fr);
      (void)co_await conn.read();
      *out = co_await l.sleep(10ms);
    }(loop, c, f, &slept));
    CHECK(pump(loop, [&] { return f.started == 1; }));
  }
  CHECK(f.finished == 1);
  CHECK(slept == errc::DUPLEX_ECANCELED);
}

// The same with a stopped timer kept for reuse (an earlier sleep's): a
// sleep made during the teardown must not start it and wait for ever.
TEST_CASE("a coroutine that sleeps after ~Loop woke it still finishes, with a reusable timer kept") {
  Frames f;
  std::error_code slept = errc::DUPLEX_EUNKNOWN;
  auto sp = dtest::socket_pair();
  {
    duplex::Loop loop;
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    duplex::spawn(loop, [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                           std::error_code *out) -> duplex::task<void> {
      Alive al(fr);
      co_await l.sleep(0ms); // its timer is kept for the next sleep
      CHECK(l.core()->idle_count == 1);
      (void)co_await conn.read();
      *out = co_await l.sleep(1h);
    }(loop, c, f, &slept));
    CHECK(pump(loop, [&] { return f.started == 1 && loop.core()->idle_count == 1; }));
    loop.run_nowait();
  }
  CHECK(f.finished == 1);
  CHECK(slept == errc::DUPLEX_ECANCELED);
}

// ---------------------------------------------------------------------------
// Exceptions and nested tasks
// ---------------------------------------------------------------------------

namespace {

duplex::task<int> twice(duplex::Loop &l, int x) {
  co_await l.sleep(0ms);
  if (x < 0) {
    l.stop(); // so that run() returns with the exception
    throw Thrown("negative");
  }
  co_return 2 * x;
}

} // namespace

TEST_CASE("an exception thrown inside a spawned task is rethrown by run()") {
  Frames f;
  duplex::Loop loop;
  duplex::spawn(loop, [](duplex::Loop &l, Frames &fr) -> duplex::task<void> {
    Alive al(fr);
    co_await l.sleep(0ms);
    l.stop();
    throw Thrown("in task");
  }(loop, f));
  CHECK_THROWS_WITH_AS(loop.run(), "in task", Thrown);
  CHECK(f.finished == 1);

  // Through a nested task<int> that nobody catches.
  duplex::spawn(loop, [](duplex::Loop &l, Frames &fr) -> duplex::task<void> {
    Alive al(fr);
    int v = co_await twice(l, -1);
    FAIL("not reached " << v);
  }(loop, f));
  CHECK_THROWS_WITH_AS(loop.run(), "negative", Thrown);
  CHECK(f.finished == 2);
}

TEST_CASE("an exception escaping a spawned task makes run() return and rethrow it, with no stop() call") {
  Frames f;
  duplex::Loop loop;
  Guard g(loop);
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  // Resumed by a timer (sleep), by a read, and by a write's completion.
  duplex::spawn(loop, [](duplex::Loop &l, Frames &fr) -> duplex::task<void> {
    Alive al(fr);
    co_await l.sleep(1ms);
    throw Thrown("after sleep");
  }(loop, f));
  CHECK_THROWS_WITH_AS(loop.run(), "after sleep", Thrown);
  duplex::spawn(loop, [](duplex::Conn conn, Frames &fr) -> duplex::task<void> {
    Alive al(fr);
    auto r = co_await conn.read();
    throw Thrown("after read " + std::string(r.data));
  }(c, f));
  REQUIRE(dtest::write_all(sp.peer.get(), "x", 1) == 0);
  CHECK_THROWS_WITH_AS(loop.run(), "after read x", Thrown);
  duplex::spawn(loop, [](duplex::Conn conn, Frames &fr) -> duplex::task<void> {
    Alive al(fr);
    (void)co_await conn.async_write("y");
    throw Thrown("after write");
  }(c, f));
  CHECK_THROWS_WITH_AS(loop.run(), "after write", Thrown);
  CHECK(f.finished == 3);
}

TEST_CASE("a task<T> returns its value to the awaiting task, which may catch its exception") {
  Frames f;
  int value = 0;
  bool caught = false;
  duplex::Loop loop;
  duplex::spawn(loop, [](duplex::Loop &l, Frames &fr, int *v,
                         bool *c) -> duplex::task<void> {
    Alive al(fr);
    *v = co_await twice(l, 21);
    try {
      (void)co_await twice(l, -1);
    } catch (const Thrown &) {
      *c = true;
    }
    l.stop();
  }(loop, f, &value, &caught));
  CHECK_NOTHROW(loop.run());
  CHECK(value == 42);
  CHECK(caught);
  CHECK(f.finished == 1);
}

TEST_CASE("an exception in a task on a started loop comes out of Loop::rethrow()") {
  Frames f;
  duplex::Loop loop;
  loop.start();
  duplex::spawn(loop, [](duplex::Loop &l, Frames &fr) -> duplex::task<void> {
    Alive al(fr);
    co_await l.sleep(0ms);
    throw Thrown("started");
  }(loop, f));
  CHECK(dtest::wait_until([&] { return f.finished.load() == 1; }));
  auto fence = std::make_shared<dtest::Event>();
  loop.post([fence] { fence->set(); });
  CHECK(fence->wait());
  CHECK_THROWS_WITH_AS(loop.rethrow(), "started", Thrown);
  CHECK_NOTHROW(loop.rethrow());
}

// ---------------------------------------------------------------------------
// Timeouts: a sleep as a first_of() operand
// ---------------------------------------------------------------------------

TEST_CASE("first_of(read, sleep) resumes with the timeout when nothing arrives, else with the read") {
  Frames f;
  std::vector<std::string> got;
  bool loser_unlinked = false;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  duplex::spawn(loop, [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                         std::vector<std::string> *out,
                         bool *unlinked) -> duplex::task<void> {
    Alive al(fr);
    auto e1 = co_await duplex::first_of(conn.read(), l.sleep(5ms));
    REQUIRE(e1.index() == 1);
    CHECK_FALSE(std::get<1>(e1)); // the time ran out: no error
    out->push_back("timeout");
    // The peer writes once it saw "timeout": the read wins long before 1 h.
    auto e2 = co_await duplex::first_of(conn.read(), l.sleep(1h));
    REQUIRE(e2.index() == 0);
    out->push_back("read:" + std::string(std::get<0>(e2).data));
    // The losing sleep let go of its timer: no sleeper is left waiting.
    *unlinked = l.core()->sleepers == nullptr;
    // A ready operand wins without waiting (EOF, once the peer shut down).
    auto e3 = co_await duplex::first_of(l.sleep(1h), conn.read());
    REQUIRE(e3.index() == 1);
    CHECK(std::get<1>(e3).eof);
    out->push_back("eof");
  }(loop, c, f, &got, &loser_unlinked));
  CHECK(pump(loop, [&] { return got.size() == 1; }));
  REQUIRE(dtest::write_all(sp.peer.get(), "hi", 2) == 0);
  CHECK(pump(loop, [&] { return got.size() == 2; }));
  ::shutdown(sp.peer.get(), SHUT_WR);
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  CHECK(got == std::vector<std::string>{"timeout", "read:hi", "eof"});
  CHECK(loser_unlinked);
}

TEST_CASE("first_of() takes three operands: a read, a receive and a timeout") {
  Frames f;
  std::vector<std::size_t> winners;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  duplex::Channel<int> ch(loop);
  duplex::spawn(loop, [](duplex::Loop &l, duplex::Conn conn, duplex::Channel<int> chan,
                         Frames &fr, std::vector<std::size_t> *out) -> duplex::task<void> {
    Alive al(fr);
    for (int i = 0; i < 3; i++) {
      auto ev = co_await duplex::first_of(conn.read(), chan.receive(), l.sleep(10ms));
      out->push_back(ev.index());
      if (ev.index() == 1)
        CHECK(*std::get<1>(ev) == 7);
      if (ev.index() == 0)
        CHECK(std::get<0>(ev).data == "x");
    }
  }(loop, c, ch, f, &winners));
  CHECK(pump(loop, [&] { return f.started == 1; }));
  CHECK(ch.send(7));
  CHECK(pump(loop, [&] { return winners.size() == 1; }));
  REQUIRE(dtest::write_all(sp.peer.get(), "x", 1) == 0);
  CHECK(pump(loop, [&] { return winners.size() == 2; }));
  CHECK(pump(loop, [&] { return f.finished == 1; })); // the third times out
  CHECK(winners == std::vector<std::size_t>{1, 0, 2});
}

TEST_CASE("a sleep operand whose Loop is gone makes first_of() resume at once with DUPLEX_ECANCELED") {
  Frames f;
  std::optional<std::variant<std::optional<int>, std::error_code>> got;
  std::optional<duplex::sleep_awaiter> aw;
  {
    duplex::Loop gone;
    aw.emplace(gone.sleep(1h));
  }
  duplex::Loop loop;
  duplex::Channel<int> ch(loop);
  duplex::spawn(loop, await_into(duplex::first_of(ch.receive(), std::move(*aw)), f, &got));
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  REQUIRE(got);
  REQUIRE(got->index() == 1);
  CHECK(std::get<1>(*got) == errc::DUPLEX_ECANCELED);
}

TEST_CASE("destroying the Loop resumes a coroutine waiting in first_of(read, sleep)") {
  Frames f;
  std::size_t index = 99;
  std::error_code why = errc::DUPLEX_EUNKNOWN;
  auto sp = dtest::socket_pair();
  {
    duplex::Loop loop;
    auto c = duplex::Conn::adopt(loop, sp.ours.release());
    duplex::spawn(loop, [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                           std::size_t *idx, std::error_code *ec) -> duplex::task<void> {
      Alive al(fr);
      auto ev = co_await duplex::first_of(conn.read(), l.sleep(1h));
      *idx = ev.index();
      *ec = ev.index() == 0 ? std::get<0>(ev).error : std::get<1>(ev);
    }(loop, c, f, &index, &why));
    CHECK(pump(loop, [&] { return f.started == 1; }));
    loop.run_nowait();
    CHECK(f.finished == 0);
  }
  CHECK(f.finished == 1);
  CHECK(index <= 1);
  CHECK(why == errc::DUPLEX_ECANCELED);
}

// ---------------------------------------------------------------------------
// One reader at a time
// ---------------------------------------------------------------------------

TEST_CASE("a second coroutine awaiting a conn's read() gets errc::DUPLEX_EBUSY; the first keeps waiting") {
  Frames f;
  std::string first;
  std::vector<std::error_code> refused;
  bool no_sleeper = false;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  duplex::spawn(loop, [](duplex::Conn conn, Frames &fr, std::string *out) -> duplex::task<void> {
    Alive al(fr);
    auto r = co_await conn.read();
    *out = r.data;
  }(c, f, &first));
  CHECK(pump(loop, [&] { return f.started == 1; }));
  duplex::spawn(loop, [](duplex::Loop &l, duplex::Conn conn, Frames &fr,
                         std::vector<std::error_code> *out,
                         bool *clean) -> duplex::task<void> {
    Alive al(fr);
    try {
      (void)co_await conn.read();
      FAIL("a second reader was let in");
    } catch (const duplex::error &e) {
      out->push_back(e.code());
    }
    // Through first_of (the read subscribes after the sleep): the sleep's
    // subscription is undone before the error comes out.
    try {
      (void)co_await duplex::first_of(l.sleep(1h), conn.read());
      FAIL("a second reader was let in");
    } catch (const duplex::error &e) {
      out->push_back(e.code());
    }
    *clean = l.core()->sleepers == nullptr;
  }(loop, c, f, &refused, &no_sleeper));
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  CHECK(refused == std::vector<std::error_code>(2, errc::DUPLEX_EBUSY));
  CHECK(no_sleeper);
  REQUIRE(dtest::write_all(sp.peer.get(), "mine", 4) == 0);
  CHECK(pump(loop, [&] { return f.finished == 2; }));
  CHECK(first == "mine");
}

TEST_CASE("a second coroutine awaiting a channel's receive() gets errc::DUPLEX_EBUSY") {
  Frames f;
  std::optional<int> first;
  std::error_code refused;
  duplex::Loop loop;
  duplex::Channel<int> ch(loop);
  duplex::spawn(loop, [](duplex::Channel<int> c, Frames &fr,
                         std::optional<int> *out) -> duplex::task<void> {
    Alive al(fr);
    *out = co_await c.receive();
  }(ch, f, &first));
  CHECK(pump(loop, [&] { return f.started == 1; }));
  duplex::spawn(loop, [](duplex::Channel<int> c, Frames &fr,
                         std::error_code *out) -> duplex::task<void> {
    Alive al(fr);
    try {
      (void)co_await c.receive();
    } catch (const duplex::error &e) {
      *out = e.code();
    }
  }(ch, f, &refused));
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  CHECK(refused == errc::DUPLEX_EBUSY);
  CHECK(ch.send(5));
  CHECK(pump(loop, [&] { return f.finished == 2; }));
  CHECK(first == std::optional<int>(5));
}

// ---------------------------------------------------------------------------
// Buffers: what a ReadResult owns, what async_write borrows
// ---------------------------------------------------------------------------

TEST_CASE("a ReadResult owns its bytes: they outlive later reads, the conn and the Loop") {
  Frames f;
  std::optional<duplex::ReadResult> kept, moved_from;
  std::string second;
  auto sp = dtest::socket_pair();
  REQUIRE(dtest::write_all(sp.peer.get(), "first\nsecond\n", 13) == 0);
  ::shutdown(sp.peer.get(), SHUT_WR);
  {
    duplex::Loop loop;
    duplex::ConnOptions o;
    o.framing = duplex::Framing::lines();
    auto c = duplex::Conn::adopt(loop, sp.ours.release(), {}, o);
    duplex::spawn(loop, [](duplex::Conn conn, Frames &fr,
                           std::optional<duplex::ReadResult> *keep,
                           std::optional<duplex::ReadResult> *from,
                           std::string *two) -> duplex::task<void> {
      Alive al(fr);
      duplex::ReadResult a = co_await conn.read();
      duplex::ReadResult b = co_await conn.read();
      duplex::ReadResult eof = co_await conn.read();
      CHECK(eof.eof);
      CHECK(a.data == "first"); // still valid after two more reads
      duplex::ReadResult m = std::move(b);
      *two = m.data;
      CHECK(std::string(reinterpret_cast<const char *>(m.bytes().data()),
                        m.bytes().size()) == "second");
      from->emplace(std::move(b)); // moved from: empty
      keep->emplace(std::move(a));
    }(c, f, &kept, &moved_from, &second));
    CHECK(pump(loop, [&] { return f.finished == 1; }));
    c.close(true);
  } // the conn and the loop are gone
  REQUIRE(kept);
  CHECK(kept->data == "first");
  CHECK(kept->ok());
  CHECK(second == "second");
  REQUIRE(moved_from);
  CHECK(moved_from->data.empty());
}

TEST_CASE("async_write borrows a view until the await completes, or takes a std::string by move") {
  Frames f;
  std::vector<std::error_code> results;
  duplex::Loop loop;
  auto sp = dtest::socket_pair();
  auto c = duplex::Conn::adopt(loop, sp.ours.release());
  duplex::spawn(loop, [](duplex::Conn conn, Frames &fr,
                         std::vector<std::error_code> *out) -> duplex::task<void> {
    Alive al(fr);
    std::string local = "lvalue;";
    out->push_back(co_await conn.async_write(local)); // a view of `local`
    out->push_back(co_await conn.async_write(std::string_view("view;")));
    const char raw[] = {'s', 'p', 'a', 'n', ';'};
    out->push_back(co_await conn.async_write(std::as_bytes(std::span(raw))));
    out->push_back(co_await conn.async_write("literal;"));
    std::string big(100, 'o'), small = "sso;";
    auto w1 = conn.async_write(std::move(big)); // moved in: no copy
    CHECK(big.empty());
    auto w2 = conn.async_write(std::move(small));
    small = "overwritten"; // the awaiter has its own
    out->push_back(co_await std::move(w2));
    out->push_back(co_await std::move(w1));
    // Stored as a task (it owns the awaiter and the string).
    duplex::task<std::error_code> t = conn.async_write(std::string("task;"));
    out->push_back(co_await std::move(t));
    out->push_back(co_await conn.async_write(std::string_view()));
    conn.shutdown();
  }(c, f, &results));
  std::string received;
  std::thread peer([&] {
    dtest::read_until_eof(sp.peer.get(), [&](const uint8_t *p, size_t n) {
      received.append(reinterpret_cast<const char *>(p), n);
      return true;
    });
  });
  CHECK(pump(loop, [&] { return f.finished == 1; }));
  peer.join();
  CHECK(results == std::vector<std::error_code>(8));
  CHECK(received == "lvalue;view;span;literal;sso;" + std::string(100, 'o') + "task;");
}
