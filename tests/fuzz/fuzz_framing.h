/* Shared harness for the framing fuzz targets (libFuzzer, clang only).
 *
 * Each target derives a duplex_framing from the first input bytes and hands
 * the rest to fuzz_framing_check(), which feeds it once whole, once in
 * chunks whose sizes come from the data, and (for short inputs) one byte
 * at a time, and traps unless every run emits the same message sequence
 * with the same result. It also traps on a message over max_frame, on a
 * buffer left behind after an error, and on a buffer held while idle. Each
 * chunk is fed from its own exact-size heap copy so ASan sees overreads. */
#ifndef FUZZ_FRAMING_H
#define FUZZ_FRAMING_H

#include "framing.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(cond)                                                     \
  do {                                                                       \
    if (!(cond))                                                             \
      __builtin_trap();                                                      \
  } while (0)

/* The emitted messages, serialized as (8-byte length, bytes)*. */
typedef struct fuzz_log {
  unsigned char *p;
  size_t len, cap;
  size_t count;      /* messages emitted */
  size_t max;        /* resolved max_frame */
  size_t stop_after; /* emit returns 1 once count reaches it */
} fuzz_log;

typedef struct fuzz_outcome {
  fuzz_log log;
  int rc;  /* first non-zero feed result */
  int eof; /* dpx_framer_eof() if the stream was fed to its end */
} fuzz_outcome;

static void
fuzz_log_put(fuzz_log *l, const void *p, size_t n)
{
  if (l->len + n > l->cap) {
    size_t cap = l->cap ? l->cap : 256;
    while (cap < l->len + n)
      cap *= 2;
    l->p = realloc(l->p, cap);
    FUZZ_CHECK(l->p != NULL);
    l->cap = cap;
  }
  if (n > 0)
    memcpy(l->p + l->len, p, n);
  l->len += n;
}

static int
fuzz_emit(void *ctx, const char *msg, size_t len)
{
  fuzz_log *l = ctx;
  FUZZ_CHECK(len <= l->max);
  uint64_t n = len;
  fuzz_log_put(l, &n, sizeof n);
  fuzz_log_put(l, msg, len);
  l->count++;
  return l->count >= l->stop_after;
}

/* Feed data[0 .. n) cut before each offset in cuts (ascending). */
static void
fuzz_run(const duplex_framing *cfg, const uint8_t *data, size_t n,
         const size_t *cuts, size_t ncuts, size_t stop_after,
         fuzz_outcome *out)
{
  dpx_framer fr;
  dpx_framer_init(&fr, cfg);
  memset(out, 0, sizeof *out);
  out->log.max = fr.cfg.max_frame;
  out->log.stop_after = stop_after;
  size_t at = 0;
  int ended = 1;
  for (size_t i = 0; i <= ncuts; i++) {
    size_t end = i < ncuts ? cuts[i] : n;
    size_t clen = end - at;
    char *chunk = malloc(clen ? clen : 1);
    FUZZ_CHECK(chunk != NULL);
    if (clen > 0)
      memcpy(chunk, data + at, clen);
    int r = dpx_framer_feed(&fr, chunk, clen, fuzz_emit, &out->log);
    free(chunk);
    at = end;
    FUZZ_CHECK(fr.len <= fr.cap);
    FUZZ_CHECK((fr.len == 0) == (fr.buf == NULL)); /* idle: no buffer */
    if (r != 0 || out->log.count >= stop_after) {
      FUZZ_CHECK(r <= 0);
      FUZZ_CHECK(fr.buf == NULL); /* dropped on error or stop */
      out->rc = r;
      ended = 0;
      break;
    }
  }
  out->eof = ended ? dpx_framer_eof(&fr) : 0;
  if (ended)
    FUZZ_CHECK((out->eof == 0) == (fr.len == 0));
  dpx_framer_free(&fr);
}

static void
fuzz_same(const fuzz_outcome *a, const fuzz_outcome *b)
{
  FUZZ_CHECK(a->rc == b->rc);
  FUZZ_CHECK(a->eof == b->eof);
  FUZZ_CHECK(a->log.count == b->log.count);
  FUZZ_CHECK(a->log.len == b->log.len);
  FUZZ_CHECK(a->log.len == 0 || memcmp(a->log.p, b->log.p, a->log.len) == 0);
}

static uint64_t
fuzz_hash(const uint8_t *d, size_t n)
{
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (size_t i = 0; i < n; i++)
    h = (h ^ d[i]) * 1099511628211ull;
  return h;
}

static uint64_t
fuzz_next(uint64_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

/* Chunk sizes 1 .. 2^k from a generator seeded by the data. */
static size_t
fuzz_cuts(const uint8_t *d, size_t n, size_t *cuts)
{
  uint64_t s = fuzz_hash(d, n) | 1;
  unsigned k = 1 + (unsigned)(fuzz_next(&s) % 9);
  size_t nc = 0;
  for (size_t at = 0;;) {
    at += 1 + (size_t)(fuzz_next(&s) % ((uint64_t)1 << k));
    if (at >= n)
      break;
    cuts[nc++] = at;
  }
  return nc;
}

/* max_frame choices for a 5-bit selector; 0 is the 1 MiB default. */
static size_t
fuzz_max(unsigned sel)
{
  static const size_t t[32] = {0,   1,   2,   3,   4,    5,    6,    7,
                               8,   9,   12,  15,  16,   17,   31,   32,
                               33,  63,  64,  65,  100,  127,  128,  255,
                               256, 257, 500, 1000, 1024, 4095, 4096, 65536};
  return t[sel & 31];
}

/* Every comparison; @p compare is 0 for a framer that is not chunk-stable
 * (then only the invariants inside fuzz_run/fuzz_emit are checked). Returns
 * the whole-feed outcome in @p whole (caller frees whole->log.p). */
static void
fuzz_framing_check(const duplex_framing *cfg, const uint8_t *d, size_t n,
                   int compare, fuzz_outcome *whole)
{
  size_t *cuts = malloc((n + 1) * sizeof *cuts);
  FUZZ_CHECK(cuts != NULL);
  fuzz_outcome o;

  fuzz_run(cfg, d, n, NULL, 0, SIZE_MAX, whole);

  size_t nc = fuzz_cuts(d, n, cuts);
  fuzz_run(cfg, d, n, cuts, nc, SIZE_MAX, &o);
  if (compare)
    fuzz_same(whole, &o);
  free(o.log.p);

  if (n <= 4096) {
    for (size_t i = 1; i < n; i++)
      cuts[i - 1] = i;
    fuzz_run(cfg, d, n, cuts, n ? n - 1 : 0, SIZE_MAX, &o);
    if (compare)
      fuzz_same(whole, &o);
    free(o.log.p);
  }

  /* emit asking to stop after k messages: the same k, everywhere. */
  if (whole->log.count > 0) {
    size_t k = 1 + (size_t)(fuzz_hash(d, n) % whole->log.count);
    fuzz_outcome a;
    fuzz_run(cfg, d, n, NULL, 0, k, &a);
    nc = fuzz_cuts(d, n, cuts);
    fuzz_run(cfg, d, n, cuts, nc, k, &o);
    if (compare) {
      FUZZ_CHECK(a.rc == 0 && a.log.count == k);
      fuzz_same(&a, &o);
      FUZZ_CHECK(a.log.len <= whole->log.len &&
                 memcmp(a.log.p, whole->log.p, a.log.len) == 0);
    }
    free(a.log.p);
    free(o.log.p);
  }
  free(cuts);
}

/* Re-encode every message of @p whole and feed the result: the same
 * messages must come back, with no error and nothing left over. */
static inline void
fuzz_roundtrip(const duplex_framing *cfg, const fuzz_outcome *whole)
{
  dpx_framer fr;
  dpx_framer_init(&fr, cfg);
  fuzz_log wire = {0};
  for (size_t at = 0; at < whole->log.len;) {
    uint64_t len;
    memcpy(&len, whole->log.p + at, sizeof len);
    at += sizeof len;
    unsigned char hdr[8];
    size_t hl = 0, tl = 0;
    const unsigned char *trail = NULL;
    FUZZ_CHECK(dpx_framer_encode(&fr.cfg, whole->log.p + at, (size_t)len,
                                 hdr, &hl, &trail, &tl) == 0);
    fuzz_log_put(&wire, hdr, hl);
    fuzz_log_put(&wire, whole->log.p + at, (size_t)len);
    fuzz_log_put(&wire, trail, tl);
    at += (size_t)len;
  }
  dpx_framer_free(&fr);
  fuzz_outcome back;
  fuzz_run(cfg, wire.p ? wire.p : (const uint8_t *)"", wire.len, NULL, 0,
           SIZE_MAX, &back);
  FUZZ_CHECK(back.rc == 0 && back.eof == 0);
  FUZZ_CHECK(back.log.len == whole->log.len);
  FUZZ_CHECK(back.log.len == 0 ||
             memcmp(back.log.p, whole->log.p, back.log.len) == 0);
  free(back.log.p);
  free(wire.p);
}

#endif /* FUZZ_FRAMING_H */
