// echo_asio: TCP echo server on standalone asio, for the benchmarks.
// Usage: echo_asio PORT (127.0.0.1; prints nothing)
//
// One io_context on one thread; a session per connection owned by a
// shared_ptr that the pending handler holds; async_read_some into the
// session's buffer, async_write of what came, then read again.
#include <asio.hpp>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <memory>

using asio::ip::tcp;

class session : public std::enable_shared_from_this<session> {
public:
  explicit session(tcp::socket s) : socket_(std::move(s)) {}
  void start() { read(); }

private:
  void read() {
    auto self = shared_from_this();
    socket_.async_read_some(asio::buffer(data_),
                            [this, self](std::error_code ec, std::size_t n) {
                              if (!ec)
                                write(n);
                            });
  }
  void write(std::size_t n) {
    auto self = shared_from_this();
    asio::async_write(socket_, asio::buffer(data_, n),
                      [this, self](std::error_code ec, std::size_t) {
                        if (!ec)
                          read();
                      });
  }
  tcp::socket socket_;
  std::array<char, 16384> data_;
};

class server {
public:
  server(asio::io_context &io, unsigned short port)
      : acceptor_(io) {
    tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), port);
    acceptor_.open(ep.protocol());
    acceptor_.set_option(tcp::acceptor::reuse_address(true));
    acceptor_.bind(ep);
    acceptor_.listen(4096);
    accept();
  }

private:
  void accept() {
    acceptor_.async_accept([this](std::error_code ec, tcp::socket s) {
      if (!ec) {
        s.set_option(tcp::no_delay(true), ec);
        std::make_shared<session>(std::move(s))->start();
      }
      accept();
    });
  }
  tcp::acceptor acceptor_;
};

int main(int argc, char **argv) {
  int port = argc > 1 ? std::atoi(argv[1]) : 0;
  if (port < 1 || port > 65535) {
    std::fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  try {
    asio::io_context io(1); // concurrency hint: one thread
    server s(io, static_cast<unsigned short>(port));
    io.run();
  } catch (std::exception &e) {
    std::fprintf(stderr, "echo_asio: %s\n", e.what());
    return 1;
  }
}
