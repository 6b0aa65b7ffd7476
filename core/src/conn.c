/* Conn lifecycle: options, creation, references, the pump, closing. */
#include "internal.h"
#include "framing.h"

#include <assert.h>
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

/* The smallest struct sizes accepted: what 0.1 callers pass. */
#define DPX_CONN_OPTS_V1 (offsetof(duplex_conn_opts, flush_timeout_ms) + \
                          sizeof(uint32_t))
#define DPX_CONN_CBS_V1 (offsetof(duplex_conn_cbs, on_close) + \
                         sizeof(duplex_close_cb))

int
dpx_conn_opts_get(duplex_conn_opts *o, const duplex_conn_opts *opts)
{
  const duplex_conn_opts def = DUPLEX_CONN_OPTS_INIT;
  *o = def;
  if (opts == NULL)
    return 0;
  int r = dpx_check_size(opts, opts->size, DPX_CONN_OPTS_V1,
                         sizeof(duplex_conn_opts));
  if (r != 0)
    return r;
  /* Fields an older, shorter struct lacks keep their defaults. */
  memcpy(o, opts, opts->size < sizeof *o ? opts->size : sizeof *o);
  o->size = sizeof *o;
  if ((o->flags & ~DUPLEX_CONN_FLAGS_ALL) != 0)
    return DUPLEX_EINVAL;
  if (o->cbs != NULL) {
    r = dpx_check_size(o->cbs, o->cbs->size, DPX_CONN_CBS_V1,
                       sizeof(duplex_conn_cbs));
    if (r != 0)
      return r;
  }
  size_t high = o->high_watermark ? o->high_watermark : DPX_DEFAULT_HIGH;
  size_t hard = o->hard_limit ? o->hard_limit
                              : (high > DPX_DEFAULT_HARD ? high
                                                         : DPX_DEFAULT_HARD);
  if (o->low_watermark >= high || hard < high)
    return DUPLEX_EINVAL;
  if (o->tls_host != NULL && (o->tls == NULL || o->tls_host[0] == '\0'))
    return DUPLEX_EINVAL; /* a server name means nothing without TLS */
  if (o->local_host != NULL) {
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
    if (uv_ip4_addr(o->local_host, 0, &in) != 0 &&
        uv_ip6_addr(o->local_host, 0, &in6) != 0)
      return DUPLEX_EINVAL;
  }
  return dpx_framing_check(o->framing);
}

int
dpx_conn_cfg_new(dpx_conn_cfg **out, const duplex_conn_opts *opts)
{
  duplex_conn_opts o;
  int r = dpx_conn_opts_get(&o, opts);
  if (r != 0)
    return r;
  dpx_conn_cfg *cfg = calloc(1, sizeof *cfg);
  if (cfg == NULL)
    return DUPLEX_ENOMEM;
  atomic_init(&cfg->refs, 1u);
  duplex_conn_cbs_init(&cfg->cbs);
  if (o.cbs != NULL)
    memcpy(&cfg->cbs, o.cbs,
           o.cbs->size < sizeof cfg->cbs ? o.cbs->size : sizeof cfg->cbs);
  cfg->cbs.size = sizeof cfg->cbs;
  cfg->high = o.high_watermark ? o.high_watermark : DPX_DEFAULT_HIGH;
  cfg->low = o.low_watermark ? o.low_watermark : cfg->high / 4;
  cfg->hard = o.hard_limit ? o.hard_limit
                           : (cfg->high > DPX_DEFAULT_HARD ? cfg->high
                                                           : DPX_DEFAULT_HARD);
  cfg->flags = o.flags;
  cfg->user = o.user;
  cfg->timeout[DUPLEX_TIMEOUT_CONNECT] = o.connect_timeout_ms;
  cfg->timeout[DUPLEX_TIMEOUT_IDLE] = o.idle_timeout_ms;
  cfg->timeout[DUPLEX_TIMEOUT_READ] = o.read_timeout_ms;
  cfg->timeout[DUPLEX_TIMEOUT_FLUSH] = o.flush_timeout_ms;
  if (o.framing != NULL && o.framing->kind != DUPLEX_FRAME_NONE) {
    memcpy(&cfg->framing, o.framing, sizeof cfg->framing);
    cfg->framing.size = sizeof cfg->framing;
  }
  cfg->has_local = o.local_host != NULL || o.local_port != 0;
  if (o.tls_host != NULL && (cfg->tls_host = dpx_strdup(o.tls_host)) == NULL) {
    free(cfg);
    return DUPLEX_ENOMEM;
  }
  if (o.tls != NULL) {
    duplex_tls_ref(o.tls);
    cfg->tls = o.tls;
  }
  *out = cfg;
  return 0;
}

void
dpx_conn_cfg_unref(dpx_conn_cfg *cfg)
{
  if (cfg != NULL &&
      atomic_fetch_sub_explicit(&cfg->refs, 1u, memory_order_acq_rel) == 1u) {
    if (cfg->tls != NULL)
      duplex_tls_unref(cfg->tls);
    free(cfg->tls_host);
    free(cfg->tls_key);
    free(cfg);
  }
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
  c->tls_asked = cfg->tls != NULL;
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
  atomic_fetch_add_explicit(&loop->st_conns, 1u, memory_order_relaxed);
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
  /* A conn that never reached its loop (creation failed) leaves its count;
   * every other one left it when it finished. */
  if (c->loop != NULL)
    atomic_fetch_sub_explicit(&c->loop->st_conns, 1u, memory_order_relaxed);
  dpx_wstate *w = dpx_conn_w(c);
  if (w != NULL)
    wstate_destroy(w);
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL) {
    dpx_conn_tls_free(x);
    free(x->tls_reason);
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
duplex_conn_get_loop(const duplex_conn *conn, duplex_loop **out)
{
  if (out != NULL)
    *out = NULL;
  if (conn == NULL || out == NULL)
    return DUPLEX_EINVAL;
  dpx_conn_lock(conn);
  duplex_loop *loop = conn->loop; /* NULL once the conn let go of it */
  dpx_conn_unlock(conn);
  if (loop == NULL)
    return DUPLEX_ECLOSED;
  *out = loop;
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
  /* A closed conn will write nothing more: what it still holds is being
   * canceled, not queued. */
  *out = c->state == DPX_CS_CLOSED ? 0 : c->queued;
  dpx_conn_unlock(c);
  return 0;
}

/* Run @p fn on the conn's loop (dpx_loop_exec), or DUPLEX_ECLOSED once the
 * conn finished. The loop cannot be freed before the conn finished (which
 * clears c->loop under the conn lock): a reference taken under that lock
 * keeps its memory for the exec, whatever a concurrent free does. */
int
dpx_conn_exec(duplex_conn *c, int (*fn)(duplex_loop *, void *), void *arg)
{
  dpx_conn_lock(c);
  duplex_loop *loop = c->loop;
  if (loop != NULL)
    duplex_loop_ref(loop);
  dpx_conn_unlock(c);
  if (loop == NULL)
    return DUPLEX_ECLOSED;
  int r = dpx_loop_exec(loop, fn, arg);
  duplex_loop_unref(loop);
  return r;
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
  if (c->close_begun)
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
  dpx_conn_unlock(c);
  if (!known) {
    /* Asked for the first time: the loop thread reads it off the socket
     * and keeps it (an idle conn stores no name nobody asked for). */
    int r = dpx_conn_exec(c, peer_fetch, c);
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

typedef struct local_args {
  duplex_conn *c;
  char *buf;
  size_t len;
} local_args;

/* Loop thread (or an idle loop): read the conn's own name. */
static int
local_fetch(duplex_loop *loop, void *arg)
{
  local_args *a = arg;
  duplex_conn *c = a->c;
  (void)loop;
  if (c->close_begun)
    return DUPLEX_ECLOSED;
  if (!c->opened)
    return DUPLEX_ENOTCONN;
  char name[1024];
  name[0] = '\0';
  dpx_stream *rd = dpx_conn_rd(c);
  if (rd->handle.type == UV_TCP) {
    struct sockaddr_storage ss;
    int n = sizeof ss;
    if (uv_tcp_getsockname(&rd->tcp, (struct sockaddr *)&ss, &n) != 0 ||
        dpx_format_addr((struct sockaddr *)&ss, name, sizeof name) != 0)
      name[0] = '\0';
  } else if (rd->handle.type == UV_NAMED_PIPE) {
    size_t n = sizeof name - 1;
    if (uv_pipe_getsockname(&rd->pipe, name, &n) != 0)
      n = 0;
    name[n] = '\0';
  }
  if (strlen(name) + 1 > a->len)
    return DUPLEX_ENOBUFS;
  memcpy(a->buf, name, strlen(name) + 1);
  return 0;
}

int
duplex_conn_get_local(const duplex_conn *conn, char *buf, size_t len)
{
  if (conn == NULL || buf == NULL || len == 0)
    return DUPLEX_EINVAL;
  duplex_conn *c = (duplex_conn *)conn;
  buf[0] = '\0';
  local_args a = { c, buf, len };
  int r = dpx_conn_exec(c, local_fetch, &a);
  if (r != 0)
    buf[0] = '\0';
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
  (void)status; /* on teardown the pump finds the close begun */
  dpx_conn_lock(c);
  c->op_queued = false;
  dpx_conn_unlock(c);
  dpx_conn_pump(c);
  duplex_conn_unref(c);
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
  if (c->cfg->tls != NULL)
    dpx_conn_tls_begin(c, c->cfg->tls, c->cfg->tls_host, c->cfg->tls_key,
                       NULL, NULL); /* on_open once the handshake is done */
  else if (c->cfg->cbs.on_open != NULL)
    c->cfg->cbs.on_open(c, conn_user(c));
  dpx_conn_pump(c);
}

/* ---- the pump ------------------------------------------------------------- *
 * One pass of the conn's state machine on the loop thread. A pass takes a
 * snapshot of the work present when it begins (an abort, new deadlines,
 * a read-side change, held frames, completions of direct writes, a
 * backpressure event, a new batch), does each item once, and leaves work
 * that appeared meanwhile (callbacks that write, a batch the kernel took at
 * once) to a later pass queued behind the loop's other work. So no conn can
 * keep the loop to itself, and every item in the snapshot is consumed: a
 * state the pass cannot act on is not work. */

enum {
  DPX_WORK_ABORT = 1u << 0,
  DPX_WORK_RETIME = 1u << 1,
  DPX_WORK_READ = 1u << 2,
  DPX_WORK_COMPLETED = 1u << 3,
  DPX_WORK_EVENTS = 1u << 4,
  DPX_WORK_BATCH = 1u << 5
};

/* Under the conn lock: what a pass would do now. */
static unsigned
pump_work_locked(const duplex_conn *c)
{
  const dpx_wstate *w = dpx_conn_w(c);
  const dpx_conn_extra *x = dpx_conn_x(c);
  unsigned work = 0;
  /* An abort before the open op ran waits for it (FIFO order). */
  if (c->abort_requested && c->in_list && !c->close_begun)
    work |= DPX_WORK_ABORT;
  if (x != NULL && x->timeouts_dirty)
    work |= DPX_WORK_RETIME;
  if (dpx_conn_read_pending(c, c->want_read))
    work |= DPX_WORK_READ;
  if (w != NULL && w->completed.n > 0)
    work |= DPX_WORK_COMPLETED;
  if (c->events != 0)
    work |= DPX_WORK_EVENTS;
  if (!c->abort_requested && w != NULL && c->opened && !c->tls_wait &&
      !c->writing && !c->close_begun && !w->shut_pending && w->intake.n > 0)
    work |= DPX_WORK_BATCH;
  return work;
}

void
dpx_conn_pump(duplex_conn *c)
{
  if (c->pumping) {
    c->pump_again = true; /* a later pass, not a nested one */
    return;
  }
  c->pumping = true;
  c->pump_again = false;
  duplex_conn_ref(c);

  dpx_conn_lock(c);
  unsigned work = pump_work_locked(c);
  dpx_wstate *w = dpx_conn_w(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  int abort_reason = c->reason;
  bool want = c->want_read;
  unsigned ev = c->events;
  size_t queued = c->queued;
  size_t ncompleted = w != NULL ? w->completed.n : 0;
  c->events = 0;
  if (work & DPX_WORK_RETIME) {
    memcpy(x->timeout, x->timeout_req, sizeof x->timeout);
    x->timeouts_dirty = false;
  }
  if ((work & DPX_WORK_BATCH) && c->starttls_queued) {
    /* A STARTTLS ends its batch: what was queued after it waits for the
     * handshake. */
    size_t k = 0;
    while (w->intake.v[k].kind != DPX_ENT_STARTTLS)
      k++;
    if (dpx_entvec_reserve(&w->batch, k + 1) == 0) {
      memcpy(w->batch.v, w->intake.v, (k + 1) * sizeof(dpx_ent));
      w->batch.n = k + 1;
      memmove(w->intake.v, w->intake.v + k + 1,
              (w->intake.n - k - 1) * sizeof(dpx_ent));
      w->intake.n -= k + 1;
      c->starttls_queued = false;
      c->writing = true;
    } else {
      work &= ~DPX_WORK_BATCH;
      if (!c->abort_requested) {
        c->abort_requested = true; /* no memory to keep the order */
        c->reason = DUPLEX_ENOMEM;
        dpx_conn_mark_closed_locked(c);
        abort_reason = DUPLEX_ENOMEM;
        work |= DPX_WORK_ABORT;
      }
    }
  } else if (work & DPX_WORK_BATCH) {
    dpx_entvec t = w->batch;
    w->batch = w->intake;
    w->intake = t;
    c->writing = true;
  }
  dpx_conn_unlock(c);

  /* Progress (checked in debug builds): each item of the snapshot is
   * consumed by its step, unless a callback asked for something new. */
  if (work & DPX_WORK_ABORT) {
    dpx_conn_begin_close(c, abort_reason);
    assert(c->close_begun);
  }
  if (work & DPX_WORK_RETIME)
    dpx_conn_deadline_retime(c);
  if (work & DPX_WORK_READ) {
    dpx_conn_read_apply(c, want, true);
    assert(c->rd_want != want || !dpx_conn_read_pending(c, want));
  }
  if (work & DPX_WORK_COMPLETED)
    dpx_conn_complete(c, &w->completed, ncompleted, 0);
  if ((ev & DPX_EV_BACKPRESSURE) && c->cfg->cbs.on_backpressure != NULL &&
      !c->close_begun)
    c->cfg->cbs.on_backpressure(c, queued, conn_user(c));
  if (work & DPX_WORK_BATCH)
    dpx_conn_batch_start(c);

  dpx_conn_lock(c);
  unsigned left = pump_work_locked(c);
  if (left != 0 || c->pump_again) {
    /* New work: a later pass, after the loop's other work. */
    c->scheduled = false;
    dpx_conn_schedule_locked(c, true);
  } else {
    /* Nothing left: a later request must wake us, unless a batch in
     * flight or the pending open will pump anyway. */
    c->scheduled = c->writing || !c->opened || c->tls_wait || c->close_begun;
    if (!c->close_begun)
      dpx_conn_w_trim_locked(c);
  }
  dpx_conn_unlock(c);
  c->pump_again = false;
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

void
dpx_stream_close(dpx_stream *s, bool reset, uv_close_cb cb)
{
  uv_os_fd_t fd = -1;
  if (uv_fileno(&s->handle, &fd) != 0)
    fd = -1;
  if (!reset || s->handle.type != UV_TCP ||
      uv_tcp_close_reset(&s->tcp, cb) != 0)
    uv_close(&s->handle, cb);
  /* libuv leaves fds 0-2 open on close; an adopted one is ours to let go
   * (libuv stopped watching it inside uv_close). */
  if (dpx_is_stdio_fd((int)fd))
    dpx_stdio_release((int)fd);
}

static void
close_handle(duplex_conn *c, dpx_stream *s, bool reset)
{
  if (s != NULL && !uv_is_closing(&s->handle)) {
    c->handles_open++;
    dpx_stream_close(s, reset, on_handle_closed);
  }
}

void
dpx_conn_begin_close(duplex_conn *c, int reason)
{
  if (c->close_begun)
    return;
  c->close_begun = true;
  dpx_conn_read_cut(c);
  dpx_conn_lock(c);
  c->reason = reason;
  dpx_conn_mark_closed_locked(c);
  dpx_conn_unlock(c);
  close_deadline(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL && x->connecting != NULL && !c->has_rd) {
    /* Resolving, or between two connect attempts: the lookup is left to
     * finish on its own; the attempt's callback finishes the close. */
    if (dpx_connect_cancel(c))
      dpx_conn_fail_unopened(c, reason);
    return;
  }
  /* A user's abort resets a TCP conn (RST); anything else closes it. */
  bool reset = reason == DUPLEX_ECONNABORTED;
  c->handles_open++; /* guard: finish only after both closes are issued */
  close_handle(c, dpx_conn_rd(c), reset);
  if (dpx_conn_wr(c) != dpx_conn_rd(c))
    close_handle(c, dpx_conn_wr(c), reset);
  if (--c->handles_open == 0)
    conn_finish(c);
}

void
dpx_conn_fail_unopened(duplex_conn *c, int reason)
{
  dpx_conn_lock(c);
  if (!c->close_begun) {
    c->close_begun = true;
    c->reason = reason;
  }
  dpx_conn_mark_closed_locked(c);
  dpx_conn_unlock(c);
  c->rd_cut = true;
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
    dpx_conn_complete(c, &w->batch, c->tls_on ? w->tls_sent : w->bpos,
                      DUPLEX_ECANCELED);
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
  dpx_conn_lock(c);
  dpx_conn_queued_sub_locked(c, c->queued);
  dpx_conn_unlock(c);
  dpx_conn_tls_finish(c);
  if (c->cfg->cbs.on_close != NULL)
    c->cfg->cbs.on_close(c, c->reason, conn_user(c));
  if (x == NULL)
    x = dpx_conn_x(c);
  if (x != NULL)
    dpx_conn_tls_free(x); /* the engine's memory goes at once */
  dpx_conn_lock(c);
  dpx_conn_release_chunks_locked(c);
  dpx_conn_queued_sub_locked(c, c->queued);
  atomic_fetch_sub_explicit(&c->loop->st_conns, 1u, memory_order_relaxed);
  c->loop = NULL; /* the loop may go away now */
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
      (conn->state == DPX_CS_CLOSE_QUEUED && how == DUPLEX_CLOSE_GRACEFUL)) {
    dpx_conn_unlock(conn);
    return DUPLEX_ECLOSED;
  }
  bool cut = false;
  if (how == DUPLEX_CLOSE_ABORT) {
    conn->abort_requested = true;
    conn->reason = DUPLEX_ECONNABORTED;
    dpx_conn_mark_closed_locked(conn);
    /* On the loop thread no read callback runs after this returns. */
    cut = dpx_on_loop(conn->loop);
  } else {
    dpx_wstate *w = dpx_conn_w_get_locked(conn);
    if (w == NULL || dpx_entvec_reserve(&w->intake, 1) != 0) {
      dpx_conn_unlock(conn);
      return DUPLEX_ENOMEM;
    }
    dpx_ent *e = &w->intake.v[w->intake.n++];
    memset(e, 0, sizeof *e);
    e->kind = DPX_ENT_CLOSE;
    conn->state = DPX_CS_CLOSE_QUEUED;
  }
  /* Always through the pump, so on_close never runs inside this call. An
   * abort must not wait for a batch stuck on a peer that does not read. */
  dpx_conn_schedule_locked(conn, how == DUPLEX_CLOSE_ABORT);
  dpx_conn_unlock(conn);
  if (cut)
    dpx_conn_read_cut(conn);
  return 0;
}
