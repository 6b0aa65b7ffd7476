// echo_asio_tls: TLS echo server on standalone asio with asio::ssl (OpenSSL),
// for the TLS benchmarks.
// Usage: echo_asio_tls PORT CERT.pem KEY.pem (127.0.0.1; prints nothing)
//
// The same shape as echo_asio.cpp: one io_context on one thread, a session
// per connection owned by a shared_ptr that the pending handler holds. The
// session is an ssl::stream over the socket: async_handshake (server), then
// async_read_some into the session's 16 KiB buffer, async_write of what
// came, read again. The context is asio's tls_server method with TLS 1.0
// and 1.1 switched off; everything else (session tickets, cipher choice)
// is OpenSSL's default, as most asio servers run it.
#include <asio.hpp>
#include <asio/ssl.hpp>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

using asio::ip::tcp;

class session : public std::enable_shared_from_this<session> {
public:
  session(tcp::socket s, asio::ssl::context &ctx) : stream_(std::move(s), ctx) {}
  void start() {
    auto self = shared_from_this();
    stream_.async_handshake(asio::ssl::stream_base::server,
                            [this, self](std::error_code ec) {
                              if (!ec)
                                read();
                            });
  }

private:
  void read() {
    auto self = shared_from_this();
    stream_.async_read_some(asio::buffer(data_),
                            [this, self](std::error_code ec, std::size_t n) {
                              if (!ec)
                                write(n);
                            });
  }
  void write(std::size_t n) {
    auto self = shared_from_this();
    asio::async_write(stream_, asio::buffer(data_, n),
                      [this, self](std::error_code ec, std::size_t) {
                        if (!ec)
                          read();
                      });
  }
  asio::ssl::stream<tcp::socket> stream_;
  std::array<char, 16384> data_;
};

class server {
public:
  server(asio::io_context &io, asio::ssl::context &ctx, unsigned short port)
      : acceptor_(io), ctx_(ctx) {
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
        std::make_shared<session>(std::move(s), ctx_)->start();
      }
      accept();
    });
  }
  tcp::acceptor acceptor_;
  asio::ssl::context &ctx_;
};

int main(int argc, char **argv) {
  int port = argc == 4 ? std::atoi(argv[1]) : 0;
  if (port < 1 || port > 65535) {
    std::fprintf(stderr, "usage: %s PORT CERT.pem KEY.pem\n", argv[0]);
    return 2;
  }
  try {
    asio::ssl::context ctx(asio::ssl::context::tls_server);
    ctx.set_options(asio::ssl::context::default_workarounds |
                    asio::ssl::context::no_sslv2 |
                    asio::ssl::context::no_sslv3 |
                    asio::ssl::context::no_tlsv1 |
                    asio::ssl::context::no_tlsv1_1);
    ctx.use_certificate_chain_file(argv[2]);
    ctx.use_private_key_file(argv[3], asio::ssl::context::pem);
    asio::io_context io(1);
    server s(io, ctx, static_cast<unsigned short>(port));
    io.run();
  } catch (std::exception &e) {
    std::fprintf(stderr, "echo_asio_tls: %s\n", e.what());
    return 1;
  }
}
