// echo_duplex_cpp: TCP echo server on the libduplex C++ layer, for the
// benchmarks. Usage: echo_duplex_cpp PORT (127.0.0.1; prints nothing).
// The same server as echo_duplex.c, written the way docs/cpp.md shows.
#include <duplex/duplex.hpp>

#include <cstdio>
#include <cstdlib>

int main(int argc, char **argv) {
  int port = argc > 1 ? std::atoi(argv[1]) : 0;
  if (port < 1 || port > 65535) {
    std::fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  duplex::Loop loop;
  auto server = duplex::Listener::tcp(
      loop, "127.0.0.1", static_cast<uint16_t>(port),
      {
          .on_read =
              [](duplex::ConnRef c, std::span<const std::byte> bytes) {
                std::error_code ec; // no throw: a reset conn just closes
                if (!c.write(bytes, ec))
                  c.close(true);
              },
          .on_eof = [](duplex::ConnRef c) { c.shutdown(); },
          .on_backpressure = [](duplex::ConnRef c, std::size_t) { c.pause(); },
          .on_writable = [](duplex::ConnRef c) { c.resume(); },
      },
      {}, 4096);
  loop.run(); // until killed
}
