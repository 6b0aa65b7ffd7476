/* The write path: intake, batches, completions, shutdown, backpressure.
 *
 * Producers (any thread) append entries to the intake under the conn lock.
 * Copied bytes go into 64 KiB chunks from the loop's pool; consecutive
 * small writes extend one entry, so a burst of writes becomes a handful of
 * iovecs. The loop swaps the whole intake into the batch and writes it
 * with uv_try_write (writev), handing any remainder to uv_write. While a
 * batch is in flight producers never wake the loop: its completion pumps
 * the conn and takes whatever arrived meanwhile. Completion callbacks,
 * zero-copy releases, shutdown and close are entries in the same FIFO, so
 * they happen exactly in the order they were asked for. All of this lives
 * in the conn's write state (dpx_wstate), which exists only while
 * something is queued or in flight: a write the kernel takes whole from
 * the loop thread touches none of it. */
#include "internal.h"
#include "framing.h"

#include <stdlib.h>
#include <string.h>

#define DPX_MAX_BUFS 1024
#define DPX_DIRECT_BUFS 16
#define DPX_WRITE_PIECE ((size_t)256 * 1024)

/* ---- entry vectors ------------------------------------------------------- */

int
dpx_entvec_grow(dpx_entvec *v, size_t extra)
{
  size_t cap = v->cap ? v->cap : 8;
  while (cap - v->n < extra)
    cap *= 2;
  dpx_ent *nv = realloc(v->v, cap * sizeof(dpx_ent));
  if (nv == NULL)
    return DUPLEX_ENOMEM;
  v->v = nv;
  v->cap = cap;
  return 0;
}

void
dpx_entvec_free(dpx_entvec *v)
{
  free(v->v);
  v->v = NULL;
  v->n = v->cap = 0;
}

/* ---- chunks -------------------------------------------------------------- */

/* Under the conn lock: @p n chunk bytes were written; recycle emptied chunks. */
static void
chunks_consume_locked(duplex_conn *c, size_t n)
{
  dpx_wstate *ws = dpx_conn_w(c);
  while (n > 0 && ws->chunk_head != NULL) {
    dpx_chunk *h = ws->chunk_head;
    size_t take = h->used - h->done;
    if (take > n)
      take = n;
    h->done += take;
    n -= take;
    if (h->done < h->used)
      break;
    if (h == ws->chunk_tail) {
      if (c->queued == 0) {
        /* Nothing queued at all: give the chunk back, so an idle conn
         * holds no write buffer. */
        ws->chunk_head = ws->chunk_tail = NULL;
        dpx_chunk_put(c->loop, h);
      } else {
        /* Every appended byte is written: start the chunk over. */
        h->used = h->done = 0;
      }
      break;
    }
    ws->chunk_head = h->next;
    dpx_chunk_put(c->loop, h);
  }
}

void
dpx_conn_release_chunks_locked(duplex_conn *c)
{
  dpx_wstate *ws = dpx_conn_w(c);
  if (ws == NULL)
    return;
  dpx_chunk *h = ws->chunk_head;
  while (h != NULL) {
    dpx_chunk *next = h->next;
    dpx_chunk_put(c->loop, h);
    h = next;
  }
  ws->chunk_head = ws->chunk_tail = NULL;
}

/* ---- completing entries --------------------------------------------------- */

void
dpx_conn_complete(duplex_conn *c, dpx_entvec *v, size_t ok_before,
                  int status)
{
  /* Callbacks may append to `completed` (a direct write from a callback)
   * and so move its storage: index afresh each time, never keep a pointer
   * across a callback. Entries added meanwhile stay for the next round. */
  size_t n = v->n;
  for (size_t i = 0; i < n; i++) {
    dpx_ent *e = &v->v[i];
    int st = i < ok_before ? 0 : status;
    switch (e->kind) {
    case DPX_ENT_OWNED:
      free(e->orig);
      if (e->done != NULL)
        e->done(c, st, e->user);
      break;
    case DPX_ENT_ZC:
      if (e->release != NULL)
        e->release(e->orig, e->orig_len, st, e->user);
      break;
    case DPX_ENT_CHUNK:
    case DPX_ENT_DONE:
      if (e->done != NULL)
        e->done(c, st, e->user);
      break;
    case DPX_ENT_SHUTDOWN:
      if (e->done != NULL)
        e->done(c, status == 0 ? DUPLEX_ECANCELED : status, e->user);
      break;
    case DPX_ENT_STARTTLS:
      /* Never reached its turn (a taken one has orig cleared). */
      if (e->done != NULL)
        e->done(c, status == 0 ? DUPLEX_ECANCELED : status, e->user);
      if (e->orig != NULL)
        duplex_tls_unref(e->orig);
      free(e->base);
      break;
    default:
      break;
    }
  }
  if (v->n > n)
    memmove(v->v, v->v + n, (v->n - n) * sizeof(dpx_ent));
  v->n -= n;
}

/* An entry with bytes to write (an empty zero-copy write has none: it
 * only waits for its turn to be released). */
static bool
is_data(const dpx_ent *e)
{
  return (e->kind == DPX_ENT_CHUNK || e->kind == DPX_ENT_OWNED ||
          e->kind == DPX_ENT_ZC) &&
         e->len > 0;
}

/* The batch is over with @p status: account, complete, act on markers. */
static void wake_room_waiters_locked(duplex_conn *c, dpx_wstate *ws);

static void
batch_done(duplex_conn *c, int status)
{
  dpx_wstate *ws = dpx_conn_w(c);
  size_t total = 0, chunk_bytes = 0;
  bool shutdown = false, close = false, starttls = false;
  dpx_ent shut = { 0 }, start = { 0 };
  for (size_t i = 0; i < ws->batch.n; i++) {
    dpx_ent *e = &ws->batch.v[i];
    total += e->cost;
    switch (e->kind) {
    case DPX_ENT_CHUNK:
      chunk_bytes += e->len;
      break;
    case DPX_ENT_SHUTDOWN:
      shutdown = true;
      shut = *e;
      e->done = NULL; /* its callback is ours to call below */
      break;
    case DPX_ENT_STARTTLS:
      /* Always the batch's last entry (the pump splits the intake). */
      starttls = true;
      start = *e;
      e->done = NULL;
      e->orig = NULL;
      e->base = NULL;
      break;
    case DPX_ENT_CLOSE:
      close = true;
      break;
    default:
      break;
    }
  }
  bool writable = false;
  dpx_conn_lock(c);
  dpx_conn_queued_sub_locked(c, total);
  chunks_consume_locked(c, chunk_bytes);
  if (ws->waiters != NULL)
    wake_room_waiters_locked(c, ws);
  if (c->congested && c->queued <= c->cfg->low) {
    c->congested = false;
    dpx_conn_wake_waiters_locked(c);
    if (c->events & DPX_EV_BACKPRESSURE) {
      /* Drained before the crossing was told: tell nothing of it, unless
       * a write was refused meanwhile (its writer waits for on_writable). */
      c->events &= ~DPX_EV_BACKPRESSURE;
      writable = c->refused;
    } else {
      writable = true;
    }
    c->refused = false;
  }
  dpx_conn_unlock(c);
  c->writing = false;

  /* Writes completed directly before this batch come first. */
  if (ws->completed.n > 0)
    dpx_conn_complete(c, &ws->completed, ws->completed.n, 0);
  /* Every entry before the first data entry not wholly written went out
   * (over TLS: whose records went out): those complete with 0 whatever
   * happened to the rest. */
  dpx_conn_complete(c, &ws->batch,
                    status == 0 ? ws->batch.n
                                : (c->tls_on ? ws->tls_sent : ws->bpos),
                    status);

  if (starttls) {
    if (status == 0 && !c->close_begun) {
      dpx_conn_tls_begin(c, start.orig, start.base, NULL, start.done,
                         start.user);
    } else if (start.done != NULL) {
      start.done(c, status < 0 ? status : DUPLEX_ECANCELED, start.user);
    }
    duplex_tls_unref(start.orig);
    free(start.base);
  }

  if (status < 0) {
    if (shutdown && shut.done != NULL)
      shut.done(c, status, shut.user);
    dpx_conn_begin_close(c, status == DUPLEX_ECANCELED ? c->reason
                                                       : status);
  } else {
    if (shutdown && !c->close_begun) {
      ws->shut_ent = shut;
      ws->shut_pending = true;
      dpx_conn_start_shutdown(c);
    } else if (shutdown && shut.done != NULL) {
      shut.done(c, DUPLEX_ECANCELED, shut.user);
    }
    if (close && shutdown && ws->shut_pending) {
      ws->close_after_shut = true; /* close once the write side is shut */
    } else if (close && !c->close_begun &&
               dpx_conn_tls_close_notify_due(c)) {
      /* A graceful TLS close says close_notify after the writes: the
       * half-close path sends it, then closes. */
      memset(&ws->shut_ent, 0, sizeof ws->shut_ent);
      ws->shut_pending = true;
      ws->close_after_shut = true;
      dpx_conn_start_shutdown(c);
    } else if (close && !c->close_begun) {
      dpx_conn_begin_close(c, 0);
    }
  }
  if (writable && !c->close_begun && c->cfg->cbs.on_writable != NULL)
    c->cfg->cbs.on_writable(c, atomic_load(&c->user));
}

static void batch_continue(duplex_conn *c);
static void batch_continue_tls(duplex_conn *c);

/* @p n more bytes of the batch are in the kernel. */
static void
batch_advance(duplex_conn *c, size_t n)
{
  dpx_wstate *ws = dpx_conn_w(c);
  if (n > 0)
    dpx_conn_stamp_write(c);
  while (n > 0) {
    dpx_ent *e = &ws->batch.v[ws->bpos];
    size_t left = e->len - ws->boff;
    if (n < left) {
      ws->boff += n;
      return;
    }
    n -= left;
    ws->boff = 0;
    ws->bpos++;
    while (ws->bpos < ws->batch.n && !is_data(&ws->batch.v[ws->bpos]))
      ws->bpos++;
  }
}

static void
on_write(uv_write_t *req, int status)
{
  duplex_conn *c = req->data;
  if (status == 0) {
    /* The request carried the next piece of the entry at bpos. */
    batch_advance(c, dpx_conn_w(c)->wpiece);
    batch_continue(c);
  } else {
    batch_done(c, dpx_err(status));
  }
  dpx_conn_pump(c);
}

/* Write the batch from bpos: vectored uv_try_write while the kernel takes
 * bytes; when it is full, one uv_write for the rest of the current entry,
 * whose completion continues here. Progress is known to the byte, so each
 * write's completion says whether its own bytes went out. */
static void
batch_continue(duplex_conn *c)
{
  if (c->tls_on) {
    batch_continue_tls(c);
    return;
  }
  dpx_wstate *ws = dpx_conn_w(c);
  for (;;) {
    while (ws->bpos < ws->batch.n && !is_data(&ws->batch.v[ws->bpos]))
      ws->bpos++;
    if (ws->bpos == ws->batch.n) {
      batch_done(c, 0);
      c->pump_again = true;
      return;
    }
    size_t nb = 0, total = 0;
    for (size_t i = ws->bpos; i < ws->batch.n && nb < ws->bufs_cap; i++) {
      dpx_ent *e = &ws->batch.v[i];
      if (!is_data(e))
        continue;
      size_t off = i == ws->bpos ? ws->boff : 0;
      ws->bufs[nb++] = uv_buf_init(e->base + off, (unsigned)(e->len - off));
      total += e->len - off;
    }
    int r = uv_try_write(&dpx_conn_wr(c)->stream, ws->bufs, (unsigned)nb);
    if (r == UV_EAGAIN || r == UV_ENOSYS)
      r = 0;
    if (r < 0) {
      batch_done(c, dpx_err(r));
      c->pump_again = true;
      return;
    }
    batch_advance(c, (size_t)r);
    if ((size_t)r == total)
      continue; /* more entries than one writev took, or done */
    /* The kernel is full: wait for it with one request for the next piece
     * of this entry. Pieces are bounded so progress (and with it the flush
     * deadline and each write's status) is seen while a big write drains. */
    dpx_ent *e = &ws->batch.v[ws->bpos];
    size_t piece = e->len - ws->boff;
    if (piece > DPX_WRITE_PIECE)
      piece = DPX_WRITE_PIECE;
    ws->wpiece = piece;
    uv_buf_t rest = uv_buf_init(e->base + ws->boff, (unsigned)piece);
    ws->wreq.data = c;
    r = uv_write(&ws->wreq, &dpx_conn_wr(c)->stream, &rest, 1, on_write);
    if (r < 0) {
      batch_done(c, dpx_err(r));
      c->pump_again = true;
    }
    return;
  }
}

/* The batch over TLS: encrypt entry by entry into the engine's output
 * (a write's records are consecutive: the next entry starts only once
 * this one is wholly taken), sending as the output fills; a full kernel
 * parks the batch until the flush in flight completes
 * (dpx_conn_batch_resume). The batch is done once its last records are
 * on the wire. */
static void
batch_continue_tls(duplex_conn *c)
{
  dpx_wstate *ws = dpx_conn_w(c);
  for (;;) {
    while (ws->bpos < ws->batch.n && !is_data(&ws->batch.v[ws->bpos]))
      ws->bpos++;
    bool all = ws->bpos == ws->batch.n;
    if (!all) {
      dpx_ent *e = &ws->batch.v[ws->bpos];
      size_t want = e->len - ws->boff, taken = 0;
      int r = dpx_conn_tls_encrypt(c, e->base + ws->boff, want, &taken);
      if (r < 0) {
        batch_done(c, r);
        c->pump_again = true;
        return;
      }
      batch_advance(c, taken);
      if (taken == want)
        continue;
    }
    /* The batch is encrypted, or the output is at its cap: send. */
    int f = dpx_conn_tls_flush(c);
    if (f < 0) {
      batch_done(c, f);
      c->pump_again = true;
      return;
    }
    if (f == 0) {
      dpx_conn_tls_wait_flush(c);
      return;
    }
    ws->tls_sent = ws->bpos;
    if (all) {
      batch_done(c, 0);
      c->pump_again = true;
      return;
    }
  }
}

void
dpx_conn_batch_resume(duplex_conn *c)
{
  if (c->writing && !c->close_begun)
    batch_continue(c);
}

void
dpx_conn_batch_start(duplex_conn *c)
{
  dpx_wstate *ws = dpx_conn_w(c);
  size_t ndata = 0;
  for (size_t i = 0; i < ws->batch.n; i++)
    if (is_data(&ws->batch.v[i]))
      ndata++;
  if (ndata > DPX_MAX_BUFS)
    ndata = DPX_MAX_BUFS;
  if (ndata > ws->bufs_cap) {
    uv_buf_t *nb = realloc(ws->bufs, ndata * sizeof(uv_buf_t));
    if (nb == NULL) {
      ws->bpos = 0;
      batch_done(c, DUPLEX_ENOMEM);
      c->pump_again = true;
      return;
    }
    ws->bufs = nb;
    ws->bufs_cap = ndata;
  }
  ws->bpos = 0;
  ws->boff = 0;
  ws->tls_sent = 0;
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x != NULL && x->timeout[DUPLEX_TIMEOUT_FLUSH] != 0) {
    /* Writes are pending from now: the flush deadline applies. */
    x->t_write = uv_now(&c->loop->uv);
    dpx_conn_deadline_touch(c);
  }
  batch_continue(c);
}

/* ---- shutdown -------------------------------------------------------------- */

static void
shutdown_finished(duplex_conn *c, int status)
{
  dpx_wstate *ws = dpx_conn_w(c);
  ws->shut_pending = false;
  if (status == 0)
    c->shut_done = true;
  if (ws->shut_ent.done != NULL)
    ws->shut_ent.done(c, status, ws->shut_ent.user);
  if (c->close_begun)
    return;
  if (status < 0)
    dpx_conn_begin_close(c, status);
  else if (ws->close_after_shut && !c->rd_ended && dpx_conn_tls_linger(c))
    return; /* closes once the peer ended */
  else if ((c->rd_ended && !c->eof_pending) || ws->close_after_shut)
    dpx_conn_begin_close(c, 0);
  else {
    /* A graceful close may wait in the intake. Scheduled, not pumped
     * here: a caller up the stack may still hold the write state. */
    dpx_conn_lock(c);
    dpx_conn_schedule_locked(c, true);
    dpx_conn_unlock(c);
  }
}

static void
on_shutdown(uv_shutdown_t *req, int status)
{
  duplex_conn *c = req->data;
  if (status == UV_ECANCELED && c->close_begun)
    status = DUPLEX_ECANCELED;
  if (status == UV_ENOTSOCK) {
    /* A lone pipe or terminal cannot half-close: closing the fd is how
     * its write side ends (and it has no read side to keep). */
    status = 0;
    dpx_conn_w(c)->close_after_shut = true;
  }
  shutdown_finished(c, dpx_err(status));
}

static void
on_write_side_closed(uv_handle_t *h)
{
  duplex_conn *c = h->data;
  c->wr_gone = true;
  if (c->close_begun) {
    /* A close began meanwhile: this was one of the handles it waits for. */
    dpx_conn_handle_closed(c);
    return;
  }
  c->handles_open--;
  shutdown_finished(c, 0);
}

void
dpx_conn_start_shutdown(duplex_conn *c)
{
  if (c->tls_on && dpx_conn_tls_close_notify_due(c)) {
    /* close_notify first; the transport half-close follows once it is
     * sent (here, or from the flush's completion). */
    int r = dpx_conn_tls_close_notify(c);
    if (r < 0)
      shutdown_finished(c, r);
    if (r != 1)
      return;
  }
  if (dpx_conn_wr(c) != dpx_conn_rd(c)) {
    /* Adopted pair: closing the write fd is the peer's EOF. */
    c->handles_open++;
    dpx_stream_close(dpx_conn_wr(c), false, on_write_side_closed);
    return;
  }
  dpx_wstate *ws = dpx_conn_w(c);
  ws->sreq.data = c;
  int r = uv_shutdown(&ws->sreq, &dpx_conn_wr(c)->stream, on_shutdown);
  if (r != 0)
    shutdown_finished(c, dpx_err(r));
}

int
duplex_conn_shutdown(duplex_conn *conn, duplex_write_cb done, void *user)
{
  if (conn == NULL)
    return DUPLEX_EINVAL;
  dpx_conn_lock(conn);
  int r = 0;
  dpx_wstate *ws = NULL;
  if (conn->state != DPX_CS_OPEN)
    r = DUPLEX_ECLOSED;
  else if (conn->shut_requested)
    r = DUPLEX_ESHUTDOWN;
  else if ((ws = dpx_conn_w_get_locked(conn)) == NULL)
    r = DUPLEX_ENOMEM;
  else
    r = dpx_entvec_reserve(&ws->intake, 1);
  if (r == 0) {
    dpx_ent *e = &ws->intake.v[ws->intake.n++];
    memset(e, 0, sizeof *e);
    e->kind = DPX_ENT_SHUTDOWN;
    e->done = done;
    e->user = user;
    conn->shut_requested = true;
    dpx_conn_schedule_locked(conn, false);
  }
  dpx_conn_unlock(conn);
  return r;
}

/* ---- writes ------------------------------------------------------------ */

typedef struct write_req {
  const duplex_buf *bufs;
  size_t nbufs;
  size_t total;
  void *zc; /* non-NULL for zero-copy */
  duplex_write_cb done;
  duplex_release_cb release;
  void *user;
} write_req;

/* Under the conn lock: make the tail chunk hold @p len more bytes. */
static int
chunk_room_locked(duplex_conn *c, size_t len)
{
  dpx_wstate *ws = dpx_conn_w(c);
  dpx_chunk *t = ws->chunk_tail;
  if (t != NULL && DPX_CHUNK_SIZE - t->used >= len)
    return 0;
  dpx_chunk *n = dpx_chunk_get(c->loop);
  if (n == NULL)
    return DUPLEX_ENOMEM;
  if (t != NULL)
    t->next = n;
  else
    ws->chunk_head = n;
  ws->chunk_tail = n;
  return 0;
}

/* What queuing @p w costs against the limits: its payload plus the
 * overhead of one write, or nothing for a write that leaves no trace (no
 * bytes and nobody to tell). */
static size_t
write_cost(const write_req *w, size_t skip)
{
  if (w->total == skip && w->done == NULL && w->zc == NULL)
    return 0;
  return w->total - skip + DUPLEX_WRITE_OVERHEAD;
}

static dpx_ent *
new_entry(dpx_wstate *ws, int kind, size_t cost)
{
  dpx_ent *e = &ws->intake.v[ws->intake.n++];
  memset(e, 0, sizeof *e);
  e->kind = kind;
  e->cost = cost;
  return e;
}

/* Under the conn lock: append @p w, skipping its first @p skip bytes (already
 * written directly). Either everything is appended or nothing is. */
static int
append_locked(duplex_conn *c, dpx_wstate *ws, const write_req *w,
              size_t skip)
{
  size_t remain = w->total - skip;
  size_t cost = write_cost(w, skip);
  if (cost == 0)
    return 0;
  int r = dpx_entvec_reserve(&ws->intake, 1);
  if (r != 0)
    return r;
  dpx_ent *last = ws->intake.n > 0 ? &ws->intake.v[ws->intake.n - 1] : NULL;
  if (w->zc != NULL) {
    dpx_ent *e = new_entry(ws, DPX_ENT_ZC, cost);
    e->base = (char *)w->zc + skip;
    e->len = remain;
    e->orig = w->zc;
    e->orig_len = w->total;
    e->release = w->release;
    e->user = w->user;
    return 0;
  }
  dpx_ent *e;
  char *dst = NULL;
  if (remain == 0) {
    e = new_entry(ws, DPX_ENT_DONE, cost); /* a flush marker */
  } else if (remain >= DPX_LARGE_WRITE) {
    dst = malloc(remain);
    if (dst == NULL)
      return DUPLEX_ENOMEM;
    e = new_entry(ws, DPX_ENT_OWNED, cost);
    e->base = dst;
    e->len = remain;
    e->orig = dst;
  } else {
    r = chunk_room_locked(c, remain);
    if (r != 0)
      return r;
    dpx_chunk *t = ws->chunk_tail;
    dst = t->data + t->used;
    if (last != NULL && last->kind == DPX_ENT_CHUNK && last->done == NULL &&
        last->base + last->len == dst) {
      /* Extend the entry; its callback (if this write has one) runs once
       * every byte up to this write's last is out. */
      e = last;
      e->len += remain;
      e->cost += cost;
    } else {
      e = new_entry(ws, DPX_ENT_CHUNK, cost);
      e->base = dst;
      e->len = remain;
    }
    t->used += remain;
  }
  e->done = w->done;
  e->user = w->user;
  /* Copy the bytes not yet written, buffer by buffer. */
  size_t off = 0;
  for (size_t i = 0; dst != NULL && i < w->nbufs; i++) {
    const char *src = w->bufs[i].base;
    size_t len = w->bufs[i].len;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    src += skip;
    len -= skip;
    skip = 0;
    memcpy(dst + off, src, len);
    off += len;
  }
  return 0;
}

/* Loop thread, nothing queued: write straight to the fd. Returns bytes
 * written (0 if the kernel took nothing or the fd failed: the batch path
 * then reports the error through the completion). */
static size_t
write_direct_tls(duplex_conn *c, const write_req *w, bool *sent);

static size_t
write_direct(duplex_conn *c, const write_req *w, bool *sent)
{
  *sent = true;
  if (c->tls_on)
    return write_direct_tls(c, w, sent);
  uv_buf_t bufs[DPX_DIRECT_BUFS];
  unsigned n = 0;
  if (w->zc != NULL) {
    bufs[n++] = uv_buf_init(w->zc, (unsigned)w->total);
  } else {
    for (size_t i = 0; i < w->nbufs; i++)
      if (w->bufs[i].len > 0)
        bufs[n++] = uv_buf_init((char *)w->bufs[i].base,
                                (unsigned)w->bufs[i].len);
  }
  int r = uv_try_write(&dpx_conn_wr(c)->stream, bufs, n);
  return r > 0 ? (size_t)r : 0;
}

/* The same over TLS: encrypt what the engine takes (buffer after buffer,
 * so the write's records stay consecutive), then send. Returns the bytes
 * encrypted; *sent says whether their records are all on the wire (else
 * a flush in flight carries the rest). An engine error takes nothing: the
 * batch path reports it. */
static size_t
write_direct_tls(duplex_conn *c, const write_req *w, bool *sent)
{
  size_t done = 0;
  for (size_t i = 0; i < w->nbufs; i++) { /* a zero-copy write: one buffer */
    size_t len = w->bufs[i].len, taken = 0;
    if (len == 0)
      continue;
    if (dpx_conn_tls_encrypt(c, w->bufs[i].base, len, &taken) != 0)
      break;
    done += taken;
    if (taken < len)
      break;
  }
  bool notify = w->done != NULL || (w->zc != NULL && w->release != NULL);
  if (!notify && dpx_conn_tls_defer_flush(c)) {
    /* From a read callback: the delivery's one send takes these records
     * together with the other answers (one writev per read, not per
     * write). */
    *sent = false;
    return done;
  }
  int f = dpx_conn_tls_flush(c);
  *sent = f == 1;
  if (f < 0) {
    /* The socket failed: encrypted records are lost with it. */
    c->abort_requested = true;
    if (c->reason == 0)
      c->reason = f;
    dpx_conn_mark_closed_locked(c);
    dpx_conn_schedule_locked(c, true);
  }
  return done;
}

static int
conn_submit(duplex_conn *c, const write_req *w)
{
  int r = 0;
  dpx_conn_lock(c);
  if (c->state != DPX_CS_OPEN) {
    r = DUPLEX_ECLOSED;
  } else if (c->shut_requested) {
    r = DUPLEX_ESHUTDOWN;
  } else if (write_cost(w, 0) > 0 && c->queued > 0 &&
             c->queued + write_cost(w, 0) > c->cfg->hard) {
    /* Refused: the writer waits (wait_writable, on_writable) until the
     * queue drains to the low watermark, also when it never reached the
     * high one (a big write against a partly full queue). */
    r = DUPLEX_EWOULDBLOCK;
    c->congested = true;
    c->refused = true;
  }
  if (r != 0) {
    dpx_conn_unlock(c);
    return r;
  }
  size_t skip = 0;
  dpx_wstate *ws = dpx_conn_w(c);
  /* Loop-thread fields are read only on the loop thread. */
  if (w->total > 0 && dpx_on_loop(c->loop) && c->opened && !c->tls_wait &&
      !c->writing &&
      (ws == NULL || ws->intake.n == 0) && !c->close_begun &&
      w->nbufs <= DPX_DIRECT_BUFS) {
    /* Nothing queued: straight to the socket. A write the kernel takes
     * whole and that wants no callback leaves no trace (no write state). */
    bool sent;
    skip = write_direct(c, w, &sent);
    if (skip > 0)
      dpx_conn_stamp_write(c); /* the idle deadline sees direct writes */
    bool notify = w->done != NULL || (w->zc != NULL && w->release != NULL);
    if (skip == w->total && !notify) {
      dpx_conn_unlock(c);
      return 0;
    }
    ws = dpx_conn_w_get_locked(c);
    if (ws != NULL && skip == w->total && sent) {
      /* On the wire; the callback runs from the pump, never inside this
       * call. */
      if (dpx_entvec_reserve(&ws->completed, 1) == 0) {
        dpx_ent *e = &ws->completed.v[ws->completed.n++];
        memset(e, 0, sizeof *e);
        e->kind = w->zc != NULL ? DPX_ENT_ZC : DPX_ENT_DONE;
        e->orig = w->zc;
        e->orig_len = w->total;
        e->done = w->done;
        e->release = w->release;
        e->user = w->user;
        dpx_conn_schedule_locked(c, true);
        dpx_conn_unlock(c);
        return 0;
      }
      ws = NULL; /* no memory for the completion: treated below */
    }
  }
  /* Queue the rest (or, without memory for a completion entry above, the
   * completion alone: it then runs in order from the intake). */
  if (ws == NULL)
    ws = dpx_conn_w_get_locked(c);
  r = ws != NULL ? append_locked(c, ws, w, skip) : DUPLEX_ENOMEM;
  if (r != 0 && skip > 0) {
    /* Part of the write is on the wire and the rest cannot be kept (no
     * memory for it): the stream is broken. */
    c->abort_requested = true;
    c->reason = r;
    dpx_conn_mark_closed_locked(c);
    dpx_conn_schedule_locked(c, true);
    dpx_conn_unlock(c);
    return r;
  }
  if (r != 0) {
    dpx_conn_unlock(c);
    return r;
  }
  dpx_conn_queued_add_locked(c, write_cost(w, skip));
  if (!c->congested && c->queued >= c->cfg->high) {
    c->congested = true;
    c->events |= DPX_EV_BACKPRESSURE;
    dpx_conn_schedule_locked(c, true);
  } else {
    dpx_conn_schedule_locked(c, false);
  }
  dpx_conn_unlock(c);
  return 0;
}

static int
check_bufs(const duplex_buf *bufs, size_t nbufs, size_t *total)
{
  size_t t = 0;
  if (nbufs > DPX_MAX_BUFS || (bufs == NULL && nbufs > 0))
    return DUPLEX_EINVAL;
  for (size_t i = 0; i < nbufs; i++) {
    if (bufs[i].base == NULL && bufs[i].len > 0)
      return DUPLEX_EINVAL;
    if (bufs[i].len > DUPLEX_WRITE_MAX - t)
      return DUPLEX_EMSGSIZE;
    t += bufs[i].len;
  }
  *total = t;
  return 0;
}

int
duplex_conn_write(duplex_conn *conn, const void *data, size_t len,
                  duplex_write_cb done, void *user)
{
  if (conn == NULL || (data == NULL && len > 0))
    return DUPLEX_EINVAL;
  if (len > DUPLEX_WRITE_MAX)
    return DUPLEX_EMSGSIZE;
  duplex_buf b = { data, len };
  write_req w = { &b, 1, len, NULL, done, NULL, user };
  return conn_submit(conn, &w);
}

int
duplex_conn_writev(duplex_conn *conn, const duplex_buf *bufs, size_t nbufs,
                   duplex_write_cb done, void *user)
{
  size_t total = 0;
  if (conn == NULL)
    return DUPLEX_EINVAL;
  int r = check_bufs(bufs, nbufs, &total);
  if (r != 0)
    return r;
  write_req w = { bufs, nbufs, total, NULL, done, NULL, user };
  return conn_submit(conn, &w);
}

int
duplex_conn_write_zc(duplex_conn *conn, void *data, size_t len,
                     duplex_release_cb release, void *user)
{
  if (conn == NULL || data == NULL)
    return DUPLEX_EINVAL;
  if (len > DUPLEX_WRITE_MAX)
    return DUPLEX_EMSGSIZE;
  duplex_buf b = { data, len };
  write_req w = { &b, 1, len, data, NULL, release, user };
  return conn_submit(conn, &w);
}

/* ---- waiting for room ------------------------------------------------------ */

/* Under the conn lock: whether the wait for @p need is over. */
static bool
room_for(const duplex_conn *c, size_t need)
{
  if (need == SIZE_MAX)
    return !c->congested;
  /* A write into an empty queue is always taken (conn_write's rule). */
  return c->queued == 0 ||
         (need <= c->cfg->hard && c->queued <= c->cfg->hard - need);
}

/* Under the conn lock, after the queue shrank: wake the room waiters
 * whose write fits now. */
static void
wake_room_waiters_locked(duplex_conn *c, dpx_wstate *ws)
{
  for (dpx_waiter *w = ws->waiters; w != NULL; w = w->next)
    if (w->need != SIZE_MAX && room_for(c, w->need))
      uv_cond_signal(&w->cv);
}

static int
wait_for_room(duplex_conn *conn, size_t need, int timeout_ms)
{
  dpx_conn_lock(conn);
  if (dpx_on_loop(conn->loop)) {
    dpx_conn_unlock(conn);
    return DUPLEX_EDEADLK;
  }
  uint64_t deadline =
      timeout_ms > 0 ? uv_hrtime() + (uint64_t)timeout_ms * 1000000u : 0;
  dpx_waiter w;
  w.need = need;
  dpx_wstate *ws = NULL; /* kept while a waiter is linked to it */
  bool linked = false;
  int r;
  for (;;) {
    if (conn->state == DPX_CS_CLOSED) {
      r = DUPLEX_ECLOSED;
      break;
    }
    if (room_for(conn, need)) {
      r = 0;
      break;
    }
    if (timeout_ms == 0) {
      r = DUPLEX_EWOULDBLOCK; /* no room, and asked not to wait */
      break;
    }
    if (!linked) {
      if (uv_cond_init(&w.cv) != 0) {
        r = DUPLEX_ENOMEM;
        break;
      }
      ws = dpx_conn_w(conn); /* bytes are queued in it */
      w.next = ws->waiters;
      ws->waiters = &w;
      linked = true;
    }
    if (timeout_ms < 0) {
      uv_cond_wait(&w.cv, dpx_conn_mu(conn));
    } else {
      uint64_t now = uv_hrtime();
      if (now >= deadline) {
        r = DUPLEX_ETIMEDOUT;
        break;
      }
      uv_cond_timedwait(&w.cv, dpx_conn_mu(conn), deadline - now);
    }
  }
  if (linked) {
    dpx_waiter **pp = &ws->waiters;
    while (*pp != &w)
      pp = &(*pp)->next;
    *pp = w.next;
    uv_cond_destroy(&w.cv);
  }
  dpx_conn_unlock(conn);
  return r;
}

int
duplex_conn_wait_writable(duplex_conn *conn, int timeout_ms)
{
  if (conn == NULL || timeout_ms < -1)
    return DUPLEX_EINVAL;
  return wait_for_room(conn, SIZE_MAX, timeout_ms);
}

int
duplex_conn_wait_room(duplex_conn *conn, size_t len, int timeout_ms)
{
  if (conn == NULL || timeout_ms < -1)
    return DUPLEX_EINVAL;
  size_t need = len <= SIZE_MAX - 1 - DUPLEX_WRITE_OVERHEAD
                    ? len + DUPLEX_WRITE_OVERHEAD
                    : SIZE_MAX - 1;
  return wait_for_room(conn, need, timeout_ms);
}

int
duplex_conn_write_frame(duplex_conn *conn, const void *data, size_t len,
                        duplex_write_cb done, void *user)
{
  if (conn == NULL || (data == NULL && len > 0))
    return DUPLEX_EINVAL;
  dpx_conn_extra *x = dpx_conn_x(conn);
  if (x == NULL || x->framer == NULL)
    return duplex_conn_write(conn, data, len, done, user);
  unsigned char hdr[8];
  size_t hdr_len = 0, trail_len = 0;
  const unsigned char *trail = NULL;
  int r = dpx_framer_encode(&x->framer->cfg, data, len, hdr, &hdr_len,
                            &trail, &trail_len);
  if (r != 0)
    return r;
  duplex_buf bufs[3] = { { hdr, hdr_len }, { data, len }, { trail, trail_len } };
  return duplex_conn_writev(conn, bufs, 3, done, user);
}
