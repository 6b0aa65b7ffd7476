// echo_asio: TCP echo server on standalone asio, for the benchmarks.
// Usage: echo_asio PORT [THREADS] (127.0.0.1; prints nothing)
//
// One io_context on one thread; a session per connection owned by a
// shared_ptr that the pending handler holds; async_read_some into the
// session's buffer, async_write of what came, then read again.
// With THREADS (the scaling scenario): asio's io_context-per-thread
// design, THREADS io_contexts each run by one thread; the acceptor on the
// first hands each accepted socket to the next io_context in turn.
#include <asio.hpp>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

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
  server(asio::io_context &io, std::vector<asio::io_context *> workers,
         unsigned short port)
      : acceptor_(io), workers_(std::move(workers)) {
    tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), port);
    acceptor_.open(ep.protocol());
    acceptor_.set_option(tcp::acceptor::reuse_address(true));
    acceptor_.bind(ep);
    acceptor_.listen(4096);
    accept();
  }

private:
  void accept() {
    asio::io_context &target = *workers_[next_++ % workers_.size()];
    acceptor_.async_accept(target, [this](std::error_code ec, tcp::socket s) {
      if (!ec) {
        s.set_option(tcp::no_delay(true), ec);
        std::make_shared<session>(std::move(s))->start();
      }
      accept();
    });
  }
  tcp::acceptor acceptor_;
  std::vector<asio::io_context *> workers_;
  std::size_t next_ = 0;
};

int main(int argc, char **argv) {
  int port = argc > 1 ? std::atoi(argv[1]) : 0;
  int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  if (port < 1 || port > 65535 || threads < 1 || threads > 1024) {
    std::fprintf(stderr, "usage: %s PORT [THREADS]\n", argv[0]);
    return 2;
  }
  try {
    std::vector<std::unique_ptr<asio::io_context>> ios;
    std::vector<asio::io_context *> workers;
    for (int i = 0; i < threads; i++) {
      ios.push_back(std::make_unique<asio::io_context>(1)); // one thread each
      workers.push_back(ios.back().get());
    }
    std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards;
    for (auto &io : ios)
      guards.push_back(asio::make_work_guard(*io));
    server s(*ios[0], workers, static_cast<unsigned short>(port));
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; i++)
      pool.emplace_back([&io = *ios[i]] { io.run(); });
    ios[0]->run();
    for (auto &t : pool)
      t.join();
  } catch (std::exception &e) {
    std::fprintf(stderr, "echo_asio: %s\n", e.what());
    return 1;
  }
}
