// echo_duplex_cpp: TCP echo server on the libduplex C++ layer, for the
// benchmarks. Usage: echo_duplex_cpp PORT [coro] (127.0.0.1; prints nothing).
//
// Without "coro": the same server as echo_duplex.c, with handlers, written
// the way docs/cpp.md shows. With "coro": one coroutine per conn, as in
// examples/echo_coro.cpp: read a chunk, async_write it back, and at EOF
// half-close (bench/run's "libduplex (C++ coro)").
#include <duplex/duplex.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

duplex::task<void> echo(duplex::Conn c) {
  for (;;) {
    auto r = co_await c.read();
    if (!r.ok()) {
      std::error_code ec; // no throw: a reset conn just closes
      if (r.eof)
        c.shutdown(ec);
      co_return;
    }
    if (co_await c.async_write(r.data)) {
      c.close(true);
      co_return;
    }
  }
}

} // namespace

int main(int argc, char **argv) {
  int port = argc > 1 ? std::atoi(argv[1]) : 0;
  bool coro = argc > 2 && std::strcmp(argv[2], "coro") == 0;
  if (port < 1 || port > 65535 || (argc > 2 && !coro)) {
    std::fprintf(stderr, "usage: %s PORT [coro]\n", argv[0]);
    return 2;
  }
  duplex::Loop loop;
  duplex::ConnHandlers h;
  if (coro) {
    h.on_open = [&loop](duplex::ConnRef c) {
      duplex::spawn(loop, echo(duplex::Conn(c)));
    };
  } else {
    h.on_read = [](duplex::ConnRef c, std::span<const std::byte> bytes) {
      std::error_code ec; // no throw: a reset conn just closes
      if (!c.write(bytes, ec))
        c.close(true);
    };
    h.on_eof = [](duplex::ConnRef c) {
      std::error_code ec;
      c.shutdown(ec);
    };
    h.on_backpressure = [](duplex::ConnRef c, std::size_t) { c.pause(); };
    h.on_writable = [](duplex::ConnRef c) { c.resume(); };
  }
  auto server = duplex::Listener::tcp(loop, "127.0.0.1",
                                      static_cast<uint16_t>(port),
                                      std::move(h), {}, 4096);
  loop.run(); // until killed
}
