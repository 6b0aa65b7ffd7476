// scenario_coro: the docs/design.md scenario in C++, as one coroutine.
//
// Producer threads push messages into a Channel<std::string>. One coroutine
// on the loop thread waits for whichever comes first, a message or bytes
// from the socket (first_of never loses the other side's value): messages go
// to the socket, bytes go to stdout. No locks. The socket talks to an echo
// listener in the same process, so the program runs on its own.
//
// Usage: scenario_coro [messages-per-producer]   (default 5)
// Exit status 0 when every message came back.
#include <duplex/duplex.hpp>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

struct Result {
  long sent = 0, lines = 0;
  std::error_code error;
};

duplex::task<void> copy_and_print(duplex::Loop &loop, duplex::Conn conn,
                                  duplex::Channel<std::string> ch, Result &r) {
  bool channel_open = true;
  for (;;) {
    duplex::ReadResult in;
    if (channel_open) {
      auto ev = co_await duplex::first_of(conn.read(), ch.receive());
      if (ev.index() == 1) {
        auto &msg = std::get<1>(ev);
        if (!msg) {            // closed and drained: half-close the socket
          channel_open = false;
          conn.shutdown();
        } else if (auto ec = co_await conn.async_write(*msg)) {
          r.error = ec;
          break;
        } else {
          r.sent++;
        }
        continue;
      }
      in = std::move(std::get<0>(ev));
    } else {
      in = co_await conn.read();
    }
    if (!in.ok()) {            // EOF: the echo is done (or an error)
      r.error = in.error;
      break;
    }
    std::fwrite(in.data.data(), 1, in.data.size(), stdout);
    r.lines += std::count(in.data.begin(), in.data.end(), '\n');
  }
  loop.stop();
}

int main(int argc, char **argv) {
  const int producers = 4, each = argc > 1 ? std::atoi(argv[1]) : 5;
  if (each < 1) {
    std::fprintf(stderr, "usage: %s [messages-per-producer]\n", argv[0]);
    return 2;
  }
  duplex::Loop loop;

  // The echo peer: writes back what it reads, half-closes after our EOF.
  auto echo = duplex::Listener::tcp(loop, "127.0.0.1", 0, {
      .on_read = [](duplex::ConnRef c, std::span<const std::byte> b) { (void)c.write(b); },
      .on_eof = [](duplex::ConnRef c) { c.shutdown(); }});

  auto conn = duplex::Conn::connect_tcp(loop, "127.0.0.1", echo.port());
  duplex::Channel<std::string> ch(loop, {}, 16); // no handler: co_await receive()
  Result r;
  duplex::spawn(loop, copy_and_print(loop, conn, ch, r));

  std::atomic<int> producing{producers};
  std::vector<std::jthread> threads;
  for (int p = 0; p < producers; p++)
    threads.emplace_back([&, p] {
      for (int i = 0; i < each; i++) // waits while 16 messages are queued
        ch.send("producer " + std::to_string(p) + ": message " + std::to_string(i) + "\n");
      if (--producing == 0)
        ch.close(); // the last one out; queued messages are still received
    });

  loop.run(); // this thread is the loop thread until the coroutine stops it
  const long total = long(producers) * each;
  std::printf("%ld messages sent, %ld lines came back: %s\n", r.sent, r.lines,
              r.error ? r.error.message().c_str() : "closed cleanly");
  return r.sent == total && r.lines == total && !r.error ? 0 : 1;
}
