// Message framing codec (core/src/framing.c), white-box and loop-free: for a
// table of configurations, a generated stream of many frames (empty and
// max-size ones included) gives the same messages however it is chunked;
// oversize frames fail with DUPLEX_EMSGSIZE and deliver nothing of
// themselves; a partial frame at EOF is DUPLEX_EPROTO; encode round-trips.
//
// Every chunk is fed from its own exact-size heap copy, so a read past a
// chunk's end is caught under ASan.
#include "framing.h"

#include <doctest/doctest.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

// ---- custom framers ------------------------------------------------------

// "u16": a 2-byte big-endian payload length, then the payload; the header
// is stripped.
extern "C" long long
u16_framer(const void *data, size_t len, size_t *skip, void *user)
{
  auto *calls = static_cast<size_t *>(user);
  if (calls != nullptr)
    ++*calls;
  const auto *p = static_cast<const unsigned char *>(data);
  if (len < 2)
    return 0;
  size_t n = (size_t(p[0]) << 8) | p[1];
  if (len < 2 + n)
    return 0;
  *skip = 2;
  return (long long)(2 + n);
}

// "tlv": type byte (< 0x80, else DUPLEX_EPROTO), length byte, value; the
// whole frame is delivered (skip stays 0).
extern "C" long long
tlv_framer(const void *data, size_t len, size_t *, void *)
{
  const auto *p = static_cast<const unsigned char *>(data);
  if (len >= 1 && (p[0] & 0x80) != 0)
    return DUPLEX_EPROTO;
  if (len < 2)
    return 0;
  size_t n = p[1];
  return len < 2 + n ? 0 : (long long)(2 + n);
}

// ---- configurations ------------------------------------------------------

duplex_framing
delimited(const char *d, size_t dl, size_t max)
{
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_DELIMITED;
  memcpy(f.delimiter, d, dl);
  f.delimiter_len = unsigned(dl);
  f.max_frame = max;
  return f;
}

duplex_framing
prefixed(unsigned pb, bool little, size_t max)
{
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
  f.prefix_bytes = pb;
  f.flags = little ? DUPLEX_FRAME_LITTLE_ENDIAN : 0u;
  f.max_frame = max;
  return f;
}

duplex_framing
custom(duplex_frame_fn fn, size_t max, void *user = nullptr)
{
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_CUSTOM;
  f.custom = fn;
  f.custom_user = user;
  f.max_frame = max;
  return f;
}

struct Config {
  const char *name;
  duplex_framing f;
};

std::vector<Config>
configs()
{
  return {
      {"newline", delimited("\n", 1, 300)},
      {"crlf", delimited("\r\n", 2, 300)},
      {"self-overlapping \\0\\0", delimited("\0\0", 2, 300)},
      {"4-byte abab", delimited("abab", 4, 300)},
      {"newline, default 1 MiB max", delimited("\n", 1, 0)},
      {"prefix 1 BE", prefixed(1, false, 200)},
      {"prefix 1 LE", prefixed(1, true, 200)},
      {"prefix 2 BE", prefixed(2, false, 300)},
      {"prefix 2 LE", prefixed(2, true, 300)},
      {"prefix 4 BE", prefixed(4, false, 300)},
      {"prefix 4 LE", prefixed(4, true, 300)},
      {"prefix 8 BE", prefixed(8, false, 300)},
      {"prefix 8 LE", prefixed(8, true, 300)},
      {"custom u16 header", custom(u16_framer, 300)},
      {"custom tlv", custom(tlv_framer, 257)},
  };
}

size_t
max_of(const duplex_framing &f)
{
  return f.max_frame != 0 ? f.max_frame : DPX_FRAME_DEFAULT_MAX;
}

// The largest payload a configuration can carry.
size_t
largest(const duplex_framing &f)
{
  size_t m = max_of(f);
  if (f.kind == DUPLEX_FRAME_LENGTH_PREFIX && f.prefix_bytes == 1)
    m = m < 255 ? m : 255;
  if (f.kind == DUPLEX_FRAME_CUSTOM)
    m = f.custom == tlv_framer ? 257 : (m < 65535 ? m : 65535);
  return m;
}

// ---- wire encoding -------------------------------------------------------

struct Frame {
  std::string wire; // bytes on the wire
  std::string msg;  // what the reader delivers
};

// Wire bytes for @p msg, via dpx_framer_encode for the built-in kinds.
Frame
make_frame(const duplex_framing &f, const std::string &msg)
{
  Frame fr;
  fr.msg = msg;
  if (f.kind == DUPLEX_FRAME_CUSTOM) {
    if (f.custom == tlv_framer) {
      REQUIRE(msg.size() >= 2);
      fr.wire = msg;
    } else {
      REQUIRE(msg.size() <= 65535);
      fr.wire.push_back(char(msg.size() >> 8));
      fr.wire.push_back(char(msg.size() & 0xff));
      fr.wire += msg;
    }
    return fr;
  }
  dpx_framer tmp;
  dpx_framer_init(&tmp, &f);
  unsigned char hdr[8];
  size_t hl = 99, tl = 99;
  const unsigned char *trail = nullptr;
  REQUIRE(dpx_framer_encode(&tmp.cfg, msg.data(), msg.size(), hdr, &hl,
                            &trail, &tl) == 0);
  fr.wire.assign(reinterpret_cast<const char *>(hdr), hl);
  fr.wire += msg;
  if (tl > 0)
    fr.wire.append(reinterpret_cast<const char *>(trail), tl);
  dpx_framer_free(&tmp);
  return fr;
}

// A payload of @p n bytes. For DELIMITED it is drawn mostly from the
// delimiter's own bytes (near misses), then patched so that the first
// delimiter in payload ++ delimiter is the appended one.
std::string
payload(const duplex_framing &f, size_t n, std::mt19937 &rng)
{
  std::string s(n, '\0');
  if (f.kind == DUPLEX_FRAME_CUSTOM && f.custom == tlv_framer) {
    REQUIRE(n >= 2);
    s[0] = char(rng() % 0x80);
    s[1] = char(n - 2);
    for (size_t i = 2; i < n; i++)
      s[i] = char(rng());
    return s;
  }
  if (f.kind != DUPLEX_FRAME_DELIMITED) {
    for (auto &c : s)
      c = char(rng());
    return s;
  }
  const size_t dl = f.delimiter_len;
  const char alphabet[] = {'x', 'y', '\r', '\n', '\0', 'a', 'b'};
  for (size_t i = 0; i < n; i++) {
    s[i] = rng() % 3 == 0 ? char(f.delimiter[rng() % dl])
                          : alphabet[rng() % sizeof alphabet];
    if (i + 1 >= dl && memcmp(&s[i + 1 - dl], f.delimiter, dl) == 0)
      s[i] = 'x';
  }
  // The tail must not start a delimiter that the appended one completes.
  dpx_framer tmp;
  dpx_framer_init(&tmp, &f);
  unsigned char hdr[8];
  size_t hl, tl;
  const unsigned char *trail;
  for (size_t i = n; i-- > 0 &&
       dpx_framer_encode(&tmp.cfg, s.data(), n, hdr, &hl, &trail, &tl) ==
           DUPLEX_EINVAL;)
    s[i] = 'x';
  dpx_framer_free(&tmp);
  return s;
}

struct Stream {
  std::string bytes;
  std::vector<std::string> msgs;
  std::vector<size_t> ends; // offset just past each frame
};

void
add(Stream &st, const Frame &fr)
{
  st.bytes += fr.wire;
  st.msgs.push_back(fr.msg);
  st.ends.push_back(st.bytes.size());
}

// @p count frames: empty, 1-byte, max-size, max-1 and random sizes.
Stream
generate(const duplex_framing &f, size_t count, std::mt19937 &rng,
         size_t small_cap = SIZE_MAX)
{
  Stream st;
  size_t top = largest(f);
  size_t lo = (f.kind == DUPLEX_FRAME_CUSTOM && f.custom == tlv_framer) ? 2 : 0;
  for (size_t i = 0; i < count; i++) {
    size_t n;
    switch (i % 7) {
    case 0: n = lo; break;
    case 1: n = lo + 1; break;
    case 2: n = top; break;
    case 3: n = top - 1; break;
    default: n = lo + rng() % (top - lo + 1); break;
    }
    if (n > small_cap)
      n = lo + rng() % (small_cap - lo + 1);
    add(st, make_frame(f, payload(f, n, rng)));
  }
  return st;
}

// ---- feeding -------------------------------------------------------------

struct Result {
  std::vector<std::string> msgs;
  int rc = 0;  // first non-zero feed result, or 0
  int eof = 0; // dpx_framer_eof() when rc == 0
  bool operator==(const Result &o) const {
    return msgs == o.msgs && rc == o.rc && eof == o.eof;
  }
};

struct Sink {
  dpx_framer *fr = nullptr;
  Result *res = nullptr;
  const char *chunk = nullptr;
  size_t chunk_len = 0;
  size_t max = 0;
  size_t stop_after = SIZE_MAX;
  size_t in_chunk = 0, in_buf = 0, elsewhere = 0, oversize = 0;
};

int
emit(void *ctx, const char *msg, size_t len)
{
  auto *s = static_cast<Sink *>(ctx);
  if (len > s->max)
    s->oversize++;
  if (len == 0 || (msg >= s->chunk && msg + len <= s->chunk + s->chunk_len))
    s->in_chunk++;
  else if (s->fr->buf != nullptr && msg >= s->fr->buf &&
           msg + len <= s->fr->buf + s->fr->len)
    s->in_buf++;
  else
    s->elsewhere++;
  s->res->msgs.emplace_back(msg, len);
  return s->res->msgs.size() >= s->stop_after ? 1 : 0;
}

size_t
buf_limit(const duplex_framing &f)
{
  size_t m = max_of(f);
  switch (f.kind) {
  case DUPLEX_FRAME_DELIMITED: return m + f.delimiter_len;
  case DUPLEX_FRAME_LENGTH_PREFIX: return m + f.prefix_bytes;
  default: return m + DPX_FRAME_CUSTOM_SLACK + 1;
  }
}

struct Stats {
  size_t in_chunk = 0, in_buf = 0;
};

// Feed @p s cut at @p cuts (ascending offsets); checks the framer's
// invariants after every feed.
Result
run(const duplex_framing &f, const std::string &s,
    const std::vector<size_t> &cuts, Stats *stats = nullptr,
    size_t stop_after = SIZE_MAX)
{
  Result res;
  dpx_framer fr;
  dpx_framer_init(&fr, &f);
  Sink sink;
  sink.fr = &fr;
  sink.res = &res;
  sink.max = max_of(f);
  sink.stop_after = stop_after;
  size_t at = 0, bad_state = 0;
  for (size_t i = 0; i <= cuts.size(); i++) {
    size_t end = i < cuts.size() ? cuts[i] : s.size();
    std::vector<char> chunk(s.begin() + long(at), s.begin() + long(end));
    sink.chunk = chunk.data();
    sink.chunk_len = chunk.size();
    int r = dpx_framer_feed(&fr, chunk.data(), chunk.size(), emit, &sink);
    at = end;
    // Counted, not CHECKed per feed: byte-at-a-time runs feed ~1e5 times.
    if (fr.len > fr.cap || fr.cap > buf_limit(f) ||
        (fr.len == 0) != (fr.buf == nullptr)) // idle: no buffer
      bad_state++;
    if (r != 0 || res.msgs.size() >= stop_after) {
      res.rc = r;
      CHECK(fr.buf == nullptr);
      break;
    }
  }
  CHECK(bad_state == 0);
  if (res.rc == 0 && res.msgs.size() < stop_after)
    res.eof = dpx_framer_eof(&fr);
  dpx_framer_free(&fr);
  CHECK(sink.oversize == 0);
  CHECK(sink.elsewhere == 0);
  if (stats != nullptr) {
    stats->in_chunk += sink.in_chunk;
    stats->in_buf += sink.in_buf;
  }
  return res;
}

std::vector<size_t>
random_cuts(size_t n, std::mt19937 &rng, size_t max_chunk)
{
  std::vector<size_t> cuts;
  for (size_t at = 1 + rng() % max_chunk; at < n; at += 1 + rng() % max_chunk)
    cuts.push_back(at);
  return cuts;
}

std::vector<size_t>
every_byte(size_t n)
{
  std::vector<size_t> cuts;
  for (size_t i = 1; i < n; i++)
    cuts.push_back(i);
  return cuts;
}

Result
expect_all(const Stream &st)
{
  Result r;
  r.msgs = st.msgs;
  return r;
}

// Every chunking of @p s this suite uses gives @p want.
void
check_chunkings(const duplex_framing &f, const std::string &s,
                const Result &want, std::mt19937 &rng, bool every_split)
{
  CHECK(run(f, s, {}) == want);
  CHECK(run(f, s, every_byte(s.size())) == want);
  for (size_t max_chunk : {2u, 7u, 64u, 1000u, 70000u})
    for (int i = 0; i < 8; i++)
      CHECK(run(f, s, random_cuts(s.size(), rng, max_chunk)) == want);
  if (every_split)
    for (size_t i = 0; i <= s.size(); i++) {
      CAPTURE(i);
      REQUIRE(run(f, s, {i}) == want);
    }
}

} // namespace

// ---- tests ----------------------------------------------------------------

TEST_CASE("duplex_framing_init fills the defaults and rejects NULL") {
  duplex_framing f;
  memset(&f, 0x5a, sizeof f);
  REQUIRE(duplex_framing_init(&f) == 0);
  duplex_framing want = DUPLEX_FRAMING_INIT;
  CHECK(f.size == sizeof f);
  CHECK(f.kind == DUPLEX_FRAME_NONE);
  CHECK(f.flags == 0u);
  CHECK(f.max_frame == 0);
  CHECK((f.custom == nullptr));
  CHECK(f.custom_user == nullptr);
  CHECK(memcmp(f.delimiter, want.delimiter, sizeof f.delimiter) == 0);
  CHECK(duplex_framing_init(nullptr) == DUPLEX_EINVAL);
  CHECK(dpx_framing_check(&f) == 0);
}

TEST_CASE("dpx_framing_check validates size, kind, flags and kind fields") {
  CHECK(dpx_framing_check(nullptr) == 0);
  for (const auto &c : configs()) {
    CAPTURE(c.name);
    CHECK(dpx_framing_check(&c.f) == 0);
  }

  duplex_framing f = delimited("\n", 1, 0);
  f.size = sizeof f - 1;
  CHECK(dpx_framing_check(&f) == DUPLEX_EVERSION);
  f.size = 0;
  CHECK(dpx_framing_check(&f) == DUPLEX_EVERSION);

  // A newer, larger struct: accepted only with a zero tail.
  struct Bigger {
    duplex_framing f;
    unsigned char tail[16];
  } big;
  memset(&big, 0, sizeof big);
  big.f = delimited("\n", 1, 0);
  big.f.size = sizeof big;
  CHECK(dpx_framing_check(&big.f) == 0);
  big.tail[15] = 1;
  CHECK(dpx_framing_check(&big.f) == DUPLEX_EVERSION);

  f = delimited("\n", 1, 0);
  f.flags = 0x2u;
  CHECK(dpx_framing_check(&f) == DUPLEX_EINVAL);
  f.flags = 0;
  f.kind = 4;
  CHECK(dpx_framing_check(&f) == DUPLEX_EINVAL);
  f.kind = -1;
  CHECK(dpx_framing_check(&f) == DUPLEX_EINVAL);

  duplex_framing none = DUPLEX_FRAMING_INIT;
  CHECK(dpx_framing_check(&none) == 0);

  for (unsigned dl : {0u, 5u, 100u}) {
    f = delimited("\n", 1, 0);
    f.delimiter_len = dl;
    CHECK(dpx_framing_check(&f) == DUPLEX_EINVAL);
  }
  for (unsigned pb : {0u, 3u, 5u, 6u, 7u, 9u, 16u}) {
    CAPTURE(pb);
    f = prefixed(pb, false, 0);
    CHECK(dpx_framing_check(&f) == DUPLEX_EINVAL);
  }
  f = custom(nullptr, 0);
  CHECK(dpx_framing_check(&f) == DUPLEX_EINVAL);
}

TEST_CASE("dpx_framer_init copies the config and resolves max_frame") {
  duplex_framing f = delimited("\r\n", 2, 0);
  dpx_framer fr;
  memset(&fr, 0x5a, sizeof fr);
  dpx_framer_init(&fr, &f);
  CHECK(fr.cfg.max_frame == (size_t(1) << 20));
  CHECK(fr.cfg.size == sizeof(duplex_framing));
  CHECK(fr.buf == nullptr);
  CHECK(fr.len == 0);
  CHECK(fr.cap == 0);
  CHECK(dpx_framer_eof(&fr) == 0);
  dpx_framer_free(&fr);
  dpx_framer_free(&fr); // idempotent

  f.max_frame = 17;
  dpx_framer_init(&fr, &f);
  CHECK(fr.cfg.max_frame == 17);
  dpx_framer_free(&fr);
}

TEST_CASE("every configuration delivers the same messages however the stream "
          "is chunked") {
  std::mt19937 rng(12345);
  for (const auto &c : configs()) {
    CAPTURE(c.name);
    // A long stream with max-size frames: whole, byte at a time, random.
    bool huge = max_of(c.f) > 100000;
    Stream st = generate(c.f, huge ? 12 : 300, rng);
    Result want = expect_all(st);
    check_chunkings(c.f, st.bytes, want, rng, false);
    // A short one, split in two at every byte boundary.
    Stream small = generate(c.f, 40, rng, 40);
    check_chunkings(c.f, small.bytes, expect_all(small), rng, true);
  }
}

TEST_CASE("frames inside one chunk are delivered in place; only a tail is "
          "buffered, and an idle framer holds no buffer") {
  std::mt19937 rng(7);
  for (const auto &c : configs()) {
    CAPTURE(c.name);
    Stream st = generate(c.f, 50, rng, 100);
    Stats whole;
    CHECK(run(c.f, st.bytes, {}, &whole) == expect_all(st));
    CHECK(whole.in_buf == 0);
    CHECK(whole.in_chunk == st.msgs.size());

    // Cut only in the middle of every 5th frame: the others stay in place.
    std::vector<size_t> cuts;
    for (size_t i = 0; i < st.ends.size(); i += 5) {
      size_t start = i == 0 ? 0 : st.ends[i - 1];
      if (st.ends[i] - start >= 2)
        cuts.push_back(start + (st.ends[i] - start) / 2);
    }
    Stats split;
    CHECK(run(c.f, st.bytes, cuts, &split) == expect_all(st));
    CHECK(split.in_chunk + split.in_buf == st.msgs.size());
    CHECK(split.in_buf <= cuts.size());
  }
}

TEST_CASE("a frame over max_frame fails with DUPLEX_EMSGSIZE and nothing of "
          "it is delivered") {
  std::mt19937 rng(99);
  for (const auto &c : configs()) {
    CAPTURE(c.name);
    if (max_of(c.f) > 100000)
      continue;
    if (c.f.kind == DUPLEX_FRAME_CUSTOM && c.f.custom == tlv_framer)
      continue; // a tlv frame cannot exceed 257 bytes
    Stream st = generate(c.f, 30, rng, 60);
    size_t over = max_of(c.f) + 1;
    std::string big;
    if (c.f.kind == DUPLEX_FRAME_DELIMITED) {
      duplex_framing wide = c.f;
      wide.max_frame = over;
      big = make_frame(wide, payload(wide, over, rng)).wire;
    } else if (c.f.kind == DUPLEX_FRAME_LENGTH_PREFIX) {
      duplex_framing wide = c.f;
      wide.max_frame = over;
      if (c.f.prefix_bytes == 1) {
        // 255 does not fit a smaller max; claim 255 on a max of 200.
        big = make_frame(wide, std::string(201, 'z')).wire;
      } else {
        big = make_frame(wide, std::string(over, 'z')).wire;
      }
    } else {
      big = make_frame(c.f, std::string(over, 'z')).wire;
    }
    Stream tail = generate(c.f, 10, rng, 60);
    Result want;
    want.msgs = st.msgs;
    want.rc = DUPLEX_EMSGSIZE;
    check_chunkings(c.f, st.bytes + big + tail.bytes, want, rng, false);
    // Also when the stream ends right after the oversize frame.
    check_chunkings(c.f, st.bytes + big, want, rng, false);
  }
}

TEST_CASE("oversize is detected as early as possible") {
  std::mt19937 rng(5);
  SUBCASE("delimited: at max_frame + delimiter bytes without a delimiter") {
    duplex_framing f = delimited("\r\n", 2, 4);
    // max + dl - 1 bytes: "\n" would still end a 4-byte payload.
    CHECK(run(f, "xxxx\r", {}).rc == 0);
    CHECK(run(f, "xxxx\r", {}).eof == DUPLEX_EPROTO);
    Result ok = run(f, "xxxx\r\n", {});
    CHECK(ok.rc == 0);
    REQUIRE(ok.msgs.size() == 1);
    CHECK(ok.msgs[0] == "xxxx");
    CHECK(run(f, "xxxxx\r", {}).rc == DUPLEX_EMSGSIZE);
    CHECK(run(f, "xxxxx\r", every_byte(6)).rc == DUPLEX_EMSGSIZE);
    CHECK(run(f, "xxxxxx", every_byte(6)).rc == DUPLEX_EMSGSIZE);
    CHECK(run(f, "xxxxx", every_byte(5)).rc == 0);
    // A delimiter straddling the buffer and the chunk past the limit.
    CHECK(run(f, "xxxxx\r\n", {5}).rc == DUPLEX_EMSGSIZE);
    CHECK(run(f, "xxxxx\r\n", {6}).rc == DUPLEX_EMSGSIZE);
    duplex_framing nl = delimited("\n", 1, 3);
    CHECK(run(nl, "abcd", every_byte(4)).rc == DUPLEX_EMSGSIZE);
    CHECK(run(nl, "abc\n", every_byte(4)).msgs ==
          std::vector<std::string>{"abc"});
  }
  SUBCASE("length prefix: as soon as the prefix is complete") {
    for (unsigned pb : {1u, 2u, 4u, 8u})
      for (bool le : {false, true}) {
        CAPTURE(pb);
        CAPTURE(le);
        duplex_framing f = prefixed(pb, le, 10);
        std::string p(pb, '\0');
        p[le ? 0 : pb - 1] = 11; // a length of 11
        CHECK(run(f, p, {}).rc == DUPLEX_EMSGSIZE);
        CHECK(run(f, p, every_byte(pb)).rc == DUPLEX_EMSGSIZE);
        p[le ? 0 : pb - 1] = 10;
        CHECK(run(f, p, {}).rc == 0);
        CHECK(run(f, p + std::string(10, 'q'), every_byte(pb + 10)).msgs ==
              std::vector<std::string>{std::string(10, 'q')});
      }
    // Lengths that do not fit in size_t arithmetic.
    duplex_framing f8 = prefixed(8, false, 0);
    CHECK(run(f8, std::string(8, '\xff'), {}).rc == DUPLEX_EMSGSIZE);
    CHECK(run(f8, std::string("\x80\0\0\0\0\0\0\0", 8), {}).rc ==
          DUPLEX_EMSGSIZE);
  }
  SUBCASE("custom: when the framer still needs more past max_frame + slack") {
    size_t calls = 0;
    duplex_framing f = custom(u16_framer, 10, &calls);
    std::string hdr("\x10\x00", 2); // claims 4096 bytes
    std::string body(10 + DPX_FRAME_CUSTOM_SLACK - 2, 'b');
    CHECK(run(f, hdr + body, {}).rc == 0); // max + slack bytes: waiting
    CHECK(run(f, hdr + body + "b", {}).rc == DUPLEX_EMSGSIZE);
    CHECK(run(f, hdr + body + "b", every_byte(hdr.size() + body.size() + 1))
              .rc == DUPLEX_EMSGSIZE);
    // A whole frame over max_frame in one chunk fails too.
    std::string eleven("\x00\x0b" "01234567890", 13);
    CHECK(run(f, eleven, {}).rc == DUPLEX_EMSGSIZE);
    CHECK(run(f, eleven, every_byte(13)).rc == DUPLEX_EMSGSIZE);
    std::string ten("\x00\x0a" "0123456789", 12);
    CHECK(run(f, ten, every_byte(12)).msgs ==
          std::vector<std::string>{"0123456789"});
    CHECK(calls > 0);
  }
}

TEST_CASE("max_frame 0 means 1 MiB, fed one byte at a time in linear time") {
  duplex_framing f = delimited("\r\n", 2, 0);
  const size_t mib = size_t(1) << 20;
  std::string frame(mib, 'm');
  frame += "\r\n";
  // One byte per feed: a rescan of the buffer per byte would be ~5e11 steps
  // and hit the test timeout.
  dpx_framer fr;
  dpx_framer_init(&fr, &f);
  Result res;
  Sink sink;
  sink.fr = &fr;
  sink.res = &res;
  sink.max = mib;
  for (size_t i = 0; i < frame.size(); i++) {
    sink.chunk = &frame[i];
    sink.chunk_len = 1;
    REQUIRE(dpx_framer_feed(&fr, &frame[i], 1, emit, &sink) == 0);
  }
  REQUIRE(res.msgs.size() == 1);
  CHECK(res.msgs[0].size() == mib);
  CHECK(fr.buf == nullptr);
  // One more byte than the limit: EMSGSIZE.
  std::string over(mib + 1, 'm');
  CHECK(run(f, over + "\r\n", {}).rc == DUPLEX_EMSGSIZE);
  dpx_framer_free(&fr);

  // The prefix kind, byte by byte too, and its limit.
  duplex_framing p = prefixed(4, false, 0);
  Stream st;
  add(st, make_frame(p, std::string(mib, 'p')));
  std::mt19937 rng(1);
  CHECK(run(p, st.bytes, random_cuts(st.bytes.size(), rng, 3)) ==
        expect_all(st));
  std::string big("\x00\x10\x00\x01", 4); // 1 MiB + 1
  CHECK(run(p, big, {}).rc == DUPLEX_EMSGSIZE);
}

TEST_CASE("a partial frame at EOF is DUPLEX_EPROTO, whatever the chunking") {
  std::mt19937 rng(42);
  for (const auto &c : configs()) {
    CAPTURE(c.name);
    Stream st = generate(c.f, 12, rng, 30);
    for (size_t cut = 0; cut <= st.bytes.size(); cut++) {
      CAPTURE(cut);
      Result want;
      size_t i = 0;
      while (i < st.ends.size() && st.ends[i] <= cut)
        want.msgs.push_back(st.msgs[i++]);
      size_t last = i == 0 ? 0 : st.ends[i - 1];
      want.eof = cut == last ? 0 : DUPLEX_EPROTO;
      std::string s = st.bytes.substr(0, cut);
      REQUIRE(run(c.f, s, {}) == want);
      REQUIRE(run(c.f, s, random_cuts(s.size(), rng, 5)) == want);
    }
  }
}

TEST_CASE("emit returning non-zero stops at once and drops the buffer") {
  std::mt19937 rng(3);
  for (const auto &c : configs()) {
    CAPTURE(c.name);
    Stream st = generate(c.f, 20, rng, 50);
    for (size_t k : {size_t(1), size_t(2), size_t(7), size_t(20)}) {
      for (auto cuts : {std::vector<size_t>{}, every_byte(st.bytes.size()),
                        random_cuts(st.bytes.size(), rng, 9)}) {
        Result r = run(c.f, st.bytes, cuts, nullptr, k);
        CHECK(r.rc == 0);
        REQUIRE(r.msgs.size() == k);
        CHECK(std::equal(r.msgs.begin(), r.msgs.end(), st.msgs.begin()));
      }
    }
  }
}

TEST_CASE("a custom framer's errors close with its code, bad answers with "
          "DUPLEX_EPROTO") {
  // The tlv framer refuses a type byte >= 0x80 with DUPLEX_EPROTO.
  duplex_framing t = custom(tlv_framer, 0);
  Result r = run(t, std::string("\x01\x01" "a" "\x81", 4), {});
  CHECK(r.rc == DUPLEX_EPROTO);
  CHECK(r.msgs == std::vector<std::string>{std::string("\x01\x01" "a", 3)});

  struct Bad {
    static long long code(const void *, size_t, size_t *, void *) {
      return DUPLEX_ECONNRESET;
    }
    static long long huge_neg(const void *, size_t, size_t *, void *) {
      return LLONG_MIN;
    }
    static long long too_long(const void *, size_t len, size_t *, void *) {
      return (long long)len + 1;
    }
    static long long llong_max(const void *, size_t, size_t *, void *) {
      return LLONG_MAX;
    }
    static long long bad_skip(const void *, size_t len, size_t *skip,
                              void *) {
      *skip = len + 1;
      return (long long)len;
    }
    static long long all(const void *, size_t len, size_t *skip, void *) {
      *skip = len; // an empty message
      return (long long)len;
    }
  };
  CHECK(run(custom(Bad::code, 0), "abc", {}).rc == DUPLEX_ECONNRESET);
  CHECK(run(custom(Bad::code, 0), "abc", {1}).rc == DUPLEX_ECONNRESET);
  CHECK(run(custom(Bad::huge_neg, 0), "abc", {}).rc == DUPLEX_EPROTO);
  CHECK(run(custom(Bad::too_long, 0), "abc", {}).rc == DUPLEX_EPROTO);
  CHECK(run(custom(Bad::too_long, 0), "abc", {1, 2}).rc == DUPLEX_EPROTO);
  CHECK(run(custom(Bad::llong_max, 0), "abc", {}).rc == DUPLEX_EPROTO);
  CHECK(run(custom(Bad::bad_skip, 0), "abc", {}).rc == DUPLEX_EPROTO);
  Result e = run(custom(Bad::all, 0), "abc", {});
  CHECK(e.rc == 0);
  CHECK(e.msgs == std::vector<std::string>{""});
}

TEST_CASE("encode writes the prefix in the configured byte order") {
  const std::string payload(0x0102, 'p');
  struct Want {
    unsigned pb;
    bool le;
    std::string hdr;
  } wants[] = {
      {2, false, std::string("\x01\x02", 2)},
      {2, true, std::string("\x02\x01", 2)},
      {4, false, std::string("\x00\x00\x01\x02", 4)},
      {4, true, std::string("\x02\x01\x00\x00", 4)},
      {8, false, std::string("\0\0\0\0\0\0\x01\x02", 8)},
      {8, true, std::string("\x02\x01\0\0\0\0\0\0", 8)},
  };
  for (const auto &w : wants) {
    CAPTURE(w.pb);
    CAPTURE(w.le);
    duplex_framing f = prefixed(w.pb, w.le, 0);
    unsigned char hdr[8];
    size_t hl = 0, tl = 1;
    const unsigned char *trail = hdr;
    REQUIRE(dpx_framer_encode(&f, payload.data(), payload.size(), hdr, &hl,
                              &trail, &tl) == 0);
    CHECK(std::string(reinterpret_cast<char *>(hdr), hl) == w.hdr);
    CHECK(tl == 0);
    CHECK(trail == nullptr);
  }
  duplex_framing one = prefixed(1, false, 0);
  unsigned char hdr[8];
  size_t hl, tl;
  const unsigned char *trail;
  CHECK(dpx_framer_encode(&one, payload.data(), 255, hdr, &hl, &trail,
                          &tl) == 0);
  CHECK(hl == 1);
  CHECK(hdr[0] == 255);
  CHECK(dpx_framer_encode(&one, payload.data(), 256, hdr, &hl, &trail,
                          &tl) == DUPLEX_EMSGSIZE);
  duplex_framing two = prefixed(2, true, 100000);
  std::string big(65536, 'b');
  CHECK(dpx_framer_encode(&two, big.data(), 65535, hdr, &hl, &trail, &tl) ==
        0);
  CHECK(dpx_framer_encode(&two, big.data(), 65536, hdr, &hl, &trail, &tl) ==
        DUPLEX_EMSGSIZE);
}

TEST_CASE("encode refuses payloads the peer could not parse back") {
  unsigned char hdr[8];
  size_t hl, tl;
  const unsigned char *trail;
  auto enc = [&](const duplex_framing &f, const std::string &s) {
    return dpx_framer_encode(&f, s.data(), s.size(), hdr, &hl, &trail, &tl);
  };
  duplex_framing nl = delimited("\n", 1, 8);
  CHECK(enc(nl, "") == 0);
  CHECK(hl == 0);
  CHECK(tl == 1);
  CHECK(trail[0] == '\n');
  CHECK(enc(nl, "12345678") == 0);
  CHECK(enc(nl, "123456789") == DUPLEX_EMSGSIZE);
  CHECK(enc(nl, "a\nb") == DUPLEX_EINVAL);
  CHECK(enc(nl, "\n") == DUPLEX_EINVAL);

  duplex_framing crlf = delimited("\r\n", 2, 0);
  CHECK(enc(crlf, "a\rb\nc") == 0);
  CHECK(enc(crlf, "a\r") == 0); // "a\r\r\n": the first "\r\n" is ours
  CHECK(enc(crlf, "a\r\nb") == DUPLEX_EINVAL);
  CHECK(enc(crlf, "\r\n") == DUPLEX_EINVAL);

  duplex_framing aa = delimited("aa", 2, 0);
  CHECK(enc(aa, "xa") == DUPLEX_EINVAL); // "xaaa" would end after "x"
  CHECK(enc(aa, "ax") == 0);
  duplex_framing abab = delimited("abab", 4, 0);
  CHECK(enc(abab, "xab") == DUPLEX_EINVAL); // "xab" + "abab"
  CHECK(enc(abab, "xaba") == 0);            // "xabaabab"
  CHECK(enc(abab, "aba") == 0);             // "abaabab": ours, at 3

  duplex_framing none = DUPLEX_FRAMING_INIT;
  CHECK(enc(none, std::string(5000000, 'n')) == 0);
  CHECK(hl == 0);
  CHECK(tl == 0);
  duplex_framing cu = custom(u16_framer, 10);
  CHECK(enc(cu, std::string(10 + DPX_FRAME_CUSTOM_SLACK, 'c')) == 0);
  CHECK(enc(cu, std::string(11 + DPX_FRAME_CUSTOM_SLACK, 'c')) ==
        DUPLEX_EMSGSIZE);

  duplex_framing p = prefixed(4, false, 0);
  CHECK(dpx_framer_encode(&p, nullptr, 0, hdr, &hl, &trail, &tl) == 0);
  CHECK(hl == 4);
  CHECK(dpx_framer_encode(&p, nullptr, (size_t(1) << 20) + 1, hdr, &hl,
                          &trail, &tl) == DUPLEX_EMSGSIZE);
}

TEST_CASE("encoded frames round-trip through feed") {
  std::mt19937 rng(2024);
  for (const auto &c : configs()) {
    CAPTURE(c.name);
    if (c.f.kind == DUPLEX_FRAME_CUSTOM)
      continue;
    // Whatever a reader emits, the writer accepts and the reader gets back.
    Stream st = generate(c.f, 60, rng, 200);
    Result first = run(c.f, st.bytes, random_cuts(st.bytes.size(), rng, 13));
    REQUIRE(first == expect_all(st));
    Stream again;
    for (const auto &m : first.msgs)
      add(again, make_frame(c.f, m));
    CHECK(again.bytes == st.bytes);
    CHECK(run(c.f, again.bytes, every_byte(again.bytes.size())) ==
          expect_all(st));
  }
}
