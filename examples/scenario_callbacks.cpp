// scenario_callbacks: the docs/design.md scenario in C++, with callbacks.
//
// Producer threads push messages into a Channel<std::string>; on the loop
// thread each one moves to the socket (a zero-copy write); whatever the
// socket receives is printed. No locks: the loop owns the socket, and the
// channel is safe to send on from any thread. The socket talks to an echo
// listener in the same process, so the program runs on its own.
//
// Usage: scenario_callbacks [messages-per-producer]   (default 5)
// Exit status 0 when every message came back.
#include <duplex/duplex.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

int main(int argc, char **argv) {
  const int producers = 4, each = argc > 1 ? std::atoi(argv[1]) : 5;
  if (each < 1) {
    std::fprintf(stderr, "usage: %s [messages-per-producer]\n", argv[0]);
    return 2;
  }
  const long total = long(producers) * each;
  long sent = 0, lines = 0; // loop thread only
  std::error_code why;

  duplex::Loop loop;

  // The echo peer: writes back what it reads, half-closes after our EOF.
  auto echo = duplex::Listener::tcp(loop, "127.0.0.1", 0, {
      .on_read = [](duplex::ConnRef c, std::span<const std::byte> b) { (void)c.write(b); },
      .on_eof = [](duplex::ConnRef c) { c.shutdown(); }});

  // The socket: print what it receives; when it closes, run() returns.
  auto conn = duplex::Conn::connect_tcp(loop, "127.0.0.1", echo.port(), {
      .on_read = [&](duplex::ConnRef, std::span<const std::byte> b) {
        std::fwrite(b.data(), 1, b.size(), stdout);
        lines += std::count(b.begin(), b.end(), std::byte{'\n'});
      },
      .on_close = [&](duplex::ConnRef, std::error_code ec) {
        why = ec;
        loop.stop();
      }});

  // The channel: each message moves to the socket; after the last one,
  // half-close (the echo then finishes too).
  duplex::Channel<std::string> ch(loop, [&](std::string &&msg) {
    if (!conn.write(std::move(msg)))
      std::fprintf(stderr, "would block: message dropped\n");
    if (++sent == total)
      conn.shutdown();
  }, 16);

  std::vector<std::jthread> threads;
  for (int p = 0; p < producers; p++)
    threads.emplace_back([&ch, p, each] {
      for (int i = 0; i < each; i++) // waits while 16 messages are queued
        ch.send("producer " + std::to_string(p) + ": message " + std::to_string(i) + "\n");
    });

  loop.run(); // this thread is the loop thread until on_close
  std::printf("%ld messages sent, %ld lines came back: %s\n", sent, lines,
              why ? why.message().c_str() : "closed cleanly");
  return sent == total && lines == total && !why ? 0 : 1;
}
