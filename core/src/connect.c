/* Creating conns: TCP and UNIX connect, adopting fds. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#include <ws2tcpip.h>
#else
#include <netdb.h>
#include <pthread.h>
#endif

/* A name lookup runs getaddrinfo() on a thread of its own, detached: a
 * resolver that does not answer holds only that thread, never the conn
 * (whose connect deadline closes it on time) nor the loop (whose free does
 * not wait for it). The lookup and the conn let go of each other under the
 * lookup's lock; the last of the two references frees it. */
typedef struct dpx_lookup {
  atomic_uint refs;   /* the resolver thread's and the conn side's */
  duplex_loop *loop;  /* with a loop reference for the hand-back */
  duplex_conn *conn;  /* lookup lock; NULL once canceled or handed back */
  char *host;
  char port[8];
  int status;
  struct addrinfo *res;
  dpx_op op;
} dpx_lookup;

struct dpx_connect_state {
  dpx_lookup *lookup; /* while resolving */
  uv_connect_t creq;
  struct addrinfo *res;
  struct addrinfo *cur;
  struct sockaddr_storage numeric;
  bool have_numeric;
  struct sockaddr_storage local; /* source address (family 0: any) */
  uint16_t local_port;
  bool has_local;
  char *host;
  uint16_t port;
  char *path;
  int last_err;
};

void
dpx_connect_state_free(dpx_connect_state *cs)
{
  if (cs == NULL)
    return;
  if (cs->res != NULL)
    freeaddrinfo(cs->res);
  free(cs->host);
  free(cs->path);
  free(cs);
}

/* ---- peer names ------------------------------------------------------------ */

int
dpx_format_addr(const struct sockaddr *sa, char *buf, size_t len)
{
  char ip[64];
  int n;
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    uv_ip4_name(in, ip, sizeof ip);
    n = snprintf(buf, len, "%s:%u", ip, (unsigned)ntohs(in->sin_port));
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    uv_ip6_name(in6, ip, sizeof ip);
    n = snprintf(buf, len, "[%s]:%u", ip, (unsigned)ntohs(in6->sin6_port));
  } else {
    return DUPLEX_EAFNOSUPPORT;
  }
  return n < 0 || (size_t)n >= len ? DUPLEX_ENOBUFS : 0;
}

void
dpx_conn_set_peer(duplex_conn *c)
{
  char buf[1024];
  buf[0] = '\0';
  dpx_stream *rd = dpx_conn_rd(c);
  if (rd->handle.type == UV_TCP) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getpeername(&rd->tcp, (struct sockaddr *)&ss, &len) == 0)
      dpx_format_addr((struct sockaddr *)&ss, buf, sizeof buf);
  } else if (rd->handle.type == UV_NAMED_PIPE) {
    size_t len = sizeof buf;
    if (uv_pipe_getpeername(&rd->pipe, buf, &len) != 0)
      buf[0] = '\0';
    else if (len < sizeof buf)
      buf[len] = '\0';
    else
      buf[sizeof buf - 1] = '\0';
  }
  char *p = dpx_strdup(buf);
  dpx_conn_lock(c);
  dpx_conn_extra *x = dpx_conn_x_get_locked(c);
  if (x != NULL) {
    free(x->peer);
    x->peer = p;
    p = NULL;
  }
  dpx_conn_unlock(c);
  free(p);
}

/* ---- TCP / UNIX connect ----------------------------------------------------- */

static void connect_next(duplex_conn *c);

static void
connect_failed(duplex_conn *c, int err)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  dpx_connect_state_free(x->connecting);
  x->connecting = NULL;
  if (c->has_rd)
    dpx_conn_begin_close(c, err);
  else
    dpx_conn_fail_unopened(c, err);
}

static void
connect_advance(dpx_connect_state *cs)
{
  if (cs->have_numeric)
    cs->have_numeric = false;
  else if (cs->cur != NULL)
    cs->cur = cs->cur->ai_next;
}

/* The failed attempt's socket is closed; its slot is free again. */
static void
on_attempt_closed(uv_handle_t *h)
{
  duplex_conn *c = h->data;
  if (c->close_begun) {
    dpx_conn_handle_closed(c);
    return;
  }
  c->handles_open--;
  connect_next(c);
}

/* A socket cannot be reused after a failed connect: close it and try the
 * next address from its close callback. */
static void
attempt_failed(duplex_conn *c, int err)
{
  dpx_connect_state *cs = dpx_conn_x(c)->connecting;
  cs->last_err = err;
  connect_advance(cs);
  c->has_rd = false;
  c->handles_open++;
  uv_close(&dpx_conn_handle(c, 0)->handle, on_attempt_closed);
}

static void
on_connect(uv_connect_t *req, int status)
{
  duplex_conn *c = req->data;
  if (c->close_begun)
    return; /* uv_close canceled it; the close callback finishes */
  if (status == 0) {
    dpx_conn_extra *x = dpx_conn_x(c);
    dpx_connect_state_free(x->connecting);
    x->connecting = NULL;
    dpx_conn_opened(c);
    return;
  }
  attempt_failed(c, dpx_err(status));
}

/* The source address for a connect to family @p family. */
static int
local_for(const dpx_connect_state *cs, int family,
          struct sockaddr_storage *out)
{
  memset(out, 0, sizeof *out);
  if (cs->local.ss_family == 0) {
    /* A port alone: the family's wildcard address. */
    if (family == AF_INET6)
      return dpx_err(uv_ip6_addr("::", cs->local_port,
                                 (struct sockaddr_in6 *)out));
    return dpx_err(uv_ip4_addr("0.0.0.0", cs->local_port,
                               (struct sockaddr_in *)out));
  }
  if (cs->local.ss_family != family)
    return DUPLEX_EAFNOSUPPORT;
  *out = cs->local;
  return 0;
}

static void
connect_next(duplex_conn *c)
{
  dpx_connect_state *cs = dpx_conn_x(c)->connecting;
  for (;;) {
    const struct sockaddr *sa = NULL;
    if (cs->have_numeric)
      sa = (const struct sockaddr *)&cs->numeric;
    else if (cs->cur != NULL)
      sa = cs->cur->ai_addr;
    if (sa == NULL) {
      connect_failed(c, cs->last_err ? cs->last_err : DUPLEX_EAI_NODATA);
      return;
    }
    struct sockaddr_storage local;
    if (cs->has_local) {
      int r = local_for(cs, sa->sa_family, &local);
      if (r != 0) {
        cs->last_err = r; /* e.g. an IPv6 address for an IPv4 source */
        connect_advance(cs);
        continue;
      }
    }
    dpx_stream *h = dpx_conn_handle(c, 0);
    int r = uv_tcp_init(&c->loop->uv, &h->tcp);
    if (r != 0) {
      cs->last_err = dpx_err(r);
      connect_advance(cs);
      continue;
    }
    h->handle.data = c;
    c->has_rd = true;
    cs->creq.data = c;
    if (cs->has_local) {
      r = uv_tcp_bind(&h->tcp, (const struct sockaddr *)&local, 0);
      if (r != 0) {
        attempt_failed(c, dpx_err(r));
        return;
      }
    }
    r = uv_tcp_connect(&cs->creq, &h->tcp, sa, on_connect);
    if (r != 0)
      attempt_failed(c, dpx_err(r));
    return;
  }
}

static void
on_resolved(duplex_conn *c, int status, struct addrinfo *res)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  dpx_connect_state *cs = x->connecting;
  x->lookup_pending = false;
  cs->res = res;
  if (status != 0) {
    connect_failed(c, status);
    return;
  }
  cs->cur = res;
  connect_next(c);
}

static void
lookup_unref(dpx_lookup *lk)
{
  if (atomic_fetch_sub_explicit(&lk->refs, 1u, memory_order_acq_rel) != 1u)
    return;
  if (lk->res != NULL)
    freeaddrinfo(lk->res);
  duplex_loop_unref(lk->loop);
  free(lk->host);
  free(lk);
}

/* Loop thread: the answer is back (or the loop is being freed). */
static void
lookup_op(duplex_loop *loop, dpx_op *op, int status)
{
  dpx_lookup *lk = DPX_CONTAINER_OF(op, dpx_lookup, op);
  (void)loop;
  uv_mutex_lock(dpx_addr_mu(lk));
  duplex_conn *c = lk->conn;
  lk->conn = NULL;
  uv_mutex_unlock(dpx_addr_mu(lk));
  if (c != NULL) {
    struct addrinfo *res = lk->res;
    lk->res = NULL;
    dpx_conn_x(c)->connecting->lookup = NULL;
    on_resolved(c, status != 0 ? status : lk->status, res);
    lookup_unref(lk); /* the conn side's */
  }
  lookup_unref(lk); /* the resolver's, handed over with the op */
}

static int
gai_error(int e)
{
  switch (e) {
  case 0:
    return 0;
  case EAI_AGAIN:
    return DUPLEX_EAI_AGAIN;
  case EAI_FAIL:
    return DUPLEX_EAI_FAIL;
  case EAI_NONAME:
    return DUPLEX_EAI_NONAME;
#if defined(EAI_NODATA) && EAI_NODATA != EAI_NONAME
  case EAI_NODATA:
    return DUPLEX_EAI_NODATA;
#endif
  case EAI_FAMILY:
    return DUPLEX_EAI_FAMILY;
  case EAI_MEMORY:
    return DUPLEX_ENOMEM;
  default:
    return DUPLEX_EAI_OTHER;
  }
}

static void
lookup_thread(void *arg)
{
  dpx_lookup *lk = arg;
  dpx_thread_block_signals();
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  hints.ai_flags = AI_ADDRCONFIG;
  struct addrinfo *res = NULL;
  int e = getaddrinfo(lk->host, lk->port, &hints, &res);
  lk->status = gai_error(e);
  lk->res = e == 0 ? res : NULL;
  /* Hand the answer back if the conn still waits; the op then owns our
   * reference. Otherwise (canceled, or the loop is being freed) drop it. */
  uv_mutex_lock(dpx_addr_mu(lk));
  bool handed = lk->conn != NULL &&
                dpx_loop_submit(lk->loop, &lk->op, true) == 0;
  uv_mutex_unlock(dpx_addr_mu(lk));
  if (!handed)
    lookup_unref(lk);
}

/* Loop thread: start resolving cs->host. */
static int
lookup_start(duplex_conn *c, dpx_connect_state *cs)
{
  dpx_lookup *lk = calloc(1, sizeof *lk);
  if (lk == NULL || (lk->host = dpx_strdup(cs->host)) == NULL) {
    free(lk);
    return DUPLEX_ENOMEM;
  }
  snprintf(lk->port, sizeof lk->port, "%u", (unsigned)cs->port);
  atomic_init(&lk->refs, 2u);
  lk->loop = c->loop;
  duplex_loop_ref(lk->loop);
  lk->conn = c;
  lk->op.fn = lookup_op;
  uv_thread_t tid;
  uv_thread_options_t to;
  to.flags = UV_THREAD_HAS_STACK_SIZE;
  to.stack_size = 1024 * 1024; /* getaddrinfo and NSS modules */
  int r = uv_thread_create_ex(&tid, &to, lookup_thread, lk);
  if (r != 0) {
    lk->conn = NULL;
    lookup_unref(lk);
    lookup_unref(lk);
    return dpx_err(r);
  }
#if defined(_WIN32)
  CloseHandle(tid);
#else
  pthread_detach(tid);
#endif
  cs->lookup = lk;
  dpx_conn_x(c)->lookup_pending = true;
  return 0;
}

/* Loop thread: a close began before the handle existed. Returns true when
 * nothing of the conn is in flight any more (a lookup was let go), so the
 * caller finishes the close now; false when a connect attempt's close
 * callback will. */
bool
dpx_connect_cancel(duplex_conn *c)
{
  dpx_conn_extra *x = dpx_conn_x(c);
  dpx_lookup *lk = x != NULL && x->connecting != NULL
                       ? x->connecting->lookup
                       : NULL;
  if (lk == NULL)
    return false;
  x->connecting->lookup = NULL;
  x->lookup_pending = false;
  uv_mutex_lock(dpx_addr_mu(lk));
  bool ours = lk->conn != NULL; /* else its op is queued and lets go */
  lk->conn = NULL;
  uv_mutex_unlock(dpx_addr_mu(lk));
  if (ours)
    lookup_unref(lk);
  return true;
}

static void
unix_connect_start(duplex_conn *c)
{
  dpx_connect_state *cs = dpx_conn_x(c)->connecting;
  dpx_stream *h = dpx_conn_handle(c, 0);
  int r = uv_pipe_init(&c->loop->uv, &h->pipe, 0);
  if (r != 0) {
    connect_failed(c, dpx_err(r));
    return;
  }
  h->handle.data = c;
  c->has_rd = true;
  cs->creq.data = c;
  uv_pipe_connect(&cs->creq, &h->pipe, cs->path, on_connect);
}

/* ---- adopt ------------------------------------------------------------------ */

static void
close_fd(duplex_loop *loop, int fd)
{
  uv_fs_t req;
  if (fd >= 0) {
    uv_fs_close(&loop->uv, &req, fd, NULL);
    uv_fs_req_cleanup(&req);
  }
}

static int
adopt_handle(duplex_conn *c, dpx_stream *h, int fd, bool readable,
             bool *inited)
{
  duplex_loop *loop = c->loop;
  int r;
  *inited = false;
  switch (uv_guess_handle(fd)) {
  case UV_TCP:
    r = uv_tcp_init(&loop->uv, &h->tcp);
    *inited = r == 0;
    if (r == 0)
      r = uv_tcp_open(&h->tcp, (uv_os_sock_t)fd);
    break;
  case UV_NAMED_PIPE:
    r = uv_pipe_init(&loop->uv, &h->pipe, 0);
    *inited = r == 0;
    if (r == 0)
      r = uv_pipe_open(&h->pipe, fd);
    break;
  case UV_TTY:
    r = uv_tty_init(&loop->uv, &h->tty, fd, readable);
    *inited = r == 0;
    break;
  default:
    return DUPLEX_ENOTSOCK;
  }
  h->handle.data = c;
  return dpx_err(r);
}

static void
on_adopt_failed_closed(uv_handle_t *h)
{
  dpx_conn_handle_closed(h->data);
}

static void
adopt_start(duplex_conn *c)
{
  int n = c->kind == DPX_CONN_ADOPT ? 1 : 2;
  dpx_conn_extra *x = dpx_conn_x(c);
  int fds[2] = { x->fd_in, x->fd_out };
  bool inited[2] = { false, false }, owned[2] = { false, false };
  int err = 0;
  for (int i = 0; i < n && err == 0; i++) {
    err = adopt_handle(c, dpx_conn_handle(c, (unsigned)i), fds[i], i == 0,
                       &inited[i]);
    owned[i] = err == 0; /* the handle closes the fd from now on */
  }
  for (int i = 0; i < n; i++)
    if (!owned[i])
      close_fd(c->loop, fds[i]);
  x->fd_in = x->fd_out = -1;
  if (err != 0) {
    for (int i = 0; i < n; i++) {
      if (inited[i]) {
        c->handles_open++;
        uv_close(&dpx_conn_handle(c, (unsigned)i)->handle,
                 on_adopt_failed_closed);
      }
    }
    dpx_conn_fail_unopened(c, err);
    return;
  }
  c->has_rd = true;
  dpx_conn_opened(c);
}

/* ---- the open op -------------------------------------------------------------- */

void
dpx_conn_open_op(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_conn *c = DPX_CONTAINER_OF(op, dpx_conn_extra, open_op)->conn;
  dpx_conn_extra *x = dpx_conn_x(c);
  if (c->close_begun)
    return; /* cannot happen with one FIFO; never finish twice */
  dpx_link_insert(&loop->conns, &c->link);
  c->in_list = true;
  dpx_conn_lock(c);
  bool aborted = c->abort_requested;
  int abort_reason = c->reason;
  dpx_conn_unlock(c);
  if (status != 0 || aborted) {
    if (c->kind == DPX_CONN_ADOPT || c->kind == DPX_CONN_ADOPT_PAIR) {
      close_fd(loop, x->fd_in);
      close_fd(loop, x->fd_out);
      x->fd_in = x->fd_out = -1;
    }
    dpx_conn_fail_unopened(c, status != 0 ? status : abort_reason);
    return;
  }
  x->t_start = uv_now(&loop->uv);
  dpx_conn_deadline_touch(c);
  dpx_connect_state *cs = x->connecting;
  switch (c->kind) {
  case DPX_CONN_TCP_CONNECT:
    if (cs->have_numeric) {
      connect_next(c);
    } else {
      int r = lookup_start(c, cs);
      if (r != 0)
        connect_failed(c, r);
    }
    break;
  case DPX_CONN_UNIX_CONNECT:
    unix_connect_start(c);
    break;
  default:
    adopt_start(c);
    break;
  }
}

/* ---- public creation -------------------------------------------------------- */

static int
conn_launch(duplex_conn **out, duplex_conn *c)
{
  if (out != NULL)
    duplex_conn_ref(c);
  dpx_conn_extra *x = dpx_conn_x(c);
  int r = dpx_loop_submit(c->loop, &x->open_op, true);
  if (r != 0) {
    dpx_connect_state_free(x->connecting);
    x->connecting = NULL;
    if (out != NULL)
      duplex_conn_unref(c);
    duplex_conn_unref(c);
    return r;
  }
  if (out != NULL)
    *out = c;
  return 0;
}

/* A new conn of @p kind with its own copy of @p opts. */
static int
conn_create(duplex_conn **out, duplex_loop *loop, int kind,
            const duplex_conn_opts *opts, unsigned nhandles,
            size_t handle_size)
{
  dpx_conn_cfg *cfg;
  int r = dpx_conn_cfg_new(&cfg, opts);
  if (r != 0)
    return r;
  if (cfg->has_local && kind != DPX_CONN_TCP_CONNECT) {
    dpx_conn_cfg_unref(cfg);
    return DUPLEX_EINVAL; /* a source address only means something there */
  }
  /* A TCP connect's host is the TLS name unless tls_host says otherwise. */
  r = dpx_tls_check_use(cfg->tls, DUPLEX_TLS_CLIENT,
                        cfg->tls_host != NULL || kind == DPX_CONN_TCP_CONNECT);
  if (r != 0) {
    dpx_conn_cfg_unref(cfg);
    return r;
  }
  *out = dpx_conn_new(loop, kind, cfg, nhandles, handle_size);
  dpx_conn_cfg_unref(cfg); /* the conn holds its own reference */
  return *out != NULL ? 0 : DUPLEX_ENOMEM;
}

int
duplex_conn_connect_tcp(duplex_conn **out, duplex_loop *loop,
                        const char *host, uint16_t port,
                        const duplex_conn_opts *opts)
{
  if (out != NULL)
    *out = NULL;
  if (loop == NULL || host == NULL || host[0] == '\0' || port == 0)
    return DUPLEX_EINVAL;
  if (strlen(host) > 1024)
    return DUPLEX_ENAMETOOLONG;
  duplex_conn *c;
  int r = conn_create(&c, loop, DPX_CONN_TCP_CONNECT, opts, 1,
                      sizeof(uv_tcp_t));
  if (r != 0)
    return r;
  dpx_connect_state *cs = calloc(1, sizeof *cs);
  char *h = dpx_strdup(host);
  /* The conn's own cfg (not shared yet): the TLS name (also for a later
   * duplex_conn_start_tls) and the session cache key. */
  dpx_conn_cfg *cfg = c->cfg;
  if (cfg->tls_host == NULL)
    cfg->tls_host = dpx_strdup(host);
  size_t klen = strlen(host) + 8;
  cfg->tls_key = malloc(klen);
  if (cfg->tls_key != NULL)
    snprintf(cfg->tls_key, klen, "%s:%u", host, (unsigned)port);
  if (cs == NULL || h == NULL || cfg->tls_host == NULL ||
      cfg->tls_key == NULL) {
    free(cs);
    free(h);
    dpx_conn_free(c);
    return DUPLEX_ENOMEM;
  }
  cs->host = h;
  cs->port = port;
  struct sockaddr_in *in = (struct sockaddr_in *)&cs->numeric;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&cs->numeric;
  if (uv_ip4_addr(host, port, in) == 0 || uv_ip6_addr(host, port, in6) == 0)
    cs->have_numeric = true;
  duplex_conn_opts o;
  dpx_conn_opts_get(&o, opts); /* checked by conn_create */
  if (o.local_host != NULL || o.local_port != 0) {
    cs->has_local = true;
    cs->local_port = o.local_port;
    if (o.local_host != NULL &&
        uv_ip4_addr(o.local_host, o.local_port,
                    (struct sockaddr_in *)&cs->local) != 0)
      uv_ip6_addr(o.local_host, o.local_port,
                  (struct sockaddr_in6 *)&cs->local);
  }
  dpx_conn_x(c)->connecting = cs;
  return conn_launch(out, c);
}

int
duplex_conn_connect_unix(duplex_conn **out, duplex_loop *loop,
                         const char *path, const duplex_conn_opts *opts)
{
  if (out != NULL)
    *out = NULL;
  if (loop == NULL || path == NULL || path[0] == '\0')
    return DUPLEX_EINVAL;
  if (strlen(path) >= 108) /* sun_path on Linux; the smallest common size */
    return DUPLEX_ENAMETOOLONG;
  duplex_conn *c;
  int r = conn_create(&c, loop, DPX_CONN_UNIX_CONNECT, opts, 1,
                      sizeof(uv_pipe_t));
  if (r != 0)
    return r;
  dpx_connect_state *cs = calloc(1, sizeof *cs);
  char *p = dpx_strdup(path);
  if (cs == NULL || p == NULL) {
    free(cs);
    free(p);
    dpx_conn_free(c);
    return DUPLEX_ENOMEM;
  }
  cs->path = p;
  dpx_conn_x(c)->connecting = cs;
  return conn_launch(out, c);
}

/* 0 and the handle size for a stream fd, or a negative code. */
static int
check_stream_fd(int fd, size_t *handle_size)
{
  if (fd < 0)
    return DUPLEX_EBADF;
  switch (uv_guess_handle(fd)) {
  case UV_TCP:
    *handle_size = sizeof(uv_tcp_t);
    return 0;
  case UV_NAMED_PIPE:
    *handle_size = sizeof(uv_pipe_t);
    return 0;
  case UV_TTY:
    *handle_size = sizeof(uv_tty_t);
    return 0;
  case UV_UNKNOWN_HANDLE: {
    uv_fs_t req;
    int r = uv_fs_fstat(NULL, &req, fd, NULL);
    uv_fs_req_cleanup(&req);
    return r < 0 ? DUPLEX_EBADF : DUPLEX_ENOTSOCK;
  }
  default:
    return DUPLEX_ENOTSOCK;
  }
}

int
duplex_conn_adopt(duplex_conn **out, duplex_loop *loop, int fd,
                  const duplex_conn_opts *opts)
{
  if (out != NULL)
    *out = NULL;
  if (loop == NULL)
    return DUPLEX_EINVAL;
  size_t hsize = 0;
  int r = check_stream_fd(fd, &hsize);
  if (r != 0)
    return r;
  duplex_conn *c;
  r = conn_create(&c, loop, DPX_CONN_ADOPT, opts, 1, hsize);
  if (r != 0)
    return r;
  dpx_conn_x(c)->fd_in = fd;
  return conn_launch(out, c);
}

int
duplex_conn_adopt_pair(duplex_conn **out, duplex_loop *loop, int read_fd,
                       int write_fd, const duplex_conn_opts *opts)
{
  if (out != NULL)
    *out = NULL;
  if (loop == NULL)
    return DUPLEX_EINVAL;
  size_t hsize = 0;
  int r = check_stream_fd(read_fd, &hsize);
  if (r == 0)
    r = check_stream_fd(write_fd, &hsize);
  if (r == 0 && read_fd == write_fd)
    r = DUPLEX_EINVAL;
  if (r != 0)
    return r;
  duplex_conn *c;
  r = conn_create(&c, loop, DPX_CONN_ADOPT_PAIR, opts, 2, 0);
  if (r != 0)
    return r;
  dpx_conn_x(c)->fd_in = read_fd;
  dpx_conn_x(c)->fd_out = write_fd;
  return conn_launch(out, c);
}
