// Regression tests for review defects reached through the C++20 layer
// (cpp/include/duplex): defect 2 through a coroutine reader (the C++ layer
// pauses and resumes the conn itself) and defect 3 (ConnRef::async_write on a
// temporary ConnRef).
#include <duplex/duplex.hpp>

#include "hardening.hpp"

#include <sys/socket.h>
#include <unistd.h>

// Defect 3 is a read through a dangling reference to a dead stack slot:
// ASan reports it only with use-after-return detection, which is off by
// default. Turn it on for this executable (ASAN_OPTIONS still overrides).
#if defined(__SANITIZE_ADDRESS__)
#define HARDENING_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HARDENING_ASAN 1
#endif
#endif
#ifdef HARDENING_ASAN
extern "C" const char *__asan_default_options() {
  return "detect_stack_use_after_return=1";
}
#endif

using namespace std::chrono_literals;
using namespace dtest;
using namespace hard;

namespace {

duplex::task<void> line_reader(duplex::Conn c, EventLog &log) {
  for (;;) {
    duplex::ReadResult r = co_await c.read();
    if (r.eof) {
      log.add("EOF");
      break;
    }
    if (r.error) {
      log.add("error");
      break;
    }
    log.add("read:" + std::string(r.data)); // taking a frame may resume the conn
  }
}

} // namespace

TEST_CASE("defect 2: a coroutine reader with a small read_buffer_limit gets every held frame "
          "before the EOF that followed them, and the loop does not spin") {
  Watchdog wd("defect 2 (C++)", std::chrono::seconds(90));
  SocketPair sp = socket_pair();
  REQUIRE(write_all(sp.peer.get(), "a\nb\nc\n", 6) == 0);
  REQUIRE(::shutdown(sp.peer.get(), SHUT_WR) == 0);

  EventLog log;
  std::atomic<int> ticks{0};
  duplex::Loop loop;
  duplex::ConnOptions o;
  o.framing = duplex::Framing::lines();
  o.read_buffer_limit = 2; // the layer pauses the conn once 2 bytes wait unread
  duplex::Conn conn = duplex::Conn::adopt(loop, sp.ours.get(), {}, o);
  sp.ours.release();
  // 50 ms later, on the loop thread (first run from a post): start the reader.
  duplex::Timer starter(loop, [&] { duplex::spawn(loop, line_reader(conn, log)); });
  starter.start(50ms);
  duplex::Timer ticker(loop, [&] { ticks++; });
  ticker.start(10ms, 10ms);
  loop.start();

  bool eof = wait_until([&] { return log.has("EOF") || log.has("error"); }, kHang);
  CHECK_MESSAGE(eof, "no EOF; log: " << log.joined());
  CHECK(log.joined() == "read:a read:b read:c EOF");
  int t0 = ticks.load();
  if (!wait_until([&] { return ticks.load() >= t0 + 10; }, kHang))
    die("defect 2 (C++): the loop timer stopped firing after the reader took the held "
        "frames (log: " + log.joined() + ")");
  {
    Watchdog fw("defect 2 (C++): closing the timers and the loop");
    starter.close();
    ticker.close();
    conn = duplex::Conn();
    loop.close();
  }
  CHECK(log.joined() == "read:a read:b read:c EOF");
}

TEST_CASE("defect 3: async_write on the temporary ConnRef a callback received delivers the "
          "bytes after the callback returned") {
  Watchdog wd("defect 3", std::chrono::seconds(60));
  SocketPair sp = socket_pair();
  std::atomic<int> status{kUnset};
  std::atomic<int> spawned{0};
  duplex::Loop loop;
  duplex::ConnHandlers h;
  h.on_open = [&loop, &status, &spawned](duplex::ConnRef r) {
    // "Greet every client": the task starts later, from a post, after this
    // callback (and its ConnRef parameter) is gone.
    duplex::spawn(loop, [](duplex::task<std::error_code> t,
                           std::atomic<int> &out) -> duplex::task<void> {
      std::error_code ec = co_await std::move(t);
      out = ec ? ec.value() : 0;
    }(r.async_write("hello\n"), status));
    spawned++;
  };
  duplex::Conn c = duplex::Conn::adopt(loop, sp.ours.get(), std::move(h));
  sp.ours.release();
  loop.start();

  REQUIRE(readable_within(sp.peer.get(), kHang));
  char buf[6];
  REQUIRE(read_exactly(sp.peer.get(), buf, sizeof buf));
  CHECK(std::string(buf, sizeof buf) == "hello\n");
  REQUIRE(wait_until([&] { return status.load() != kUnset; }, kHang));
  CHECK(status.load() == 0);
  CHECK(spawned.load() == 1);
  {
    Watchdog fw("defect 3: closing the loop");
    c = duplex::Conn();
    loop.close();
  }
  // Nothing more arrived than the greeting.
  char extra;
  CHECK(::recv(sp.peer.get(), &extra, 1, MSG_DONTWAIT) == 0); // EOF: the conn closed
}
