/* Signals on the loop: libuv's signal watcher, made from any thread and
 * watching by the time duplex_signal_new() returns. */
#include "internal.h"

#include <signal.h>
#include <stdlib.h>

/* References: the caller's (from duplex_signal_new), the loop's (while the
 * uv handle exists) and one per queued close op. */
struct duplex_signal {
  atomic_uint refs;
  uv_signal_t h;
  duplex_signal_cb cb;
  void *user;
  int signum;
  uv_mutex_t mu;
  uv_cond_t idle; /* signalled when a callback returns */
  /* ---- guarded by mu ---- */
  duplex_loop *loop; /* NULL once the loop is done with the watcher */
  bool close_requested;
  bool in_callback;
  /* ---- loop thread only ---- */
  bool closing;
  dpx_op op;
  dpx_link link;
};

static void
signal_free(duplex_signal *s)
{
  uv_cond_destroy(&s->idle);
  uv_mutex_destroy(&s->mu);
  free(s);
}

int
duplex_signal_ref(duplex_signal *sig)
{
  if (sig == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&sig->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_signal_unref(duplex_signal *sig)
{
  if (sig == NULL)
    return DUPLEX_EINVAL;
  if (atomic_fetch_sub_explicit(&sig->refs, 1u, memory_order_acq_rel) == 1u)
    signal_free(sig);
  return 0;
}

static void
on_signal_closed(uv_handle_t *h)
{
  duplex_signal *s = h->data;
  uv_mutex_lock(&s->mu);
  s->loop = NULL;
  s->close_requested = true;
  uv_mutex_unlock(&s->mu);
  duplex_signal_unref(s); /* the loop's reference */
}

static void
signal_close_now(duplex_signal *s)
{
  if (s->closing)
    return;
  s->closing = true;
  dpx_link_remove(&s->link);
  uv_close((uv_handle_t *)&s->h, on_signal_closed);
}

void
dpx_signal_close_all(duplex_loop *loop)
{
  while (loop->signals.next != &loop->signals)
    signal_close_now(
        DPX_CONTAINER_OF(loop->signals.next, duplex_signal, link));
}

static void
on_signal(uv_signal_t *h, int signum)
{
  duplex_signal *s = h->data;
  if (s->closing)
    return;
  /* No callback starts once duplex_signal_close() has returned. */
  uv_mutex_lock(&s->mu);
  bool skip = s->close_requested;
  s->in_callback = !skip;
  uv_mutex_unlock(&s->mu);
  if (skip)
    return;
  s->cb(s, signum, s->user);
  uv_mutex_lock(&s->mu);
  s->in_callback = false;
  uv_cond_broadcast(&s->idle);
  uv_mutex_unlock(&s->mu);
}

static void
on_start_failed_closed(uv_handle_t *h)
{
  signal_free(h->data);
}

typedef struct start_ctx {
  duplex_signal *s;
  bool handle_made; /* a failed start closes the handle, which frees s */
} start_ctx;

/* With the loop's uv state to ourselves (dpx_loop_exec). */
static int
signal_start(duplex_loop *loop, void *arg)
{
  start_ctx *ctx = arg;
  duplex_signal *s = ctx->s;
  if (loop->tearing_down)
    return DUPLEX_ECLOSED;
  int r = uv_signal_init(&loop->uv, &s->h);
  if (r != 0)
    return dpx_err(r);
  s->h.data = s;
  r = uv_signal_start(&s->h, on_signal, s->signum);
  if (r != 0) {
    ctx->handle_made = true;
    uv_close((uv_handle_t *)&s->h, on_start_failed_closed);
    return dpx_err(r);
  }
  dpx_link_insert(&loop->signals, &s->link);
  return 0;
}

int
duplex_signal_new(duplex_signal **out, duplex_loop *loop, int signum,
                  duplex_signal_cb cb, void *user)
{
  if (out != NULL)
    *out = NULL;
  if (out == NULL || loop == NULL || cb == NULL || signum <= 0 ||
      signum >= NSIG)
    return DUPLEX_EINVAL;
#if defined(SIGKILL) && defined(SIGSTOP)
  if (signum == SIGKILL || signum == SIGSTOP)
    return DUPLEX_EINVAL; /* cannot be caught */
#endif
  duplex_signal *s = calloc(1, sizeof *s);
  if (s == NULL)
    return DUPLEX_ENOMEM;
  if (uv_mutex_init(&s->mu) != 0) {
    free(s);
    return DUPLEX_ENOMEM;
  }
  if (uv_cond_init(&s->idle) != 0) {
    uv_mutex_destroy(&s->mu);
    free(s);
    return DUPLEX_ENOMEM;
  }
  atomic_init(&s->refs, 2u); /* the caller's and the loop's */
  s->loop = loop;
  s->cb = cb;
  s->user = user;
  s->signum = signum;
  dpx_link_init(&s->link);
  start_ctx ctx = { s, false };
  int r = dpx_loop_exec(loop, signal_start, &ctx);
  if (r != 0) {
    if (!ctx.handle_made)
      signal_free(s);
    return r;
  }
  *out = s;
  return 0;
}

static void
close_op_run(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_signal *s = DPX_CONTAINER_OF(op, duplex_signal, op);
  (void)loop;
  (void)status;
  signal_close_now(s);
  duplex_signal_unref(s); /* the op's reference */
}

int
duplex_signal_close(duplex_signal *sig)
{
  if (sig == NULL)
    return DUPLEX_EINVAL;
  uv_mutex_lock(&sig->mu);
  if (sig->close_requested || sig->loop == NULL) {
    uv_mutex_unlock(&sig->mu);
    return DUPLEX_ECLOSED;
  }
  sig->close_requested = true;
  duplex_loop *loop = sig->loop;
  if (dpx_on_loop(loop)) {
    uv_mutex_unlock(&sig->mu);
    signal_close_now(sig);
    return 0;
  }
  /* Queued under mu: the loop cannot let go (on_signal_closed takes mu)
   * before the op is in its queue. */
  atomic_fetch_add_explicit(&sig->refs, 1u, memory_order_relaxed);
  sig->op.fn = close_op_run;
  dpx_loop_submit(loop, &sig->op, false);
  /* A callback already running finishes before close returns. */
  while (sig->in_callback)
    uv_cond_wait(&sig->idle, &sig->mu);
  uv_mutex_unlock(&sig->mu);
  return 0;
}

int
duplex_signal_get_signum(const duplex_signal *sig, int *signum)
{
  if (sig == NULL || signum == NULL)
    return DUPLEX_EINVAL;
  *signum = sig->signum;
  return 0;
}
