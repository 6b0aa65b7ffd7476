// consumer_cpp: the C++20 layer (<duplex/duplex.hpp>) from an installed
// libduplex, as the CMake consumer builds it (target libduplex::duplex_cpp).
// The same exchange as consumer.c: "ping" one way over a socketpair,
// "pong" back, both ends half-close, run() returns when both have closed.
#include <duplex/duplex.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <system_error>

int main() {
  alarm(20); // a hang guard
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) {
    std::perror("consumer_cpp: socketpair");
    return 1;
  }

  duplex::Loop loop;
  std::string at_a, at_b;
  std::error_code why_a, why_b;
  int closed = 0;
  auto done = [&] {
    if (++closed == 2)
      loop.stop();
  };

  auto b = duplex::Conn::adopt(loop, fds[1], {
      .on_read = [&](duplex::ConnRef c, std::span<const std::byte> bytes) {
        at_b.append(reinterpret_cast<const char *>(bytes.data()), bytes.size());
        if (at_b.size() == 4) {
          (void)c.write("pong");
          c.shutdown();
        }
      },
      .on_close = [&](duplex::ConnRef, std::error_code ec) { why_b = ec; done(); }});
  auto a = duplex::Conn::adopt(loop, fds[0], {
      .on_read = [&](duplex::ConnRef, std::span<const std::byte> bytes) {
        at_a.append(reinterpret_cast<const char *>(bytes.data()), bytes.size());
      },
      .on_close = [&](duplex::ConnRef, std::error_code ec) { why_a = ec; done(); }});

  if (!a.write("ping")) {
    std::fprintf(stderr, "consumer_cpp: write refused\n");
    return 1;
  }
  a.shutdown();
  loop.run();

  if (at_b != "ping" || at_a != "pong" || why_a || why_b) {
    std::fprintf(stderr, "consumer_cpp: got '%s' and '%s' (%s / %s)\n",
                 at_b.c_str(), at_a.c_str(), why_b.message().c_str(),
                 why_a.message().c_str());
    return 1;
  }
  std::printf("consumer_cpp: libduplex %s: ping/pong over a socketpair ok\n",
              duplex_version_string());
  return 0;
}
