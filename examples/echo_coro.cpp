// echo_coro: a TCP echo server, one coroutine per connection.
//
// Usage: echo_coro [port]   (default 0: a free port; the address is
//        printed). Try it with `nc 127.0.0.1 <port>`. A client that sends
//        nothing for 60 s is closed.
#include <duplex/duplex.hpp>

#include <cstdio>
#include <cstdlib>

using namespace std::chrono_literals;

duplex::task<void> echo(duplex::Loop &loop, duplex::Conn c) {
  std::string peer = c.peer();
  std::printf("open  %s\n", peer.c_str());
  std::string why = "done";
  for (;;) {
    // A chunk, or 60 s of silence. The ReadResult owns the chunk until the
    // end of this iteration; async_write() resumes once the kernel has the
    // bytes, waiting out backpressure (and read() pauses the socket while
    // unread data piles up). Nothing here allocates per message.
    auto ev = co_await duplex::first_of(c.read(), loop.sleep(60s));
    if (ev.index() == 1) {
      why = "idle";
      c.close();
      break;
    }
    auto &r = std::get<0>(ev);
    if (r.eof) {
      std::error_code ec;
      c.shutdown(ec); // echo done: half-close (an error here just means closed)
      break;
    }
    if (r.error) {
      why = r.error.message();
      break;
    }
    if (auto ec = co_await c.async_write(r.data)) {
      why = ec.message();
      break;
    }
  }
  std::printf("close %s: %s\n", peer.c_str(), why.c_str());
}

int main(int argc, char **argv) {
  auto port = static_cast<uint16_t>(argc > 1 ? std::atoi(argv[1]) : 0);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  duplex::Loop loop;
  auto server = duplex::Listener::tcp(
      loop, "127.0.0.1", port,
      {.on_open = [&loop](duplex::ConnRef c) {
        duplex::spawn(loop, echo(loop, duplex::Conn(c)));
      }},
      {},
      {.backlog = 1024,
       .on_error = [](std::error_code ec) { // e.g. out of descriptors
         std::fprintf(stderr, "accept: %s\n", ec.message().c_str());
       }});
  std::printf("listening on %s\n", server.address().c_str());
  loop.run(); // until the process is killed
}
