/* Loop, inbox, deferred list, run/start/stop/free. */

#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* CPU_SET, pthread_setaffinity_np */
#endif
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

DPX_THREAD_LOCAL duplex_loop *dpx_tls_loop;

/* ---- lists ----------------------------------------------------------- */

void
dpx_link_init(dpx_link *head)
{
  head->prev = head;
  head->next = head;
}

void
dpx_link_insert(dpx_link *head, dpx_link *node)
{
  node->prev = head->prev;
  node->next = head;
  head->prev->next = node;
  head->prev = node;
}

void
dpx_link_remove(dpx_link *node)
{
  node->prev->next = node->next;
  node->next->prev = node->prev;
  node->prev = node->next = node;
}

static void
oplist_push(dpx_oplist *l, dpx_op *op)
{
  op->next = NULL;
  if (l->tail != NULL)
    l->tail->next = op;
  else
    l->head = op;
  l->tail = op;
}

static dpx_op *
oplist_take(dpx_oplist *l)
{
  dpx_op *head = l->head;
  l->head = l->tail = NULL;
  return head;
}

static void
oplist_run(duplex_loop *loop, dpx_op *op, int status)
{
  while (op != NULL) {
    dpx_op *next = op->next;
    op->next = NULL;
    op->fn(loop, op, status);
    op = next;
  }
}

/* ---- inbox and deferred list ----------------------------------------- */

/* Loop-thread requests (the deferred list) are always older in cause than
 * what other threads queued since: run them first, so one order holds. */
static void
drain_deferred(duplex_loop *loop, int status)
{
  dpx_op *ops = oplist_take(&loop->deferred);
  oplist_run(loop, ops, status);
}

static void
drain_inbox(duplex_loop *loop, int status)
{
  drain_deferred(loop, status);
  uv_mutex_lock(&loop->mu);
  dpx_op *ops = oplist_take(&loop->inbox);
  uv_mutex_unlock(&loop->mu);
  oplist_run(loop, ops, status);
}

static void
on_wake(uv_async_t *h)
{
  duplex_loop *loop = DPX_CONTAINER_OF(h, duplex_loop, wake);
  bool stop;
  uv_mutex_lock(&loop->mu);
  stop = loop->quit || loop->halt || (loop->stop_requested && !loop->started);
  uv_mutex_unlock(&loop->mu);
  drain_inbox(loop, loop->tearing_down ? DUPLEX_ECANCELED : 0);
  if (stop)
    uv_stop(&loop->uv);
}

static void
on_idle(uv_idle_t *h)
{
  duplex_loop *loop = DPX_CONTAINER_OF(h, duplex_loop, idle);
  drain_deferred(loop, loop->tearing_down ? DUPLEX_ECANCELED : 0);
  if (loop->deferred.head == NULL && loop->idle_active) {
    uv_idle_stop(&loop->idle);
    loop->idle_active = false;
  }
}

int
dpx_loop_submit(duplex_loop *loop, dpx_op *op, bool new_work)
{
  if (dpx_on_loop(loop)) {
    if (new_work) {
      uv_mutex_lock(&loop->mu);
      bool freeing = loop->state == DPX_LOOP_FREEING;
      uv_mutex_unlock(&loop->mu);
      if (freeing)
        return DUPLEX_ECLOSED;
    }
    oplist_push(&loop->deferred, op);
    if (!loop->idle_active) {
      uv_idle_start(&loop->idle, on_idle);
      loop->idle_active = true;
    }
    return 0;
  }
  uv_mutex_lock(&loop->mu);
  if (new_work && loop->state == DPX_LOOP_FREEING) {
    uv_mutex_unlock(&loop->mu);
    return DUPLEX_ECLOSED;
  }
  bool was_empty = loop->inbox.head == NULL;
  oplist_push(&loop->inbox, op);
  /* The inbox, not the wake-up, carries the work: libuv coalesces sends,
   * and the loop takes the whole list at once, so only the push that found
   * the list empty needs to wake it. Sent under the lock: free closes the
   * wake handle only after taking the lock, so it is never sent a freed
   * handle. */
  if (was_empty)
    uv_async_send(&loop->wake);
  uv_mutex_unlock(&loop->mu);
  return 0;
}

/* ---- exec: run a function with the uv loop to ourselves ---------------- */

typedef struct exec_op {
  dpx_op op;
  int (*fn)(duplex_loop *, void *);
  void *arg;
  int result;
  bool done;
} exec_op;

static void
exec_op_run(duplex_loop *loop, dpx_op *op, int status)
{
  exec_op *e = DPX_CONTAINER_OF(op, exec_op, op);
  int r = status == 0 ? e->fn(loop, e->arg) : DUPLEX_ECLOSED;
  uv_mutex_lock(&loop->mu);
  e->result = r;
  e->done = true;
  uv_cond_broadcast(&loop->cv);
  uv_mutex_unlock(&loop->mu);
}

/* Under loop->mu, the loop idle: run fn as the loop's thread. */
static int
exec_borrowed_locked(duplex_loop *loop, int (*fn)(duplex_loop *, void *),
                     void *arg)
{
  loop->state = DPX_LOOP_EXEC;
  uv_mutex_unlock(&loop->mu);
  duplex_loop *saved = dpx_tls_loop;
  dpx_tls_loop = loop;
  int r = fn(loop, arg);
  dpx_tls_loop = saved;
  uv_mutex_lock(&loop->mu);
  loop->state = DPX_LOOP_IDLE;
  uv_cond_broadcast(&loop->cv);
  /* Deferred work queued by fn runs when the loop next runs. */
  return r;
}

/* Unlink @p op from @p l if it is there. */
static bool
oplist_remove(dpx_oplist *l, dpx_op *op)
{
  dpx_op *prev = NULL;
  for (dpx_op *o = l->head; o != NULL; prev = o, o = o->next) {
    if (o != op)
      continue;
    if (prev != NULL)
      prev->next = o->next;
    else
      l->head = o->next;
    if (l->tail == o)
      l->tail = prev;
    o->next = NULL;
    return true;
  }
  return false;
}

int
dpx_loop_exec(duplex_loop *loop, int (*fn)(duplex_loop *, void *), void *arg)
{
  if (dpx_on_loop(loop))
    return fn(loop, arg);
  uv_mutex_lock(&loop->mu);
  while (loop->state == DPX_LOOP_EXEC)
    uv_cond_wait(&loop->cv, &loop->mu);
  if (loop->state == DPX_LOOP_FREEING) {
    uv_mutex_unlock(&loop->mu);
    return DUPLEX_ECLOSED;
  }
  if (loop->state == DPX_LOOP_IDLE) {
    /* Nobody runs the loop: borrow it, as its thread, for this call. */
    int r = exec_borrowed_locked(loop, fn, arg);
    uv_mutex_unlock(&loop->mu);
    return r;
  }
  exec_op e;
  memset(&e, 0, sizeof e);
  e.op.fn = exec_op_run;
  e.fn = fn;
  e.arg = arg;
  bool was_empty = loop->inbox.head == NULL;
  oplist_push(&loop->inbox, &e.op);
  if (was_empty)
    uv_async_send(&loop->wake);
  loop->exec_waiters++;
  while (!e.done) {
    /* The loop stopped with our op still queued: nobody will run it until
     * the loop runs again, so take it back and borrow the idle loop. */
    if (loop->state == DPX_LOOP_IDLE && oplist_remove(&loop->inbox, &e.op)) {
      e.result = exec_borrowed_locked(loop, fn, arg);
      e.done = true;
      break;
    }
    uv_cond_wait(&loop->cv, &loop->mu);
  }
  /* A free in progress waits for us to leave before tearing down. */
  if (--loop->exec_waiters == 0)
    uv_cond_broadcast(&loop->cv);
  uv_mutex_unlock(&loop->mu);
  return e.result;
}

/* ---- chunk pool --------------------------------------------------------- */

#define DPX_POOL_MAX 64u

dpx_chunk *
dpx_chunk_get(duplex_loop *loop)
{
  dpx_chunk *c = NULL;
  uv_mutex_lock(&loop->pool_mu);
  if (loop->pool != NULL) {
    c = loop->pool;
    loop->pool = c->next;
    loop->pool_len--;
  }
  uv_mutex_unlock(&loop->pool_mu);
  if (c == NULL)
    c = malloc(sizeof(dpx_chunk) + DPX_CHUNK_SIZE);
  if (c != NULL) {
    c->next = NULL;
    c->used = 0;
    c->done = 0;
  }
  return c;
}

void
dpx_chunk_put(duplex_loop *loop, dpx_chunk *c)
{
  if (loop != NULL) {
    uv_mutex_lock(&loop->pool_mu);
    if (loop->pool_len < DPX_POOL_MAX) {
      c->next = loop->pool;
      loop->pool = c;
      loop->pool_len++;
      c = NULL;
    }
    uv_mutex_unlock(&loop->pool_mu);
  }
  free(c);
}

/* ---- public: create ------------------------------------------------------ */

int
duplex_loop_opts_init(duplex_loop_opts *opts)
{
  if (opts == NULL)
    return DUPLEX_EINVAL;
  const duplex_loop_opts def = DUPLEX_LOOP_OPTS_INIT;
  *opts = def;
  return 0;
}

int
duplex_loop_new(duplex_loop **out, const duplex_loop_opts *opts)
{
  duplex_loop_opts o = DUPLEX_LOOP_OPTS_INIT;
  int r;
  if (out == NULL)
    return DUPLEX_EINVAL;
  *out = NULL;
  if (opts != NULL) {
    r = dpx_check_size(opts, opts->size,
                       offsetof(duplex_loop_opts, read_buffer_size) +
                           sizeof(uint32_t),
                       sizeof(duplex_loop_opts));
    if (r != 0)
      return r;
    memcpy(&o, opts, opts->size < sizeof o ? opts->size : sizeof o);
    if (o.flags != 0)
      return DUPLEX_EINVAL;
    if (o.read_buffer_size > 16u * 1024 * 1024)
      return DUPLEX_EINVAL;
  }
  dpx_conn_locks_ensure();
  dpx_stdio_ensure_open();
  duplex_loop *loop = calloc(1, sizeof *loop);
  if (loop == NULL)
    return DUPLEX_ENOMEM;
  atomic_init(&loop->refs, 1u); /* the creator's, dropped by free */
  loop->rbuf_size = o.read_buffer_size != 0 ? o.read_buffer_size : 65536;
  /* Locks first, uv last: each failure undoes exactly what came before. */
  r = DUPLEX_ENOMEM;
  if (uv_mutex_init(&loop->mu) != 0)
    goto fail_alloc;
  if (uv_cond_init(&loop->cv) != 0)
    goto fail_mu;
  if (uv_mutex_init(&loop->pool_mu) != 0)
    goto fail_cv;
  r = dpx_err(uv_loop_init(&loop->uv));
  if (r != 0)
    goto fail_pool;
  r = dpx_err(uv_async_init(&loop->uv, &loop->wake, on_wake));
  if (r != 0)
    goto fail_uv;
  uv_idle_init(&loop->uv, &loop->idle); /* cannot fail */
  dpx_link_init(&loop->conns);
  dpx_link_init(&loop->listeners);
  dpx_link_init(&loop->channels);
  dpx_link_init(&loop->timers);
  dpx_link_init(&loop->signals);
  loop->state = DPX_LOOP_IDLE;
  loop->cpu = -1;
  *out = loop;
  return 0;

fail_uv:
  uv_loop_close(&loop->uv);
fail_pool:
  uv_mutex_destroy(&loop->pool_mu);
fail_cv:
  uv_cond_destroy(&loop->cv);
fail_mu:
  uv_mutex_destroy(&loop->mu);
fail_alloc:
  free(loop);
  return r;
}

/* ---- run / start / stop ------------------------------------------------ */

/* Enter the running state; the caller becomes the loop thread. */
static int
run_enter(duplex_loop *loop)
{
  if (dpx_tls_loop != NULL)
    return DUPLEX_EDEADLK;
  uv_mutex_lock(&loop->mu);
  while (loop->state == DPX_LOOP_EXEC)
    uv_cond_wait(&loop->cv, &loop->mu);
  int r = 0;
  if (loop->state == DPX_LOOP_FREEING)
    r = DUPLEX_ECLOSED;
  else if (loop->state != DPX_LOOP_IDLE || loop->started)
    r = DUPLEX_EBUSY;
  else {
    loop->state = DPX_LOOP_RUNNING;
    loop->in_run = true;
  }
  uv_mutex_unlock(&loop->mu);
  if (r == 0)
    dpx_tls_loop = loop;
  return r;
}

static void
run_leave(duplex_loop *loop)
{
  dpx_tls_loop = NULL;
  uv_mutex_lock(&loop->mu);
  if (loop->state == DPX_LOOP_RUNNING)
    loop->state = DPX_LOOP_IDLE;
  loop->in_run = false;
  uv_cond_broadcast(&loop->cv);
  uv_mutex_unlock(&loop->mu);
}

int
duplex_loop_run(duplex_loop *loop, unsigned mode)
{
  if (loop == NULL || mode > DUPLEX_RUN_NOWAIT)
    return DUPLEX_EINVAL;
  if (dpx_tls_loop == loop)
    return DUPLEX_EDEADLK;
  if (loop->group != NULL)
    return DUPLEX_EBUSY; /* its group runs it */
  int r = run_enter(loop);
  if (r != 0)
    return r;
  dpx_sigstate sig;
  dpx_sigpipe_block(&sig);
  if (mode == DUPLEX_RUN_DEFAULT) {
    for (;;) {
      uv_run(&loop->uv, UV_RUN_DEFAULT);
      uv_mutex_lock(&loop->mu);
      bool done = loop->stop_requested || loop->quit;
      loop->stop_requested = false;
      uv_mutex_unlock(&loop->mu);
      if (done)
        break;
    }
  } else {
    /* Work queued while nobody ran the loop must not wait for a wake-up
     * that was already consumed. */
    drain_inbox(loop, 0);
    uv_run(&loop->uv, mode == DUPLEX_RUN_ONCE ? UV_RUN_ONCE : UV_RUN_NOWAIT);
  }
  dpx_sigpipe_restore(&sig);
  run_leave(loop);
  return 0;
}

static void
pin_to_cpu(int cpu)
{
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  /* Best effort: a CPU taken away since the group was made leaves the
   * thread where the scheduler puts it. */
  (void)pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
  (void)cpu;
#endif
}

static void
loop_thread_main(void *arg)
{
  duplex_loop *loop = arg;
  dpx_thread_block_signals();
  if (loop->cpu >= 0)
    pin_to_cpu(loop->cpu);
  dpx_tls_loop = loop;
  for (;;) {
    uv_run(&loop->uv, UV_RUN_DEFAULT);
    uv_mutex_lock(&loop->mu);
    bool quit = loop->quit || loop->halt;
    loop->stop_requested = false;
    uv_mutex_unlock(&loop->mu);
    if (quit)
      break;
  }
  dpx_tls_loop = NULL;
}

int
duplex_loop_start(duplex_loop *loop)
{
  if (loop == NULL)
    return DUPLEX_EINVAL;
  if (loop->group != NULL)
    return DUPLEX_EBUSY; /* its group starts it */
  return dpx_loop_start(loop);
}

int
dpx_loop_start(duplex_loop *loop)
{
  uv_mutex_lock(&loop->mu);
  while (loop->state == DPX_LOOP_EXEC)
    uv_cond_wait(&loop->cv, &loop->mu);
  int r = 0;
  if (loop->state == DPX_LOOP_FREEING)
    r = DUPLEX_ECLOSED;
  else if (loop->state != DPX_LOOP_IDLE || loop->started)
    r = DUPLEX_EBUSY;
  if (r == 0) {
    loop->state = DPX_LOOP_RUNNING;
    loop->started = true;
    loop->stop_requested = false;
    r = uv_thread_create(&loop->thread, loop_thread_main, loop);
    if (r != 0) {
      loop->state = DPX_LOOP_IDLE;
      loop->started = false;
      r = dpx_err(r);
    }
  }
  uv_mutex_unlock(&loop->mu);
  return r;
}

void
dpx_loop_halt(duplex_loop *loop)
{
  uv_mutex_lock(&loop->mu);
  if (!loop->started || loop->state != DPX_LOOP_RUNNING) {
    uv_mutex_unlock(&loop->mu);
    return;
  }
  loop->halt = true;
  uv_async_send(&loop->wake);
  uv_mutex_unlock(&loop->mu);
  uv_thread_join(&loop->thread);
  uv_mutex_lock(&loop->mu);
  loop->halt = false;
  loop->started = false;
  loop->state = DPX_LOOP_IDLE;
  uv_cond_broadcast(&loop->cv);
  uv_mutex_unlock(&loop->mu);
}

int
duplex_loop_stop(duplex_loop *loop)
{
  if (loop == NULL)
    return DUPLEX_EINVAL;
  uv_mutex_lock(&loop->mu);
  if (loop->state == DPX_LOOP_FREEING) {
    uv_mutex_unlock(&loop->mu);
    return DUPLEX_ECLOSED;
  }
  loop->stop_requested = true;
  uv_async_send(&loop->wake);
  uv_mutex_unlock(&loop->mu);
  return 0;
}

int
duplex_loop_on_thread(const duplex_loop *loop)
{
  if (loop == NULL)
    return DUPLEX_EINVAL;
  return dpx_tls_loop == loop ? 1 : 0;
}

/* ---- post ---------------------------------------------------------------- */

typedef struct post_op {
  dpx_op op;
  duplex_post_cb fn;
  void *arg;
} post_op;

static void
post_op_run(duplex_loop *loop, dpx_op *op, int status)
{
  post_op *p = DPX_CONTAINER_OF(op, post_op, op);
  duplex_post_cb fn = p->fn;
  void *arg = p->arg;
  free(p);
  fn(loop, status, arg);
}

int
duplex_loop_post(duplex_loop *loop, duplex_post_cb fn, void *arg)
{
  if (loop == NULL || fn == NULL)
    return DUPLEX_EINVAL;
  post_op *p = malloc(sizeof *p);
  if (p == NULL)
    return DUPLEX_ENOMEM;
  p->op.fn = post_op_run;
  p->fn = fn;
  p->arg = arg;
  int r = dpx_loop_submit(loop, &p->op, true);
  if (r != 0)
    free(p);
  return r;
}

/* ---- free --------------------------------------------------------------- */

static bool
teardown_pending(duplex_loop *loop)
{
  bool inbox;
  uv_mutex_lock(&loop->mu);
  inbox = loop->inbox.head != NULL;
  uv_mutex_unlock(&loop->mu);
  return inbox || loop->deferred.head != NULL ||
         loop->conns.next != &loop->conns ||
         loop->listeners.next != &loop->listeners ||
         loop->channels.next != &loop->channels ||
         loop->timers.next != &loop->timers ||
         loop->signals.next != &loop->signals;
}

static void
teardown(duplex_loop *loop)
{
  /* The freeing thread acts as the loop thread from here on. */
  dpx_tls_loop = loop;
  loop->tearing_down = true;
  dpx_sigstate sig;
  dpx_sigpipe_block(&sig);
  while (teardown_pending(loop)) {
    /* Conns first: a pump still queued must find its conn closing rather
     * than write to a peer that is gone (every conn closes with
     * DUPLEX_ECANCELED unless it was closing already). */
    for (dpx_link *l = loop->conns.next; l != &loop->conns;) {
      duplex_conn *c = DPX_CONTAINER_OF(l, duplex_conn, link);
      l = l->next;
      dpx_conn_begin_close(c, DUPLEX_ECANCELED);
    }
    drain_inbox(loop, DUPLEX_ECANCELED); /* deferred list first */
    dpx_listener_close_all(loop);
    dpx_channel_cancel_all(loop);
    dpx_timer_close_all(loop);
    dpx_signal_close_all(loop);
    if (!teardown_pending(loop))
      break; /* everything finished synchronously */
    /* Close callbacks, canceled writes and thread-pool completions
     * (a name lookup in flight) arrive through the loop. */
    uv_run(&loop->uv, UV_RUN_ONCE);
  }
  if (loop->idle_active)
    uv_idle_stop(&loop->idle);
  uv_close((uv_handle_t *)&loop->idle, NULL);
  uv_mutex_lock(&loop->mu); /* no sender is inside uv_async_send now */
  uv_close((uv_handle_t *)&loop->wake, NULL);
  uv_mutex_unlock(&loop->mu);
  uv_run(&loop->uv, UV_RUN_DEFAULT);
  dpx_sigpipe_restore(&sig);
  dpx_tls_loop = NULL;
}

static void
loop_release(duplex_loop *loop)
{
  uv_mutex_destroy(&loop->pool_mu);
  uv_cond_destroy(&loop->cv);
  uv_mutex_destroy(&loop->mu);
  free(loop);
}

int
duplex_loop_ref(duplex_loop *loop)
{
  if (loop == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&loop->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_loop_unref(duplex_loop *loop)
{
  if (loop == NULL)
    return DUPLEX_EINVAL;
  unsigned n = atomic_load_explicit(&loop->refs, memory_order_relaxed);
  do {
    if (n == 1u) {
      /* The last reference: only a freed loop may let it go. */
      uv_mutex_lock(&loop->mu);
      bool freed = loop->freed;
      uv_mutex_unlock(&loop->mu);
      if (!freed)
        return DUPLEX_EBUSY;
    }
  } while (!atomic_compare_exchange_weak_explicit(
      &loop->refs, &n, n - 1u, memory_order_acq_rel, memory_order_relaxed));
  if (n == 1u)
    loop_release(loop);
  return 0;
}

int
duplex_loop_get_stats(const duplex_loop *loop, duplex_loop_stats *out)
{
  if (loop == NULL || out == NULL)
    return DUPLEX_EINVAL;
  size_t given = out->size;
  int r = dpx_check_size(out, given, offsetof(duplex_loop_stats, accepted) +
                                         sizeof(uint64_t),
                         sizeof(duplex_loop_stats));
  if (r != 0)
    return r;
  duplex_loop_stats st = DUPLEX_LOOP_STATS_INIT;
  st.conns = atomic_load_explicit(&loop->st_conns, memory_order_relaxed);
  st.queued = atomic_load_explicit(&loop->st_queued, memory_order_relaxed);
  st.accepted =
      atomic_load_explicit(&loop->st_accepted, memory_order_relaxed);
  memcpy(out, &st, sizeof st);
  out->size = given;
  return 0;
}

int
duplex_loop_get_group(const duplex_loop *loop, duplex_loop_group **group,
                      unsigned *index)
{
  if (loop == NULL)
    return DUPLEX_EINVAL;
  duplex_loop *l = (duplex_loop *)loop;
  uv_mutex_lock(&l->mu);
  bool gone = l->state == DPX_LOOP_FREEING;
  uv_mutex_unlock(&l->mu);
  if (gone)
    return DUPLEX_ECLOSED;
  if (group != NULL)
    *group = l->group;
  if (index != NULL)
    *index = l->group_index;
  return 0;
}

int
duplex_loop_free(duplex_loop *loop)
{
  if (loop == NULL)
    return DUPLEX_EINVAL;
  if (dpx_tls_loop != NULL)
    return DUPLEX_EDEADLK;
  if (loop->group != NULL)
    return DUPLEX_EBUSY; /* duplex_group_free() frees it */
  return dpx_loop_free(loop);
}

int
dpx_loop_free(duplex_loop *loop)
{
  if (dpx_tls_loop != NULL)
    return DUPLEX_EDEADLK; /* on this or another loop's thread */
  uv_mutex_lock(&loop->mu);
  while (loop->state == DPX_LOOP_EXEC)
    uv_cond_wait(&loop->cv, &loop->mu);
  if (loop->state == DPX_LOOP_FREEING) {
    uv_mutex_unlock(&loop->mu);
    return DUPLEX_ECLOSED;
  }
  bool was_running = loop->state == DPX_LOOP_RUNNING;
  bool started = loop->started;
  loop->state = DPX_LOOP_FREEING;
  loop->quit = true;
  uv_mutex_unlock(&loop->mu);
  if (was_running) {
    uv_async_send(&loop->wake);
    if (started) {
      uv_thread_join(&loop->thread);
    } else {
      /* duplex_loop_run() on another thread: wait until it returns. */
      uv_mutex_lock(&loop->mu);
      while (loop->in_run)
        uv_cond_wait(&loop->cv, &loop->mu);
      uv_mutex_unlock(&loop->mu);
    }
  }
  teardown(loop);
  uv_mutex_lock(&loop->mu);
  while (loop->exec_waiters > 0)
    uv_cond_wait(&loop->cv, &loop->mu);
  uv_mutex_unlock(&loop->mu);
  int r = uv_loop_close(&loop->uv);
  (void)r; /* every handle is closed by teardown */
  dpx_chunk *c = loop->pool;
  while (c != NULL) {
    dpx_chunk *next = c->next;
    free(c);
    c = next;
  }
  loop->pool = NULL;
  loop->pool_len = 0;
  dpx_wstate_pool_free(loop);
  free(loop->rbuf);
  loop->rbuf = NULL;
  uv_mutex_lock(&loop->mu);
  loop->freed = true; /* stays FREEING: every call returns ECLOSED */
  uv_mutex_unlock(&loop->mu);
  if (atomic_fetch_sub_explicit(&loop->refs, 1u, memory_order_acq_rel) == 1u)
    loop_release(loop);
  return 0;
}
