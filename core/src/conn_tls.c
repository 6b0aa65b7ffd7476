/* TLS on conns: the public duplex_tls object and the glue between a conn
 * and its engine (tls/engine.h).
 *
 * The engine sits between the socket and the conn's plaintext machinery,
 * all on the loop thread:
 *   read:  socket bytes are fed to the engine, then decrypted into the
 *          loop's read buffer and delivered exactly as plaintext from the
 *          socket would be (framing, pause, EOF). A paused conn stops
 *          reading the socket and leaves the rest undecrypted in the
 *          engine (rd_more), so decrypted data never piles up.
 *   write: the write batch (conn_write.c) encrypts entry by entry into
 *          the engine's output queue and sends it with flush(); one
 *          uv_write at a time carries ciphertext, and whatever waited for
 *          room (the batch, a read blocked on the output cap, a
 *          close_notify) continues when it completes (progress()).
 * The handshake begins when the socket opens (or when a STARTTLS entry
 * reaches its turn); until it is done the conn's writes wait (tls_wait)
 * and `on_open` is held back. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if DUPLEX_HAVE_TLS
#include "tls/engine.h"
#endif

#define DPX_TLS_HANDSHAKE_DEFAULT_MS 10000u

struct duplex_tls {
  atomic_uint refs;
  int role;
  int verify;
  uint32_t handshake_timeout_ms;
#if DUPLEX_HAVE_TLS
  dpx_tls_config *cfg;
#endif
};

int
duplex_tls_config_init(duplex_tls_config *cfg)
{
  if (cfg == NULL)
    return DUPLEX_EINVAL;
  const duplex_tls_config def = DUPLEX_TLS_CONFIG_INIT;
  *cfg = def;
  return 0;
}

int
duplex_tls_ref(duplex_tls *tls)
{
  if (tls == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&tls->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_tls_unref(duplex_tls *tls)
{
  if (tls == NULL)
    return DUPLEX_EINVAL;
  if (atomic_fetch_sub_explicit(&tls->refs, 1u, memory_order_acq_rel) ==
      1u) {
#if DUPLEX_HAVE_TLS
    dpx_tls_config_unref(tls->cfg);
#endif
    free(tls);
  }
  return 0;
}

int
dpx_tls_check_use(const duplex_tls *tls, int role, bool have_host)
{
  if (tls == NULL)
    return 0;
#if DUPLEX_HAVE_TLS
  if (tls->role != role)
    return DUPLEX_EINVAL;
  if (role == DUPLEX_TLS_CLIENT && tls->verify != DUPLEX_TLS_VERIFY_NONE &&
      !have_host)
    return DUPLEX_EINVAL; /* nothing to check the certificate against */
  return 0;
#else
  (void)role;
  (void)have_host;
  return DUPLEX_ENOTSUP;
#endif
}

#if !DUPLEX_HAVE_TLS

/* Built without TLS: no duplex_tls can exist, so no conn ever has an
 * engine; the entry points refuse and the hooks are never reached. */

int
duplex_tls_new(duplex_tls **out, const duplex_tls_config *cfg, char *err,
               size_t errlen)
{
  if (out != NULL)
    *out = NULL;
  if (err != NULL && errlen > 0)
    snprintf(err, errlen, "built without TLS");
  if (out == NULL || cfg == NULL)
    return DUPLEX_EINVAL;
  return DUPLEX_ENOTSUP;
}

const char *
duplex_tls_backend(void)
{
  return NULL;
}

int
duplex_conn_start_tls(duplex_conn *conn, duplex_tls *tls, const char *host,
                      duplex_write_cb done, void *user)
{
  (void)host;
  (void)done;
  (void)user;
  if (conn == NULL || tls == NULL)
    return DUPLEX_EINVAL;
  return DUPLEX_ENOTSUP;
}

int dpx_conn_tls_info_fill(duplex_conn *c, duplex_tls_info *info)
{
  (void)c;
  (void)info;
  return DUPLEX_ENOTSUP;
}
void dpx_conn_tls_begin(duplex_conn *c, duplex_tls *tls, const char *host,
                        const char *key, duplex_write_cb done, void *user)
{
  (void)tls;
  (void)host;
  (void)key;
  if (done != NULL)
    done(c, DUPLEX_ENOTSUP, user);
  dpx_conn_begin_close(c, DUPLEX_ENOTSUP);
}
void dpx_conn_tls_input(duplex_conn *c, const char *data, size_t len)
{
  (void)data;
  (void)len;
  dpx_conn_begin_close(c, DUPLEX_ENOTSUP);
}
void dpx_conn_tls_input_eof(duplex_conn *c)
{
  dpx_conn_begin_close(c, DUPLEX_ENOTSUP);
}
void dpx_conn_tls_drain(duplex_conn *c) { (void)c; }
bool dpx_conn_tls_rd_more(const duplex_conn *c) { (void)c; return false; }
bool dpx_conn_tls_read_blocked(const duplex_conn *c) { (void)c; return false; }
int dpx_conn_tls_encrypt(duplex_conn *c, const void *data, size_t len,
                         size_t *taken)
{
  (void)c;
  (void)data;
  (void)len;
  *taken = 0;
  return DUPLEX_ENOTSUP;
}
int dpx_conn_tls_flush(duplex_conn *c) { (void)c; return 1; }
bool dpx_conn_tls_defer_flush(const duplex_conn *c) { (void)c; return false; }
void dpx_conn_tls_wait_flush(duplex_conn *c) { (void)c; }
int dpx_conn_tls_close_notify(duplex_conn *c) { (void)c; return 1; }
bool dpx_conn_tls_close_notify_due(const duplex_conn *c) { (void)c; return false; }
uint64_t dpx_conn_tls_hs_due(const duplex_conn *c) { (void)c; return 0; }
void dpx_conn_tls_timed_out(duplex_conn *c) { (void)c; }
bool dpx_conn_tls_linger(duplex_conn *c) { (void)c; return false; }
void dpx_conn_tls_finish(duplex_conn *c) { (void)c; }
void dpx_conn_tls_free(dpx_conn_extra *x) { (void)x; }

#else /* DUPLEX_HAVE_TLS */

#include <openssl/crypto.h>

/* ---- the shared configuration ------------------------------------------ */

static int
map_status(int st)
{
  switch (st) {
  case DPX_TLS_EVERIFY:
    return DUPLEX_ETLSVERIFY;
  case DPX_TLS_EALERT:
  case DPX_TLS_EPROTO:
    return DUPLEX_ETLS;
  case DPX_TLS_ETRUNCATED:
    return DUPLEX_ETLSTRUNC;
  case DPX_TLS_ESHUTDOWN:
    return DUPLEX_ESHUTDOWN;
  case DPX_TLS_ENOMEM:
    return DUPLEX_ENOMEM;
  case DPX_TLS_ECONFIG:
    return DUPLEX_ETLSCONFIG;
  default:
    return st < 0 ? DUPLEX_EINVAL : 0;
  }
}

int
duplex_tls_new(duplex_tls **out, const duplex_tls_config *cfg, char *err,
               size_t errlen)
{
  if (out != NULL)
    *out = NULL;
  if (err != NULL && errlen > 0)
    err[0] = '\0';
  if (out == NULL || cfg == NULL)
    return DUPLEX_EINVAL;
  int r = dpx_check_size(cfg, cfg->size, sizeof *cfg, sizeof *cfg);
  if (r != 0)
    return r;
  if ((cfg->role != DUPLEX_TLS_CLIENT && cfg->role != DUPLEX_TLS_SERVER) ||
      cfg->verify < DUPLEX_TLS_VERIFY_DEFAULT ||
      cfg->verify > DUPLEX_TLS_VERIFY_OPTIONAL ||
      (cfg->role == DUPLEX_TLS_CLIENT && cfg->verify > DUPLEX_TLS_VERIFY_NONE) ||
      (cfg->role == DUPLEX_TLS_SERVER && cfg->verify == DUPLEX_TLS_VERIFY_NONE)) {
    if (err != NULL && errlen > 0)
      snprintf(err, errlen, "role and verify do not go together");
    return DUPLEX_EINVAL;
  }
  dpx_tls_config_opts o;
  memset(&o, 0, sizeof o);
  o.role = cfg->role == DUPLEX_TLS_CLIENT ? DPX_TLS_CLIENT : DPX_TLS_SERVER;
  o.cert_file = cfg->cert_file;
  o.cert_pem = cfg->cert_pem;
  o.cert_pem_len = cfg->cert_pem_len;
  o.key_file = cfg->key_file;
  o.key_pem = cfg->key_pem;
  o.key_pem_len = cfg->key_pem_len;
  o.ca_file = cfg->ca_file;
  o.ca_dir = cfg->ca_dir;
  o.ca_pem = cfg->ca_pem;
  o.ca_pem_len = cfg->ca_pem_len;
  o.system_ca = cfg->system_ca != 0;
  switch (cfg->verify) {
  case DUPLEX_TLS_VERIFY_NONE:
    o.verify = DPX_TLS_VERIFY_NONE;
    break;
  case DUPLEX_TLS_VERIFY_REQUIRE:
    o.verify = DPX_TLS_VERIFY_REQUIRE;
    break;
  case DUPLEX_TLS_VERIFY_OPTIONAL:
    o.verify = DPX_TLS_VERIFY_OPTIONAL;
    break;
  default:
    o.verify = DPX_TLS_VERIFY_DEFAULT;
    break;
  }
  o.alpn = cfg->alpn;
  o.alpn_count = cfg->alpn_count;
  o.min_version = cfg->min_version;
  o.max_version = cfg->max_version;
  o.session_cache = cfg->session_cache;
  o.keylog_file = cfg->keylog_file;

  duplex_tls *t = calloc(1, sizeof *t);
  if (t == NULL)
    return DUPLEX_ENOMEM;
  r = dpx_tls_config_new(&t->cfg, &o, err, errlen);
  if (r != 0) {
    free(t);
    return map_status(r);
  }
  atomic_init(&t->refs, 1u);
  t->role = cfg->role;
  t->verify = cfg->verify;
  t->handshake_timeout_ms = cfg->handshake_timeout_ms != 0
                                ? cfg->handshake_timeout_ms
                                : DPX_TLS_HANDSHAKE_DEFAULT_MS;
  *out = t;
  return 0;
}

const char *
duplex_tls_backend(void)
{
  return OpenSSL_version(OPENSSL_VERSION);
}

/* ---- per-conn state (loop thread) ---------------------------------------- */

struct dpx_conn_tls {
  dpx_tls *eng;
  duplex_tls *tls;
  uv_write_t *wreq;  /* while a uv_write is in flight (not kept idle) */
  size_t inflight;   /* ciphertext the uv_write in flight carries */
  uint64_t hs_start; /* loop time the handshake began */
  duplex_write_cb hs_cb; /* STARTTLS: told when the handshake ends */
  void *hs_user;
  bool hs_done;
  bool rd_more;      /* paused with input left to decrypt */
  bool read_blocked; /* the output queue is full of answers: not reading */
  bool batch_waits;  /* the write batch waits for the output to drain */
  bool shut_waits;   /* close_notify queued: half-close once it is sent */
  bool eof_told;     /* the peer's close_notify went out as on_eof */
  bool delivering;   /* inside decrypt(): it sends what callbacks write */
};

static inline dpx_conn_tls *
conn_tls(const duplex_conn *c)
{
  const dpx_conn_extra *x = dpx_conn_x(c);
  return x != NULL ? x->tls : NULL;
}

/* Keep the reason of a failure for duplex_conn_get_tls_error (first wins). */
static void
keep_reason(duplex_conn *c, const char *why)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  if (x == NULL || why == NULL || why[0] == '\0')
    return;
  char *copy = dpx_strdup(why);
  dpx_conn_lock(c);
  if (x->tls_reason == NULL) {
    x->tls_reason = copy;
    copy = NULL;
  }
  dpx_conn_unlock(c);
  free(copy);
}

static void on_tls_written(uv_write_t *req, int status);

/* Fill @p bufs with the pending output; returns how many and the total. */
static unsigned
out_bufs(dpx_conn_tls *t, uv_buf_t *bufs, unsigned cap, size_t *total)
{
  dpx_tls_buf pieces[16];
  size_t n = dpx_tls_out_peek(t->eng, 0, pieces, cap < 16 ? cap : 16);
  *total = 0;
  for (size_t i = 0; i < n; i++) {
    bufs[i] = uv_buf_init((char *)pieces[i].base, (unsigned)pieces[i].len);
    *total += pieces[i].len;
  }
  return (unsigned)n;
}

int
dpx_conn_tls_flush(duplex_conn *c)
{
  dpx_conn_tls *t = conn_tls(c);
  if (t->inflight > 0)
    return 0;
  dpx_stream *wr = dpx_conn_wr(c);
  uv_buf_t bufs[16];
  for (;;) {
    size_t total;
    unsigned n = out_bufs(t, bufs, 16, &total);
    if (n == 0)
      return 1;
    if (wr == NULL)
      return DUPLEX_EPIPE; /* the write side is gone */
    int r = uv_try_write(&wr->stream, bufs, n);
    if (r == UV_EAGAIN || r == UV_ENOSYS)
      r = 0;
    if (r < 0)
      return dpx_err(r);
    if (r > 0) {
      dpx_tls_out_consume(t->eng, (size_t)r);
      dpx_conn_stamp_write(c);
    }
    if ((size_t)r == total)
      continue;
    /* The kernel is full: one request for what is pending now. */
    n = out_bufs(t, bufs, 16, &total);
    t->wreq = malloc(sizeof *t->wreq);
    if (t->wreq == NULL)
      return DUPLEX_ENOMEM;
    t->wreq->data = c;
    r = uv_write(t->wreq, &wr->stream, bufs, n, on_tls_written);
    if (r < 0) {
      free(t->wreq);
      t->wreq = NULL;
      return dpx_err(r);
    }
    t->inflight = total;
    return 0;
  }
}

bool
dpx_conn_tls_defer_flush(const duplex_conn *c)
{
  const dpx_conn_tls *t = conn_tls(c);
  return t != NULL && t->delivering;
}

void
dpx_conn_tls_wait_flush(duplex_conn *c)
{
  conn_tls(c)->batch_waits = true;
}

/* The engine failed with @p st: keep why, send the alert if the kernel
 * takes it at once, close. */
static void
tls_fail(duplex_conn *c, int st)
{
  dpx_conn_tls *t = conn_tls(c);
  keep_reason(c, dpx_tls_reason(t->eng));
  /* Name the peer while the socket is there: a server's on_close is
   * where it wants to say whose handshake failed. */
  dpx_conn_extra *x = dpx_conn_x(c);
  dpx_conn_lock(c);
  bool named = x->peer != NULL;
  dpx_conn_unlock(c);
  if (!named)
    dpx_conn_set_peer(c);
  if (t->inflight == 0 && dpx_conn_wr(c) != NULL) {
    uv_buf_t bufs[16];
    size_t total;
    unsigned n = out_bufs(t, bufs, 16, &total);
    if (n > 0)
      (void)uv_try_write(&dpx_conn_wr(c)->stream, bufs, n);
  }
  dpx_conn_begin_close(c, map_status(st));
}

/* The socket's read state as the TLS conn needs it: reading while the
 * handshake runs, else as the user wishes, never while the output is
 * blocked or undelivered input waits for a resume. */
static void
sock_read_sync(duplex_conn *c, dpx_conn_tls *t)
{
  if (c->rd_cut || c->close_begun || c->rd_ended)
    return;
  bool want = !t->read_blocked &&
              (!t->hs_done || c->lingering || (c->rd_want && !t->rd_more));
  if (want && !c->reading)
    dpx_conn_read_start(c);
  else if (!want && c->reading)
    dpx_conn_read_stop(c);
}

static void
handshake_done(duplex_conn *c, dpx_conn_tls *t)
{
  t->hs_done = true;
  c->tls_wait = false;
  dpx_conn_deadline_release(c); /* unless another deadline applies */
  dpx_conn_lock(c);
  bool want = c->want_read;
  dpx_conn_unlock(c);
  c->rd_want = want;
  if (t->hs_cb != NULL) {
    duplex_write_cb cb = t->hs_cb;
    t->hs_cb = NULL;
    cb(c, 0, t->hs_user);
  } else if (c->cfg->cbs.on_open != NULL) {
    c->cfg->cbs.on_open(c, atomic_load_explicit(&c->user,
                                                memory_order_relaxed));
  }
  /* Writes queued meanwhile go out now, from the pump. */
  dpx_conn_lock(c);
  dpx_conn_schedule_locked(c, true);
  dpx_conn_unlock(c);
}

/* Decrypt and deliver what the engine holds, as far as the user's wish
 * and the output cap allow; then send what reading produced. */
static void
decrypt(duplex_conn *c)
{
  dpx_conn_tls *t = conn_tls(c);
  duplex_loop *loop = c->loop;
  t->rd_more = false;
  if (loop->rbuf == NULL && (loop->rbuf = malloc(loop->rbuf_size)) == NULL) {
    dpx_conn_begin_close(c, DUPLEX_ENOMEM);
    return;
  }
again:
  t->delivering = true;
  for (;;) {
    if (c->rd_cut || c->close_begun)
      return;
    if (t->hs_done && !c->rd_want && !c->lingering) {
      t->rd_more = dpx_tls_in_pending(t->eng) > 0 ||
                   dpx_tls_read_pending(t->eng) > 0 ||
                   (c->rd_ended && !t->eof_told);
      break;
    }
    if (!t->hs_done) {
      /* The handshake alone first: no plaintext is read before on_open
       * (and the user's wish) are known. */
      int h = dpx_tls_handshake(t->eng);
      if (h == DPX_TLS_OK) {
        /* Our last flight goes before anything on_open writes. */
        int f = dpx_conn_tls_flush(c);
        if (f < 0) {
          dpx_conn_begin_close(c, f);
          return;
        }
        handshake_done(c, t);
        continue;
      }
      if (h == DPX_TLS_WANT_INPUT)
        break;
      if (h == DPX_TLS_FULL) {
        t->read_blocked = true;
        break;
      }
      tls_fail(c, h);
      return;
    }
    size_t n = 0;
    int r = dpx_tls_read(t->eng, loop->rbuf, loop->rbuf_size, &n);
    if (r == DPX_TLS_OK && n > 0) {
      if (!c->lingering) /* after a close, what still comes is dropped */
        dpx_conn_deliver(c, loop->rbuf, n);
      continue;
    }
    if (r == DPX_TLS_OK || r == DPX_TLS_WANT_INPUT)
      break;
    if (r == DPX_TLS_FULL) {
      t->read_blocked = true; /* progress() resumes once the output drains */
      break;
    }
    if (c->lingering && (r == DPX_TLS_EOF || r < 0)) {
      /* The peer ended (cleanly or not): the close is complete. */
      dpx_conn_begin_close(c, 0);
      return;
    }
    if (r == DPX_TLS_EOF) {
      /* The peer's close_notify: its clean end of data. */
      if (!t->eof_told) {
        t->eof_told = true;
        dpx_conn_read_stop(c);
        c->rd_ended = true;
        dpx_conn_deliver_eof(c);
      }
      break;
    }
    tls_fail(c, r);
    return;
  }
  t->delivering = false;
  if (c->close_begun)
    return;
  /* One send for our answers and everything the callbacks wrote. */
  int f = dpx_conn_tls_flush(c);
  if (f < 0) {
    dpx_conn_begin_close(c, f);
    return;
  }
  if (f == 1 && t->read_blocked) {
    /* The kernel took the answers at once: nothing to wait for. */
    t->read_blocked = false;
    goto again;
  }
  sock_read_sync(c, t);
}

void
dpx_conn_tls_input(duplex_conn *c, const char *data, size_t len)
{
  dpx_conn_tls *t = conn_tls(c);
  int r = dpx_tls_feed(t->eng, data, len);
  if (r == DPX_TLS_FULL) {
    /* Reading stops before the input queue fills; never drop bytes. */
    dpx_conn_begin_close(c, DUPLEX_ENOBUFS);
    return;
  }
  if (r < 0) {
    tls_fail(c, r);
    return;
  }
  decrypt(c);
}

void
dpx_conn_tls_input_eof(duplex_conn *c)
{
  /* What is still queued is decrypted first; then the engine says whether
   * the peer's close_notify came before this EOF. */
  dpx_tls_feed_eof(conn_tls(c)->eng);
  decrypt(c);
}

bool
dpx_conn_tls_rd_more(const duplex_conn *c)
{
  const dpx_conn_tls *t = conn_tls(c);
  return t != NULL && t->rd_more;
}

bool
dpx_conn_tls_read_blocked(const duplex_conn *c)
{
  const dpx_conn_tls *t = conn_tls(c);
  return t != NULL && t->read_blocked;
}

void
dpx_conn_tls_drain(duplex_conn *c)
{
  dpx_conn_tls *t = conn_tls(c);
  if (t != NULL && !t->read_blocked)
    decrypt(c);
}

/* The output drained (or a request finished): continue whatever waited. */
static void
progress(duplex_conn *c)
{
  dpx_conn_tls *t = conn_tls(c);
  int r = dpx_conn_tls_flush(c);
  if (r < 0) {
    dpx_conn_begin_close(c, r);
    return;
  }
  if (r == 0)
    return;
  if (t->batch_waits) {
    t->batch_waits = false;
    dpx_conn_batch_resume(c);
  }
  if (t->shut_waits && !c->close_begun) {
    t->shut_waits = false;
    dpx_conn_start_shutdown(c);
  }
  if (t->read_blocked && !c->close_begun) {
    t->read_blocked = false;
    decrypt(c);
  }
}

static void
on_tls_written(uv_write_t *req, int status)
{
  duplex_conn *c = req->data;
  dpx_conn_tls *t = conn_tls(c);
  size_t n = t->inflight;
  t->inflight = 0;
  free(t->wreq);
  t->wreq = NULL;
  if (status == 0) {
    dpx_tls_out_consume(t->eng, n);
    dpx_conn_stamp_write(c);
  }
  if (c->close_begun)
    return;
  if (status < 0) {
    dpx_conn_begin_close(c, dpx_err(status));
    return;
  }
  progress(c);
  dpx_conn_pump(c);
}

int
dpx_conn_tls_encrypt(duplex_conn *c, const void *data, size_t len,
                     size_t *taken)
{
  dpx_conn_tls *t = conn_tls(c);
  *taken = 0;
  int r = dpx_tls_write(t->eng, data, len, taken);
  if (r == DPX_TLS_FULL || r == DPX_TLS_OK)
    return 0;
  if (r == DPX_TLS_WANT_INPUT)
    return 0; /* not reached: writes wait for the handshake */
  keep_reason(c, dpx_tls_reason(t->eng));
  return map_status(r);
}

int
dpx_conn_tls_close_notify(duplex_conn *c)
{
  dpx_conn_tls *t = conn_tls(c);
  int r = dpx_tls_shutdown(t->eng);
  if (r < 0) {
    keep_reason(c, dpx_tls_reason(t->eng));
    return map_status(r);
  }
  r = dpx_conn_tls_flush(c);
  if (r == 0)
    t->shut_waits = true;
  return r;
}

bool
dpx_conn_tls_close_notify_due(const duplex_conn *c)
{
  const dpx_conn_tls *t = conn_tls(c);
  return t != NULL && t->hs_done && !c->shut_done &&
         dpx_tls_error(t->eng) == 0 && !dpx_tls_sent_close(t->eng);
}

bool
dpx_conn_tls_linger(duplex_conn *c)
{
  dpx_conn_tls *t = conn_tls(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  if (t == NULL || x == NULL || c->close_begun || c->rd_cut ||
      dpx_tls_error(t->eng) != 0)
    return false;
  c->lingering = true;
  x->t_linger = uv_now(&c->loop->uv);
  dpx_conn_deadline_touch(c);
  decrypt(c); /* what is already queued, then the socket */
  return true;
}

void
dpx_conn_tls_timed_out(duplex_conn *c)
{
  keep_reason(c, "handshake timed out");
}

uint64_t
dpx_conn_tls_hs_due(const duplex_conn *c)
{
  const dpx_conn_tls *t = conn_tls(c);
  if (t == NULL || t->hs_done)
    return 0;
  return t->hs_start + t->tls->handshake_timeout_ms;
}

void
dpx_conn_tls_begin(duplex_conn *c, duplex_tls *tls, const char *host,
                   const char *key, duplex_write_cb done, void *user)
{
  dpx_conn_extra *x = dpx_conn_x_get(c);
  dpx_conn_tls *t = x != NULL ? calloc(1, sizeof *t) : NULL;
  int r = t != NULL ? 0 : DUPLEX_ENOMEM;
  if (r == 0) {
    dpx_tls_opts o;
    memset(&o, 0, sizeof o);
    o.host = host;
    o.session_key = key;
    r = map_status(dpx_tls_new(&t->eng, tls->cfg, &o));
  }
  if (r != 0) {
    free(t);
    if (done != NULL)
      done(c, r, user);
    dpx_conn_begin_close(c, r);
    return;
  }
  duplex_tls_ref(tls);
  t->tls = tls;
  t->hs_cb = done;
  t->hs_user = user;
  t->hs_start = uv_now(&c->loop->uv);
  x->tls = t;
  c->tls_on = true;
  c->tls_wait = true;
  dpx_conn_deadline_touch(c);
  if (tls->role == DUPLEX_TLS_CLIENT) {
    int st = dpx_tls_handshake(t->eng); /* the ClientHello */
    if (st < 0) {
      tls_fail(c, st);
      return;
    }
  }
  /* Input that came with the socket's plaintext before a STARTTLS is not
   * re-read; from here on every byte goes to the engine. */
  decrypt(c);
}

void
dpx_conn_tls_finish(duplex_conn *c)
{
  dpx_conn_tls *t = conn_tls(c);
  if (t == NULL || t->hs_cb == NULL)
    return;
  duplex_write_cb cb = t->hs_cb;
  t->hs_cb = NULL;
  cb(c, c->reason != 0 ? c->reason : DUPLEX_ECANCELED, t->hs_user);
}

void
dpx_conn_tls_free(dpx_conn_extra *x)
{
  dpx_conn_tls *t = x->tls;
  if (t != NULL) {
    free(t->wreq); /* NULL: a request in flight completes before this */
    dpx_tls_free(t->eng);
    duplex_tls_unref(t->tls);
    free(t);
    x->tls = NULL;
  }
}

int
dpx_conn_tls_info_fill(duplex_conn *c, duplex_tls_info *info)
{
  dpx_conn_tls *t = conn_tls(c);
  if (c->close_begun)
    return DUPLEX_ECLOSED;
  if (t == NULL)
    return c->cfg->tls != NULL ? DUPLEX_ENOTCONN : DUPLEX_ENOTSUP;
  if (!t->hs_done)
    return DUPLEX_ENOTCONN;
  dpx_tls_info in;
  dpx_tls_get_info(t->eng, &in);
  size_t size = info->size;
  memset(info, 0, sizeof *info);
  info->size = size;
  info->version = in.version;
  snprintf(info->version_name, sizeof info->version_name, "%s",
           in.version_name != NULL ? in.version_name : "");
  snprintf(info->cipher, sizeof info->cipher, "%s",
           in.cipher != NULL ? in.cipher : "");
  snprintf(info->alpn, sizeof info->alpn, "%s", in.alpn);
  snprintf(info->sni, sizeof info->sni, "%s", in.sni);
  if (dpx_tls_peer_subject(t->eng, info->peer_subject,
                           sizeof info->peer_subject) < 0)
    info->peer_subject[0] = '\0';
  info->resumed = in.resumed;
  info->peer_cert = in.peer_cert;
  return 0;
}

/* ---- STARTTLS ------------------------------------------------------------ */

int
duplex_conn_start_tls(duplex_conn *conn, duplex_tls *tls, const char *host,
                      duplex_write_cb done, void *user)
{
  if (conn == NULL || tls == NULL)
    return DUPLEX_EINVAL;
  /* The host of a TCP connect is the default name (cfg is immutable). */
  const char *name = host != NULL ? host : conn->cfg->tls_host;
  int r = dpx_tls_check_use(tls, tls->role, name != NULL);
  if (r != 0)
    return r;
  char *copy = NULL;
  if (name != NULL && (copy = dpx_strdup(name)) == NULL)
    return DUPLEX_ENOMEM;
  dpx_conn_lock(conn);
  dpx_wstate *ws = NULL;
  if (conn->state != DPX_CS_OPEN)
    r = DUPLEX_ECLOSED;
  else if (conn->shut_requested)
    r = DUPLEX_ESHUTDOWN;
  else if (conn->tls_asked)
    r = DUPLEX_EBUSY;
  else if ((ws = dpx_conn_w_get_locked(conn)) == NULL)
    r = DUPLEX_ENOMEM;
  else
    r = dpx_entvec_reserve(&ws->intake, 1);
  if (r == 0) {
    dpx_ent *e = &ws->intake.v[ws->intake.n++];
    memset(e, 0, sizeof *e);
    e->kind = DPX_ENT_STARTTLS;
    e->orig = tls;
    e->base = copy;
    e->done = done;
    e->user = user;
    duplex_tls_ref(tls);
    conn->tls_asked = true;
    conn->starttls_queued = true;
    dpx_conn_schedule_locked(conn, false);
    copy = NULL;
  }
  dpx_conn_unlock(conn);
  free(copy);
  return r;
}

#endif /* DUPLEX_HAVE_TLS */

/* ---- both builds ------------------------------------------------------------ */

static int
info_fetch(duplex_loop *loop, void *arg)
{
  (void)loop;
  void **a = arg;
  return dpx_conn_tls_info_fill(a[0], a[1]);
}

int
duplex_conn_get_tls_info(const duplex_conn *conn, duplex_tls_info *info)
{
  if (conn == NULL || info == NULL)
    return DUPLEX_EINVAL;
  int r = dpx_check_size(info, info->size, sizeof *info, sizeof *info);
  if (r != 0)
    return r;
  void *a[2] = { (void *)conn, info };
  return dpx_conn_exec((duplex_conn *)conn, info_fetch, a);
}

int
duplex_conn_get_tls_error(const duplex_conn *conn, char *buf, size_t len)
{
  if (conn == NULL || buf == NULL || len == 0)
    return DUPLEX_EINVAL;
  duplex_conn *c = (duplex_conn *)conn;
  dpx_conn_lock(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  const char *why = x != NULL && x->tls_reason != NULL ? x->tls_reason : "";
  size_t n = strlen(why);
  int r = n + 1 > len ? DUPLEX_ENOBUFS : 0;
  if (n + 1 > len)
    n = len - 1;
  memcpy(buf, why, n);
  buf[n] = '\0';
  dpx_conn_unlock(c);
  return r;
}
