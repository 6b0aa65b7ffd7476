/* Conn deadlines: connect, idle, read and flush. One lazily created timer
 * per conn is armed for the nearest deadline that applies; events only
 * move deadlines later, so the timer re-checks when it fires instead of
 * being re-armed on every byte. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

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
  if (c->tls_wait) {
    uint64_t d = dpx_conn_tls_hs_due(c); /* the handshake deadline */
    if (d != 0 && (due == 0 || d < due))
      due = d;
  }
  if (c->lingering && (due == 0 || x->t_linger + DPX_TLS_LINGER_MS < due))
    due = x->t_linger + DPX_TLS_LINGER_MS;
  return due;
}

static void
deadline_arm(duplex_conn *c, dpx_conn_extra *x, uint64_t due)
{
  uint64_t now = uv_now(&c->loop->uv);
  x->deadline_due = due;
  uv_timer_start(x->deadline, on_deadline, due > now ? due - now : 0, 0);
}

static void
on_deadline_released(uv_handle_t *h)
{
  duplex_conn *c = h->data;
  free(h);
  duplex_conn_unref(c);
}

void
dpx_conn_deadline_release(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (c->close_begun || x == NULL || x->deadline == NULL ||
      deadline_next(c, x) != 0)
    return;
  /* No deadline applies any more (a finished handshake): an idle conn
   * keeps no timer. The next deadline that applies makes a new one. */
  uv_timer_t *t = x->deadline;
  x->deadline = NULL;
  x->deadline_due = 0;
  duplex_conn_ref(c); /* until the close callback has run */
  uv_close((uv_handle_t *)t, on_deadline_released);
}

void
dpx_conn_deadline_touch(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (c->close_begun || x == NULL)
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
  if (c->close_begun)
    return;
  uint64_t due = deadline_next(c, x);
  if (due == 0)
    return;
  if (due <= uv_now(&c->loop->uv)) {
    if (c->tls_wait)
      dpx_conn_tls_timed_out(c);
    /* A lingering close did all it had to: the peer just never ended. */
    dpx_conn_begin_close(c, c->lingering ? 0 : DUPLEX_ETIMEDOUT);
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

/* Loop thread: the time of the last byte read / written, which only
 * deadlines look at. */
void
dpx_conn_stamp_read(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL)
    x->t_read = uv_now(&c->loop->uv);
}

void
dpx_conn_stamp_write(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL)
    x->t_write = uv_now(&c->loop->uv);
}

void
dpx_conn_deadline_read_started(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL &&
      (x->deadline != NULL || x->timeout[DUPLEX_TIMEOUT_READ] != 0)) {
    /* Paused time does not count against the read deadline. */
    x->t_read = uv_now(&c->loop->uv);
    dpx_conn_deadline_touch(c);
  }
}

void
dpx_conn_deadline_retime(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (c->close_begun || x == NULL)
    return;
  if (!x->stamped && c->opened) {
    /* Deadlines set after the open count from now. */
    x->t_read = x->t_write = uv_now(&c->loop->uv);
    x->stamped = true;
  }
  dpx_conn_deadline_touch(c);
}
