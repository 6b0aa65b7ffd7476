// Message framing end to end over a socketpair: a raw peer encodes frames
// by hand (delimited and length-prefixed) and sends them split at every
// byte boundary or coalesced many per write; on_read must receive exactly
// the messages. Oversize frames close with DUPLEX_EMSGSIZE without a partial
// delivery, EOF inside a frame closes with DUPLEX_EPROTO, and framed writes
// from several threads reach the peer whole and in per-thread order.
//
// (The codec itself has white-box tests in framing_test.cpp.)
#include "fixture.hpp"

#include <sys/un.h>

#include <cctype>
#include <cstddef>

using namespace dtest;

namespace {

duplex_framing delimited(const std::string &delim = "\n", size_t max_frame = 0) {
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_DELIMITED;
  REQUIRE(delim.size() >= 1);
  REQUIRE(delim.size() <= 4);
  std::memcpy(f.delimiter, delim.data(), delim.size());
  f.delimiter_len = unsigned(delim.size());
  f.max_frame = max_frame;
  return f;
}

duplex_framing prefixed(unsigned bytes, bool little_endian = false, size_t max_frame = 0) {
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
  f.prefix_bytes = bytes;
  f.flags = little_endian ? DUPLEX_FRAME_LITTLE_ENDIAN : 0u;
  f.max_frame = max_frame;
  return f;
}

// The peer's own encoder (independent of the library's).
std::string encode(const duplex_framing &f, const std::string &payload) {
  if (f.kind == DUPLEX_FRAME_DELIMITED)
    return payload + std::string(reinterpret_cast<const char *>(f.delimiter), f.delimiter_len);
  std::string h(f.prefix_bytes, '\0');
  uint64_t n = payload.size();
  for (unsigned i = 0; i < f.prefix_bytes; i++) {
    char b = char((n >> (8 * i)) & 0xff);
    if (f.flags & DUPLEX_FRAME_LITTLE_ENDIAN)
      h[i] = b;
    else
      h[f.prefix_bytes - 1 - i] = b;
  }
  return h + payload;
}

std::string encode_all(const duplex_framing &f, const std::vector<std::string> &msgs) {
  std::string s;
  for (auto &m : msgs)
    s += encode(f, m);
  return s;
}

// Conn callbacks that keep every message on_read delivers.
struct Framed {
  ConnEvents ev;
  Framed() {
    ev.read_hook = [this](duplex_conn *, const uint8_t *d, size_t n) {
      std::lock_guard<std::mutex> lk(mu);
      msgs.emplace_back(reinterpret_cast<const char *>(d), n);
    };
  }
  duplex_conn_opts opts(const duplex_framing *f, unsigned flags = 0) {
    duplex_conn_opts o = ev.opts(0, 0, 0, flags);
    o.framing = f;
    return o;
  }
  std::vector<std::string> get() {
    std::lock_guard<std::mutex> lk(mu);
    return msgs;
  }
  size_t count() {
    std::lock_guard<std::mutex> lk(mu);
    return msgs.size();
  }
  bool wait_count(size_t n) {
    return wait_until([&] { return count() >= n || ev.closes.load() > 0; });
  }
  std::mutex mu;
  std::vector<std::string> msgs;
};

std::vector<std::string> short_messages(size_t max_len) {
  std::vector<std::string> v = {"hello", "a", "", "world wide web", "\r", "x y z", ""};
  std::string longer;
  for (size_t i = 0; i < std::min<size_t>(max_len, 300); i++)
    longer += char('A' + i % 26);
  v.push_back(longer);
  v.push_back("end");
  return v;
}

struct FramingCase {
  std::string name;
  duplex_framing f;
  size_t max_len; // longest payload the prefix can express in this test
};

std::vector<FramingCase> framing_cases() {
  return {
      {"delimited \\n", delimited("\n"), 1000},
      {"delimited \\r\\n (2-byte delimiter)", delimited("\r\n"), 1000},
      {"delimited 4-byte delimiter", delimited("<|>|"), 1000},
      {"length prefix 4 bytes big-endian", prefixed(4), 1000},
      {"length prefix 1 byte", prefixed(1), 255},
      {"length prefix 2 bytes little-endian", prefixed(2, true), 1000},
      {"length prefix 8 bytes big-endian", prefixed(8), 1000},
  };
}

// "\r" as a message cannot travel inside "\r\n" framing unambiguously; drop
// payloads that contain (a prefix of) the delimiter for delimited cases.
std::vector<std::string> messages_for(const duplex_framing &f, size_t max_len) {
  auto v = short_messages(max_len);
  if (f.kind != DUPLEX_FRAME_DELIMITED)
    return v;
  std::vector<std::string> out;
  std::string d(reinterpret_cast<const char *>(f.delimiter), f.delimiter_len);
  for (auto &m : v) {
    bool bad = false;
    for (size_t k = 1; k <= d.size() && !bad; k++)
      bad = m.find(d.substr(0, k)) != std::string::npos ||
            m.find(d.substr(d.size() - k)) != std::string::npos;
    if (!bad)
      out.push_back(m);
  }
  return out;
}

void shut_wr(int fd) { REQUIRE(::shutdown(fd, SHUT_WR) == 0); }

} // namespace

TEST_CASE("framed reads split at every byte boundary deliver exactly the messages") {
  // A 1-byte loop read buffer: the library reads the stream one byte per
  // read, so every frame is cut at every byte boundary.
  duplex_loop_opts lo = DUPLEX_LOOP_OPTS_INIT;
  lo.read_buffer_size = 1;
  for (auto &fc : framing_cases()) {
    SUBCASE(fc.name.c_str()) {
      Loop loop(true, &lo);
      Framed fr;
      auto sp = socket_pair();
      auto o = fr.opts(&fc.f);
      duplex_conn *c = adopt(loop, sp.ours, &o);
      auto msgs = messages_for(fc.f, fc.max_len);
      std::string wire = encode_all(fc.f, msgs);
      REQUIRE(write_all(sp.peer.get(), wire.data(), wire.size()) == 0);
      REQUIRE(fr.wait_count(msgs.size()));
      CHECK(fr.get() == msgs);
      CHECK(fr.ev.closes.load() == 0);
      // EOF at a frame boundary is not an error.
      shut_wr(sp.peer.get());
      REQUIRE(wait_until([&] { return fr.ev.eofs.load() == 1; }));
      CHECK(fr.ev.closes.load() == 0);
      CHECK(fr.ev.order_errors.load() == 0);
      CHECK(fr.get() == msgs);
      CHECK(loop.free() == 0);
      CHECK(fr.ev.close_reason.load() == DUPLEX_ECANCELED);
      CHECK(duplex_conn_unref(c) == 0);
    }
  }
}

TEST_CASE("framed reads: the peer sends one byte per write, default read buffer") {
  for (auto &fc : framing_cases()) {
    SUBCASE(fc.name.c_str()) {
      Loop loop;
      Framed fr;
      auto sp = socket_pair();
      auto o = fr.opts(&fc.f);
      duplex_conn *c = adopt(loop, sp.ours, &o);
      auto msgs = messages_for(fc.f, 40);
      std::string wire = encode_all(fc.f, msgs);
      for (size_t i = 0; i < wire.size(); i++) {
        REQUIRE(write_all(sp.peer.get(), &wire[i], 1) == 0);
        if (i % 3 == 0)
          std::this_thread::sleep_for(200us); // let the loop read partial frames
      }
      REQUIRE(fr.wait_count(msgs.size()));
      CHECK(fr.get() == msgs);
      CHECK(fr.ev.closes.load() == 0);
      CHECK(loop.free() == 0);
      CHECK(duplex_conn_unref(c) == 0);
    }
  }
}

TEST_CASE("framed reads: many frames coalesced per write deliver exactly the messages") {
  duplex_loop_opts small = DUPLEX_LOOP_OPTS_INIT;
  small.read_buffer_size = 7; // odd cut points inside frames and prefixes
  for (bool tiny : {false, true}) {
    for (auto &fc : framing_cases()) {
      SUBCASE((fc.name + (tiny ? ", 7-byte read buffer" : ", default read buffer")).c_str()) {
        Loop loop(true, tiny ? &small : nullptr);
        Framed fr;
        auto sp = socket_pair();
        auto o = fr.opts(&fc.f);
        duplex_conn *c = adopt(loop, sp.ours, &o);
        std::vector<std::string> msgs;
        Rng rng(42);
        for (int i = 0; i < 2000; i++) {
          std::string m = "m" + std::to_string(i) + ":";
          size_t pad = rng.range(0, std::min<size_t>(fc.max_len - m.size(), 200));
          m += std::string(pad, char('a' + i % 26));
          msgs.push_back(std::move(m));
        }
        std::string wire = encode_all(fc.f, msgs);
        // Ten big writes, each cutting frames at arbitrary places.
        size_t step = wire.size() / 10 + 1;
        for (size_t off = 0; off < wire.size(); off += step)
          REQUIRE(write_all(sp.peer.get(), wire.data() + off, std::min(step, wire.size() - off)) ==
                  0);
        REQUIRE(fr.wait_count(msgs.size()));
        CHECK(fr.count() == msgs.size());
        CHECK(fr.get() == msgs);
        CHECK(fr.ev.closes.load() == 0);
        CHECK(loop.free() == 0);
        CHECK(duplex_conn_unref(c) == 0);
      }
    }
  }
}

TEST_CASE("an oversize frame closes the conn with DUPLEX_EMSGSIZE; nothing of it is delivered") {
  constexpr size_t kMax = 16;
  duplex_loop_opts lo = DUPLEX_LOOP_OPTS_INIT;
  Framed fr;
  auto sp = socket_pair();
  duplex_framing f;
  std::string wire;
  std::vector<std::string> expect;
  SUBCASE("delimited: a 17-byte line after two good ones") {
    f = delimited("\n", kMax);
    wire = "ok\n" + std::string(kMax, 'e') + "\n" + std::string(kMax + 1, 'x') + "\nafter\n";
    expect = {"ok", std::string(kMax, 'e')};
  }
  SUBCASE("delimited: a line that never ends, the peer keeps the conn open") {
    f = delimited("\n", kMax);
    wire = "ok\n" + std::string(100, 'x');
    expect = {"ok"};
  }
  SUBCASE("delimited \\r\\n with a 1-byte read buffer: the limit is found mid-frame") {
    lo.read_buffer_size = 1;
    f = delimited("\r\n", kMax);
    wire = "ok\r\n" + std::string(kMax + 1, 'x') + "\r\nafter\r\n";
    expect = {"ok"};
  }
  SUBCASE("length prefix: a header announcing 17 bytes, no payload sent") {
    f = prefixed(4, false, kMax);
    wire = encode(f, "ok") + std::string("\0\0\0\x11", 4);
    expect = {"ok"};
  }
  SUBCASE("length prefix: a header announcing 2^40 bytes (8-byte prefix)") {
    f = prefixed(8, false, kMax);
    wire = encode(f, std::string(kMax, 'e')) + std::string("\0\0\x01\0\0\0\0\0", 8) + "xyz";
    expect = {std::string(kMax, 'e')};
  }
  Loop loop(true, &lo);
  auto o = fr.opts(&f);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(write_all(sp.peer.get(), wire.data(), wire.size()) == 0);
  REQUIRE(fr.ev.wait_closed());
  CHECK(fr.ev.close_reason.load() == DUPLEX_EMSGSIZE);
  CHECK(fr.get() == expect);
  CHECK(fr.ev.closes.load() == 1);
  CHECK(fr.ev.order_errors.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(fr.get() == expect);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("EOF inside a partial frame closes with DUPLEX_EPROTO; the partial bytes are never "
          "delivered") {
  Loop loop;
  Framed fr;
  auto sp = socket_pair();
  duplex_framing f;
  std::string wire;
  std::vector<std::string> expect;
  SUBCASE("delimited: a line without its delimiter") {
    f = delimited("\n");
    wire = "abc\ndef";
    expect = {"abc"};
  }
  SUBCASE("delimited: half of a 2-byte delimiter") {
    f = delimited("\r\n");
    wire = "abc\r\ndef\r";
    expect = {"abc"};
  }
  SUBCASE("length prefix: payload cut short") {
    f = prefixed(4);
    wire = encode(f, "abc") + std::string("\0\0\0\x0a", 4) + "12345";
    expect = {"abc"};
  }
  SUBCASE("length prefix: the prefix itself cut short") {
    f = prefixed(4);
    wire = encode(f, "abc") + std::string("\0\0", 2);
    expect = {"abc"};
  }
  auto o = fr.opts(&f);
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(write_all(sp.peer.get(), wire.data(), wire.size()) == 0);
  shut_wr(sp.peer.get());
  REQUIRE(fr.ev.wait_closed());
  CHECK(fr.ev.close_reason.load() == DUPLEX_EPROTO);
  CHECK(fr.get() == expect);
  CHECK(fr.ev.closes.load() == 1);
  CHECK(fr.ev.order_errors.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("4 threads x 10000 duplex_conn_write_frame: the peer decodes every frame whole and "
          "in per-thread order") {
  constexpr unsigned kThreads = 4;
  const uint32_t kPer = kTsan ? 2500 : 10000;
  Loop loop;
  Framed fr;
  auto sp = socket_pair();
  bool is_delimited = false;
  duplex_framing f;
  SUBCASE("length prefix 4 bytes big-endian, binary payloads") { f = prefixed(4); }
  SUBCASE("delimited \\n, text payloads") {
    f = delimited("\n");
    is_delimited = true;
  }
  auto o = fr.opts(&f);
  duplex_conn *c = adopt(loop, sp.ours, &o);

  // The peer decodes the stream with its own decoder.
  int peer_fd = sp.peer.get();
  std::atomic<uint64_t> frames{0};
  std::string peer_error;
  size_t dangling = 0;
  PeerThread peer([&, peer_fd] {
    std::vector<uint32_t> next(kThreads, 0);
    frame::Verifier v(kThreads);
    std::string buf;
    auto fail = [&](std::string why) {
      if (peer_error.empty())
        peer_error = std::move(why);
    };
    read_until_eof(peer_fd, [&](const uint8_t *d, size_t n) {
      buf.append(reinterpret_cast<const char *>(d), n);
      size_t pos = 0;
      for (;;) {
        std::string payload;
        if (is_delimited) {
          size_t nl = buf.find('\n', pos);
          if (nl == std::string::npos)
            break;
          payload = buf.substr(pos, nl - pos);
          pos = nl + 1;
          unsigned tid = 0;
          uint32_t seq = 0;
          int used = 0;
          if (std::sscanf(payload.c_str(), "t%u:s%u:%n", &tid, &seq, &used) != 2 ||
              tid >= kThreads) {
            fail("bad text frame '" + payload.substr(0, 40) + "'");
            return false;
          }
          if (seq != next[tid]) {
            fail("thread " + std::to_string(tid) + " expected " + std::to_string(next[tid]) +
                 " got " + std::to_string(seq));
            return false;
          }
          std::string pad = payload.substr(size_t(used));
          if (pad != std::string(seq % 97, char('a' + tid))) {
            fail("bad padding in thread " + std::to_string(tid) + " seq " + std::to_string(seq));
            return false;
          }
          next[tid]++;
        } else {
          if (buf.size() - pos < 4)
            break;
          const auto *p = reinterpret_cast<const uint8_t *>(buf.data() + pos);
          size_t len = (size_t(p[0]) << 24) | (size_t(p[1]) << 16) | (size_t(p[2]) << 8) | p[3];
          if (buf.size() - pos - 4 < len)
            break;
          if (len < frame::kHeader ||
              len != (size_t(p[4 + 2]) | (size_t(p[4 + 3]) << 8))) {
            fail("prefix " + std::to_string(len) + " does not match the frame inside it");
            return false;
          }
          v.feed(p + 4, len); // exactly one whole frame::
          if (!v.ok()) {
            fail(v.error());
            return false;
          }
          pos += 4 + len;
        }
        frames++;
      }
      buf.erase(0, pos);
      return true;
    });
    dangling = buf.size();
  });

  std::atomic<uint64_t> write_errors{0};
  std::atomic<int> last_error{0};
  std::vector<std::thread> writers;
  for (unsigned t = 0; t < kThreads; t++)
    writers.emplace_back([&, t] {
      Rng rng(t + 1);
      for (uint32_t i = 0; i < kPer; i++) {
        std::string text;
        std::vector<uint8_t> bin;
        const void *data;
        size_t len;
        if (is_delimited) {
          text = "t" + std::to_string(t) + ":s" + std::to_string(i) + ":" +
                 std::string(i % 97, char('a' + t));
          data = text.data();
          len = text.size();
        } else {
          bin = frame::make(uint8_t(t), i, rng.range(frame::kHeader, 300));
          data = bin.data();
          len = bin.size();
        }
        int rc = retry_wouldblock(c, [&] {
          return duplex_conn_write_frame(c, data, len, nullptr, nullptr);
        });
        if (rc != 0) {
          write_errors++;
          last_error = rc;
          return;
        }
      }
    });
  for (auto &w : writers)
    w.join();
  CHECK_MESSAGE(write_errors.load() == 0, "last error " << err_str(last_error.load()));
  REQUIRE(duplex_conn_shutdown(c, nullptr, nullptr) == 0);
  peer.join();
  CHECK_MESSAGE(peer_error.empty(), peer_error);
  CHECK(frames.load() == uint64_t(kThreads) * kPer);
  CHECK(dangling == 0);
  CHECK(fr.ev.closes.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("duplex_conn_write_frame refuses what the framing cannot carry; the caller keeps "
          "its bytes and nothing is sent") {
  Loop loop;
  Framed fr;
  auto sp = socket_pair();
  WriteCounter wc;
  std::vector<char> big(70000, 'b');
  SUBCASE("1-byte prefix: 256 bytes cannot be expressed") {
    auto f = prefixed(1);
    auto o = fr.opts(&f);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    CHECK(duplex_conn_write_frame(c, big.data(), 256, WriteCounter::cb, &wc) == DUPLEX_EMSGSIZE);
    CHECK(duplex_conn_write_frame(c, big.data(), 255, WriteCounter::cb, &wc) == 0);
    REQUIRE(wait_until([&] { return wc.total.load() == 1; }));
    std::string got(256, '\0');
    REQUIRE(read_exactly(sp.peer.get(), got.data(), 256));
    CHECK(uint8_t(got[0]) == 255);
    CHECK(got.substr(1) == std::string(255, 'b'));
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("2-byte prefix: 65536 bytes cannot be expressed") {
    auto f = prefixed(2);
    auto o = fr.opts(&f);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    CHECK(duplex_conn_write_frame(c, big.data(), 65536, WriteCounter::cb, &wc) ==
          DUPLEX_EMSGSIZE);
    CHECK(loop.free() == 0);
    CHECK(wc.total.load() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("over max_frame") {
    auto f = prefixed(4, false, 100);
    auto o = fr.opts(&f);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    CHECK(duplex_conn_write_frame(c, big.data(), 101, WriteCounter::cb, &wc) == DUPLEX_EMSGSIZE);
    CHECK(duplex_conn_write_frame(c, big.data(), 100, WriteCounter::cb, &wc) == 0);
    REQUIRE(wait_until([&] { return wc.total.load() == 1; }));
    CHECK(wc.ok.load() == 1);
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("delimited payload containing the delimiter") {
    auto f = delimited("\n");
    auto o = fr.opts(&f);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    CHECK(duplex_conn_write_frame(c, "a\nb", 3, WriteCounter::cb, &wc) == DUPLEX_EINVAL);
    CHECK(duplex_conn_write_frame(c, "ab", 2, WriteCounter::cb, &wc) == 0);
    REQUIRE(wait_until([&] { return wc.total.load() == 1; }));
    char got[3];
    REQUIRE(read_exactly(sp.peer.get(), got, 3));
    CHECK(std::string(got, 3) == "ab\n");
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  SUBCASE("no framing: write_frame is a plain write") {
    auto o = fr.opts(nullptr);
    duplex_conn *c = adopt(loop, sp.ours, &o);
    CHECK(duplex_conn_write_frame(c, "raw", 3, WriteCounter::cb, &wc) == 0);
    REQUIRE(wait_until([&] { return wc.total.load() == 1; }));
    char got[3];
    REQUIRE(read_exactly(sp.peer.get(), got, 3));
    CHECK(std::string(got, 3) == "raw");
    CHECK(loop.free() == 0);
    CHECK(duplex_conn_unref(c) == 0);
  }
  CHECK(wc.failed.load() == 0);
}

TEST_CASE("pausing inside on_read holds the frames already decoded until resume") {
  Loop loop;
  Framed fr;
  auto sp = socket_pair();
  auto f = delimited("\n");
  auto o = fr.opts(&f);
  std::atomic<int> pause_rc{kUnset};
  fr.ev.read_hook = [&](duplex_conn *c, const uint8_t *d, size_t n) {
    size_t count;
    {
      std::lock_guard<std::mutex> lk(fr.mu);
      fr.msgs.emplace_back(reinterpret_cast<const char *>(d), n);
      count = fr.msgs.size();
    }
    if (count == 1)
      pause_rc = duplex_conn_pause(c);
  };
  duplex_conn *c = adopt(loop, sp.ours, &o);
  std::string wire = "one\ntwo\nthree\n";
  REQUIRE(write_all(sp.peer.get(), wire.data(), wire.size()) == 0);
  REQUIRE(fr.wait_count(1));
  std::this_thread::sleep_for(100ms); // nothing more may arrive while paused
  CHECK(pause_rc.load() == 0);
  CHECK(fr.count() == 1);
  REQUIRE(duplex_conn_resume(c) == 0);
  REQUIRE(fr.wait_count(3));
  CHECK(fr.get() == std::vector<std::string>{"one", "two", "three"});
  CHECK(fr.ev.order_errors.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("a listener's framing is copied: accepted conns frame even after the caller's "
          "struct changed") {
  TempDir dir;
  Loop loop;
  Framed fr;
  auto f = delimited("\n");
  auto co = fr.opts(&f);
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  lo.conn_opts = &co;
  duplex_listener *l = nullptr;
  std::string path = dir.file("framed.sock");
  REQUIRE(duplex_listener_unix(&l, loop, path.c_str(), &lo) == 0);
  // Scribble over the caller's copies.
  f.kind = 77;
  f.delimiter_len = 0;
  co.framing = nullptr;

  Fd cli(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(cli);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
  REQUIRE(::connect(cli.get(), reinterpret_cast<sockaddr *>(&sa), sizeof sa) == 0);
  std::string wire = "alpha\nbe";
  REQUIRE(write_all(cli.get(), wire.data(), wire.size()) == 0);
  REQUIRE(fr.wait_count(1));
  REQUIRE(write_all(cli.get(), "ta\n", 3) == 0);
  REQUIRE(fr.wait_count(2));
  CHECK(fr.get() == std::vector<std::string>{"alpha", "beta"});
  CHECK(loop.free() == 0);
  CHECK(duplex_listener_unref(l) == 0);
}

// Pipelined requests: the replies to every frame of one read go out as one
// write from on_read_batch.
namespace {
struct Pipeline {
  std::mutex mu;
  std::string pending;          // replies gathered in on_read
  std::vector<size_t> batches;  // frames per batch
  size_t in_batch = 0;
  std::atomic<int> writes{0};
  static void on_read(duplex_conn *, const void *d, size_t n, void *u) {
    auto *p = static_cast<Pipeline *>(u);
    std::lock_guard<std::mutex> lk(p->mu);
    std::string s(static_cast<const char *>(d), n);
    for (char &ch : s)
      ch = char(std::toupper(static_cast<unsigned char>(ch)));
    p->pending += s + "\n";
    p->in_batch++;
  }
  static void on_batch(duplex_conn *c, void *u) {
    auto *p = static_cast<Pipeline *>(u);
    std::string out;
    {
      std::lock_guard<std::mutex> lk(p->mu);
      out.swap(p->pending);
      p->batches.push_back(p->in_batch);
      p->in_batch = 0;
    }
    if (duplex_conn_write(c, out.data(), out.size(), nullptr, nullptr) == 0)
      p->writes++;
  }
};
} // namespace

TEST_CASE("on_read_batch follows the last frame of each read: one reply write per batch") {
  Loop loop;
  Pipeline pl;
  auto sp = socket_pair();
  auto f = delimited("\n");
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_read = Pipeline::on_read;
  cbs.on_read_batch = Pipeline::on_batch;
  duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
  o.cbs = &cbs;
  o.user = &pl;
  o.framing = &f;
  duplex_conn *c = adopt(loop, sp.ours, &o);
  // One send of three requests (one read on a socketpair) and a partial
  // fourth: one batch of three; the partial frame makes no batch.
  std::string wire = "get a\nget b\nget c\nget";
  REQUIRE(write_all(sp.peer.get(), wire.data(), wire.size()) == 0);
  std::string replies(18, '\0');
  REQUIRE(read_exactly(sp.peer.get(), replies.data(), replies.size()));
  CHECK(replies == "GET A\nGET B\nGET C\n");
  // The rest of the fourth frame plus a fifth: a second batch of two.
  std::string more = " d\nget e\n";
  REQUIRE(write_all(sp.peer.get(), more.data(), more.size()) == 0);
  std::string replies2(12, '\0');
  REQUIRE(read_exactly(sp.peer.get(), replies2.data(), replies2.size()));
  CHECK(replies2 == "GET D\nGET E\n");
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    CHECK(pl.batches == std::vector<size_t>{3, 2});
  }
  CHECK(wait_until([&] { return pl.writes.load() == 2; }));
  REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
}

TEST_CASE("on_read_batch without framing follows each chunk; callers with the 0.1 struct work") {
  Loop loop;
  Pipeline pl;
  auto sp = socket_pair();
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_read = Pipeline::on_read;
  cbs.on_read_batch = Pipeline::on_batch;
  duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
  o.cbs = &cbs;
  o.user = &pl;
  duplex_conn *c = adopt(loop, sp.ours, &o);
  REQUIRE(write_all(sp.peer.get(), "x", 1) == 0);
  std::string r(2, '\0');
  REQUIRE(read_exactly(sp.peer.get(), r.data(), r.size()));
  CHECK(r == "X\n");
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    CHECK(pl.batches == std::vector<size_t>{1});
  }
  REQUIRE(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  // A caller compiled against 0.1 passes the shorter structs: accepted, and
  // the callback it cannot have is never called.
  Pipeline old;
  duplex_conn_cbs cbs1 = DUPLEX_CONN_CBS_INIT;
  cbs1.size = offsetof(duplex_conn_cbs, on_read_batch);
  cbs1.on_read = Pipeline::on_read;
  duplex_conn_opts o1 = DUPLEX_CONN_OPTS_INIT;
  o1.size = offsetof(duplex_conn_opts, local_host);
  o1.cbs = &cbs1;
  o1.user = &old;
  auto sp1 = socket_pair();
  duplex_conn *c1 = adopt(loop, sp1.ours, &o1);
  REQUIRE(write_all(sp1.peer.get(), "y", 1) == 0);
  CHECK(wait_until([&] {
    std::lock_guard<std::mutex> lk(old.mu);
    return old.in_batch == 1;
  }));
  CHECK(old.writes.load() == 0);
  REQUIRE(duplex_conn_close(c1, DUPLEX_CLOSE_ABORT) == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_conn_unref(c) == 0);
  CHECK(duplex_conn_unref(c1) == 0);
}
