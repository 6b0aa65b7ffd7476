/* libFuzzer target: LENGTH_PREFIX framing. Input byte 0 picks the prefix
 * width (bits 0-1: 1, 2, 4, 8), little-endian (bit 2) and max_frame (bits
 * 3-7); the rest is the stream. See fuzz_framing.h for the checks. */
#include "fuzz_framing.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size < 1)
    return 0;
  static const unsigned widths[4] = {1, 2, 4, 8};
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_LENGTH_PREFIX;
  f.prefix_bytes = widths[data[0] & 3u];
  f.flags = (data[0] & 4u) ? DUPLEX_FRAME_LITTLE_ENDIAN : 0u;
  f.max_frame = fuzz_max(data[0] >> 3);
  FUZZ_CHECK(dpx_framing_check(&f) == 0);

  fuzz_outcome whole;
  fuzz_framing_check(&f, data + 1, size - 1, 1, &whole);
  fuzz_roundtrip(&f, &whole);
  free(whole.log.p);
  return 0;
}
