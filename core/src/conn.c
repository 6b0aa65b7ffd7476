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

duplex_conn *
dpx_conn_new(duplex_loop *loop, int kind, const duplex_conn_opts *opts,
             unsigned nhandles)
{
  duplex_conn *c = calloc(1, sizeof *c + nhandles * sizeof(dpx_stream));
  if (c == NULL)
    return NULL;
  if (uv_mutex_init(&c->mu) != 0) {
    free(c);
    return NULL;
  }
  atomic_init(&c->refs, 1u); /* the loop's reference, dropped after close */
  atomic_init(&c->user, opts != NULL ? opts->user : NULL);
  c->loop = loop;
  c->state = DPX_CS_OPEN;
  c->kind = kind;
  c->want_read = opts == NULL || !(opts->flags & DUPLEX_CONN_START_PAUSED);
  /* Nothing is written before the conn opens; opening pumps it. */
  c->scheduled = true;
  duplex_conn_cbs_init(&c->cbs);
  if (opts != NULL && opts->cbs != NULL)
    memcpy(&c->cbs, opts->cbs, sizeof c->cbs);
  c->cbs.size = sizeof c->cbs;
  c->high = opts && opts->high_watermark ? opts->high_watermark
                                         : DPX_DEFAULT_HIGH;
  c->low = opts && opts->low_watermark ? opts->low_watermark : c->high / 4;
  c->hard = opts && opts->hard_limit
                ? opts->hard_limit
                : (c->high > DPX_DEFAULT_HARD ? c->high : DPX_DEFAULT_HARD);
  c->flags = opts ? opts->flags : 0;
  if (opts != NULL) {
    c->timeout[DUPLEX_TIMEOUT_CONNECT] = opts->connect_timeout_ms;
    c->timeout[DUPLEX_TIMEOUT_IDLE] = opts->idle_timeout_ms;
    c->timeout[DUPLEX_TIMEOUT_READ] = opts->read_timeout_ms;
    c->timeout[DUPLEX_TIMEOUT_FLUSH] = opts->flush_timeout_ms;
    memcpy(c->timeout_req, c->timeout, sizeof c->timeout);
  }
  if (opts != NULL && opts->framing != NULL &&
      opts->framing->kind != DUPLEX_FRAME_NONE) {
    c->framer = calloc(1, sizeof *c->framer);
    if (c->framer == NULL) {
      uv_mutex_destroy(&c->mu);
      free(c);
      return NULL;
    }
    dpx_framer_init(c->framer, opts->framing);
  }
  c->op.fn = dpx_conn_pump_op;
  c->open_op.fn = dpx_conn_open_op;
  c->fd_in = c->fd_out = -1;
  dpx_link_init(&c->link);
  return c;
}

void
dpx_conn_free(duplex_conn *c)
{
  dpx_entvec_free(&c->intake);
  dpx_entvec_free(&c->batch);
  dpx_entvec_free(&c->completed);
  dpx_entvec_free(&c->cancelled);
  free(c->bufs);
  free(c->sreq);
  free(c->peer);
  free(c->deadline);
  free(c->held);
  if (c->framer != NULL) {
    dpx_framer_free(c->framer);
    free(c->framer);
  }
  uv_mutex_destroy(&c->mu);
  free(c);
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
  uv_mutex_lock(&c->mu);
  *out = c->queued;
  uv_mutex_unlock(&c->mu);
  return 0;
}

int
duplex_conn_get_peer(const duplex_conn *conn, char *buf, size_t len)
{
  if (conn == NULL || buf == NULL || len == 0)
    return DUPLEX_EINVAL;
  duplex_conn *c = (duplex_conn *)conn;
  int r = 0;
  uv_mutex_lock(&c->mu);
  if (c->peer == NULL) {
    r = DUPLEX_ENOTCONN;
    buf[0] = '\0';
  } else if (strlen(c->peer) + 1 > len) {
    r = DUPLEX_ENOBUFS;
    buf[0] = '\0';
  } else {
    memcpy(buf, c->peer, strlen(c->peer) + 1);
  }
  uv_mutex_unlock(&c->mu);
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
  uv_mutex_lock(&c->mu);
  c->op_queued = false;
  uv_mutex_unlock(&c->mu);
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
    uv_read_stop(&c->rd->stream);
    c->reading = false;
  }
}

/* Frames decoded while reading is paused (a chunk holds several and the
 * callback paused after the first) wait here, length-prefixed, until a
 * resume delivers them: no read callback runs while paused. */
static int
hold_frame(duplex_conn *c, const char *msg, size_t len)
{
  size_t need = c->held_len + sizeof len + len;
  if (need > c->held_cap) {
    size_t cap = c->held_cap ? c->held_cap : 256;
    while (cap < need)
      cap *= 2;
    char *p = realloc(c->held, cap);
    if (p == NULL)
      return DUPLEX_ENOMEM;
    c->held = p;
    c->held_cap = cap;
  }
  memcpy(c->held + c->held_len, &len, sizeof len);
  memcpy(c->held + c->held_len + sizeof len, msg, len);
  c->held_len = need;
  return 0;
}

static int
emit_frame(void *ctx, const char *msg, size_t len)
{
  duplex_conn *c = ctx;
  if (c->closing)
    return 1;
  if (!c->reading || c->held_off < c->held_len) {
    if (hold_frame(c, msg, len) != 0) {
      dpx_conn_begin_close(c, DUPLEX_ENOMEM);
      return 1;
    }
    return 0;
  }
  if (c->cbs.on_read != NULL)
    c->cbs.on_read(c, msg, len, conn_user(c));
  return c->closing;
}

/* Deliver held frames while reading stays on (loop thread, pump). */
static void
deliver_held(duplex_conn *c)
{
  while (c->held_off < c->held_len && c->reading && !c->closing) {
    size_t len;
    memcpy(&len, c->held + c->held_off, sizeof len);
    const char *msg = c->held + c->held_off + sizeof len;
    c->held_off += sizeof len + len;
    if (c->cbs.on_read != NULL)
      c->cbs.on_read(c, msg, len, conn_user(c));
  }
  if (c->held_off == c->held_len && c->held != NULL) {
    free(c->held);
    c->held = NULL;
    c->held_len = c->held_off = c->held_cap = 0;
  }
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
  duplex_conn *c = s->data;
  if (nread > 0) {
    /* Stamped always: a deadline set later counts from the last event. */
    c->t_read = uv_now(&c->loop->uv);
    if (c->closing)
      return;
    if (c->framer != NULL) {
      int r = dpx_framer_feed(c->framer, buf->base, (size_t)nread,
                              emit_frame, c);
      if (r != 0)
        dpx_conn_begin_close(c, r);
    } else if (c->cbs.on_read != NULL) {
      c->cbs.on_read(c, buf->base, (size_t)nread, conn_user(c));
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
    if (c->framer != NULL && dpx_framer_eof(c->framer) != 0) {
      /* A partial frame at EOF: nothing of it is delivered. */
      dpx_conn_begin_close(c, DUPLEX_EPROTO);
      return;
    }
    if (c->cbs.on_eof != NULL && !c->closing)
      c->cbs.on_eof(c, conn_user(c));
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
    if (uv_read_start(&c->rd->stream, on_alloc, on_read) == 0) {
      c->reading = true;
      if (c->deadline != NULL || c->timeout[DUPLEX_TIMEOUT_READ] != 0) {
        /* Paused time does not count against the read deadline. */
        c->t_read = uv_now(&c->loop->uv);
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
  uv_mutex_lock(&conn->mu);
  if (conn->state == DPX_CS_CLOSED) {
    uv_mutex_unlock(&conn->mu);
    return DUPLEX_ECLOSED;
  }
  conn->want_read = want;
  bool here = dpx_on_loop(conn->loop);
  if (!here)
    dpx_conn_schedule_locked(conn, true);
  uv_mutex_unlock(&conn->mu);
  if (!here)
    return 0;
  conn_apply_read(conn, want);
  if (want && conn->held != NULL) {
    /* Frames held while paused go first, from the pump. */
    uv_mutex_lock(&conn->mu);
    dpx_conn_schedule_locked(conn, true);
    uv_mutex_unlock(&conn->mu);
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
  c->t_read = c->t_write = uv_now(&c->loop->uv);
  dpx_conn_deadline_touch(c);
  if (c->rd->handle.type == UV_TCP) {
    uv_tcp_nodelay(&c->rd->tcp, !(c->flags & DUPLEX_CONN_NAGLE));
    if (c->flags & DUPLEX_CONN_KEEPALIVE)
      uv_tcp_keepalive(&c->rd->tcp, 1, 60);
  }
  dpx_conn_set_peer(c);
  if (c->cbs.on_open != NULL)
    c->cbs.on_open(c, conn_user(c));
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
    uv_mutex_lock(&c->mu);
    bool abort = c->abort_requested;
    bool retime = c->timeouts_dirty;
    if (retime) {
      memcpy(c->timeout, c->timeout_req, sizeof c->timeout);
      c->timeouts_dirty = false;
    }
    bool want = c->want_read;
    unsigned ev = c->events;
    size_t queued = c->queued;
    bool batch = !abort && c->opened && !c->writing && !c->closing &&
                 !c->shut_pending && c->intake.n > 0;
    c->events = 0;
    if (batch) {
      dpx_entvec t = c->batch;
      c->batch = c->intake;
      c->intake = t;
      c->writing = true;
    }
    bool reads = c->opened && !c->closing && !c->eof_seen &&
                 want != c->reading;
    /* An abort before the open op ran waits for it (FIFO order). */
    abort = abort && c->in_list;
    bool held = c->held != NULL && (want || c->reading) && !c->closing;
    bool work = (abort && !c->closing) || ev != 0 || batch || reads ||
                c->completed.n > 0 || retime || held;
    if (!work) {
      /* Nothing left: a later request must wake us, unless a batch in
       * flight or the pending open will pump anyway. */
      c->scheduled = c->writing || !c->opened || c->closing;
      uv_mutex_unlock(&c->mu);
      break;
    }
    uv_mutex_unlock(&c->mu);

    if (abort && !c->closing) {
      dpx_conn_begin_close(c, c->abort_reason);
      continue;
    }
    if (retime && !c->closing)
      dpx_conn_deadline_touch(c);
    if (reads)
      conn_apply_read(c, want);
    if (held && c->reading)
      deliver_held(c);
    if (c->completed.n > 0)
      dpx_conn_complete(c, &c->completed, c->completed.n, 0);
    if ((ev & DPX_EV_BACKPRESSURE) && c->cbs.on_backpressure != NULL &&
        !c->closing)
      c->cbs.on_backpressure(c, queued, conn_user(c));
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
  for (dpx_waiter *w = c->waiters; w != NULL; w = w->next)
    uv_cond_signal(&w->cv);
}

void
dpx_conn_mark_closed_locked(duplex_conn *c)
{
  c->state = DPX_CS_CLOSED;
  /* Entries that never reached a batch complete after the batch in flight
   * (which libuv cancels during uv_close), preserving order. */
  if (c->intake.n > 0) {
    if (dpx_entvec_reserve(&c->cancelled, c->intake.n) == 0) {
      memcpy(c->cancelled.v + c->cancelled.n, c->intake.v,
             c->intake.n * sizeof(dpx_ent));
      c->cancelled.n += c->intake.n;
      c->intake.n = 0;
    }
  }
  dpx_conn_wake_waiters_locked(c);
}

static void conn_finish(duplex_conn *c);

void
dpx_conn_handle_closed(duplex_conn *c)
{
  if (--c->handles_open == 0 && !c->lookup_pending)
    conn_finish(c);
}

static void on_handle_closed(uv_handle_t *h);

static void
close_deadline(duplex_conn *c)
{
  if (c->deadline != NULL && !uv_is_closing((uv_handle_t *)c->deadline)) {
    c->handles_open++;
    uv_close((uv_handle_t *)c->deadline, on_handle_closed);
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
  c->close_reason = reason;
  uv_mutex_lock(&c->mu);
  dpx_conn_mark_closed_locked(c);
  uv_mutex_unlock(&c->mu);
  close_deadline(c);
  if (c->connecting != NULL && c->rd == NULL) {
    /* Resolving, or between two connect attempts: the lookup's or the
     * attempt's callback finishes the close. */
    dpx_connect_cancel(c);
    return;
  }
  conn_read_stop(c);
  c->handles_open++; /* guard: finish only after both closes are issued */
  close_handle(c, c->rd);
  if (c->wr != c->rd)
    close_handle(c, c->wr);
  if (--c->handles_open == 0)
    conn_finish(c);
}

void
dpx_conn_fail_unopened(duplex_conn *c, int reason)
{
  if (!c->closing) {
    c->closing = true;
    c->close_reason = reason;
  }
  uv_mutex_lock(&c->mu);
  dpx_conn_mark_closed_locked(c);
  uv_mutex_unlock(&c->mu);
  close_deadline(c);
  if (c->handles_open == 0 && !c->lookup_pending)
    conn_finish(c);
}

/* Every handle is closed: complete what is left, tell the user, let go. */
static void
conn_finish(duplex_conn *c)
{
  if (c->connecting != NULL) {
    dpx_connect_state_free(c->connecting);
    c->connecting = NULL;
  }
  /* A batch libuv never reported (handle never written) is canceled. */
  if (c->writing) {
    c->writing = false;
    dpx_conn_complete(c, &c->batch, c->bpos, DUPLEX_ECANCELED);
  }
  if (c->completed.n > 0)
    dpx_conn_complete(c, &c->completed, c->completed.n, 0);
  uv_mutex_lock(&c->mu);
  dpx_conn_mark_closed_locked(c); /* picks up anything queued meanwhile */
  uv_mutex_unlock(&c->mu);
  dpx_conn_complete(c, &c->cancelled, 0, DUPLEX_ECANCELED);
  if (c->shut_pending) {
    c->shut_pending = false;
    if (c->shut_ent.done != NULL)
      c->shut_ent.done(c, DUPLEX_ECANCELED, c->shut_ent.user);
  }
  if (c->in_list) {
    dpx_link_remove(&c->link);
    c->in_list = false;
  }
  if (c->cbs.on_close != NULL)
    c->cbs.on_close(c, c->close_reason, conn_user(c));
  uv_mutex_lock(&c->mu);
  dpx_conn_release_chunks_locked(c);
  c->loop = NULL; /* the loop may go away now */
  c->queued = 0;
  uv_mutex_unlock(&c->mu);
  duplex_conn_unref(c); /* the loop's reference */
}

int
duplex_conn_close(duplex_conn *conn, unsigned how)
{
  if (conn == NULL || how > DUPLEX_CLOSE_ABORT)
    return DUPLEX_EINVAL;
  uv_mutex_lock(&conn->mu);
  if (conn->state == DPX_CS_CLOSED ||
      (conn->state == DPX_CS_CLOSING && how == DUPLEX_CLOSE_GRACEFUL)) {
    uv_mutex_unlock(&conn->mu);
    return DUPLEX_ECLOSED;
  }
  if (how == DUPLEX_CLOSE_ABORT) {
    conn->abort_requested = true;
    dpx_conn_mark_closed_locked(conn);
  } else {
    if (dpx_entvec_reserve(&conn->intake, 1) != 0) {
      uv_mutex_unlock(&conn->mu);
      return DUPLEX_ENOMEM;
    }
    dpx_ent *e = &conn->intake.v[conn->intake.n++];
    memset(e, 0, sizeof *e);
    e->kind = DPX_ENT_CLOSE;
    conn->state = DPX_CS_CLOSING;
  }
  /* Always through the pump, so on_close never runs inside this call. An
   * abort must not wait for a batch stuck on a peer that does not read. */
  dpx_conn_schedule_locked(conn, how == DUPLEX_CLOSE_ABORT);
  uv_mutex_unlock(&conn->mu);
  return 0;
}

/* ---- deadlines ---------------------------------------------------------- */

static void on_deadline(uv_timer_t *t);

/* The earliest moment one of the deadlines that apply now can expire, or
 * 0 when none applies. */
static uint64_t
deadline_next(duplex_conn *c)
{
  uint64_t due = 0;
#define DPX_DUE_(cond, since, kind)                                          \
  do {                                                                       \
    if ((cond) && c->timeout[kind] != 0) {                                   \
      uint64_t d = (since) + c->timeout[kind];                               \
      if (due == 0 || d < due)                                               \
        due = d;                                                             \
    }                                                                        \
  } while (0)
  DPX_DUE_(!c->opened, c->t_start, DUPLEX_TIMEOUT_CONNECT);
  DPX_DUE_(c->opened, c->t_read > c->t_write ? c->t_read : c->t_write,
           DUPLEX_TIMEOUT_IDLE);
  DPX_DUE_(c->opened && c->reading, c->t_read, DUPLEX_TIMEOUT_READ);
  DPX_DUE_(c->opened && c->writing, c->t_write, DUPLEX_TIMEOUT_FLUSH);
#undef DPX_DUE_
  return due;
}

static void
deadline_arm(duplex_conn *c, uint64_t due)
{
  uint64_t now = uv_now(&c->loop->uv);
  c->deadline_due = due;
  uv_timer_start(c->deadline, on_deadline, due > now ? due - now : 0, 0);
}

void
dpx_conn_deadline_touch(duplex_conn *c)
{
  if (c->closing)
    return;
  uint64_t due = deadline_next(c);
  if (due == 0) {
    if (c->deadline != NULL && c->deadline_due != 0) {
      uv_timer_stop(c->deadline);
      c->deadline_due = 0;
    }
    return;
  }
  if (c->deadline == NULL) {
    c->deadline = malloc(sizeof *c->deadline);
    if (c->deadline == NULL)
      return; /* deadlines are best effort under memory exhaustion */
    uv_timer_init(&c->loop->uv, c->deadline);
    c->deadline->data = c;
    c->deadline_due = 0;
  }
  /* Events only move deadlines later: re-arm only when this one is
   * sooner than the armed one (the timer re-checks when it fires). */
  if (c->deadline_due == 0 || due < c->deadline_due)
    deadline_arm(c, due);
}

static void
on_deadline(uv_timer_t *t)
{
  duplex_conn *c = t->data;
  c->deadline_due = 0;
  if (c->closing)
    return;
  uint64_t due = deadline_next(c);
  if (due == 0)
    return;
  if (due <= uv_now(&c->loop->uv)) {
    dpx_conn_begin_close(c, DUPLEX_ETIMEDOUT);
    return;
  }
  deadline_arm(c, due);
}

int
duplex_conn_set_timeout(duplex_conn *conn, int kind, uint32_t ms)
{
  if (conn == NULL || kind < DUPLEX_TIMEOUT_CONNECT ||
      kind > DUPLEX_TIMEOUT_FLUSH)
    return DUPLEX_EINVAL;
  uv_mutex_lock(&conn->mu);
  if (conn->state == DPX_CS_CLOSED) {
    uv_mutex_unlock(&conn->mu);
    return DUPLEX_ECLOSED;
  }
  conn->timeout_req[kind] = ms;
  conn->timeouts_dirty = true;
  /* Applied by the pump, also on the loop thread: an expiry it causes
   * never runs inside this call. */
  dpx_conn_schedule_locked(conn, true);
  uv_mutex_unlock(&conn->mu);
  return 0;
}
