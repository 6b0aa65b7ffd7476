// Half-close: shutdown flushes queued writes then closes the write side;
// reading continues until the peer's EOF, which is its own event; when both
// directions are done the conn closes by itself with reason 0.
#include "fixture.hpp"

using namespace dtest;

TEST_CASE("half-close: EOF is its own event, writing goes on, then shutdown") {
  const size_t kPeerBytes = 10 * 1024 * 1024; // peer -> us
  const size_t kBefore = 2 * 1024 * 1024;     // us -> peer before EOF
  const size_t kAfter = 1 * 1024 * 1024;      // us -> peer after EOF
  const uint32_t kSeedIn = 77, kSeedOut = 78;

  ConnEvents ev;
  Loop loop;
  PatternChecker in_checker(kSeedIn); // touched on the loop thread only
  std::atomic<uint64_t> read_at_eof{0};
  std::atomic<int> closes_at_eof{kUnset};
  std::atomic<int> after_eof_rc{kUnset}, shutdown_rc{kUnset};
  std::vector<uint8_t> out = pattern(kBefore + kAfter, 0, kSeedOut);
  WriteCounter w, sd;

  ev.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) {
    in_checker.feed(d, n);
  };
  ev.eof_hook = [&](duplex_conn *c) {
    read_at_eof = ev.bytes_read.load();
    closes_at_eof = ev.closes.load();
    // Still writable after EOF: the rest of our data, then our shutdown.
    int rc = 0;
    for (size_t off = kBefore; off < out.size() && rc == 0; off += 64 * 1024)
      rc = duplex_conn_write(c, out.data() + off, 64 * 1024, WriteCounter::cb, &w);
    after_eof_rc = rc;
    shutdown_rc = duplex_conn_shutdown(c, WriteCounter::cb, &sd);
  };
  std::atomic<int> sd_done_before_close{kUnset};
  ev.close_hook = [&](duplex_conn *, int) { sd_done_before_close = int(sd.total.load()); };

  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);

  // Peer reader: everything we send, then EOF.
  PatternChecker out_checker(kSeedOut);
  std::atomic<int> reader_rc{kUnset};
  Event reader_done;
  PeerThread reader([&] {
    reader_rc = read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      out_checker.feed(d, n);
      return true;
    });
    reader_done.set();
  });

  // Our first part, flushed to the kernel before the peer starts sending, so
  // the stream order of the two parts is fixed.
  for (size_t off = 0; off < kBefore; off += 64 * 1024)
    REQUIRE(duplex_conn_write(conn, out.data() + off, 64 * 1024, WriteCounter::cb, &w) == 0);
  CHECK(wait_until([&] { return w.total.load() == kBefore / (64 * 1024); }));

  // Peer writer: 10 MB, then shut down its write side.
  std::atomic<int> writer_rc{kUnset};
  PeerThread writer([&] {
    std::vector<uint8_t> in = pattern(kPeerBytes, 0, kSeedIn);
    int rc = write_all(sp.peer.get(), in.data(), in.size());
    if (rc == 0 && ::shutdown(sp.peer.get(), SHUT_WR) != 0)
      rc = errno;
    writer_rc = rc;
  });

  CHECK(reader_done.wait());
  writer.join();
  reader.join();
  CHECK(writer_rc.load() == 0);
  CHECK(reader_rc.load() == 0);
  CHECK(ev.wait_closed());

  CHECK(ev.eofs.load() == 1);
  CHECK(read_at_eof.load() == kPeerBytes); // EOF after every byte
  CHECK(closes_at_eof.load() == 0);        // EOF is not a close
  CHECK(ev.bytes_read.load() == kPeerBytes);
  CHECK(in_checker.ok());
  CHECK(after_eof_rc.load() == 0);
  CHECK(shutdown_rc.load() == 0);
  CHECK(out_checker.ok());
  CHECK(out_checker.offset == out.size());
  CHECK(w.total.load() == (kBefore + kAfter) / (64 * 1024));
  CHECK(w.ok.load() == w.total.load());
  CHECK(sd.total.load() == 1);
  CHECK(sd.ok.load() == 1);
  CHECK(sd_done_before_close.load() == 1);
  // Both directions finished: closed by itself, reason 0.
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.order_errors.load() == 0);
  CHECK(duplex_conn_write(conn, "x", 1, nullptr, nullptr) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("after shutdown writes return DUPLEX_ESHUTDOWN; reading goes on") {
  ConnEvents ev;
  Loop loop;
  ev.keep_data = true;
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);

  std::vector<uint8_t> data = pattern(1024 * 1024, 0, 3);
  PatternChecker checker(3);
  std::atomic<int> reader_rc{kUnset};
  Event reader_done;
  PeerThread reader([&] {
    reader_rc = read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      checker.feed(d, n);
      return true;
    });
    reader_done.set();
  });

  WriteCounter w, sd, sd2;
  REQUIRE(duplex_conn_write(conn, data.data(), data.size(), WriteCounter::cb, &w) == 0);
  REQUIRE(duplex_conn_shutdown(conn, WriteCounter::cb, &sd) == 0);
  CHECK(duplex_conn_write(conn, "x", 1, WriteCounter::cb, &w) == DUPLEX_ESHUTDOWN);
  CHECK(duplex_conn_write(conn, nullptr, 0, WriteCounter::cb, &w) == DUPLEX_ESHUTDOWN);
  duplex_buf b = {"x", 1};
  CHECK(duplex_conn_writev(conn, &b, 1, WriteCounter::cb, &w) == DUPLEX_ESHUTDOWN);
  ZcCounter z;
  void *zbuf = ZcCounter::alloc_copy("x", 1);
  CHECK(duplex_conn_write_zc(conn, zbuf, 1, ZcCounter::release, &z) == DUPLEX_ESHUTDOWN);
  std::free(zbuf); // refused: still ours
  CHECK(duplex_conn_shutdown(conn, WriteCounter::cb, &sd2) == DUPLEX_ESHUTDOWN);

  // The peer sees every byte, then EOF.
  CHECK(reader_done.wait());
  reader.join();
  CHECK(reader_rc.load() == 0);
  CHECK(checker.ok());
  CHECK(checker.offset == data.size());
  CHECK(wait_until([&] { return sd.total.load() == 1; }));
  CHECK(sd.ok.load() == 1);
  CHECK(w.total.load() == 1);
  CHECK(w.ok.load() == 1);
  // Still ESHUTDOWN (not closed: the peer has not finished).
  CHECK(duplex_conn_write(conn, "x", 1, nullptr, nullptr) == DUPLEX_ESHUTDOWN);
  CHECK(ev.closes.load() == 0);

  // Reading continues after our shutdown.
  const char msg[] = "after your shutdown";
  REQUIRE(write_all(sp.peer.get(), msg, sizeof msg - 1) == 0);
  CHECK(ev.wait_bytes(sizeof msg - 1));
  CHECK(ev.data() == msg);
  CHECK(ev.closes.load() == 0);
  // The peer finishes: EOF, then the conn closes by itself with reason 0.
  REQUIRE(::shutdown(sp.peer.get(), SHUT_WR) == 0);
  CHECK(ev.wait_closed());
  CHECK(ev.eofs.load() == 1);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.order_errors.load() == 0);
  CHECK(sd.total.load() == 1);
  CHECK(sd2.total.load() == 0); // refused: never called
  CHECK(z.released.load() == 0);
  CHECK(duplex_conn_shutdown(conn, nullptr, nullptr) == DUPLEX_ECLOSED);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK(sd.total.load() == 1);
  CHECK(w.total.load() == 1);
}

TEST_CASE("shutdown done runs once with DUPLEX_ECANCELED if the conn is aborted") {
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  fill_send_buffer(sp.ours.get()); // the peer never reads
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::vector<uint8_t> data = pattern(1024 * 1024, 0, 4);
  WriteCounter w, sd;
  REQUIRE(duplex_conn_write(conn, data.data(), data.size(), WriteCounter::cb, &w) == 0);
  REQUIRE(duplex_conn_shutdown(conn, WriteCounter::cb, &sd) == 0);
  REQUIRE(on_loop(loop, [] {}));
  CHECK(sd.total.load() == 0); // stuck behind the unread data
  REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(ev.wait_closed());
  CHECK(wait_until([&] { return sd.total.load() == 1 && w.total.load() == 1; }));
  CHECK(sd.canceled.load() == 1);
  CHECK(w.canceled.load() == 1);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECONNABORTED);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
  CHECK(sd.total.load() == 1);
}

TEST_CASE("shutdown from the loop thread: done runs later, never inside") {
  ConnEvents ev;
  Loop loop;
  WriteCounter w, sd;
  std::atomic<int> wrc{kUnset}, src{kUnset};
  std::atomic<uint64_t> sd_at_return{99};
  ev.open_hook = [&](duplex_conn *c) {
    wrc = duplex_conn_write(c, "bye", 3, WriteCounter::cb, &w);
    src = duplex_conn_shutdown(c, WriteCounter::cb, &sd);
    sd_at_return = sd.total.load();
  };
  auto sp = socket_pair();
  auto opts = ev.opts();
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  std::string got;
  int rc = read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
    got.append(reinterpret_cast<const char *>(d), n);
    return true;
  });
  CHECK(rc == 0);
  CHECK(got == "bye");
  CHECK(wrc.load() == 0);
  CHECK(src.load() == 0);
  CHECK(sd_at_return.load() == 0);
  CHECK(wait_until([&] { return sd.total.load() == 1; }));
  CHECK(sd.ok.load() == 1);
  CHECK(w.ok.load() == 1);
  sp.peer.reset(); // peer closes: EOF for us, so the conn closes with 0
  CHECK(ev.wait_closed());
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.eofs.load() == 1);
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}

TEST_CASE("a thread's writes before its shutdown are all flushed first") {
  const unsigned kThreads = 3;
  ConnEvents ev;
  Loop loop;
  auto sp = socket_pair();
  auto opts = ev.opts(256 * 1024, 64 * 1024, 1024 * 1024);
  duplex_conn *conn = adopt(loop, sp.ours, &opts);
  frame::Verifier verifier(kThreads + 1);
  Event reader_done;
  PeerThread reader([&] {
    read_until_eof(sp.peer.get(), [&](const uint8_t *d, size_t n) {
      verifier.feed(d, n);
      return true;
    });
    reader_done.set();
  });
  // Other threads write; they finish before the shutdown thread starts.
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      uint8_t buf[512];
      for (uint32_t s = 0; s < 2000; s++) {
        frame::encode(buf, uint8_t(t), s, sizeof buf);
        int rc = retry_wouldblock(conn, [&] {
          return duplex_conn_write(conn, buf, sizeof buf, nullptr, nullptr);
        });
        CHECK(rc == 0);
        if (rc != 0)
          return;
      }
    });
  }
  for (auto &t : threads)
    t.join();
  WriteCounter sd;
  std::thread last([&] {
    uint8_t buf[100];
    for (uint32_t s = 0; s < 1000; s++) {
      frame::encode(buf, uint8_t(kThreads), s, sizeof buf);
      int rc = retry_wouldblock(conn, [&] {
        return duplex_conn_write(conn, buf, sizeof buf, nullptr, nullptr);
      });
      CHECK(rc == 0);
    }
    CHECK(duplex_conn_shutdown(conn, WriteCounter::cb, &sd) == 0);
  });
  last.join();
  CHECK(reader_done.wait());
  reader.join();
  CHECK_MESSAGE(verifier.ok(), verifier.error());
  CHECK(verifier.dangling() == 0);
  for (unsigned t = 0; t < kThreads; t++)
    CHECK(verifier.count(t) == 2000);
  CHECK(verifier.count(kThreads) == 1000);
  CHECK(wait_until([&] { return sd.total.load() == 1; }));
  CHECK(sd.ok.load() == 1);
  CHECK(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
  CHECK(ev.wait_closed());
  CHECK(duplex_conn_unref(conn) == 0);
  CHECK(loop.free() == 0);
}
