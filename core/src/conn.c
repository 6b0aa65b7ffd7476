/* Conn lifecycle: creation, references, reading, the pump, closing. */
#include "internal.h"
#include "framing.h"

#include <stdlib.h>
#include <string.h>

#define DPX_DEFAULT_HIGH ((size_t)1 << 20)
#define DPX_DEFAULT_HARD ((size_t)16 << 20)

/* ---- options ----------------------------------------------------------- */

int
duplex_conn_opts_init(duplex_conn_opts *opts)
{
  if (opts == NULL)
    return DUPLEX_EINVAL;
  const duplex_conn_opts def = DUPLEX_CONN_OPTS_INIT;
  *opts = def;
  return 0;
}

int
duplex_conn_cbs_init(duplex_conn_cbs *cbs)
{
  if (cbs == NULL)
    return DUPLEX_EINVAL;
  const duplex_conn_cbs def = DUPLEX_CONN_CBS_INIT;
  *cbs = def;
  return 0;
}

int
dpx_conn_opts_check(const duplex_conn_opts *opts)
{
  if (opts == NULL)
    return 0;
  int r = dpx_check_size(opts, opts->size, sizeof(duplex_conn_opts),
                         sizeof(duplex_conn_opts));
  if (r != 0)
    return r;
  if ((opts->flags & ~DUPLEX_CONN_FLAGS_ALL) != 0)
    return DUPLEX_EINVAL;
  if (opts->cbs != NULL) {
    r = dpx_check_size(opts->cbs, opts->cbs->size, sizeof(duplex_conn_cbs),
                       sizeof(duplex_conn_cbs));
    if (r != 0)
      return r;
  }
  size_t high = opts->high_watermark ? opts->high_watermark : DPX_DEFAULT_HIGH;
  size_t hard = opts->hard_limit ? opts->hard_limit
                                 : (high > DPX_DEFAULT_HARD ? high
                                                            : DPX_DEFAULT_HARD);
  if (opts->low_watermark >= high || hard < high)
    return DUPLEX_EINVAL;
  return dpx_framing_check(opts->framing);
}

int
dpx_conn_cfg_new(dpx_conn_cfg **out, const duplex_conn_opts *opts)
{
  int r = dpx_conn_opts_check(opts);
  if (r != 0)
    return r;
  dpx_conn_cfg *cfg = calloc(1, sizeof *cfg);
  if (cfg == NULL)
    return DUPLEX_ENOMEM;
  atomic_init(&cfg->refs, 1u);
  duplex_conn_cbs_init(&cfg->cbs);
  if (opts != NULL && opts->cbs != NULL)
    memcpy(&cfg->cbs, opts->cbs, sizeof cfg->cbs);
  cfg->cbs.size = sizeof cfg->cbs;
  cfg->high = opts && opts->high_watermark ? opts->high_watermark
                                           : DPX_DEFAULT_HIGH;
  cfg->low = opts && opts->low_watermark ? opts->low_watermark
                                         : cfg->high / 4;
  cfg->hard = opts && opts->hard_limit
                  ? opts->hard_limit
                  : (cfg->high > DPX_DEFAULT_HARD ? cfg->high
                                                  : DPX_DEFAULT_HARD);
  if (opts != NULL) {
    cfg->flags = opts->flags;
    cfg->user = opts->user;
    cfg->timeout[DUPLEX_TIMEOUT_CONNECT] = opts->connect_timeout_ms;
    cfg->timeout[DUPLEX_TIMEOUT_IDLE] = opts->idle_timeout_ms;
    cfg->timeout[DUPLEX_TIMEOUT_READ] = opts->read_timeout_ms;
    cfg->timeout[DUPLEX_TIMEOUT_FLUSH] = opts->flush_timeout_ms;
    if (opts->framing != NULL && opts->framing->kind != DUPLEX_FRAME_NONE) {
      memcpy(&cfg->framing, opts->framing, sizeof cfg->framing);
      cfg->framing.size = sizeof cfg->framing;
    }
  }
  *out = cfg;
  return 0;
}

void
dpx_conn_cfg_unref(dpx_conn_cfg *cfg)
{
  if (cfg != NULL &&
      atomic_fetch_sub_explicit(&cfg->refs, 1u, memory_order_acq_rel) == 1u)
    free(cfg);
}

/* ---- the lock set ------------------------------------------------------- */

uv_mutex_t dpx_conn_locks[DPX_CONN_LOCKS];
static uv_once_t conn_locks_once = UV_ONCE_INIT;

static void
conn_locks_init(void)
{
  for (size_t i = 0; i < DPX_CONN_LOCKS; i++)
    if (uv_mutex_init(&dpx_conn_locks[i]) != 0)
      abort(); /* only fails without resources at first use */
}

void
dpx_conn_locks_ensure(void)
{
  uv_once(&conn_locks_once, conn_locks_init);
}

static bool
has_deadline(const uint32_t t[4])
{
  return (t[0] | t[1] | t[2] | t[3]) != 0;
}

dpx_conn_extra *
dpx_conn_x_get_locked(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL)
    return x;
  x = calloc(1, sizeof *x);
  if (x == NULL)
    return NULL;
  x->fd_in = x->fd_out = -1;
  x->conn = c;
  x->open_op.fn = dpx_conn_open_op;
  memcpy(x->timeout, c->cfg->timeout, sizeof x->timeout);
  memcpy(x->timeout_req, c->cfg->timeout, sizeof x->timeout_req);
  atomic_store_explicit(&c->x, x, memory_order_release);
  return x;
}

dpx_conn_extra *
dpx_conn_x_get(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL)
    return x;
  dpx_conn_lock(c);
  x = dpx_conn_x_get_locked(c);
  dpx_conn_unlock(c);
  return x;
}

duplex_conn *
dpx_conn_new(duplex_loop *loop, int kind, dpx_conn_cfg *cfg,
             unsigned nhandles, size_t handle_size)
{
  size_t hsize = nhandles == 2 ? 2 * sizeof(dpx_stream) : handle_size;
  duplex_conn *c = calloc(1, sizeof *c + ((hsize + 7) & ~(size_t)7));
  if (c == NULL)
    return NULL;
  atomic_fetch_add_explicit(&cfg->refs, 1u, memory_order_relaxed);
  c->cfg = cfg;
  atomic_init(&c->refs, 1u); /* the loop's reference, dropped after close */
  atomic_init(&c->user, cfg->user);
  atomic_init(&c->w, NULL);
  atomic_init(&c->x, NULL);
  c->loop = loop;
  c->state = DPX_CS_OPEN;
  c->kind = (uint8_t)kind;
  c->nhandles = (uint8_t)nhandles;
  c->want_read = !(cfg->flags & DUPLEX_CONN_START_PAUSED);
  /* Nothing is written before the conn opens; opening pumps it. */
  c->scheduled = true;
  /* Deadlines and the open state need the extra part from the start. */
  if (has_deadline(cfg->timeout) || kind != DPX_CONN_ACCEPTED ||
      cfg->framing.kind != DUPLEX_FRAME_NONE) {
    if (dpx_conn_x_get_locked(c) == NULL)
      goto fail;
  }
  if (cfg->framing.kind != DUPLEX_FRAME_NONE) {
    dpx_conn_extra *x = dpx_conn_x_get_locked(c);
    if (x == NULL || (x->framer = calloc(1, sizeof *x->framer)) == NULL)
      goto fail;
    dpx_framer_init(x->framer, &cfg->framing);
  }
  c->op.fn = dpx_conn_pump_op;
  dpx_link_init(&c->link);
  return c;
fail:
  free(dpx_conn_x(c));
  dpx_conn_cfg_unref(cfg);
  free(c);
  return NULL;
}

static void
wstate_destroy(dpx_wstate *w)
{
  dpx_entvec_free(&w->intake);
  dpx_entvec_free(&w->batch);
  dpx_entvec_free(&w->completed);
  dpx_entvec_free(&w->cancelled);
  free(w->bufs);
  free(w);
}

void
dpx_conn_free(duplex_conn *c)
{
  dpx_wstate *w = dpx_conn_w(c);
  if (w != NULL)
    wstate_destroy(w);
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL) {
    free(x->peer);
    free(x->deadline);
    free(x->held);
    if (x->framer != NULL) {
      dpx_framer_free(x->framer);
      free(x->framer);
    }
    free(x);
  }
  dpx_conn_cfg_unref(c->cfg);
  free(c);
}

/* ---- write state ---------------------------------------------------------- */

#define DPX_WPOOL_MAX 64u

dpx_wstate *
dpx_conn_w_get_locked(duplex_conn *c)
{
  dpx_wstate *w = dpx_conn_w(c);
  if (w != NULL)
    return w;
  duplex_loop *loop = c->loop;
  if (loop == NULL)
    return NULL;
  uv_mutex_lock(&loop->pool_mu);
  w = loop->wpool;
  if (w != NULL) {
    loop->wpool = w->next_free;
    loop->wpool_len--;
  }
  uv_mutex_unlock(&loop->pool_mu);
  if (w == NULL) {
    w = calloc(1, sizeof *w);
    if (w == NULL)
      return NULL;
  }
  w->next_free = NULL;
  atomic_store_explicit(&c->w, w, memory_order_release);
  return w;
}

void
dpx_conn_w_trim_locked(duplex_conn *c)
{
  dpx_wstate *w = dpx_conn_w(c);
  if (w == NULL || c->writing || c->queued > 0 || w->intake.n > 0 ||
      w->chunk_head != NULL || w->waiters != NULL || w->batch.n > 0 ||
      w->completed.n > 0 || w->cancelled.n > 0 || w->shut_pending ||
      w->close_after_shut || c->loop == NULL)
    return;
  atomic_store_explicit(&c->w, NULL, memory_order_relaxed);
  duplex_loop *loop = c->loop;
  uv_mutex_lock(&loop->pool_mu);
  if (loop->wpool_len < DPX_WPOOL_MAX) {
    w->next_free = loop->wpool;
    loop->wpool = w;
    loop->wpool_len++;
    w = NULL;
  }
  uv_mutex_unlock(&loop->pool_mu);
  if (w != NULL)
    wstate_destroy(w);
}

void
dpx_wstate_pool_free(duplex_loop *loop)
{
  dpx_wstate *w = loop->wpool;
  while (w != NULL) {
    dpx_wstate *next = w->next_free;
    wstate_destroy(w);
    w = next;
  }
  loop->wpool = NULL;
  loop->wpool_len = 0;
}

/* ---- references and simple accessors ------------------------------------ */

int
duplex_conn_ref(duplex_conn *conn)
{
  if (conn == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&conn->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_conn_unref(duplex_conn *conn)
{
  if (conn == NULL)
    return DUPLEX_EINVAL;
  if (atomic_fetch_sub_explicit(&conn->refs, 1u, memory_order_acq_rel) == 1u)
    dpx_conn_free(conn);
  return 0;
}

int
duplex_conn_get_user(const duplex_conn *conn, void **out)
{
  if (conn == NULL || out == NULL)
    return DUPLEX_EINVAL;
  *out = atomic_load(&((duplex_conn *)conn)->user);
  return 0;
}

int
duplex_conn_set_user(duplex_conn *conn, void *user)
{
  if (conn == NULL)
    return DUPLEX_EINVAL;
  atomic_store(&conn->user, user);
  return 0;
}

int
duplex_conn_get_queued(const duplex_conn *conn, size_t *out)
{
  if (conn == NULL || out == NULL)
    return DUPLEX_EINVAL;
  duplex_conn *c = (duplex_conn *)conn;
  dpx_conn_lock(c);
  *out = c->queued;
  dpx_conn_unlock(c);
  return 0;
}

/* Loop thread (or an idle loop): read the peer's name off the handle. */
static int
peer_fetch(duplex_loop *loop, void *arg)
{
  duplex_conn *c = arg;
  (void)loop;
  dpx_conn_extra *x = dpx_conn_x_get(c);
  if (x == NULL)
    return DUPLEX_ENOMEM;
  dpx_conn_lock(c);
  bool known = x->peer != NULL;
  dpx_conn_unlock(c);
  if (known)
    return 0;
  if (!c->opened)
    return DUPLEX_ENOTCONN;
  if (c->closing)
    return DUPLEX_ECLOSED;
  dpx_conn_set_peer(c);
  return 0;
}

int
duplex_conn_get_peer(const duplex_conn *conn, char *buf, size_t len)
{
  if (conn == NULL || buf == NULL || len == 0)
    return DUPLEX_EINVAL;
  duplex_conn *c = (duplex_conn *)conn;
  buf[0] = '\0';
  dpx_conn_lock(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  bool known = x != NULL && x->peer != NULL;
  duplex_loop *loop = c->loop;
  dpx_conn_unlock(c);
  if (!known) {
    /* Asked for the first time: the loop thread reads it off the socket
     * and keeps it (an idle conn stores no name nobody asked for). */
    if (loop == NULL)
      return DUPLEX_ECLOSED;
    int r = dpx_loop_exec(loop, peer_fetch, c);
    if (r != 0)
      return r;
    x = dpx_conn_x(c);
  }
  int r = 0;
  dpx_conn_lock(c);
  const char *peer = x->peer != NULL ? x->peer : "";
  if (strlen(peer) + 1 > len)
    r = DUPLEX_ENOBUFS;
  else
    memcpy(buf, peer, strlen(peer) + 1);
  dpx_conn_unlock(c);
  return r;
}

static inline void *
conn_user(duplex_conn *c)
{
  return atomic_load_explicit(&c->user, memory_order_relaxed);
}

/* ---- scheduling ----------------------------------------------------------- */

void
dpx_conn_schedule_locked(duplex_conn *c, bool force)
{
  if (c->loop == NULL || (c->scheduled && !force))
    return;
  c->scheduled = true;
  if (c->op_queued)
    return;
  c->op_queued = true;
  duplex_conn_ref(c); /* held by the queued op */
  dpx_loop_submit(c->loop, &c->op, false);
}

void
dpx_conn_pump_op(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_conn *c = DPX_CONTAINER_OF(op, duplex_conn, op);
  (void)loop;
  (void)status; /* on teardown the pump finds the conn closing */
  dpx_conn_lock(c);
  c->op_queued = false;
  dpx_conn_unlock(c);
  dpx_conn_pump(c);
  duplex_conn_unref(c);
}

/* ---- reading -------------------------------------------------------------- */

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

static void
conn_read_stop(duplex_conn *c)
{
  if (c->reading) {
    uv_read_stop(&dpx_conn_rd(c)->stream);
    c->reading = false;
  }
}

/* Frames decoded while reading is paused (a chunk holds several and the
 * callback paused after the first) wait here, length-prefixed, until a
 * resume delivers them: no read callback runs while paused. */
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

/* Frames wait in the held buffer (loop thread). */
static bool
has_held(const duplex_conn *c)
{
  const dpx_conn_extra *x = dpx_conn_x(c);
  return x != NULL && x->held != NULL;
}

static int
emit_frame(void *ctx, const char *msg, size_t len)
{
  duplex_conn *c = ctx;
  if (c->closing)
    return 1;
  if (!c->reading || has_held(c)) {
    if (hold_frame(c, msg, len) != 0) {
      dpx_conn_begin_close(c, DUPLEX_ENOMEM);
      return 1;
    }
    return 0;
  }
  if (c->cfg->cbs.on_read != NULL)
    c->cfg->cbs.on_read(c, msg, len, conn_user(c));
  return c->closing;
}

/* Deliver held frames while reading stays on (loop thread, pump). */
static void
deliver_held(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x == NULL)
    return;
  while (x->held_off < x->held_len && c->reading && !c->closing) {
    size_t len;
    memcpy(&len, x->held + x->held_off, sizeof len);
    const char *msg = x->held + x->held_off + sizeof len;
    x->held_off += sizeof len + len;
    if (c->cfg->cbs.on_read != NULL)
      c->cfg->cbs.on_read(c, msg, len, conn_user(c));
  }
  if (x->held_off == x->held_len && x->held != NULL) {
    free(x->held);
    x->held = NULL;
    x->held_len = x->held_off = x->held_cap = 0;
  }
}

/* Loop thread: stamp the time of the last byte read / written, which only
 * deadlines look at. */
static inline void
stamp_read(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL)
    x->t_read = uv_now(&c->loop->uv);
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
  duplex_conn *c = s->data;
  if (nread > 0) {
    stamp_read(c);
    if (c->closing)
      return;
    dpx_conn_extra *x = dpx_conn_x(c);
    if (x != NULL && x->framer != NULL) {
      int r = dpx_framer_feed(x->framer, buf->base, (size_t)nread,
                              emit_frame, c);
      if (r != 0)
        dpx_conn_begin_close(c, r);
    } else if (c->cfg->cbs.on_read != NULL) {
      c->cfg->cbs.on_read(c, buf->base, (size_t)nread, conn_user(c));
    }
    return;
  }
  if (nread == 0)
    return;
  if (nread == UV_ENOBUFS) {
    dpx_conn_begin_close(c, DUPLEX_ENOMEM);
    return;
  }
  conn_read_stop(c);
  if (nread == UV_EOF) {
    c->eof_seen = true;
    dpx_conn_extra *x = dpx_conn_x(c);
    if (x != NULL && x->framer != NULL && dpx_framer_eof(x->framer) != 0) {
      /* A partial frame at EOF: nothing of it is delivered. */
      dpx_conn_begin_close(c, DUPLEX_EPROTO);
      return;
    }
    if (c->cfg->cbs.on_eof != NULL && !c->closing)
      c->cfg->cbs.on_eof(c, conn_user(c));
    if (c->shut_done && !c->closing)
      dpx_conn_begin_close(c, 0);
    return;
  }
  dpx_conn_begin_close(c, dpx_err((int)nread));
}

static void
conn_apply_read(duplex_conn *c, bool want)
{
  if (!c->opened || c->closing || c->eof_seen)
    return;
  if (want && !c->reading) {
    if (uv_read_start(&dpx_conn_rd(c)->stream, on_alloc, on_read) == 0) {
      c->reading = true;
      dpx_conn_extra *x = dpx_conn_x(c);
      if (x != NULL &&
          (x->deadline != NULL || x->timeout[DUPLEX_TIMEOUT_READ] != 0)) {
        /* Paused time does not count against the read deadline. */
        x->t_read = uv_now(&c->loop->uv);
        dpx_conn_deadline_touch(c);
      }
    }
  } else if (!want && c->reading) {
    conn_read_stop(c);
  }
}

/* Pause or resume: on the loop thread at once (no callback runs inside
 * the call), elsewhere through the pump. */
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
  if (!here)
    return 0;
  conn_apply_read(conn, want);
  if (want && has_held(conn)) {
    /* Frames held while paused go first, from the pump. */
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

/* ---- opening ---------------------------------------------------------------- */

void
dpx_conn_opened(duplex_conn *c)
{
  c->opened = true;
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL) {
    x->t_read = x->t_write = uv_now(&c->loop->uv);
    x->stamped = true;
    dpx_conn_deadline_touch(c);
  }
  dpx_stream *rd = dpx_conn_rd(c);
  if (rd->handle.type == UV_TCP) {
    uv_tcp_nodelay(&rd->tcp, !(c->cfg->flags & DUPLEX_CONN_NAGLE));
    if (c->cfg->flags & DUPLEX_CONN_KEEPALIVE)
      uv_tcp_keepalive(&rd->tcp, 1, 60);
  }
  if (c->kind != DPX_CONN_ACCEPTED)
    dpx_conn_set_peer(c); /* clients ask for it; servers pay on demand */
  if (c->cfg->cbs.on_open != NULL)
    c->cfg->cbs.on_open(c, conn_user(c));
  dpx_conn_pump(c);
}

/* ---- the pump ------------------------------------------------------------- */

void
dpx_conn_pump(duplex_conn *c)
{
  if (c->pumping) {
    c->pump_again = true;
    return;
  }
  c->pumping = true;
  duplex_conn_ref(c);
  for (;;) {
    c->pump_again = false;
    dpx_conn_lock(c);
    dpx_wstate *w = dpx_conn_w(c);
    dpx_conn_extra *x = dpx_conn_x(c);
    bool abort = c->abort_requested;
    int abort_reason = c->reason;
    bool retime = x != NULL && x->timeouts_dirty;
    if (retime) {
      memcpy(x->timeout, x->timeout_req, sizeof x->timeout);
      x->timeouts_dirty = false;
    }
    bool want = c->want_read;
    unsigned ev = c->events;
    size_t queued = c->queued;
    bool batch = !abort && w != NULL && c->opened && !c->writing &&
                 !c->closing && !w->shut_pending && w->intake.n > 0;
    c->events = 0;
    if (batch) {
      dpx_entvec t = w->batch;
      w->batch = w->intake;
      w->intake = t;
      c->writing = true;
    }
    bool reads = c->opened && !c->closing && !c->eof_seen &&
                 want != c->reading;
    /* An abort before the open op ran waits for it (FIFO order). */
    abort = abort && c->in_list;
    bool held = x != NULL && x->held != NULL && (want || c->reading) &&
                !c->closing;
    bool completed = w != NULL && w->completed.n > 0;
    bool work = (abort && !c->closing) || ev != 0 || batch || reads ||
                completed || retime || held;
    if (!work) {
      /* Nothing left: a later request must wake us, unless a batch in
       * flight or the pending open will pump anyway. */
      c->scheduled = c->writing || !c->opened || c->closing;
      if (!c->closing)
        dpx_conn_w_trim_locked(c);
      dpx_conn_unlock(c);
      break;
    }
    dpx_conn_unlock(c);

    if (abort && !c->closing) {
      dpx_conn_begin_close(c, abort_reason);
      continue;
    }
    if (retime && !c->closing) {
      if (!x->stamped && c->opened) {
        /* Deadlines set after the open count from now. */
        x->t_read = x->t_write = uv_now(&c->loop->uv);
        x->stamped = true;
      }
      dpx_conn_deadline_touch(c);
    }
    if (reads)
      conn_apply_read(c, want);
    if (held && c->reading)
      deliver_held(c);
    if (completed)
      dpx_conn_complete(c, &w->completed, w->completed.n, 0);
    if ((ev & DPX_EV_BACKPRESSURE) && c->cfg->cbs.on_backpressure != NULL &&
        !c->closing)
      c->cfg->cbs.on_backpressure(c, queued, conn_user(c));
    if (batch)
      dpx_conn_batch_start(c);
  }
  c->pumping = false;
  duplex_conn_unref(c);
}

/* ---- closing --------------------------------------------------------------- */

void
dpx_conn_wake_waiters_locked(duplex_conn *c)
{
  dpx_wstate *ws = dpx_conn_w(c);
  for (dpx_waiter *w = ws != NULL ? ws->waiters : NULL; w != NULL;
       w = w->next)
    uv_cond_signal(&w->cv);
}

void
dpx_conn_mark_closed_locked(duplex_conn *c)
{
  c->state = DPX_CS_CLOSED;
  /* Entries that never reached a batch complete after the batch in flight
   * (which libuv cancels during uv_close), preserving order. */
  dpx_wstate *w = dpx_conn_w(c);
  if (w != NULL && w->intake.n > 0) {
    if (dpx_entvec_reserve(&w->cancelled, w->intake.n) == 0) {
      memcpy(w->cancelled.v + w->cancelled.n, w->intake.v,
             w->intake.n * sizeof(dpx_ent));
      w->cancelled.n += w->intake.n;
      w->intake.n = 0;
    }
  }
  dpx_conn_wake_waiters_locked(c);
}

static void conn_finish(duplex_conn *c);

void
dpx_conn_handle_closed(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (--c->handles_open == 0 && (x == NULL || !x->lookup_pending))
    conn_finish(c);
}

static void on_handle_closed(uv_handle_t *h);

static void
close_deadline(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL && x->deadline != NULL &&
      !uv_is_closing((uv_handle_t *)x->deadline)) {
    c->handles_open++;
    uv_close((uv_handle_t *)x->deadline, on_handle_closed);
  }
}

static void
on_handle_closed(uv_handle_t *h)
{
  dpx_conn_handle_closed(h->data);
}

static void
close_handle(duplex_conn *c, dpx_stream *s)
{
  if (s != NULL && !uv_is_closing(&s->handle)) {
    c->handles_open++;
    uv_close(&s->handle, on_handle_closed);
  }
}

void
dpx_conn_begin_close(duplex_conn *c, int reason)
{
  if (c->closing)
    return;
  c->closing = true;
  dpx_conn_lock(c);
  c->reason = reason;
  dpx_conn_mark_closed_locked(c);
  dpx_conn_unlock(c);
  close_deadline(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL && x->connecting != NULL && !c->has_rd) {
    /* Resolving, or between two connect attempts: the lookup's or the
     * attempt's callback finishes the close. */
    dpx_connect_cancel(c);
    return;
  }
  conn_read_stop(c);
  c->handles_open++; /* guard: finish only after both closes are issued */
  close_handle(c, dpx_conn_rd(c));
  if (dpx_conn_wr(c) != dpx_conn_rd(c))
    close_handle(c, dpx_conn_wr(c));
  if (--c->handles_open == 0)
    conn_finish(c);
}

void
dpx_conn_fail_unopened(duplex_conn *c, int reason)
{
  dpx_conn_lock(c);
  if (!c->closing) {
    c->closing = true;
    c->reason = reason;
  }
  dpx_conn_mark_closed_locked(c);
  dpx_conn_unlock(c);
  close_deadline(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  if (c->handles_open == 0 && (x == NULL || !x->lookup_pending))
    conn_finish(c);
}

/* Every handle is closed: complete what is left, tell the user, let go. */
static void
conn_finish(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL && x->connecting != NULL) {
    dpx_connect_state_free(x->connecting);
    x->connecting = NULL;
  }
  dpx_wstate *w = dpx_conn_w(c);
  /* A batch libuv never reported (handle never written) is canceled. */
  if (c->writing) {
    c->writing = false;
    dpx_conn_complete(c, &w->batch, w->bpos, DUPLEX_ECANCELED);
  }
  if (w != NULL && w->completed.n > 0)
    dpx_conn_complete(c, &w->completed, w->completed.n, 0);
  dpx_conn_lock(c);
  dpx_conn_mark_closed_locked(c); /* picks up anything queued meanwhile */
  w = dpx_conn_w(c); /* a callback above may have created it */
  dpx_conn_unlock(c);
  if (w != NULL) {
    dpx_conn_complete(c, &w->cancelled, 0, DUPLEX_ECANCELED);
    if (w->shut_pending) {
      w->shut_pending = false;
      if (w->shut_ent.done != NULL)
        w->shut_ent.done(c, DUPLEX_ECANCELED, w->shut_ent.user);
    }
  }
  if (c->in_list) {
    dpx_link_remove(&c->link);
    c->in_list = false;
  }
  if (c->cfg->cbs.on_close != NULL)
    c->cfg->cbs.on_close(c, c->reason, conn_user(c));
  dpx_conn_lock(c);
  dpx_conn_release_chunks_locked(c);
  c->loop = NULL; /* the loop may go away now */
  c->queued = 0;
  dpx_conn_unlock(c);
  duplex_conn_unref(c); /* the loop's reference */
}

int
duplex_conn_close(duplex_conn *conn, unsigned how)
{
  if (conn == NULL || how > DUPLEX_CLOSE_ABORT)
    return DUPLEX_EINVAL;
  dpx_conn_lock(conn);
  if (conn->state == DPX_CS_CLOSED ||
      (conn->state == DPX_CS_CLOSING && how == DUPLEX_CLOSE_GRACEFUL)) {
    dpx_conn_unlock(conn);
    return DUPLEX_ECLOSED;
  }
  if (how == DUPLEX_CLOSE_ABORT) {
    conn->abort_requested = true;
    dpx_conn_mark_closed_locked(conn);
  } else {
    dpx_wstate *w = dpx_conn_w_get_locked(conn);
    if (w == NULL || dpx_entvec_reserve(&w->intake, 1) != 0) {
      dpx_conn_unlock(conn);
      return DUPLEX_ENOMEM;
    }
    dpx_ent *e = &w->intake.v[w->intake.n++];
    memset(e, 0, sizeof *e);
    e->kind = DPX_ENT_CLOSE;
    conn->state = DPX_CS_CLOSING;
  }
  /* Always through the pump, so on_close never runs inside this call. An
   * abort must not wait for a batch stuck on a peer that does not read. */
  dpx_conn_schedule_locked(conn, how == DUPLEX_CLOSE_ABORT);
  dpx_conn_unlock(conn);
  return 0;
}

/* ---- deadlines ---------------------------------------------------------- */

static void on_deadline(uv_timer_t *t);

/* The earliest moment one of the deadlines that apply now can expire, or
 * 0 when none applies. */
static uint64_t
deadline_next(duplex_conn *c, dpx_conn_extra *x)
{
  uint64_t due = 0;
#define DPX_DUE_(cond, since, kind)                                          \
  do {                                                                       \
    if ((cond) && x->timeout[kind] != 0) {                                   \
      uint64_t d = (since) + x->timeout[kind];                               \
      if (due == 0 || d < due)                                               \
        due = d;                                                             \
    }                                                                        \
  } while (0)
  DPX_DUE_(!c->opened, x->t_start, DUPLEX_TIMEOUT_CONNECT);
  DPX_DUE_(c->opened, x->t_read > x->t_write ? x->t_read : x->t_write,
           DUPLEX_TIMEOUT_IDLE);
  DPX_DUE_(c->opened && c->reading, x->t_read, DUPLEX_TIMEOUT_READ);
  DPX_DUE_(c->opened && c->writing, x->t_write, DUPLEX_TIMEOUT_FLUSH);
#undef DPX_DUE_
  return due;
}

static void
deadline_arm(duplex_conn *c, dpx_conn_extra *x, uint64_t due)
{
  uint64_t now = uv_now(&c->loop->uv);
  x->deadline_due = due;
  uv_timer_start(x->deadline, on_deadline, due > now ? due - now : 0, 0);
}

void
dpx_conn_deadline_touch(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (c->closing || x == NULL)
    return;
  uint64_t due = deadline_next(c, x);
  if (due == 0) {
    if (x->deadline != NULL && x->deadline_due != 0) {
      uv_timer_stop(x->deadline);
      x->deadline_due = 0;
    }
    return;
  }
  if (x->deadline == NULL) {
    x->deadline = malloc(sizeof *x->deadline);
    if (x->deadline == NULL)
      return; /* deadlines are best effort under memory exhaustion */
    uv_timer_init(&c->loop->uv, x->deadline);
    x->deadline->data = c;
    x->deadline_due = 0;
  }
  /* Events only move deadlines later: re-arm only when this one is
   * sooner than the armed one (the timer re-checks when it fires). */
  if (x->deadline_due == 0 || due < x->deadline_due)
    deadline_arm(c, x, due);
}

static void
on_deadline(uv_timer_t *t)
{
  duplex_conn *c = t->data;
  dpx_conn_extra *x = dpx_conn_x(c);
  x->deadline_due = 0;
  if (c->closing)
    return;
  uint64_t due = deadline_next(c, x);
  if (due == 0)
    return;
  if (due <= uv_now(&c->loop->uv)) {
    dpx_conn_begin_close(c, DUPLEX_ETIMEDOUT);
    return;
  }
  deadline_arm(c, x, due);
}

int
duplex_conn_set_timeout(duplex_conn *conn, int kind, uint32_t ms)
{
  if (conn == NULL || kind < DUPLEX_TIMEOUT_CONNECT ||
      kind > DUPLEX_TIMEOUT_FLUSH)
    return DUPLEX_EINVAL;
  dpx_conn_lock(conn);
  if (conn->state == DPX_CS_CLOSED) {
    dpx_conn_unlock(conn);
    return DUPLEX_ECLOSED;
  }
  dpx_conn_extra *x = dpx_conn_x_get_locked(conn);
  if (x == NULL) {
    dpx_conn_unlock(conn);
    return DUPLEX_ENOMEM;
  }
  x->timeout_req[kind] = ms;
  x->timeouts_dirty = true;
  /* Applied by the pump, also on the loop thread: an expiry it causes
   * never runs inside this call. */
  dpx_conn_schedule_locked(conn, true);
  dpx_conn_unlock(conn);
  return 0;
}
