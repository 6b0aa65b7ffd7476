/* Message framing codec (see framing.h).
 *
 * The stream is cut into frames in order. While no partial frame is
 * buffered, frames are found directly in the caller's chunk and emitted
 * from it without copying; only the incomplete tail of a chunk is copied
 * into fr->buf. While a partial frame is buffered, just enough of the next
 * chunk is appended to finish it (for CUSTOM, whose framer does not say
 * how much it needs, the chunk is appended up to the size limit and the
 * bytes past the frame are given back), then the rest of that chunk is
 * again read in place. Every decision depends only on the stream bytes and
 * never on where a chunk ends, so any split of the stream gives the same
 * messages and the same error. */
#include "framing.h"

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*dpx_emit_fn)(void *ctx, const char *msg, size_t len);

/* Internal step results, besides 0 (progress made) and negative errors. */
enum { STEP_MORE = 1, /* the rest of the chunk is buffered */
       STEP_STOP = 2  /* emit asked to stop */ };

#define NOT_FOUND ((size_t)-1)

int
duplex_framing_init(duplex_framing *framing)
{
  if (framing == NULL)
    return DUPLEX_EINVAL;
  const duplex_framing init = DUPLEX_FRAMING_INIT;
  *framing = init;
  return 0;
}

/* The same rule as dpx_check_size() in error.c, repeated here so this file
 * needs nothing but <duplex.h>: a smaller struct is from an older header we
 * do not support; a larger one is accepted when its unknown tail is zero. */
static int
check_size(const duplex_framing *f)
{
  if (f->size < sizeof *f)
    return DUPLEX_EVERSION;
  if (f->size > sizeof *f) {
    const unsigned char *b = (const unsigned char *)f;
    if (f->size > 4096)
      return DUPLEX_EVERSION;
    for (size_t i = sizeof *f; i < f->size; i++)
      if (b[i] != 0)
        return DUPLEX_EVERSION;
  }
  return 0;
}

int
dpx_framing_check(const duplex_framing *f)
{
  if (f == NULL)
    return 0;
  int r = check_size(f);
  if (r != 0)
    return r;
  if ((f->flags & ~DUPLEX_FRAME_FLAGS_ALL) != 0)
    return DUPLEX_EINVAL;
  switch (f->kind) {
  case DUPLEX_FRAME_NONE:
    return 0;
  case DUPLEX_FRAME_DELIMITED:
    return f->delimiter_len >= 1 && f->delimiter_len <= 4 ? 0 : DUPLEX_EINVAL;
  case DUPLEX_FRAME_LENGTH_PREFIX:
    switch (f->prefix_bytes) {
    case 1: case 2: case 4: case 8:
      return 0;
    default:
      return DUPLEX_EINVAL;
    }
  case DUPLEX_FRAME_CUSTOM:
    return f->custom != NULL ? 0 : DUPLEX_EINVAL;
  default:
    return DUPLEX_EINVAL;
  }
}

/* 0 means the default. Anything over SIZE_MAX / 2 could never be buffered
 * anyway; capping it keeps every "max_frame + header" sum from wrapping. */
static size_t
resolve_max(size_t max_frame)
{
  if (max_frame == 0)
    return DPX_FRAME_DEFAULT_MAX;
  return max_frame > SIZE_MAX / 2 ? SIZE_MAX / 2 : max_frame;
}

void
dpx_framer_init(dpx_framer *fr, const duplex_framing *f)
{
  memset(fr, 0, sizeof *fr);
  memcpy(&fr->cfg, f, sizeof fr->cfg); /* f->size >= sizeof: checked */
  fr->cfg.size = sizeof fr->cfg;
  fr->cfg.max_frame = resolve_max(f->max_frame);
}

void
dpx_framer_free(dpx_framer *fr)
{
  free(fr->buf);
  fr->buf = NULL;
  fr->len = 0;
  fr->cap = 0;
}

int
dpx_framer_eof(const dpx_framer *fr)
{
  return fr->len != 0 ? DUPLEX_EPROTO : 0;
}

/* ---- buffer ------------------------------------------------------------ */

/* The most fr->buf ever holds: an incomplete frame is always shorter. */
static size_t
buf_limit(const dpx_framer *fr)
{
  size_t max = fr->cfg.max_frame;
  switch (fr->cfg.kind) {
  case DUPLEX_FRAME_DELIMITED:
    return max + fr->cfg.delimiter_len;
  case DUPLEX_FRAME_LENGTH_PREFIX:
    return max + fr->cfg.prefix_bytes;
  default:
    return max + DPX_FRAME_CUSTOM_SLACK + 1;
  }
}

static int
append(dpx_framer *fr, const char *p, size_t n)
{
  if (n == 0)
    return 0;
  size_t need = fr->len + n;
  if (need > fr->cap) {
    /* Geometric growth, but never past the largest incomplete frame: a
     * peer cannot make us reserve memory it has not sent. */
    size_t limit = buf_limit(fr);
    size_t cap = fr->cap < 256 ? 256 : fr->cap;
    while (cap < need && cap <= SIZE_MAX / 2)
      cap *= 2;
    if (cap < need)
      cap = need;
    if (cap > limit && need <= limit)
      cap = limit;
    char *b = realloc(fr->buf, cap);
    if (b == NULL)
      return DUPLEX_ENOMEM;
    fr->buf = b;
    fr->cap = cap;
  }
  memcpy(fr->buf + fr->len, p, n);
  fr->len += n;
  return 0;
}

static void
drop(dpx_framer *fr)
{
  dpx_framer_free(fr);
}

/* A buffered frame was delivered. Keep a small buffer for the tail this
 * chunk may leave; dpx_framer_feed() frees it if nothing is left. */
static void
consumed_buffer(dpx_framer *fr)
{
  fr->len = 0;
  if (fr->cap > 4096)
    drop(fr);
}

/* ---- DELIMITED --------------------------------------------------------- */

/* Start of the first delimiter wholly inside p[0 .. n), or NOT_FOUND. */
static size_t
find_delim(const unsigned char *p, size_t n, const unsigned char *d,
           size_t dl)
{
  if (n < dl)
    return NOT_FOUND;
  size_t last = n - dl; /* last possible start */
  size_t i = 0;
  while (i <= last) {
    const unsigned char *q = memchr(p + i, d[0], last - i + 1);
    if (q == NULL)
      return NOT_FOUND;
    i = (size_t)(q - p);
    if (memcmp(q + 1, d + 1, dl - 1) == 0)
      return i;
    i++;
  }
  return NOT_FOUND;
}

static int
delim_direct(dpx_framer *fr, const char *data, size_t len, size_t *pos,
             dpx_emit_fn emit, void *ctx)
{
  size_t dl = fr->cfg.delimiter_len, max = fr->cfg.max_frame;
  const char *p = data + *pos;
  size_t rem = len - *pos;
  /* Only a delimiter ending within max + dl bytes can end a legal frame. */
  size_t win = rem < max + dl ? rem : max + dl;
  size_t k = find_delim((const unsigned char *)p, win, fr->cfg.delimiter, dl);
  if (k == NOT_FOUND) {
    if (rem >= max + dl)
      return DUPLEX_EMSGSIZE;
    int r = append(fr, p, rem);
    if (r != 0)
      return r;
    *pos = len;
    return STEP_MORE;
  }
  *pos += k + dl;
  return emit(ctx, p, k) != 0 ? STEP_STOP : 0;
}

/* fr->len > 0 and fr->buf holds no whole delimiter (else it would have
 * ended a frame), so the first delimiter starts in its last dl - 1 bytes
 * or in the new chunk. Resuming there keeps byte-at-a-time feeds linear. */
static int
delim_buffered(dpx_framer *fr, const char *data, size_t len, size_t *pos,
               dpx_emit_fn emit, void *ctx)
{
  size_t dl = fr->cfg.delimiter_len, max = fr->cfg.max_frame;
  const unsigned char *d = fr->cfg.delimiter;
  const unsigned char *b = (const unsigned char *)fr->buf;
  const unsigned char *in = (const unsigned char *)data + *pos;
  size_t blen = fr->len, n = len - *pos;
  size_t c = NOT_FOUND; /* payload length: where the delimiter starts */

  /* A delimiter straddling the buffer and the chunk. */
  for (size_t s = blen >= dl - 1 ? blen - (dl - 1) : 0; s < blen; s++) {
    if (s + dl > blen + n)
      break;
    size_t j = 0;
    while (j < dl && (s + j < blen ? b[s + j] : in[s + j - blen]) == d[j])
      j++;
    if (j == dl) {
      c = s;
      break;
    }
  }
  if (c == NOT_FOUND) {
    /* blen < max + dl, or the buffer would have failed already. */
    size_t room = max + dl - blen;
    size_t k = find_delim(in, n < room ? n : room, d, dl);
    if (k == NOT_FOUND) {
      if (blen + n >= max + dl)
        return DUPLEX_EMSGSIZE;
      int r = append(fr, data + *pos, n);
      if (r != 0)
        return r;
      *pos = len;
      return STEP_MORE;
    }
    c = blen + k;
  }
  if (c > max)
    return DUPLEX_EMSGSIZE;
  if (c > blen) {
    int r = append(fr, data + *pos, c - blen);
    if (r != 0)
      return r;
  }
  *pos += c + dl - blen;
  int stop = emit(ctx, fr->buf, c);
  consumed_buffer(fr);
  return stop != 0 ? STEP_STOP : 0;
}

/* ---- LENGTH_PREFIX ----------------------------------------------------- */

static uint64_t
decode_prefix(const dpx_framer *fr, const unsigned char *p)
{
  size_t pb = fr->cfg.prefix_bytes;
  uint64_t v = 0;
  if (fr->cfg.flags & DUPLEX_FRAME_LITTLE_ENDIAN) {
    for (size_t i = pb; i-- > 0;)
      v = (v << 8) | p[i];
  } else {
    for (size_t i = 0; i < pb; i++)
      v = (v << 8) | p[i];
  }
  return v;
}

static int
prefix_direct(dpx_framer *fr, const char *data, size_t len, size_t *pos,
              dpx_emit_fn emit, void *ctx)
{
  size_t pb = fr->cfg.prefix_bytes;
  const char *p = data + *pos;
  size_t rem = len - *pos;
  if (rem >= pb) {
    uint64_t plen = decode_prefix(fr, (const unsigned char *)p);
    if (plen > (uint64_t)fr->cfg.max_frame)
      return DUPLEX_EMSGSIZE;
    if (rem - pb >= plen) {
      *pos += pb + (size_t)plen;
      return emit(ctx, p + pb, (size_t)plen) != 0 ? STEP_STOP : 0;
    }
  }
  int r = append(fr, p, rem);
  if (r != 0)
    return r;
  *pos = len;
  return STEP_MORE;
}

static int
prefix_buffered(dpx_framer *fr, const char *data, size_t len, size_t *pos,
                dpx_emit_fn emit, void *ctx)
{
  size_t pb = fr->cfg.prefix_bytes;
  int r;
  if (fr->len < pb) {
    size_t take = pb - fr->len;
    if (take > len - *pos)
      take = len - *pos;
    if ((r = append(fr, data + *pos, take)) != 0)
      return r;
    *pos += take;
    if (fr->len < pb)
      return STEP_MORE;
  }
  uint64_t plen = decode_prefix(fr, (const unsigned char *)fr->buf);
  if (plen > (uint64_t)fr->cfg.max_frame)
    return DUPLEX_EMSGSIZE; /* as soon as the prefix is complete */
  size_t need = pb + (size_t)plen - fr->len, n = len - *pos;
  if (fr->len == pb && n >= need) {
    /* Only the prefix was buffered: the payload is read in place. */
    const char *p = data + *pos;
    *pos += need;
    consumed_buffer(fr);
    return emit(ctx, p, need) != 0 ? STEP_STOP : 0;
  }
  if (n < need) {
    if ((r = append(fr, data + *pos, n)) != 0)
      return r;
    *pos = len;
    return STEP_MORE;
  }
  if ((r = append(fr, data + *pos, need)) != 0)
    return r;
  *pos += need;
  int stop = emit(ctx, fr->buf + pb, (size_t)plen);
  consumed_buffer(fr);
  return stop != 0 ? STEP_STOP : 0;
}

/* ---- CUSTOM ------------------------------------------------------------ */

/* Ask the user's framer about p[0 .. n) (n > 0). Returns 1 with the frame
 * length and skip, 0 when it needs more, or a negative code. */
static int
custom_probe(const dpx_framer *fr, const char *p, size_t n, size_t *flen,
             size_t *skip)
{
  size_t max = fr->cfg.max_frame;
  *skip = 0;
  long long r = fr->cfg.custom(p, n, skip, fr->cfg.custom_user);
  if (r < 0)
    return r >= INT_MIN ? (int)r : DUPLEX_EPROTO;
  if (r == 0)
    /* Still no frame with more bytes than any legal frame has. */
    return n > max + DPX_FRAME_CUSTOM_SLACK ? DUPLEX_EMSGSIZE : 0;
  if ((unsigned long long)r > n || *skip > (unsigned long long)r)
    return DUPLEX_EPROTO;
  /* The total bound matters too: a longer frame would fail or not
   * depending on whether it arrived in one chunk. */
  if ((size_t)r > max + DPX_FRAME_CUSTOM_SLACK || (size_t)r - *skip > max)
    return DUPLEX_EMSGSIZE;
  *flen = (size_t)r;
  return 1;
}

static int
custom_direct(dpx_framer *fr, const char *data, size_t len, size_t *pos,
              dpx_emit_fn emit, void *ctx)
{
  const char *p = data + *pos;
  size_t rem = len - *pos, flen = 0, skip = 0;
  int r = custom_probe(fr, p, rem, &flen, &skip);
  if (r < 0)
    return r;
  if (r == 0) {
    if ((r = append(fr, p, rem)) != 0)
      return r;
    *pos = len;
    return STEP_MORE;
  }
  *pos += flen;
  return emit(ctx, p + skip, flen - skip) != 0 ? STEP_STOP : 0;
}

static int
custom_buffered(dpx_framer *fr, const char *data, size_t len, size_t *pos,
                dpx_emit_fn emit, void *ctx)
{
  /* fr->len < limit: a buffer that reached it failed in custom_probe. */
  size_t limit = fr->cfg.max_frame + DPX_FRAME_CUSTOM_SLACK + 1;
  size_t take = len - *pos, flen = 0, skip = 0;
  if (take > limit - fr->len)
    take = limit - fr->len;
  int r = append(fr, data + *pos, take);
  if (r != 0)
    return r;
  *pos += take;
  r = custom_probe(fr, fr->buf, fr->len, &flen, &skip);
  if (r < 0)
    return r;
  if (r == 0)
    return STEP_MORE; /* then *pos == len: fr->len < limit */
  /* Give back the chunk bytes past the frame: they are read in place. */
  size_t back = fr->len - flen;
  if (back > take)
    back = take; /* the framer ended a frame inside bytes it had refused */
  *pos -= back;
  fr->len -= back;
  int stop = emit(ctx, fr->buf + skip, flen - skip);
  if (stop != 0)
    return STEP_STOP;
  if (fr->len > flen) {
    memmove(fr->buf, fr->buf + flen, fr->len - flen);
    fr->len -= flen;
  } else {
    consumed_buffer(fr);
  }
  return 0;
}

/* ---- feed / encode ----------------------------------------------------- */

int
dpx_framer_feed(dpx_framer *fr, const char *data, size_t len,
                int (*emit)(void *ctx, const char *msg, size_t len),
                void *ctx)
{
  size_t pos = 0;
  int r = 0;
  while (pos < len) {
    bool buffered = fr->len > 0;
    switch (fr->cfg.kind) {
    case DUPLEX_FRAME_DELIMITED:
      r = buffered ? delim_buffered(fr, data, len, &pos, emit, ctx)
                   : delim_direct(fr, data, len, &pos, emit, ctx);
      break;
    case DUPLEX_FRAME_LENGTH_PREFIX:
      r = buffered ? prefix_buffered(fr, data, len, &pos, emit, ctx)
                   : prefix_direct(fr, data, len, &pos, emit, ctx);
      break;
    case DUPLEX_FRAME_CUSTOM:
      r = buffered ? custom_buffered(fr, data, len, &pos, emit, ctx)
                   : custom_direct(fr, data, len, &pos, emit, ctx);
      break;
    default:
      /* NONE never gets a framer; treat each chunk as one message. */
      pos = len;
      r = emit(ctx, data, len) != 0 ? STEP_STOP : 0;
      break;
    }
    if (r != 0)
      break;
  }
  if (r < 0 || r == STEP_STOP) {
    drop(fr);
    return r < 0 ? r : 0;
  }
  if (fr->len == 0 && fr->buf != NULL)
    drop(fr); /* an idle conn holds no buffer */
  return 0;
}

/* Byte @p i of payload ++ delimiter. */
static unsigned char
joined(const unsigned char *p, size_t len, const unsigned char *d, size_t i)
{
  return i < len ? p[i] : d[i - len];
}

int
dpx_framer_encode(const duplex_framing *cfg, const void *payload, size_t len,
                  unsigned char hdr[8], size_t *hdr_len,
                  const unsigned char **trail, size_t *trail_len)
{
  size_t max = resolve_max(cfg->max_frame);
  *hdr_len = 0;
  *trail = NULL;
  *trail_len = 0;
  switch (cfg->kind) {
  case DUPLEX_FRAME_NONE:
    return 0;
  case DUPLEX_FRAME_CUSTOM:
    /* The caller writes the header; bound the frame as the reader does. */
    return len > max + DPX_FRAME_CUSTOM_SLACK ? DUPLEX_EMSGSIZE : 0;
  case DUPLEX_FRAME_DELIMITED: {
    if (len > max)
      return DUPLEX_EMSGSIZE;
    const unsigned char *p = payload, *d = cfg->delimiter;
    size_t dl = cfg->delimiter_len;
    if (dl < 1 || dl > 4)
      return DUPLEX_EINVAL;
    /* The reader ends the frame at the first delimiter in payload ++
     * delimiter; it must be the appended one, also for delimiters that
     * overlap themselves ("aa" after a payload ending in 'a'). */
    if (find_delim(p, len, d, dl) != NOT_FOUND)
      return DUPLEX_EINVAL;
    for (size_t s = len >= dl - 1 ? len - (dl - 1) : 0; s < len; s++) {
      size_t j = 0;
      while (j < dl && joined(p, len, d, s + j) == d[j])
        j++;
      if (j == dl)
        return DUPLEX_EINVAL;
    }
    *trail = d;
    *trail_len = dl;
    return 0;
  }
  case DUPLEX_FRAME_LENGTH_PREFIX: {
    size_t pb = cfg->prefix_bytes;
    if (pb != 1 && pb != 2 && pb != 4 && pb != 8)
      return DUPLEX_EINVAL;
    if (len > max || (pb < 8 && ((uint64_t)len >> (8 * pb)) != 0))
      return DUPLEX_EMSGSIZE;
    uint64_t v = (uint64_t)len;
    for (size_t i = 0; i < pb; i++) {
      size_t at = (cfg->flags & DUPLEX_FRAME_LITTLE_ENDIAN) ? i : pb - 1 - i;
      hdr[at] = (unsigned char)(v & 0xff);
      v >>= 8;
    }
    *hdr_len = pb;
    return 0;
  }
  default:
    return DUPLEX_EINVAL;
  }
}
