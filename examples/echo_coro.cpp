// echo_coro: a TCP echo server, one coroutine per connection.
//
// Usage: echo_coro [port]   (default 0: a free port; the address is
//        printed). Try it with `nc 127.0.0.1 <port>`.
#include <duplex/duplex.hpp>

#include <cstdio>
#include <cstdlib>

duplex::task<void> echo(duplex::Conn c) {
  std::string peer = c.peer();
  std::printf("open  %s\n", peer.c_str());
  duplex::ReadResult r;
  // read() pauses the socket while unread data piles up; async_write()
  // resumes once the kernel has the bytes, waiting out backpressure.
  while ((r = co_await c.read()).ok())
    if (auto ec = co_await c.async_write(r.data); ec) {
      r.error = ec;
      break;
    }
  if (r.eof) {
    std::error_code ec;
    c.shutdown(ec); // echo done: half-close (an error here just means closed)
  }
  std::printf("close %s: %s\n", peer.c_str(), r.error ? r.error.message().c_str() : "done");
}

int main(int argc, char **argv) {
  auto port = static_cast<uint16_t>(argc > 1 ? std::atoi(argv[1]) : 0);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  duplex::Loop loop;
  auto server = duplex::Listener::tcp(loop, "127.0.0.1", port, {
      .on_open = [&loop](duplex::ConnRef c) { duplex::spawn(loop, echo(duplex::Conn(c))); }});
  std::printf("listening on %s\n", server.address().c_str());
  loop.run(); // until the process is killed
}
