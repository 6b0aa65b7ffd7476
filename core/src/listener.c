/* Listeners: TCP and UNIX-domain sockets that accept conns. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* accept4 */
#endif
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#endif

/* Accept back-off: while accept() fails for lack of descriptors or memory,
 * the listener stops watching its socket and retries after this long,
 * doubling up to the maximum. Waiting clients stay in the kernel's backlog
 * meanwhile (libuv's own accept loop would accept and drop them, or spin
 * when its reserve descriptor is gone: libuv#690). */
#define DPX_ACCEPT_BACKOFF_MIN_MS 20u
#define DPX_ACCEPT_BACKOFF_MAX_MS 1000u
/* Accepts per readiness, so one busy listener cannot starve the loop. */
#define DPX_ACCEPT_BATCH 64

/* References: the caller's (from duplex_listener_tcp/_unix) and the
 * loop's, held from creation until the listener's handles have closed (or
 * its open op found the loop gone).
 *
 * A group listener (duplex_group_listen_*) is the user's handle over one
 * or more member listeners, each an ordinary listener on one loop of the
 * group. The group listener holds a reference on each member (its
 * "caller's"); a member holds one on the group listener while its loop
 * holds it, for the pointer it reports errors with. A balanced member
 * hands each accepted socket to the group's least-loaded loop. */
struct duplex_listener {
  atomic_uint refs;
  /* ---- under the listener's lock (dpx_addr_mu) ---- */
  duplex_loop *loop; /* NULL once the loop is done with the listener */
  /* ---- immutable after creation ---- */
  bool is_unix;
  uint16_t port;
  char *addr;
  char *path; /* UNIX socket file we created, removed on close */
  dpx_conn_cfg *cfg; /* shared by every conn it accepts */
  duplex_listen_error_cb on_error;
  void *user;
  int backlog;
  unsigned flags;
  unsigned mode;
  atomic_bool close_requested;
  duplex_listener *parent;  /* member: the group listener, else NULL */
  duplex_loop_group *group; /* balanced member: hand sockets out */
  duplex_listener **members; /* group listener: its members */
  unsigned nmembers;
  /* Under the lock: accepted conns being opened (on_open running), on any
   * loop; close waits for them, so no on_open runs after it returns. */
  unsigned opening;
  uv_cond_t opened;
  bool has_cond;
  /* ---- loop thread only ---- */
  dpx_link link; /* in loop->listeners while listening */
  dpx_stream h;
  bool in_list;
  bool closing;
  bool has_handle; /* h is initialised */
  dpx_op open_op;
  dpx_op close_op;
  int fd; /* the listening socket */
#if !defined(_WIN32)
  /* Unix: the library accepts itself, watching the socket with a poll
   * handle, and backs off with a timer when accept() fails. */
  uv_poll_t poll;
  uv_timer_t retry;
  unsigned backoff_ms; /* 0 while accepting normally */
  unsigned handles;    /* handles still to close before letting go */
  bool accepting;      /* poll and timer are initialised */
#endif
};

int
duplex_listener_opts_init(duplex_listener_opts *opts)
{
  if (opts == NULL)
    return DUPLEX_EINVAL;
  const duplex_listener_opts def = DUPLEX_LISTENER_OPTS_INIT;
  *opts = def;
  return 0;
}

static void
listener_free(duplex_listener *l)
{
  if (l->has_cond)
    uv_cond_destroy(&l->opened);
  for (unsigned i = 0; i < l->nmembers; i++)
    duplex_listener_unref(l->members[i]);
  free(l->members);
  free(l->addr);
  free(l->path);
  dpx_conn_cfg_unref(l->cfg);
  free(l);
}

int
duplex_listener_ref(duplex_listener *l)
{
  if (l == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&l->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_listener_unref(duplex_listener *l)
{
  if (l == NULL)
    return DUPLEX_EINVAL;
  if (atomic_fetch_sub_explicit(&l->refs, 1u, memory_order_acq_rel) == 1u)
    listener_free(l);
  return 0;
}

/* The loop lets go: the socket file goes, calls return ECLOSED. */
static void
listener_detach(duplex_listener *l)
{
#if !defined(_WIN32)
  if (l->path != NULL)
    unlink(l->path);
#endif
  uv_mutex_lock(dpx_addr_mu(l));
  l->loop = NULL;
  uv_mutex_unlock(dpx_addr_mu(l));
  atomic_store(&l->close_requested, true);
  duplex_listener *parent = l->parent;
  duplex_listener_unref(l); /* the loop's reference */
  if (parent != NULL)
    duplex_listener_unref(parent); /* the member's */
}

/* Tell the user: members report as their group listener. */
static void
listener_report(duplex_listener *l, int err)
{
  if (l->on_error != NULL)
    l->on_error(l->parent != NULL ? l->parent : l, err, l->user);
}

static void
on_listener_closed(uv_handle_t *h)
{
  duplex_listener *l = h->data;
#if !defined(_WIN32)
  if (l->handles > 0 && --l->handles > 0)
    return; /* the other handles' callbacks come first */
#endif
  listener_detach(l);
}

static void
listener_close_now(duplex_listener *l)
{
  if (l->closing)
    return;
  l->closing = true;
  if (l->in_list) {
    dpx_link_remove(&l->link);
    l->in_list = false;
  }
#if !defined(_WIN32)
  if (l->accepting) {
    /* The poll handle stops watching at once, before the socket closes. */
    l->handles = 3;
    uv_close((uv_handle_t *)&l->poll, on_listener_closed);
    uv_close((uv_handle_t *)&l->retry, on_listener_closed);
  }
#endif
  uv_close(&l->h.handle, on_listener_closed);
}

void
dpx_listener_close_all(duplex_loop *loop)
{
  while (loop->listeners.next != &loop->listeners) {
    duplex_listener *l =
        DPX_CONTAINER_OF(loop->listeners.next, duplex_listener, link);
    listener_close_now(l);
  }
}

/* ---- accepting --------------------------------------------------------- */

static void
on_accept_failed_closed(uv_handle_t *h)
{
  dpx_conn_free(h->data);
}

/* The listener whose accepted conn the calling thread is opening: a close
 * from inside that on_open must not wait for itself. */
static DPX_THREAD_LOCAL duplex_listener *dpx_opening;

/* Enter / leave the opening of an accepted conn. False: the listener was
 * closed, the conn must not open. */
static bool
open_begin(duplex_listener *l)
{
  uv_mutex_lock(dpx_addr_mu(l));
  bool ok = !atomic_load(&l->close_requested);
  if (ok)
    l->opening++;
  uv_mutex_unlock(dpx_addr_mu(l));
  return ok;
}

static void
open_end(duplex_listener *l)
{
  uv_mutex_lock(dpx_addr_mu(l));
  if (--l->opening == 0 && l->has_cond)
    uv_cond_broadcast(&l->opened);
  uv_mutex_unlock(dpx_addr_mu(l));
}

/* Under the lock, close_requested set: wait until no other thread is
 * inside an on_open of this listener. */
static void
wait_openings_locked(duplex_listener *l)
{
  unsigned mine = dpx_opening == l ? 1u : 0u;
  while (l->has_cond && l->opening > mine)
    uv_cond_wait(&l->opened, dpx_addr_mu(l));
}

/* Open conn @p c (made for its loop, whose thread this is) on the accepted
 * socket: from @p server (libuv accepts) or @p fd. On failure the socket
 * is closed and the error reported. */
static void open_accepted_now(duplex_listener *l, duplex_conn *c,
                              uv_stream_t *server, int fd);

static void
open_accepted(duplex_listener *l, duplex_conn *c, uv_stream_t *server, int fd)
{
  if (!open_begin(l)) {
    /* Closed since the accept: nothing opens after close returned. */
#if !defined(_WIN32)
    if (fd >= 0)
      close(fd);
#endif
    dpx_conn_free(c);
    return;
  }
  duplex_listener *outer = dpx_opening;
  dpx_opening = l;
  open_accepted_now(l, c, server, fd);
  dpx_opening = outer;
  open_end(l);
}

static void
open_accepted_now(duplex_listener *l, duplex_conn *c, uv_stream_t *server,
                  int fd)
{
  duplex_loop *loop = c->loop;
  dpx_stream *h = dpx_conn_handle(c, 0);
  int r = l->is_unix ? uv_pipe_init(&loop->uv, &h->pipe, 0)
                     : uv_tcp_init(&loop->uv, &h->tcp);
  if (r != 0) {
    dpx_conn_free(c);
#if !defined(_WIN32)
    if (fd >= 0)
      close(fd);
#endif
    listener_report(l, dpx_err(r));
    return;
  }
  h->handle.data = c;
  if (server != NULL)
    r = uv_accept(server, &h->stream);
  else
    r = l->is_unix ? uv_pipe_open(&h->pipe, fd)
                   : uv_tcp_open(&h->tcp, (uv_os_sock_t)fd);
  if (r != 0) {
#if !defined(_WIN32)
    if (server == NULL)
      close(fd); /* the handle did not take it */
#endif
    uv_close(&h->handle, on_accept_failed_closed);
    listener_report(l, dpx_err(r));
    return;
  }
  c->has_rd = true;
  dpx_link_insert(&loop->conns, &c->link);
  c->in_list = true;
  atomic_fetch_add_explicit(&loop->st_accepted, 1u, memory_order_relaxed);
  dpx_conn_opened(c);
}

#if !defined(_WIN32)
/* An accepted socket on its way to another loop of the group. The conn
 * exists already, so it counts on its loop from the hand-off on and a
 * burst of accepts spreads. */
typedef struct handoff {
  dpx_op op;
  duplex_listener *l; /* a reference */
  duplex_conn *c;
  int fd;
} handoff;

static void
handoff_drop(handoff *h)
{
  close(h->fd);
  dpx_conn_free(h->c);
  duplex_listener_unref(h->l);
  free(h);
}

static void
handoff_run(duplex_loop *loop, dpx_op *op, int status)
{
  handoff *h = DPX_CONTAINER_OF(op, handoff, op);
  (void)loop;
  /* Its loop is being freed: the socket closes. (A listener closed since
   * the accept is seen by open_accepted.) */
  if (status != 0) {
    handoff_drop(h);
    return;
  }
  open_accepted(h->l, h->c, NULL, h->fd);
  duplex_listener_unref(h->l);
  free(h);
}

static void
handoff_start(duplex_listener *l, duplex_conn *c, int fd)
{
  handoff *h = malloc(sizeof *h);
  if (h == NULL) {
    close(fd);
    dpx_conn_free(c);
    listener_report(l, DUPLEX_ENOMEM);
    return;
  }
  duplex_listener_ref(l);
  h->op.fn = handoff_run;
  h->l = l;
  h->c = c;
  h->fd = fd;
  if (dpx_loop_submit(c->loop, &h->op, true) != 0)
    handoff_drop(h); /* the group is being freed */
}
#endif

/* Wrap an accepted socket in a conn on the loop it goes to and open it
 * there (loop thread of the listener). */
static void
accept_into_conn(duplex_listener *l, uv_stream_t *server, int fd)
{
  duplex_loop *target = l->loop;
#if !defined(_WIN32)
  if (l->group != NULL)
    target = dpx_group_pick(l->group);
#endif
  duplex_conn *c = dpx_conn_new(target, DPX_CONN_ACCEPTED, l->cfg, 1,
                                l->is_unix ? sizeof(uv_pipe_t)
                                           : sizeof(uv_tcp_t));
  if (c == NULL) {
#if !defined(_WIN32)
    if (fd >= 0)
      close(fd);
#endif
    listener_report(l, DUPLEX_ENOMEM);
    return;
  }
#if !defined(_WIN32)
  if (target != l->loop) {
    handoff_start(l, c, fd);
    return;
  }
#endif
  open_accepted(l, c, server, fd);
}

#if !defined(_WIN32)
static void on_acceptable(uv_poll_t *p, int status, int events);

static void
on_retry(uv_timer_t *t)
{
  duplex_listener *l = t->data;
  if (!l->closing)
    uv_poll_start(&l->poll, UV_READABLE, on_acceptable);
}

/* accept() keeps failing: stop watching the socket for a while. Reported
 * once per episode, not once per attempt. */
static void
accept_back_off(duplex_listener *l, int err)
{
  bool first = l->backoff_ms == 0;
  l->backoff_ms = first ? DPX_ACCEPT_BACKOFF_MIN_MS
                        : (l->backoff_ms * 2 > DPX_ACCEPT_BACKOFF_MAX_MS
                               ? DPX_ACCEPT_BACKOFF_MAX_MS
                               : l->backoff_ms * 2);
  uv_poll_stop(&l->poll);
  uv_timer_start(&l->retry, on_retry, l->backoff_ms, 0);
  if (first)
    listener_report(l, err);
}

static int
accept_fd(int lfd)
{
  int fd;
  do {
#if defined(SOCK_CLOEXEC) && (defined(__linux__) || defined(__FreeBSD__))
    fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
#else
    fd = accept(lfd, NULL, NULL);
    if (fd >= 0)
      (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
#endif
  } while (fd < 0 && errno == EINTR);
  return fd >= 0 ? fd : uv_translate_sys_error(errno);
}

static void
on_acceptable(uv_poll_t *p, int status, int events)
{
  duplex_listener *l = p->data;
  (void)events;
  for (int i = 0; i < DPX_ACCEPT_BATCH; i++) {
    /* Nothing is accepted once duplex_listener_close() has returned. */
    if (l->closing || atomic_load(&l->close_requested))
      return;
    int fd = status < 0 ? status : accept_fd(l->fd);
    if (fd >= 0) {
      l->backoff_ms = 0;
      accept_into_conn(l, NULL, fd);
      continue;
    }
    if (fd == UV_EAGAIN || fd == UV_ECONNABORTED)
      return; /* drained / a client gave up while queued */
    /* EMFILE, ENFILE, ENOBUFS, ENOMEM or anything persistent: a level-
     * triggered watch would fire again at once, so back off. */
    accept_back_off(l, dpx_err(fd));
    return;
  }
}

/* Watch the listening socket (loop thread). */
static int
accept_start(duplex_listener *l)
{
  int r = uv_timer_init(&l->loop->uv, &l->retry);
  if (r != 0)
    return r;
  l->retry.data = l;
  r = uv_poll_init_socket(&l->loop->uv, &l->poll, l->fd);
  if (r != 0) {
    /* One handle to close besides the listener's own. */
    l->handles = 2;
    uv_close((uv_handle_t *)&l->retry, on_listener_closed);
    return r;
  }
  l->poll.data = l;
  l->accepting = true;
  return uv_poll_start(&l->poll, UV_READABLE, on_acceptable);
}
#else
static void
on_connection(uv_stream_t *server, int status)
{
  duplex_listener *l = server->data;
  /* Nothing is accepted once duplex_listener_close() has returned, even
   * while the close itself still waits in the loop's queue. */
  if (l->closing || atomic_load(&l->close_requested))
    return;
  if (status < 0) {
    listener_report(l, dpx_err(status));
    return;
  }
  accept_into_conn(l, server, -1);
}

static int
accept_start(duplex_listener *l)
{
  return uv_listen(&l->h.stream, l->backlog, on_connection);
}
#endif

/* ---- creating ------------------------------------------------------------- *
 * The socket is made, bound and put into listening state on the caller's
 * thread, so errors (address in use, permissions) come back from the call
 * and nothing waits for the loop. The loop then wraps the descriptor in a
 * handle and starts accepting (the open op). */

/* Options checked and copied; DUPLEX_LISTEN_REUSEPORT only when
 * @p group_ok (group listeners). */
static int
listener_opts_get(duplex_listener_opts *o, const duplex_listener_opts *opts,
                  bool group_ok)
{
  const duplex_listener_opts def = DUPLEX_LISTENER_OPTS_INIT;
  *o = def;
  if (opts == NULL)
    return 0;
  int r = dpx_check_size(opts, opts->size,
                         offsetof(duplex_listener_opts, tls),
                         sizeof(duplex_listener_opts));
  if (r != 0)
    return r;
  /* Fields an older, shorter struct lacks keep their defaults. */
  memcpy(o, opts, opts->size < sizeof *o ? opts->size : sizeof *o);
  o->size = sizeof *o;
  r = dpx_tls_check_use(o->tls, DUPLEX_TLS_SERVER, true);
  if (r != 0)
    return r;
  unsigned allowed = DUPLEX_LISTEN_FLAGS_ALL;
  if (!group_ok)
    allowed &= ~DUPLEX_LISTEN_REUSEPORT;
  if ((o->flags & ~allowed) != 0 || o->backlog < 0 || o->mode > 0777)
    return DUPLEX_EINVAL;
  return 0;
}

/* Where a new listener belongs: NULL members for duplex_listener_*; a
 * group listener's member knows its group listener, and a balanced one
 * its group. */
typedef struct listen_ctx {
  duplex_listener *parent;
  duplex_loop_group *group;
  bool reuseport;
} listen_ctx;

static int
listener_prepare(duplex_listener **out, duplex_loop *loop,
                 const duplex_listener_opts *opts, const listen_ctx *ctx)
{
  if (out != NULL)
    *out = NULL;
  if (out == NULL || loop == NULL)
    return DUPLEX_EINVAL;
  duplex_listener_opts o;
  int r0 = listener_opts_get(&o, opts, ctx->parent != NULL);
  if (r0 != 0)
    return r0;
  /* The conn options are borrowed for the call: one copy serves every
   * accepted conn. */
  dpx_conn_cfg *cfg;
  int r = dpx_conn_cfg_new(&cfg, o.conn_opts);
  if (r != 0)
    return r;
  if (cfg->has_local || cfg->tls != NULL) {
    /* A source address is for outgoing conns; a listener's TLS is in its
     * own options (a server config), not in conn_opts. */
    dpx_conn_cfg_unref(cfg);
    return DUPLEX_EINVAL;
  }
  if (o.tls != NULL) {
    duplex_tls_ref(o.tls);
    cfg->tls = o.tls; /* not shared yet */
  }
  duplex_listener *l = calloc(1, sizeof *l);
  if (l == NULL) {
    dpx_conn_cfg_unref(cfg);
    return DUPLEX_ENOMEM;
  }
  atomic_init(&l->refs, 2u); /* the caller's and the loop's */
  l->loop = loop;
  l->cfg = cfg;
  l->on_error = o.on_error;
  l->user = o.user;
  l->backlog = o.backlog > 0 ? o.backlog : 511;
  l->flags = o.flags;
  l->mode = o.mode;
  l->fd = -1;
  atomic_init(&l->close_requested, false);
  dpx_link_init(&l->link);
  if (uv_cond_init(&l->opened) != 0) {
    listener_free(l);
    return DUPLEX_ENOMEM;
  }
  l->has_cond = true;
  l->parent = ctx->parent;
  l->group = ctx->group;
  *out = l;
  return 0;
}

/* Loop thread: a listener that never got going lets go of its socket. */
static void
listener_open_failed(duplex_listener *l, int err)
{
  if (l->fd >= 0 && !l->has_handle) {
#if !defined(_WIN32)
    close(l->fd);
#endif
    l->fd = -1;
  }
  if (err != 0)
    listener_report(l, err);
  if (l->has_handle) {
    l->closing = true;
    uv_close(&l->h.handle, on_listener_closed);
    return;
  }
  listener_detach(l);
}

static void
listener_open_op(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_listener *l = DPX_CONTAINER_OF(op, duplex_listener, open_op);
  if (status != 0 || atomic_load(&l->close_requested)) {
    listener_open_failed(l, 0); /* loop freed or closed before it opened */
    return;
  }
  int r = l->is_unix ? uv_pipe_init(&loop->uv, &l->h.pipe, 0)
                     : uv_tcp_init(&loop->uv, &l->h.tcp);
  if (r != 0) {
    listener_open_failed(l, dpx_err(r));
    return;
  }
  l->h.handle.data = l;
  r = l->is_unix ? uv_pipe_open(&l->h.pipe, l->fd)
                 : uv_tcp_open(&l->h.tcp, (uv_os_sock_t)l->fd);
  if (r != 0) {
#if !defined(_WIN32)
    close(l->fd); /* the handle did not take it */
#endif
    l->fd = -1;
    l->has_handle = true;
    listener_open_failed(l, dpx_err(r));
    return;
  }
  l->has_handle = true;
  r = accept_start(l);
  if (r != 0) {
    l->closing = true;
#if !defined(_WIN32)
    if (l->accepting) {
      l->handles = 3;
      uv_close((uv_handle_t *)&l->poll, on_listener_closed);
      uv_close((uv_handle_t *)&l->retry, on_listener_closed);
    }
#endif
    listener_report(l, dpx_err(r));
    uv_close(&l->h.handle, on_listener_closed);
    return;
  }
  dpx_link_insert(&loop->listeners, &l->link);
  l->in_list = true;
}

/* Hand the bound, listening socket to the loop. On failure the socket is
 * closed, the file removed and the listener freed. */
static int
listener_submit(duplex_listener **out, duplex_listener *l)
{
  l->open_op.fn = listener_open_op;
  if (l->parent != NULL)
    duplex_listener_ref(l->parent); /* dropped when the loop lets go */
  int r = dpx_loop_submit(l->loop, &l->open_op, true);
  if (r != 0) {
    if (l->parent != NULL)
      duplex_listener_unref(l->parent);
#if !defined(_WIN32)
    close(l->fd);
    if (l->path != NULL)
      unlink(l->path);
#endif
    listener_free(l);
    return r;
  }
  *out = l;
  return 0;
}

#if !defined(_WIN32)
static int
sys_err(void)
{
  return dpx_err(uv_translate_sys_error(errno));
}

/* A socket above the standard descriptors, close-on-exec, non-blocking. */
static int
make_socket(int family)
{
  int fd = socket(family, SOCK_STREAM, 0);
  if (fd < 0)
    return sys_err();
  if (dpx_is_stdio_fd(fd)) {
    int moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    close(fd);
    if (moved < 0)
      return sys_err();
    fd = moved;
  }
  int fl = fcntl(fd, F_GETFL);
  if (fcntl(fd, F_SETFD, FD_CLOEXEC) != 0 || fl < 0 ||
      fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
    int r = sys_err();
    close(fd);
    return r;
  }
  return fd;
}

static int
listen_tcp(duplex_listener **out, duplex_loop *loop, const char *host,
           uint16_t port, const duplex_listener_opts *opts,
           const listen_ctx *ctx)
{
  struct sockaddr_storage addr;
  memset(&addr, 0, sizeof addr);
  if (out == NULL)
    return DUPLEX_EINVAL;
  *out = NULL;
  if (host == NULL || host[0] == '\0')
    host = "0.0.0.0";
  else if (strcmp(host, "localhost") == 0)
    host = "127.0.0.1";
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0)
    return DUPLEX_EINVAL;
  duplex_listener *l;
  int r = listener_prepare(&l, loop, opts, ctx);
  if (r != 0)
    return r;
  dpx_stdio_ensure_open();
  int fd = make_socket(addr.ss_family);
  if (fd < 0) {
    listener_free(l);
    return fd;
  }
  int on = 1;
  (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
#if defined(SO_REUSEPORT)
  if (ctx->reuseport &&
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) != 0) {
    r = sys_err();
    close(fd);
    listener_free(l);
    return r;
  }
#endif
  if (addr.ss_family == AF_INET6) {
    int v6only = (l->flags & DUPLEX_LISTEN_IPV6ONLY) ? 1 : 0;
    (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only);
  }
  socklen_t alen = addr.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                              : sizeof(struct sockaddr_in);
  struct sockaddr_storage bound;
  socklen_t blen = sizeof bound;
  char buf[128];
  if (bind(fd, (struct sockaddr *)&addr, alen) != 0 ||
      listen(fd, l->backlog) != 0 ||
      getsockname(fd, (struct sockaddr *)&bound, &blen) != 0) {
    r = sys_err();
    close(fd);
    listener_free(l);
    return r;
  }
  l->fd = fd;
  l->port = ntohs(bound.ss_family == AF_INET6
                      ? ((struct sockaddr_in6 *)&bound)->sin6_port
                      : ((struct sockaddr_in *)&bound)->sin_port);
  dpx_format_addr((struct sockaddr *)&bound, buf, sizeof buf);
  if ((l->addr = dpx_strdup(buf)) == NULL) {
    close(fd);
    listener_free(l);
    return DUPLEX_ENOMEM;
  }
  return listener_submit(out, l);
}

int
duplex_listener_tcp(duplex_listener **out, duplex_loop *loop, const char *host,
                    uint16_t port, const duplex_listener_opts *opts)
{
  const listen_ctx plain = { NULL, NULL, false };
  return listen_tcp(out, loop, host, port, opts, &plain);
}

/* Is something listening on the UNIX socket at @p path? A refused connect
 * means the file is stale. The probe never blocks: a live listener whose
 * backlog is full answers EAGAIN, which counts as live. */
static bool
unix_path_is_stale(const char *path)
{
  struct stat st;
  if (lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode))
    return false; /* missing, or not a socket: never remove it */
  int fd = make_socket(AF_UNIX);
  if (fd < 0)
    return false;
  struct sockaddr_un sun;
  memset(&sun, 0, sizeof sun);
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, path, strlen(path) + 1);
  int r;
  do
    r = connect(fd, (struct sockaddr *)&sun, sizeof sun);
  while (r != 0 && errno == EINTR);
  int e = errno;
  close(fd);
  return r != 0 && e == ECONNREFUSED;
}

static int
listen_unix(duplex_listener **out, duplex_loop *loop, const char *path,
            const duplex_listener_opts *opts, const listen_ctx *ctx)
{
  if (out == NULL)
    return DUPLEX_EINVAL;
  *out = NULL;
  if (path == NULL || path[0] == '\0')
    return DUPLEX_EINVAL;
  struct sockaddr_un sun;
  if (strlen(path) >= sizeof sun.sun_path)
    return DUPLEX_ENAMETOOLONG;
  if (opts != NULL && opts->size >= sizeof(duplex_listener_opts) &&
      (opts->flags & DUPLEX_LISTEN_IPV6ONLY))
    return DUPLEX_EINVAL;
  duplex_listener *l;
  int r = listener_prepare(&l, loop, opts, ctx);
  if (r != 0)
    return r;
  l->is_unix = true;
  if ((l->addr = dpx_strdup(path)) == NULL) {
    listener_free(l);
    return DUPLEX_ENOMEM;
  }
  dpx_stdio_ensure_open();
  int fd = make_socket(AF_UNIX);
  if (fd < 0) {
    listener_free(l);
    return fd;
  }
  memset(&sun, 0, sizeof sun);
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, path, strlen(path) + 1);
  r = bind(fd, (struct sockaddr *)&sun, sizeof sun);
  int e = r != 0 ? errno : 0;
  if (e == EADDRINUSE && unix_path_is_stale(path)) {
    unlink(path);
    r = bind(fd, (struct sockaddr *)&sun, sizeof sun);
    e = r != 0 ? errno : 0;
  }
  if (r != 0) {
    r = dpx_err(uv_translate_sys_error(e));
    close(fd);
    listener_free(l);
    return r;
  }
  /* Ours from here: removed on close. Clients cannot connect before
   * listen(), so setting the mode between bind and listen leaves no window
   * with the wrong permissions. */
  if ((l->path = dpx_strdup(path)) == NULL)
    r = DUPLEX_ENOMEM;
  else if (l->mode != 0 && chmod(path, (mode_t)l->mode) != 0)
    r = sys_err();
  else if (listen(fd, l->backlog) != 0)
    r = sys_err();
  if (r != 0) {
    close(fd);
    unlink(path);
    listener_free(l);
    return r;
  }
  l->fd = fd;
  return listener_submit(out, l);
}

int
duplex_listener_unix(duplex_listener **out, duplex_loop *loop,
                     const char *path, const duplex_listener_opts *opts)
{
  const listen_ctx plain = { NULL, NULL, false };
  return listen_unix(out, loop, path, opts, &plain);
}

/* ---- group listeners ------------------------------------------------------ */

/* The user's handle over the members; it holds a reference on each. */
static int
group_listener_new(duplex_listener **out, unsigned members)
{
  duplex_listener *p = calloc(1, sizeof *p);
  duplex_listener **m = calloc(members, sizeof *m);
  if (p == NULL || m == NULL) {
    free(p);
    free(m);
    return DUPLEX_ENOMEM;
  }
  atomic_init(&p->refs, 1u); /* the caller's */
  atomic_init(&p->close_requested, false);
  dpx_link_init(&p->link);
  p->fd = -1;
  p->members = m;
  *out = p;
  return 0;
}

/* Members made: the group listener takes their address. */
static int
group_listener_done(duplex_listener **out, duplex_listener *p)
{
  duplex_listener *first = p->members[0];
  p->is_unix = first->is_unix;
  p->port = first->port;
  if ((p->addr = dpx_strdup(first->addr)) == NULL) {
    for (unsigned i = 0; i < p->nmembers; i++)
      duplex_listener_close(p->members[i]);
    duplex_listener_unref(p); /* freed once the members let go */
    return DUPLEX_ENOMEM;
  }
  *out = p;
  return 0;
}

/* A member could not be made: undo the others. */
static int
group_listener_fail(duplex_listener *p, int err)
{
  for (unsigned i = 0; i < p->nmembers; i++)
    duplex_listener_close(p->members[i]);
  duplex_listener_unref(p);
  return err;
}

static int
group_listen_check(duplex_listener **out, duplex_loop_group *g,
                   const duplex_listener_opts *opts, duplex_listener_opts *o)
{
  if (out != NULL)
    *out = NULL;
  if (out == NULL || g == NULL)
    return DUPLEX_EINVAL;
  int r = listener_opts_get(o, opts, true);
  if (r != 0)
    return r;
  return dpx_group_closed(g) ? DUPLEX_ECLOSED : 0;
}

int
duplex_group_listen_tcp(duplex_listener **out, duplex_loop_group *g,
                        const char *host, uint16_t port,
                        const duplex_listener_opts *opts)
{
  duplex_listener_opts o;
  int r = group_listen_check(out, g, opts, &o);
  if (r != 0)
    return r;
  bool reuseport = (o.flags & DUPLEX_LISTEN_REUSEPORT) != 0;
#if !defined(__linux__) || !defined(SO_REUSEPORT)
  if (reuseport)
    return DUPLEX_ENOTSUP;
#endif
  o.flags &= ~DUPLEX_LISTEN_REUSEPORT;
  unsigned n = reuseport ? dpx_group_count(g) : 1u;
  duplex_listener *p;
  if ((r = group_listener_new(&p, n)) != 0)
    return r;
  listen_ctx ctx = { p, reuseport ? NULL : g, reuseport };
  for (unsigned i = 0; i < n; i++) {
    duplex_listener *m;
    /* Port 0 picks a port once; every other socket joins it. */
    r = listen_tcp(&m, dpx_group_loop(g, i), host, port, &o, &ctx);
    if (r != 0)
      return group_listener_fail(p, r);
    p->members[p->nmembers++] = m;
    port = m->port;
  }
  return group_listener_done(out, p);
}

int
duplex_group_listen_unix(duplex_listener **out, duplex_loop_group *g,
                         const char *path, const duplex_listener_opts *opts)
{
  duplex_listener_opts o;
  int r = group_listen_check(out, g, opts, &o);
  if (r != 0)
    return r;
  if (o.flags & DUPLEX_LISTEN_REUSEPORT)
    return DUPLEX_ENOTSUP;
  duplex_listener *p;
  if ((r = group_listener_new(&p, 1u)) != 0)
    return r;
  listen_ctx ctx = { p, g, false };
  duplex_listener *m;
  r = listen_unix(&m, dpx_group_loop(g, 0), path, &o, &ctx);
  if (r != 0)
    return group_listener_fail(p, r);
  p->members[p->nmembers++] = m;
  return group_listener_done(out, p);
}
#else
/* Windows: TCP sockets could be bound here as on Unix; named pipes only
 * exist through libuv's handle. Both are bound on the loop at its next
 * iteration and errors are reported through on_error. Untested here. */
int
duplex_listener_tcp(duplex_listener **out, duplex_loop *loop, const char *host,
                    uint16_t port, const duplex_listener_opts *opts)
{
  (void)out; (void)loop; (void)host; (void)port; (void)opts;
  return DUPLEX_ENOTSUP;
}

int
duplex_listener_unix(duplex_listener **out, duplex_loop *loop,
                     const char *path, const duplex_listener_opts *opts)
{
  (void)out; (void)loop; (void)path; (void)opts;
  return DUPLEX_ENOTSUP;
}

int
duplex_group_listen_tcp(duplex_listener **out, duplex_loop_group *g,
                        const char *host, uint16_t port,
                        const duplex_listener_opts *opts)
{
  (void)out; (void)g; (void)host; (void)port; (void)opts;
  return DUPLEX_ENOTSUP;
}

int
duplex_group_listen_unix(duplex_listener **out, duplex_loop_group *g,
                         const char *path, const duplex_listener_opts *opts)
{
  (void)out; (void)g; (void)path; (void)opts;
  return DUPLEX_ENOTSUP;
}
#endif

/* ---- queries and close ---------------------------------------------------- */

int
duplex_listener_get_port(const duplex_listener *l, uint16_t *port)
{
  if (l == NULL || port == NULL)
    return DUPLEX_EINVAL;
  if (l->is_unix)
    return DUPLEX_ENOTSUP;
  *port = l->port;
  return 0;
}

int
duplex_listener_get_address(const duplex_listener *l, char *buf, size_t len)
{
  if (l == NULL || buf == NULL || len == 0)
    return DUPLEX_EINVAL;
  const char *a = l->addr != NULL ? l->addr : "";
  if (strlen(a) + 1 > len) {
    buf[0] = '\0';
    return DUPLEX_ENOBUFS;
  }
  memcpy(buf, a, strlen(a) + 1);
  return 0;
}

static void
close_op_run(duplex_loop *loop, dpx_op *op, int status)
{
  duplex_listener *l = DPX_CONTAINER_OF(op, duplex_listener, close_op);
  (void)loop;
  (void)status;
  if (l->has_handle)
    listener_close_now(l);
  /* else the open op, still queued before us, sees close_requested */
  duplex_listener_unref(l); /* the close op's reference */
}

int
duplex_listener_close(duplex_listener *l)
{
  if (l == NULL)
    return DUPLEX_EINVAL;
  if (l->members != NULL) {
    /* A group listener: closed once every member is. */
    if (atomic_exchange(&l->close_requested, true))
      return DUPLEX_ECLOSED;
    int r = DUPLEX_ECLOSED;
    for (unsigned i = 0; i < l->nmembers; i++)
      if (duplex_listener_close(l->members[i]) == 0)
        r = 0;
    return r;
  }
  uv_mutex_lock(dpx_addr_mu(l));
  duplex_loop *loop = l->loop;
  if (loop == NULL || atomic_exchange(&l->close_requested, true)) {
    uv_mutex_unlock(dpx_addr_mu(l));
    return DUPLEX_ECLOSED;
  }
  if (dpx_on_loop(loop)) {
    /* Group members open conns on other loops too. */
    wait_openings_locked(l);
    uv_mutex_unlock(dpx_addr_mu(l));
    if (l->has_handle)
      listener_close_now(l); /* no accept after this returns */
    return 0;
  }
  /* Queued under the lock: the loop cannot let go of the listener (its
   * detach takes the lock) before the op is in its queue. */
  duplex_listener_ref(l);
  l->close_op.fn = close_op_run;
  int r = dpx_loop_submit(loop, &l->close_op, false);
  /* An on_open that began before close_requested was set finishes first. */
  wait_openings_locked(l);
  uv_mutex_unlock(dpx_addr_mu(l));
  return r;
}
