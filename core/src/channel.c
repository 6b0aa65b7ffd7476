/* Channels: multi-producer queues delivered as callbacks on the loop.
 *
 * Senders append to ch->intake under ch->mu (copied bytes go into one
 * growing byte arena, so a steady stream allocates nothing). The loop swaps
 * the whole intake out and delivers it; one wake-up covers every message
 * queued by then. A bounded channel counts messages until they have been
 * delivered; senders that wait for room sleep on ch->room.
 *
 * Memory: a bytes message of DPX_CHAN_OWN_MIN or more is copied into an
 * allocation of its own (outside the lock), freed once on_message returns;
 * it never enters an arena. After each delivery the drained queue's arena
 * and message vector are cut back to DPX_CHAN_KEEP_BYTES / _MSGS, so a
 * burst does not stay resident for the channel's life, while a steady
 * stream whose batches fit stays allocation-free. A finished channel keeps
 * no queue memory even while references to it remain. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* Bytes messages this large get their own copy instead of arena space. */
#define DPX_CHAN_OWN_MIN ((size_t)64 << 10)
/* What a drained queue keeps: arena bytes, and message slots. */
#define DPX_CHAN_KEEP_BYTES ((size_t)256 << 10)
#define DPX_CHAN_KEEP_MSGS ((size_t)4096)

typedef struct dpx_msg {
  void *ptr; /* pointer message or own copy; NULL for bytes in the arena */
  size_t off; /* bytes message: offset in the arena */
  size_t len;
  duplex_release_cb release;
  void *user;
} dpx_msg;

typedef struct dpx_msgq {
  dpx_msg *v;
  size_t n, cap;
  char *bytes;
  size_t blen, bcap;
} dpx_msgq;

struct duplex_channel {
  atomic_uint refs;
  uv_mutex_t mu;
  uv_cond_t room;
  /* ---- guarded by mu ---- */
  duplex_loop *loop; /* NULL once finished */
  bool closed;       /* sends refused */
  bool op_queued;
  unsigned waiters;
  size_t pending; /* queued or being delivered */
  dpx_msgq intake;
  /* ---- immutable ---- */
  size_t capacity;
  duplex_channel_cb on_message;
  duplex_channel_close_cb on_close;
  void *user;
  /* ---- loop thread only ---- */
  dpx_msgq batch;
  dpx_op op;
  dpx_op open_op;
  dpx_link link;
  bool in_list;
  bool finished;
};

static void
msgq_free(dpx_msgq *q)
{
  free(q->v);
  free(q->bytes);
  memset(q, 0, sizeof *q);
}

/* Marks a large bytes message held in a copy of its own: the pump frees
 * the copy once on_message returns; release_all() frees it through this
 * when the message is never delivered. */
static void
copy_release(void *ptr, size_t len, int status, void *user)
{
  (void)len;
  (void)status;
  (void)user;
  free(ptr);
}

/* A drained queue (n == 0) gives back what a burst grew it to. A failed
 * shrink keeps the larger block, which is still correct. */
static void
msgq_trim(dpx_msgq *q)
{
  if (q->bcap > DPX_CHAN_KEEP_BYTES) {
    char *b = realloc(q->bytes, DPX_CHAN_KEEP_BYTES);
    if (b != NULL) {
      q->bytes = b;
      q->bcap = DPX_CHAN_KEEP_BYTES;
    }
  }
  if (q->cap > DPX_CHAN_KEEP_MSGS) {
    dpx_msg *v = realloc(q->v, DPX_CHAN_KEEP_MSGS * sizeof *v);
    if (v != NULL) {
      q->v = v;
      q->cap = DPX_CHAN_KEEP_MSGS;
    }
  }
}

static void
channel_free(duplex_channel *ch)
{
  msgq_free(&ch->intake);
  msgq_free(&ch->batch);
  uv_cond_destroy(&ch->room);
  uv_mutex_destroy(&ch->mu);
  free(ch);
}

int
duplex_channel_ref(duplex_channel *ch)
{
  if (ch == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&ch->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_channel_unref(duplex_channel *ch)
{
  if (ch == NULL)
    return DUPLEX_EINVAL;
  if (atomic_fetch_sub_explicit(&ch->refs, 1u, memory_order_acq_rel) == 1u)
    channel_free(ch);
  return 0;
}

int
duplex_channel_opts_init(duplex_channel_opts *opts)
{
  if (opts == NULL)
    return DUPLEX_EINVAL;
  const duplex_channel_opts def = DUPLEX_CHANNEL_OPTS_INIT;
  *opts = def;
  return 0;
}

int
duplex_channel_get_pending(const duplex_channel *ch, size_t *out)
{
  if (ch == NULL || out == NULL)
    return DUPLEX_EINVAL;
  duplex_channel *c = (duplex_channel *)ch;
  uv_mutex_lock(&c->mu);
  *out = c->pending;
  uv_mutex_unlock(&c->mu);
  return 0;
}

/* ---- delivery (loop thread) ----------------------------------------------- */

static void
channel_schedule_locked(duplex_channel *ch)
{
  if (ch->op_queued || ch->loop == NULL)
    return;
  ch->op_queued = true;
  duplex_channel_ref(ch);
  dpx_loop_submit(ch->loop, &ch->op, false);
}

static void
release_all(dpx_msgq *q, int status)
{
  for (size_t i = 0; i < q->n; i++) {
    dpx_msg *m = &q->v[i];
    if (m->ptr != NULL && m->release != NULL)
      m->release(m->ptr, m->len, status, m->user);
  }
  q->n = 0;
  q->blen = 0;
}

static void
channel_finish(duplex_channel *ch, int reason)
{
  if (ch->finished)
    return;
  ch->finished = true;
  if (ch->in_list) {
    dpx_link_remove(&ch->link);
    ch->in_list = false;
  }
  if (ch->on_close != NULL)
    ch->on_close(ch, reason, ch->user);
  /* Nothing is queued now and sends are refused: a channel still
   * referenced after it finished holds no queue memory. */
  msgq_free(&ch->batch);
  uv_mutex_lock(&ch->mu);
  ch->loop = NULL;
  msgq_free(&ch->intake);
  uv_mutex_unlock(&ch->mu);
  duplex_channel_unref(ch); /* the loop's reference */
}

/* Loop being freed: nothing more is delivered; pointers are released. */
static void
channel_cancel(duplex_channel *ch)
{
  if (ch->finished)
    return;
  uv_mutex_lock(&ch->mu);
  ch->closed = true;
  dpx_msgq q = ch->intake;
  memset(&ch->intake, 0, sizeof ch->intake);
  ch->pending = 0;
  uv_cond_broadcast(&ch->room);
  uv_mutex_unlock(&ch->mu);
  release_all(&q, DUPLEX_ECANCELED);
  msgq_free(&q);
  channel_finish(ch, DUPLEX_ECANCELED);
}

void
dpx_channel_cancel_all(duplex_loop *loop)
{
  while (loop->channels.next != &loop->channels) {
    duplex_channel *ch =
        DPX_CONTAINER_OF(loop->channels.next, duplex_channel, link);
    channel_cancel(ch);
  }
}

static void
channel_pump_op(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_channel *ch = DPX_CONTAINER_OF(op, duplex_channel, op);
  (void)loop;
  uv_mutex_lock(&ch->mu);
  ch->op_queued = false;
  dpx_msgq t = ch->batch;
  ch->batch = ch->intake;
  ch->intake = t;
  bool closed = ch->closed;
  uv_mutex_unlock(&ch->mu);

  if (status != 0 || ch->finished) {
    /* Teardown: cancel releases these and everything else. */
    release_all(&ch->batch, DUPLEX_ECANCELED);
    duplex_channel_unref(ch);
    return;
  }
  size_t n = ch->batch.n;
  for (size_t i = 0; i < n; i++) {
    dpx_msg *m = &ch->batch.v[i];
    void *data = m->ptr != NULL ? m->ptr : ch->batch.bytes + m->off;
    ch->on_message(ch, data, m->len, ch->user);
    if (m->release == copy_release)
      free(m->ptr); /* borrowed for the callback only */
  }
  ch->batch.n = 0;
  ch->batch.blen = 0;
  msgq_trim(&ch->batch);

  uv_mutex_lock(&ch->mu);
  ch->pending -= n;
  if (ch->waiters > 0 && n > 0)
    uv_cond_broadcast(&ch->room);
  closed = ch->closed;
  bool more = ch->intake.n > 0;
  /* More arrived while delivering: come back next iteration, letting the
   * loop's other work run in between. */
  if (more)
    channel_schedule_locked(ch);
  bool done = closed && ch->pending == 0 && !more;
  uv_mutex_unlock(&ch->mu);
  if (done)
    channel_finish(ch, 0);
  duplex_channel_unref(ch);
}

static void
channel_open_op(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_channel *ch = DPX_CONTAINER_OF(op, duplex_channel, open_op);
  if (ch->finished)
    return; /* cannot happen with one FIFO; never list a finished one */
  dpx_link_insert(&loop->channels, &ch->link);
  ch->in_list = true;
  if (status != 0)
    channel_cancel(ch);
}

/* ---- public ---------------------------------------------------------------- */

int
duplex_channel_new(duplex_channel **out, duplex_loop *loop,
                   const duplex_channel_opts *opts)
{
  if (out != NULL)
    *out = NULL;
  if (out == NULL || loop == NULL || opts == NULL)
    return DUPLEX_EINVAL;
  int r = dpx_check_size(opts, opts->size, sizeof(duplex_channel_opts),
                         sizeof(duplex_channel_opts));
  if (r != 0)
    return r;
  if (opts->on_message == NULL || opts->flags != 0)
    return DUPLEX_EINVAL;
  duplex_channel *ch = calloc(1, sizeof *ch);
  if (ch == NULL)
    return DUPLEX_ENOMEM;
  if (uv_mutex_init(&ch->mu) != 0) {
    free(ch);
    return DUPLEX_ENOMEM;
  }
  if (uv_cond_init(&ch->room) != 0) {
    uv_mutex_destroy(&ch->mu);
    free(ch);
    return DUPLEX_ENOMEM;
  }
  atomic_init(&ch->refs, 2u); /* the loop's and the caller's */
  ch->loop = loop;
  ch->capacity = opts->capacity;
  ch->on_message = opts->on_message;
  ch->on_close = opts->on_close;
  ch->user = opts->user;
  ch->op.fn = channel_pump_op;
  ch->open_op.fn = channel_open_op;
  dpx_link_init(&ch->link);
  r = dpx_loop_submit(loop, &ch->open_op, true);
  if (r != 0) {
    channel_free(ch);
    return r;
  }
  *out = ch;
  return 0;
}

static int
msgq_push(dpx_msgq *q, const void *bytes, size_t len, void *ptr,
          duplex_release_cb release, void *user)
{
  if (q->n == q->cap) {
    size_t cap = q->cap ? q->cap * 2 : 16;
    dpx_msg *v = realloc(q->v, cap * sizeof *v);
    if (v == NULL)
      return DUPLEX_ENOMEM;
    q->v = v;
    q->cap = cap;
  }
  size_t off = 0;
  if (ptr == NULL) {
    if (q->bcap - q->blen < len) {
      size_t cap = q->bcap ? q->bcap : 4096;
      while (cap - q->blen < len)
        cap *= 2;
      char *b = realloc(q->bytes, cap);
      if (b == NULL)
        return DUPLEX_ENOMEM;
      q->bytes = b;
      q->bcap = cap;
    }
    off = q->blen;
    if (len > 0)
      memcpy(q->bytes + off, bytes, len);
    q->blen += len;
  }
  dpx_msg *m = &q->v[q->n++];
  m->ptr = ptr;
  m->off = off;
  m->len = len;
  m->release = release;
  m->user = user;
  return 0;
}

/* Wait for room under ch->mu: 0 when a message may be queued now. */
static int
channel_wait_room_locked(duplex_channel *ch, int timeout_ms,
                         uint64_t deadline)
{
  int r = 0;
  for (;;) {
    if (ch->closed)
      return DUPLEX_ECLOSED;
    if (ch->capacity == 0 || ch->pending < ch->capacity)
      return 0;
    if (timeout_ms == 0)
      return DUPLEX_EWOULDBLOCK;
    if (dpx_on_loop(ch->loop))
      return DUPLEX_EDEADLK;
    ch->waiters++;
    if (timeout_ms < 0) {
      uv_cond_wait(&ch->room, &ch->mu);
    } else {
      uint64_t now = uv_hrtime();
      if (now >= deadline)
        r = DUPLEX_ETIMEDOUT;
      else
        uv_cond_timedwait(&ch->room, &ch->mu, deadline - now);
    }
    ch->waiters--;
    if (r != 0)
      return r;
  }
}

static int
channel_send(duplex_channel *ch, const void *bytes, size_t len, void *ptr,
             duplex_release_cb release, void *user, int timeout_ms)
{
  if (ch == NULL || timeout_ms < -1 || (ptr == NULL && bytes == NULL && len))
    return DUPLEX_EINVAL;
  if (len > DUPLEX_WRITE_MAX)
    return DUPLEX_EMSGSIZE;
  void *copy = NULL;
  int r;
  uv_mutex_lock(&ch->mu);
  uint64_t deadline =
      timeout_ms > 0 ? uv_hrtime() + (uint64_t)timeout_ms * 1000000u : 0;
  for (;;) {
    r = channel_wait_room_locked(ch, timeout_ms, deadline);
    if (r != 0 || ptr != NULL || len < DPX_CHAN_OWN_MIN)
      break;
    /* A large bytes message, and there is room: copy it without holding
     * the lock (other senders go on meanwhile), then check again. */
    uv_mutex_unlock(&ch->mu);
    copy = malloc(len);
    if (copy == NULL)
      return DUPLEX_ENOMEM;
    memcpy(copy, bytes, len);
    ptr = copy;
    release = copy_release;
    user = NULL;
    uv_mutex_lock(&ch->mu);
  }
  if (r == 0)
    r = msgq_push(&ch->intake, bytes, len, ptr, release, user);
  if (r == 0) {
    ch->pending++;
    channel_schedule_locked(ch);
  }
  uv_mutex_unlock(&ch->mu);
  if (r != 0)
    free(copy);
  return r;
}

int
duplex_channel_send(duplex_channel *ch, const void *data, size_t len,
                    int timeout_ms)
{
  if (data == NULL && len > 0)
    return DUPLEX_EINVAL;
  return channel_send(ch, data, len, NULL, NULL, NULL, timeout_ms);
}

int
duplex_channel_send_ptr(duplex_channel *ch, void *ptr, size_t len,
                        duplex_release_cb release, void *user, int timeout_ms)
{
  if (ptr == NULL)
    return DUPLEX_EINVAL;
  return channel_send(ch, NULL, len, ptr, release, user, timeout_ms);
}

int
duplex_channel_close(duplex_channel *ch)
{
  if (ch == NULL)
    return DUPLEX_EINVAL;
  uv_mutex_lock(&ch->mu);
  if (ch->closed) {
    uv_mutex_unlock(&ch->mu);
    return DUPLEX_ECLOSED;
  }
  ch->closed = true;
  if (ch->waiters > 0)
    uv_cond_broadcast(&ch->room);
  /* The pump delivers what is queued, then finishes. */
  channel_schedule_locked(ch);
  uv_mutex_unlock(&ch->mu);
  return 0;
}
