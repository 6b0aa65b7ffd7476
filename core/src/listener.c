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

struct duplex_listener {
  duplex_loop *loop;
  dpx_link link; /* in loop->listeners while listening */
  dpx_stream h;
  bool is_unix;
  bool in_list;
  bool closing;
  atomic_bool close_requested;
  uint16_t port;
  char *addr;
  char *path; /* UNIX socket file we created, removed on close */
  dpx_conn_cfg *cfg; /* shared by every conn it accepts */
  duplex_listen_error_cb on_error;
  void *user;
  int backlog;
  unsigned flags;
  unsigned mode;
  dpx_op close_op;
#if !defined(_WIN32)
  /* Unix: the library accepts itself, watching the socket with a poll
   * handle, and backs off with a timer when accept() fails. */
  uv_poll_t poll;
  uv_timer_t retry;
  int fd;
  unsigned backoff_ms; /* 0 while accepting normally */
  unsigned handles;    /* handles still to close before freeing */
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
  free(l->addr);
  free(l->path);
  dpx_conn_cfg_unref(l->cfg);
  free(l);
}

static void
on_listener_closed(uv_handle_t *h)
{
  duplex_listener *l = h->data;
#if !defined(_WIN32)
  if (l->handles > 0 && --l->handles > 0)
    return; /* the other handles' callbacks come first */
  if (l->path != NULL)
    unlink(l->path);
#endif
  listener_free(l);
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

/* Wrap an accepted socket in a conn and open it (loop thread). On failure
 * the socket is closed and the error reported. */
static void
accept_into_conn(duplex_listener *l, uv_stream_t *server, int fd)
{
  duplex_conn *c = dpx_conn_new(l->loop, DPX_CONN_ACCEPTED, l->cfg, 1,
                                l->is_unix ? sizeof(uv_pipe_t)
                                           : sizeof(uv_tcp_t));
  int r = c != NULL ? 0 : UV_ENOMEM;
  dpx_stream *h = c != NULL ? dpx_conn_handle(c, 0) : NULL;
  if (r == 0)
    r = l->is_unix ? uv_pipe_init(&l->loop->uv, &h->pipe, 0)
                   : uv_tcp_init(&l->loop->uv, &h->tcp);
  if (r != 0) {
    if (c != NULL)
      dpx_conn_free(c);
#if !defined(_WIN32)
    if (fd >= 0)
      close(fd);
#endif
    if (l->on_error != NULL)
      l->on_error(l, dpx_err(r), l->user);
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
    if (l->on_error != NULL)
      l->on_error(l, dpx_err(r), l->user);
    return;
  }
  c->has_rd = true;
  dpx_link_insert(&l->loop->conns, &c->link);
  c->in_list = true;
  dpx_conn_opened(c);
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
  if (first && l->on_error != NULL)
    l->on_error(l, err, l->user);
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

/* Listen on the bound socket and watch it (loop thread). */
static int
accept_start(duplex_listener *l)
{
  uv_os_fd_t fd;
  int r = uv_fileno(&l->h.handle, &fd);
  if (r != 0)
    return r;
  l->fd = fd;
  if (listen(l->fd, l->backlog) != 0)
    return uv_translate_sys_error(errno);
  r = uv_timer_init(&l->loop->uv, &l->retry);
  if (r != 0)
    return r;
  r = uv_poll_init_socket(&l->loop->uv, &l->poll, l->fd);
  if (r != 0) {
    /* One handle to close besides the listener's own. */
    l->handles = 2;
    l->retry.data = l;
    uv_close((uv_handle_t *)&l->retry, on_listener_closed);
    return r;
  }
  l->poll.data = l;
  l->retry.data = l;
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
    if (l->on_error != NULL)
      l->on_error(l, dpx_err(status), l->user);
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

/* ---- creating ------------------------------------------------------------- */

static int
listener_prepare(duplex_listener **out, duplex_loop *loop,
                 const duplex_listener_opts *opts)
{
  if (out != NULL)
    *out = NULL;
  if (out == NULL || loop == NULL)
    return DUPLEX_EINVAL;
  duplex_listener_opts o = DUPLEX_LISTENER_OPTS_INIT;
  if (opts != NULL) {
    int r = dpx_check_size(opts, opts->size, sizeof(duplex_listener_opts),
                           sizeof(duplex_listener_opts));
    if (r != 0)
      return r;
    o = *opts;
    if ((o.flags & ~DUPLEX_LISTEN_FLAGS_ALL) != 0 || o.backlog < 0 ||
        o.mode > 0777)
      return DUPLEX_EINVAL;
  }
  /* The conn options are borrowed for the call: one copy serves every
   * accepted conn. */
  dpx_conn_cfg *cfg;
  int r = dpx_conn_cfg_new(&cfg, o.conn_opts);
  if (r != 0)
    return r;
  duplex_listener *l = calloc(1, sizeof *l);
  if (l == NULL) {
    dpx_conn_cfg_unref(cfg);
    return DUPLEX_ENOMEM;
  }
  l->loop = loop;
  l->cfg = cfg;
  l->on_error = o.on_error;
  l->user = o.user;
  l->backlog = o.backlog > 0 ? o.backlog : 511;
  l->flags = o.flags;
  l->mode = o.mode;
  atomic_init(&l->close_requested, false);
  dpx_link_init(&l->link);
  *out = l;
  return 0;
}

typedef struct tcp_args {
  duplex_listener *l;
  struct sockaddr_storage addr;
} tcp_args;

static void
listen_failed(duplex_listener *l)
{
  /* The handle exists: it must close through the loop before freeing. */
  l->path = NULL;
  l->closing = true;
#if !defined(_WIN32)
  if (l->accepting) {
    l->handles = 3;
    uv_close((uv_handle_t *)&l->poll, on_listener_closed);
    uv_close((uv_handle_t *)&l->retry, on_listener_closed);
  }
#endif
  uv_close(&l->h.handle, on_listener_closed);
}

static int
listen_tcp_on_loop(duplex_loop *loop, void *arg)
{
  tcp_args *a = arg;
  duplex_listener *l = a->l;
  int r = uv_tcp_init(&loop->uv, &l->h.tcp);
  if (r != 0) {
    listener_free(l);
    return dpx_err(r);
  }
  l->h.handle.data = l;
  unsigned flags = (l->flags & DUPLEX_LISTEN_IPV6ONLY) ? UV_TCP_IPV6ONLY : 0;
  r = uv_tcp_bind(&l->h.tcp, (struct sockaddr *)&a->addr, flags);
  if (r == 0)
    r = accept_start(l);
  if (r == 0) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    char buf[128];
    r = uv_tcp_getsockname(&l->h.tcp, (struct sockaddr *)&ss, &len);
    if (r == 0) {
      l->port = ntohs(ss.ss_family == AF_INET6
                          ? ((struct sockaddr_in6 *)&ss)->sin6_port
                          : ((struct sockaddr_in *)&ss)->sin_port);
      dpx_format_addr((struct sockaddr *)&ss, buf, sizeof buf);
      l->addr = malloc(strlen(buf) + 1);
      if (l->addr == NULL)
        r = UV_ENOMEM;
      else
        memcpy(l->addr, buf, strlen(buf) + 1);
    }
  }
  if (r != 0) {
    listen_failed(l);
    return dpx_err(r);
  }
  dpx_link_insert(&loop->listeners, &l->link);
  l->in_list = true;
  return 0;
}

int
duplex_listener_tcp(duplex_listener **out, duplex_loop *loop, const char *host,
                    uint16_t port, const duplex_listener_opts *opts)
{
  tcp_args a;
  memset(&a, 0, sizeof a);
  if (out != NULL)
    *out = NULL;
  if (host == NULL || host[0] == '\0')
    host = "0.0.0.0";
  else if (strcmp(host, "localhost") == 0)
    host = "127.0.0.1";
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&a.addr) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&a.addr) != 0)
    return DUPLEX_EINVAL;
  int r = listener_prepare(out, loop, opts);
  if (r != 0)
    return r;
  a.l = *out;
  *out = NULL;
  r = dpx_loop_exec(loop, listen_tcp_on_loop, &a);
  if (r == DUPLEX_ECLOSED && a.l->h.handle.loop == NULL)
    listener_free(a.l); /* never reached the loop */
  if (r == 0)
    *out = a.l;
  return r;
}

#if !defined(_WIN32)
/* Is something listening on the UNIX socket at @p path? A refused connect
 * means the file is stale. Local sockets answer at once, so this does not
 * stall the loop. */
static bool
unix_path_is_stale(const char *path)
{
  struct stat st;
  if (lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode))
    return false; /* missing, or not a socket: never remove it */
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0)
    return false;
  struct sockaddr_un sun;
  memset(&sun, 0, sizeof sun);
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, path, strlen(path) + 1);
  int r = connect(fd, (struct sockaddr *)&sun, sizeof sun);
  int e = errno;
  close(fd);
  return r != 0 && e == ECONNREFUSED;
}
#endif

typedef struct unix_args {
  duplex_listener *l;
  const char *path;
} unix_args;

static int
listen_unix_on_loop(duplex_loop *loop, void *arg)
{
  unix_args *a = arg;
  duplex_listener *l = a->l;
  int r = uv_pipe_init(&loop->uv, &l->h.pipe, 0);
  if (r != 0) {
    listener_free(l);
    return dpx_err(r);
  }
  l->h.handle.data = l;
  r = uv_pipe_bind(&l->h.pipe, a->path);
#if !defined(_WIN32)
  if (r == UV_EADDRINUSE && unix_path_is_stale(a->path)) {
    unlink(a->path);
    r = uv_pipe_bind(&l->h.pipe, a->path);
  }
#endif
  if (r != 0) {
    listen_failed(l);
    return dpx_err(r);
  }
  l->path = malloc(strlen(a->path) + 1);
  l->addr = malloc(strlen(a->path) + 1);
  if (l->path == NULL || l->addr == NULL)
    r = UV_ENOMEM;
  else {
    memcpy(l->path, a->path, strlen(a->path) + 1);
    memcpy(l->addr, a->path, strlen(a->path) + 1);
  }
#if !defined(_WIN32)
  /* Clients cannot connect before listen(), so setting the mode between
   * bind and listen leaves no window with the wrong permissions. */
  if (r == 0 && l->mode != 0 && chmod(a->path, (mode_t)l->mode) != 0)
    r = uv_translate_sys_error(errno);
#endif
  l->is_unix = true;
  if (r == 0)
    r = accept_start(l);
  if (r != 0) {
#if !defined(_WIN32)
    unlink(a->path);
#endif
    free(l->path);
    listen_failed(l);
    return dpx_err(r);
  }
  dpx_link_insert(&loop->listeners, &l->link);
  l->in_list = true;
  l->is_unix = true;
  return 0;
}

int
duplex_listener_unix(duplex_listener **out, duplex_loop *loop,
                     const char *path, const duplex_listener_opts *opts)
{
  if (out != NULL)
    *out = NULL;
  if (path == NULL || path[0] == '\0')
    return DUPLEX_EINVAL;
  if (strlen(path) >= 108)
    return DUPLEX_ENAMETOOLONG;
  if (opts != NULL && opts->size >= sizeof(duplex_listener_opts) &&
      (opts->flags & DUPLEX_LISTEN_IPV6ONLY))
    return DUPLEX_EINVAL;
  int r = listener_prepare(out, loop, opts);
  if (r != 0)
    return r;
  unix_args a = { *out, path };
  *out = NULL;
  r = dpx_loop_exec(loop, listen_unix_on_loop, &a);
  if (r == DUPLEX_ECLOSED && a.l->h.handle.loop == NULL)
    listener_free(a.l);
  if (r == 0)
    *out = a.l;
  return r;
}

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
  listener_close_now(l);
}

int
duplex_listener_close(duplex_listener *l)
{
  if (l == NULL)
    return DUPLEX_EINVAL;
  if (atomic_exchange(&l->close_requested, true))
    return DUPLEX_ECLOSED;
  if (dpx_on_loop(l->loop)) {
    listener_close_now(l); /* no accept after this returns */
    return 0;
  }
  l->close_op.fn = close_op_run;
  return dpx_loop_submit(l->loop, &l->close_op, false);
}
