/* Timers: start, stop and close from any thread; callbacks on the loop.
 *
 * Off the loop thread a call records the wanted state under t->mu and
 * queues the timer's op; the loop applies the latest wanted state. On the
 * loop thread calls act on the uv timer directly. */
#include "internal.h"

#include <stdlib.h>

enum { DPX_TIMER_KEEP, DPX_TIMER_START, DPX_TIMER_STOP };

/* References: the caller's (from duplex_timer_new), the loop's (while the
 * uv handle exists, or until the creation op ran) and one per queued op. */
struct duplex_timer {
  atomic_uint refs;
  uv_timer_t h;
  duplex_timer_cb cb;
  void *user;
  uv_mutex_t mu;
  uv_cond_t idle; /* signalled when a callback returns */
  /* ---- guarded by mu ---- */
  duplex_loop *loop; /* NULL once the loop is done with the timer */
  int want;          /* DPX_TIMER_* waiting to be applied */
  uint64_t timeout, repeat;
  bool close_requested;
  bool in_callback; /* the loop is running cb right now */
  bool op_queued;
  /* ---- loop thread only ---- */
  bool inited;
  bool closing;
  dpx_op op;
  dpx_link link;
};

static void
timer_free(duplex_timer *t)
{
  uv_cond_destroy(&t->idle);
  uv_mutex_destroy(&t->mu);
  free(t);
}

int
duplex_timer_ref(duplex_timer *timer)
{
  if (timer == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&timer->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_timer_unref(duplex_timer *timer)
{
  if (timer == NULL)
    return DUPLEX_EINVAL;
  if (atomic_fetch_sub_explicit(&timer->refs, 1u, memory_order_acq_rel) == 1u)
    timer_free(timer);
  return 0;
}

/* The loop lets go of the timer (handle closed, or never created). */
static void
timer_detach(duplex_timer *t)
{
  uv_mutex_lock(&t->mu);
  t->loop = NULL;
  t->close_requested = true;
  uv_mutex_unlock(&t->mu);
  duplex_timer_unref(t); /* the loop's reference */
}

static void
on_timer_closed(uv_handle_t *h)
{
  timer_detach(h->data);
}

static void
on_timer(uv_timer_t *h)
{
  duplex_timer *t = h->data;
  if (t->closing)
    return;
  /* A close (or stop) asked for by another thread and not yet applied
   * wins over an expiry: no callback starts once close has returned. */
  uv_mutex_lock(&t->mu);
  bool skip = t->close_requested || t->want == DPX_TIMER_STOP;
  t->in_callback = !skip;
  uv_mutex_unlock(&t->mu);
  if (skip)
    return;
  t->cb(t, t->user);
  uv_mutex_lock(&t->mu);
  t->in_callback = false;
  uv_cond_broadcast(&t->idle);
  uv_mutex_unlock(&t->mu);
}

static void
timer_close_now(duplex_timer *t)
{
  if (t->closing)
    return;
  t->closing = true;
  dpx_link_remove(&t->link);
  uv_close((uv_handle_t *)&t->h, on_timer_closed);
}

void
dpx_timer_close_all(duplex_loop *loop)
{
  while (loop->timers.next != &loop->timers)
    timer_close_now(DPX_CONTAINER_OF(loop->timers.next, duplex_timer, link));
}

/* Loop thread: make the uv timer match what was asked for. */
static void
timer_apply(duplex_timer *t)
{
  uv_mutex_lock(&t->mu);
  int want = t->want;
  uint64_t timeout = t->timeout, repeat = t->repeat;
  bool close = t->close_requested;
  t->want = DPX_TIMER_KEEP;
  uv_mutex_unlock(&t->mu);
  if (t->closing)
    return;
  if (close) {
    timer_close_now(t);
    return;
  }
  if (want == DPX_TIMER_START)
    uv_timer_start(&t->h, on_timer, timeout, repeat);
  else if (want == DPX_TIMER_STOP)
    uv_timer_stop(&t->h);
}

static void
timer_init_on_loop(duplex_timer *t, duplex_loop *loop)
{
  uv_timer_init(&loop->uv, &t->h); /* cannot fail */
  t->h.data = t;
  t->inited = true;
  dpx_link_insert(&loop->timers, &t->link);
}

static void
timer_op(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_timer *t = DPX_CONTAINER_OF(op, duplex_timer, op);
  uv_mutex_lock(&t->mu);
  t->op_queued = false;
  bool gone = t->loop == NULL;
  uv_mutex_unlock(&t->mu);
  if (!gone && !t->inited) {
    if (status != 0) {
      timer_detach(t); /* the loop was freed before the timer existed */
      gone = true;
    } else {
      timer_init_on_loop(t, loop);
    }
  }
  if (!gone)
    timer_apply(t);
  duplex_timer_unref(t); /* the op's reference */
}

/* Under t->mu, the loop still holding the timer: make sure the op runs. */
static void
timer_schedule_locked(duplex_timer *t)
{
  if (t->op_queued)
    return;
  t->op_queued = true;
  atomic_fetch_add_explicit(&t->refs, 1u, memory_order_relaxed);
  dpx_loop_submit(t->loop, &t->op, false);
}

int
duplex_timer_new(duplex_timer **out, duplex_loop *loop, duplex_timer_cb cb,
                 void *user)
{
  if (out != NULL)
    *out = NULL;
  if (out == NULL || loop == NULL || cb == NULL)
    return DUPLEX_EINVAL;
  duplex_timer *t = calloc(1, sizeof *t);
  if (t == NULL)
    return DUPLEX_ENOMEM;
  if (uv_mutex_init(&t->mu) != 0) {
    free(t);
    return DUPLEX_ENOMEM;
  }
  if (uv_cond_init(&t->idle) != 0) {
    uv_mutex_destroy(&t->mu);
    free(t);
    return DUPLEX_ENOMEM;
  }
  atomic_init(&t->refs, 2u); /* the caller's and the loop's */
  t->loop = loop;
  t->cb = cb;
  t->user = user;
  t->op.fn = timer_op;
  dpx_link_init(&t->link);
  if (dpx_on_loop(loop)) {
    if (loop->tearing_down) {
      timer_free(t);
      return DUPLEX_ECLOSED; /* it would never fire */
    }
    timer_init_on_loop(t, loop);
  } else {
    t->op_queued = true;
    atomic_init(&t->refs, 3u); /* and the creation op's */
    int r = dpx_loop_submit(loop, &t->op, true);
    if (r != 0) {
      timer_free(t);
      return r;
    }
  }
  *out = t;
  return 0;
}

static int
timer_request(duplex_timer *t, int want, uint64_t timeout, uint64_t repeat)
{
  uv_mutex_lock(&t->mu);
  if (t->close_requested || t->loop == NULL) {
    uv_mutex_unlock(&t->mu);
    return DUPLEX_ECLOSED;
  }
  t->want = want;
  t->timeout = timeout;
  t->repeat = repeat;
  bool here = dpx_on_loop(t->loop) && t->inited;
  if (!here)
    timer_schedule_locked(t);
  uv_mutex_unlock(&t->mu);
  if (here)
    timer_apply(t);
  return 0;
}

int
duplex_timer_start(duplex_timer *timer, uint64_t timeout_ms,
                   uint64_t repeat_ms)
{
  if (timer == NULL)
    return DUPLEX_EINVAL;
  return timer_request(timer, DPX_TIMER_START, timeout_ms, repeat_ms);
}

int
duplex_timer_stop(duplex_timer *timer)
{
  if (timer == NULL)
    return DUPLEX_EINVAL;
  return timer_request(timer, DPX_TIMER_STOP, 0, 0);
}

int
duplex_timer_close(duplex_timer *timer)
{
  if (timer == NULL)
    return DUPLEX_EINVAL;
  uv_mutex_lock(&timer->mu);
  if (timer->close_requested || timer->loop == NULL) {
    uv_mutex_unlock(&timer->mu);
    return DUPLEX_ECLOSED;
  }
  timer->close_requested = true;
  bool here = dpx_on_loop(timer->loop) && timer->inited;
  if (!here) {
    timer_schedule_locked(timer);
    /* A callback already running finishes before close returns (the
     * caller's reference keeps the memory while we wait). */
    while (timer->in_callback)
      uv_cond_wait(&timer->idle, &timer->mu);
  }
  uv_mutex_unlock(&timer->mu);
  if (here)
    timer_close_now(timer);
  return 0;
}
