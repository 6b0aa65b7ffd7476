// echo_callbacks: a TCP echo server, with callbacks.
//
// Usage: echo_callbacks [port]   (default 0: a free port; the address is
//        printed). Try it with `nc 127.0.0.1 <port>`.
#include <duplex/duplex.hpp>

#include <cstdio>
#include <cstdlib>

int main(int argc, char **argv) {
  auto port = static_cast<uint16_t>(argc > 1 ? std::atoi(argv[1]) : 0);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  duplex::Loop loop;
  auto server = duplex::Listener::tcp(loop, "127.0.0.1", port, {
      .on_open = [](duplex::ConnRef c) { std::printf("open  %s\n", c.peer().c_str()); },
      // The bytes are borrowed for the call; write() copies them. It returns
      // false ("would block") only past the hard limit, which pausing on
      // backpressure keeps us from reaching.
      .on_read = [](duplex::ConnRef c, std::span<const std::byte> bytes) {
        if (!c.write(bytes))
          c.close(true);
      },
      .on_eof = [](duplex::ConnRef c) { c.shutdown(); }, // echo done: half-close
      .on_backpressure = [](duplex::ConnRef c, std::size_t) { c.pause(); },
      .on_writable = [](duplex::ConnRef c) { c.resume(); },
      .on_close = [](duplex::ConnRef c, std::error_code ec) {
        std::printf("close %s: %s\n", c.peer().c_str(), ec ? ec.message().c_str() : "done");
      }});
  std::printf("listening on %s\n", server.address().c_str());
  loop.run(); // until the process is killed
}
