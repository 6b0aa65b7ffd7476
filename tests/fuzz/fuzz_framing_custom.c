/* libFuzzer target: CUSTOM framing, with a family of framers configured by
 * the input. Byte 0: max_frame (bits 0-4), "length includes the header"
 * (bit 5), little-endian length (bit 6), buggy framer (bit 7). Byte 1:
 * header size 1..4 (bits 0-1), length width 1..2 (bit 2, capped at the
 * header), length offset (bits 3-4, capped), skip mode (bits 5-6: 0, the
 * header, half the frame, the whole frame), magic check (bit 7). Byte 2:
 * the magic first byte. The rest is the stream.
 *
 * A well-behaved framer (pure; its answer depends only on the bytes of the
 * frame it reports) must give the same messages and result however the
 * stream is chunked. The buggy one sometimes claims more bytes than it was
 * shown, a skip past the frame, or an error from a huge negative value:
 * then only the invariants (no crash, no oversize message, no leftover
 * buffer after an error) are checked. */
#include "fuzz_framing.h"

#include <limits.h>

typedef struct params {
  unsigned h, w, o, skipmode;
  int incl, le, magic, buggy;
  unsigned char magic_byte;
} params;

static long long
framer(const void *data, size_t len, size_t *skip, void *user)
{
  const params *c = user;
  const uint8_t *p = data;
  if (c->buggy) {
    switch ((p[0] ^ len) & 15u) {
    case 0:
      return (long long)len + 1; /* more than shown */
    case 1:
      *skip = len + 1; /* a skip past the frame */
      return (long long)len;
    case 2:
      return LLONG_MIN;
    default:
      break;
    }
  }
  if (c->magic && p[0] != c->magic_byte)
    return -1000; /* any negative code closes with it */
  if (len < c->h)
    return 0;
  uint64_t v = 0;
  for (unsigned i = 0; i < c->w; i++) {
    unsigned at = c->le ? c->o + c->w - 1 - i : c->o + i;
    v = (v << 8) | p[at];
  }
  uint64_t frame = c->incl ? v : c->h + v;
  if (frame < c->h)
    return -2000; /* shorter than its own header */
  if (len < frame)
    return 0;
  switch (c->skipmode) {
  case 0: *skip = 0; break;
  case 1: *skip = c->h; break;
  case 2: *skip = (size_t)frame / 2; break;
  default: *skip = (size_t)frame; break;
  }
  return (long long)frame;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size < 3)
    return 0;
  params c;
  c.h = 1u + (data[1] & 3u);
  c.w = (data[1] & 4u) ? 2u : 1u;
  if (c.w > c.h)
    c.w = c.h;
  c.o = (data[1] >> 3) & 3u;
  if (c.o > c.h - c.w)
    c.o = c.h - c.w;
  c.skipmode = (data[1] >> 5) & 3u;
  c.magic = (data[1] & 0x80u) != 0;
  c.incl = (data[0] & 0x20u) != 0;
  c.le = (data[0] & 0x40u) != 0;
  c.buggy = (data[0] & 0x80u) != 0;
  c.magic_byte = data[2];

  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_CUSTOM;
  f.custom = framer;
  f.custom_user = &c;
  f.max_frame = fuzz_max(data[0] & 31u);
  FUZZ_CHECK(dpx_framing_check(&f) == 0);

  fuzz_outcome whole;
  fuzz_framing_check(&f, data + 3, size - 3, !c.buggy, &whole);
  free(whole.log.p);
  return 0;
}
