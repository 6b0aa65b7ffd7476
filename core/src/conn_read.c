/* The read side of a conn: reading into the loop's buffer, framing, frames
 * held while paused, the EOF event, pause and resume.
 *
 * Read callbacks (on_read, on_eof) run only while the read side is live:
 * not after an abort or close began on the loop thread (rd_cut). The EOF
 * event is one more item in the delivery order: when frames are held
 * because the user paused, the peer's EOF waits behind them and is
 * delivered after the last one, once reading is resumed. */
#include "internal.h"
#include "framing.h"

#include <stdlib.h>
#include <string.h>

static inline void *
conn_user(duplex_conn *c)
{
  return atomic_load_explicit(&c->user, memory_order_relaxed);
}

static void
on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
  duplex_conn *c = h->data;
  duplex_loop *loop = c->loop; /* loop thread: stable while open */
  (void)suggested;
  if (loop->rbuf == NULL)
    loop->rbuf = malloc(loop->rbuf_size);
  buf->base = loop->rbuf;
  buf->len = loop->rbuf != NULL ? loop->rbuf_size : 0;
}

void
dpx_conn_read_stop(duplex_conn *c)
{
  if (c->reading) {
    uv_read_stop(&dpx_conn_rd(c)->stream);
    c->reading = false;
  }
}

void
dpx_conn_read_cut(duplex_conn *c)
{
  c->rd_cut = true;
  dpx_conn_read_stop(c);
}

/* Frames decoded while reading is paused (a chunk holds several and the
 * callback paused after the first) wait here, length-prefixed, until a
 * resume delivers them. */
static int
hold_frame(duplex_conn *c, const char *msg, size_t len)
{
  dpx_conn_extra *x = dpx_conn_x_get(c);
  if (x == NULL)
    return DUPLEX_ENOMEM;
  size_t need = x->held_len + sizeof len + len;
  if (need > x->held_cap) {
    size_t cap = x->held_cap ? x->held_cap : 256;
    while (cap < need)
      cap *= 2;
    char *p = realloc(x->held, cap);
    if (p == NULL)
      return DUPLEX_ENOMEM;
    x->held = p;
    x->held_cap = cap;
  }
  memcpy(x->held + x->held_len, &len, sizeof len);
  memcpy(x->held + x->held_len + sizeof len, msg, len);
  x->held_len = need;
  return 0;
}

bool
dpx_conn_has_held(const duplex_conn *c)
{
  const dpx_conn_extra *x = dpx_conn_x(c);
  return x != NULL && x->held != NULL;
}

/* One read's worth of frames on their way to the user. */
typedef struct read_batch {
  duplex_conn *c;
  unsigned delivered; /* on_read calls made */
} read_batch;

/* The batch's last on_read has run: tell the user, if any ran. */
static void
batch_end(duplex_conn *c, unsigned delivered)
{
  if (delivered > 0 && !c->rd_cut && c->cfg->cbs.on_read_batch != NULL)
    c->cfg->cbs.on_read_batch(c, conn_user(c));
}

static int
emit_frame(void *ctx, const char *msg, size_t len)
{
  read_batch *b = ctx;
  duplex_conn *c = b->c;
  if (c->rd_cut)
    return 1;
  if (!c->rd_want || dpx_conn_has_held(c)) {
    if (hold_frame(c, msg, len) != 0) {
      dpx_conn_begin_close(c, DUPLEX_ENOMEM);
      return 1;
    }
    return 0;
  }
  if (c->cfg->cbs.on_read != NULL)
    c->cfg->cbs.on_read(c, msg, len, conn_user(c));
  b->delivered++;
  return c->rd_cut;
}

/* The peer's EOF, in delivery order (after every held frame). */
static void
deliver_eof(duplex_conn *c)
{
  c->eof_pending = false;
  if (c->rd_cut)
    return;
  if (c->eof_proto) {
    /* A partial frame at EOF: nothing of it is delivered. */
    dpx_conn_begin_close(c, DUPLEX_EPROTO);
    return;
  }
  if (c->cfg->cbs.on_eof != NULL)
    c->cfg->cbs.on_eof(c, conn_user(c));
  if (c->shut_done && !c->close_begun)
    dpx_conn_begin_close(c, 0);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

bool
dpx_conn_read_pending(const duplex_conn *c, bool want)
{
  if (c->rd_cut || c->close_begun || !c->opened || c->tls_wait ||
      c->lingering)
    return false;
  if (dpx_conn_has_held(c) || c->eof_pending || dpx_conn_tls_rd_more(c))
    return want; /* waiting for a resume */
  return !c->rd_ended && want != c->reading &&
         !dpx_conn_tls_read_blocked(c);
}

void
dpx_conn_read_start(duplex_conn *c)
{
  int r = uv_read_start(&dpx_conn_rd(c)->stream, on_alloc, on_read);
  if (r == UV_ENOTCONN) {
    /* No read side (a pipe's write end): nothing will ever be read, and
     * there is no EOF to report either. */
    c->rd_ended = true;
    return;
  }
  if (r != 0) {
    dpx_conn_begin_close(c, dpx_err(r));
    return;
  }
  c->reading = true;
  dpx_conn_deadline_read_started(c);
}

bool
dpx_conn_read_apply(duplex_conn *c, bool want, bool deliver)
{
  c->rd_want = want;
  if (!c->opened || c->rd_cut || c->close_begun)
    return false;
  if (c->tls_wait || c->lingering)
    return false; /* the handshake reads; the wish applies after it */
  if (!want) {
    dpx_conn_read_stop(c);
    return false;
  }
  if (dpx_conn_has_held(c) || c->eof_pending) {
    if (!deliver)
      return true; /* the pump delivers them, never the caller's call */
    /* Held frames first, then the EOF that came after them, then the
     * socket. A callback may pause again or close: re-check each time. */
    dpx_conn_extra *x = dpx_conn_x(c);
    unsigned delivered = 0;
    while (x != NULL && x->held_off < x->held_len && c->rd_want &&
           !c->rd_cut) {
      size_t len;
      memcpy(&len, x->held + x->held_off, sizeof len);
      const char *msg = x->held + x->held_off + sizeof len;
      x->held_off += sizeof len + len;
      if (c->cfg->cbs.on_read != NULL)
        c->cfg->cbs.on_read(c, msg, len, conn_user(c));
      delivered++;
    }
    batch_end(c, delivered);
    if (x != NULL && x->held != NULL && x->held_off == x->held_len) {
      free(x->held);
      x->held = NULL;
      x->held_len = x->held_off = x->held_cap = 0;
    }
    if (dpx_conn_has_held(c) || !c->rd_want || c->rd_cut || c->close_begun)
      return false;
    if (c->eof_pending) {
      deliver_eof(c);
      return false;
    }
  }
  if (!c->rd_ended && !c->reading && !dpx_conn_tls_read_blocked(c))
    dpx_conn_read_start(c);
  if (dpx_conn_tls_rd_more(c)) {
    /* Input left undecrypted by a pause: it comes before the socket's. */
    if (!deliver)
      return true;
    dpx_conn_tls_drain(c);
  }
  return false;
}

void
dpx_conn_deliver(duplex_conn *c, const char *data, size_t len)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  read_batch b = { c, 0 };
  if (x != NULL && x->framer != NULL) {
    int r = dpx_framer_feed(x->framer, data, len, emit_frame, &b);
    if (r != 0)
      dpx_conn_begin_close(c, r);
  } else if (c->cfg->cbs.on_read != NULL) {
    c->cfg->cbs.on_read(c, data, len, conn_user(c));
    b.delivered = 1;
  }
  batch_end(c, b.delivered);
}

void
dpx_conn_deliver_eof(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  c->eof_proto = x != NULL && x->framer != NULL &&
                 dpx_framer_eof(x->framer) != 0;
  c->eof_pending = true;
  if (!dpx_conn_has_held(c))
    deliver_eof(c);
  /* else it waits behind the held frames for a resume */
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
  duplex_conn *c = s->data;
  if (nread > 0) {
    dpx_conn_stamp_read(c);
    if (c->rd_cut)
      return;
    /* A TLS conn's bytes are ciphertext: its engine delivers them. */
    if (c->tls_on)
      dpx_conn_tls_input(c, buf->base, (size_t)nread);
    else
      dpx_conn_deliver(c, buf->base, (size_t)nread);
    return;
  }
  if (nread == 0)
    return;
  if (nread == UV_ENOBUFS) {
    dpx_conn_begin_close(c, DUPLEX_ENOMEM);
    return;
  }
  dpx_conn_read_stop(c);
  c->rd_ended = true;
  if (nread != UV_EOF) {
    dpx_conn_begin_close(c, dpx_err((int)nread));
    return;
  }
  if (c->tls_on)
    dpx_conn_tls_input_eof(c);
  else
    dpx_conn_deliver_eof(c);
}

/* Pause or resume: on the loop thread at once (no callback runs inside
 * the call; held frames and a held EOF go out from the pump), elsewhere
 * through the pump. */
static int
conn_want_read(duplex_conn *conn, bool want)
{
  if (conn == NULL)
    return DUPLEX_EINVAL;
  dpx_conn_lock(conn);
  if (conn->state == DPX_CS_CLOSED) {
    dpx_conn_unlock(conn);
    return DUPLEX_ECLOSED;
  }
  conn->want_read = want;
  bool here = dpx_on_loop(conn->loop);
  if (!here)
    dpx_conn_schedule_locked(conn, true);
  dpx_conn_unlock(conn);
  if (here && dpx_conn_read_apply(conn, want, false)) {
    dpx_conn_lock(conn);
    dpx_conn_schedule_locked(conn, true);
    dpx_conn_unlock(conn);
  }
  return 0;
}

int
duplex_conn_pause(duplex_conn *conn)
{
  return conn_want_read(conn, false);
}

int
duplex_conn_resume(duplex_conn *conn)
{
  return conn_want_read(conn, true);
}
