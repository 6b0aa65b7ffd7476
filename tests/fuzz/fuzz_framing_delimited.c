/* libFuzzer target: DELIMITED framing. Input byte 0 picks the delimiter
 * length (bits 0-1), whether its bytes come from a small alphabet (bit 2;
 * then bytes 1-4 pick from "\n\r\0a", so random data hits them often) and
 * max_frame (bits 3-7); bytes 1-4 are the delimiter; the rest is the
 * stream. See fuzz_framing.h for the checks. */
#include "fuzz_framing.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size < 5)
    return 0;
  static const unsigned char small[4] = {'\n', '\r', '\0', 'a'};
  duplex_framing f = DUPLEX_FRAMING_INIT;
  f.kind = DUPLEX_FRAME_DELIMITED;
  f.delimiter_len = 1u + (data[0] & 3u);
  for (int i = 0; i < 4; i++)
    f.delimiter[i] = (data[0] & 4u) ? small[data[1 + i] & 3u] : data[1 + i];
  f.max_frame = fuzz_max(data[0] >> 3);
  FUZZ_CHECK(dpx_framing_check(&f) == 0);

  fuzz_outcome whole;
  fuzz_framing_check(&f, data + 5, size - 5, 1, &whole);
  fuzz_roundtrip(&f, &whole);
  free(whole.log.p);
  return 0;
}
