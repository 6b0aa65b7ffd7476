/* Message framing codec: splits a byte stream into messages and builds the
 * header / trailer of a framed write. Pure: no loop, no locks, no libuv,
 * only <duplex.h> and the C library, so it can be unit-tested and fuzzed on
 * its own (tests/framing_test.cpp, tests/fuzz/fuzz_framing_*.c). */
#ifndef DPX_FRAMING_H
#define DPX_FRAMING_H

#include <duplex.h>

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* max_frame when duplex_framing.max_frame is 0. */
#define DPX_FRAME_DEFAULT_MAX ((size_t)1 << 20)
/* CUSTOM: a frame may be at most max_frame + this many bytes long in total
 * (header included), and a framer still asking for more bytes once that
 * many are buffered fails with DUPLEX_EMSGSIZE. */
#define DPX_FRAME_CUSTOM_SLACK ((size_t)64)

typedef struct dpx_framer {
  duplex_framing cfg; /* validated copy; max_frame resolved (0 -> 1 MiB);
                         never written after init, so encode may read it
                         from any thread while the loop feeds */
  char *buf;          /* bytes of an incomplete frame; NULL while none */
  size_t len, cap;
} dpx_framer;

/* Validate a user framing struct: size (DUPLEX_EVERSION when smaller than
 * ours, or larger with a non-zero tail), kind, flags, delimiter_len 1..4
 * (DELIMITED), prefix_bytes 1/2/4/8 (LENGTH_PREFIX), custom != NULL
 * (CUSTOM). NULL or kind NONE: 0. Returns 0, DUPLEX_EINVAL, DUPLEX_EVERSION. */
int dpx_framing_check(const duplex_framing *f);

/* @p f already passed dpx_framing_check() and is not NULL. */
void dpx_framer_init(dpx_framer *fr, const duplex_framing *f);
void dpx_framer_free(dpx_framer *fr);

/* Feed @p len stream bytes. Calls emit(ctx, msg, len) once per whole
 * message, in order; msg points into @p data (a frame wholly inside this
 * chunk is not copied) or into fr->buf, and is valid only during emit. emit
 * must not feed or free @p fr. If emit returns non-zero, feed stops at once,
 * drops everything buffered and returns 0 (the conn is closing; the reason
 * is whatever closed it). The messages emitted do not depend on how the
 * stream is split into chunks.
 * Returns 0, DUPLEX_EMSGSIZE (a payload over max_frame; nothing of that
 * frame is emitted), DUPLEX_ENOMEM, a negative code from a custom framer,
 * or DUPLEX_EPROTO (a custom framer returned a length over what it was
 * shown, or a skip over the length). After an error nothing is buffered and
 * the framer must not be fed again. */
int dpx_framer_feed(dpx_framer *fr, const char *data, size_t len,
                    int (*emit)(void *ctx, const char *msg, size_t len),
                    void *ctx);

/* At EOF: 0 if nothing is buffered, DUPLEX_EPROTO otherwise. */
int dpx_framer_eof(const dpx_framer *fr);

/* The framing around a write of @p len payload bytes: the length prefix in
 * hdr[0 .. *hdr_len) and the delimiter at *trail (borrowed from @p cfg),
 * either possibly empty. @p cfg is a dpx_framer's cfg. Returns 0,
 * DUPLEX_EMSGSIZE (len over max_frame, over what prefix_bytes can express,
 * or for CUSTOM over max_frame + DPX_FRAME_CUSTOM_SLACK), DUPLEX_EINVAL
 * (DELIMITED: the delimiter would be found before the end of the payload,
 * splitting it in two on the other side). */
int dpx_framer_encode(const duplex_framing *cfg, const void *payload,
                      size_t len, unsigned char hdr[8], size_t *hdr_len,
                      const unsigned char **trail, size_t *trail_len);

#ifdef __cplusplus
}
#endif

#endif /* DPX_FRAMING_H */
