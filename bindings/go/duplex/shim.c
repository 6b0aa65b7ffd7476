/* Trampolines from libduplex's callbacks (loop thread) into the exported
 * Go functions in callbacks.go. Definitions live here, not in a cgo
 * preamble, because a file with //export may only declare in its
 * preamble. */
#include "shim.h"
#include "_cgo_export.h"

static void
on_open(duplex_conn *c, void *user)
{
  goOnOpen(c, (uintptr_t)user);
}

static void
on_read(duplex_conn *c, const void *data, size_t len, void *user)
{
  goOnRead(c, (void *)data, len, (uintptr_t)user);
}

static void
on_eof(duplex_conn *c, void *user)
{
  goOnEOF(c, (uintptr_t)user);
}

static void
on_writable(duplex_conn *c, void *user)
{
  goOnWritable(c, (uintptr_t)user);
}

static void
on_close(duplex_conn *c, int reason, void *user)
{
  goOnClose(c, reason, (uintptr_t)user);
}

static void
on_tls_done(duplex_conn *c, int status, void *user)
{
  goOnTLSDone(c, status, (uintptr_t)user);
}

static void
on_listener_close(duplex_loop *loop, int status, void *arg)
{
  (void)loop;
  goListenerClosed((uintptr_t)arg, status);
}

static void
on_listener_barrier(duplex_loop *loop, int status, void *arg)
{
  (void)loop;
  goListenerBarrier((uintptr_t)arg, status);
}

static void
fill_opts(duplex_conn_opts *opts, duplex_conn_cbs *cbs, uintptr_t user,
          dpxgo_limits lim, duplex_tls *tls, const char *tls_host)
{
  duplex_conn_cbs c = DUPLEX_CONN_CBS_INIT;
  c.on_open = on_open;
  c.on_read = on_read;
  c.on_eof = on_eof;
  c.on_writable = on_writable;
  c.on_close = on_close;
  *cbs = c;
  duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
  o.cbs = cbs;
  o.user = (void *)user;
  o.high_watermark = lim.high;
  o.low_watermark = lim.low;
  o.hard_limit = lim.hard;
  o.tls = tls;
  o.tls_host = tls_host;
  *opts = o;
}

int
dpxgo_connect_tcp(duplex_conn **out, duplex_loop *loop, const char *host,
                  uint16_t port, uintptr_t user, dpxgo_limits lim,
                  duplex_tls *tls, const char *tls_host)
{
  duplex_conn_cbs cbs;
  duplex_conn_opts opts;
  fill_opts(&opts, &cbs, user, lim, tls, tls_host);
  return duplex_conn_connect_tcp(out, loop, host, port, &opts);
}

int
dpxgo_connect_unix(duplex_conn **out, duplex_loop *loop, const char *path,
                   uintptr_t user, dpxgo_limits lim, duplex_tls *tls,
                   const char *tls_host)
{
  duplex_conn_cbs cbs;
  duplex_conn_opts opts;
  fill_opts(&opts, &cbs, user, lim, tls, tls_host);
  return duplex_conn_connect_unix(out, loop, path, &opts);
}

static void
fill_listener_opts(duplex_listener_opts *lo, duplex_conn_opts *opts,
                   duplex_conn_cbs *cbs, int backlog, unsigned flags,
                   uintptr_t user, dpxgo_limits lim, duplex_tls *tls)
{
  fill_opts(opts, cbs, user, lim, NULL, NULL);
  duplex_listener_opts o = DUPLEX_LISTENER_OPTS_INIT;
  o.conn_opts = opts;
  o.backlog = backlog;
  o.flags = flags;
  o.tls = tls;
  *lo = o;
}

int
dpxgo_listen_tcp(duplex_listener **out, duplex_loop *loop, const char *host,
                 uint16_t port, int backlog, unsigned flags, uintptr_t user,
                 dpxgo_limits lim, duplex_tls *tls)
{
  duplex_conn_cbs cbs;
  duplex_conn_opts opts;
  duplex_listener_opts lo;
  fill_listener_opts(&lo, &opts, &cbs, backlog, flags, user, lim, tls);
  return duplex_listener_tcp(out, loop, host, port, &lo);
}

int
dpxgo_listen_unix(duplex_listener **out, duplex_loop *loop, const char *path,
                  int backlog, unsigned flags, uintptr_t user,
                  dpxgo_limits lim, duplex_tls *tls)
{
  duplex_conn_cbs cbs;
  duplex_conn_opts opts;
  duplex_listener_opts lo;
  fill_listener_opts(&lo, &opts, &cbs, backlog, flags, user, lim, tls);
  return duplex_listener_unix(out, loop, path, &lo);
}

int
dpxgo_group_listen_tcp(duplex_listener **out, duplex_loop_group *group,
                       const char *host, uint16_t port, int backlog,
                       unsigned flags, uintptr_t user, dpxgo_limits lim,
                       duplex_tls *tls)
{
  duplex_conn_cbs cbs;
  duplex_conn_opts opts;
  duplex_listener_opts lo;
  fill_listener_opts(&lo, &opts, &cbs, backlog, flags, user, lim, tls);
  return duplex_group_listen_tcp(out, group, host, port, &lo);
}

int
dpxgo_group_listen_unix(duplex_listener **out, duplex_loop_group *group,
                        const char *path, int backlog, unsigned flags,
                        uintptr_t user, dpxgo_limits lim,
                        duplex_tls *tls)
{
  duplex_conn_cbs cbs;
  duplex_conn_opts opts;
  duplex_listener_opts lo;
  fill_listener_opts(&lo, &opts, &cbs, backlog, flags, user, lim, tls);
  return duplex_group_listen_unix(out, group, path, &lo);
}

int
dpxgo_start_tls(duplex_conn *conn, duplex_tls *tls, const char *host,
                uintptr_t user)
{
  return duplex_conn_start_tls(conn, tls, host, on_tls_done, (void *)user);
}

int
dpxgo_group_new(duplex_loop_group **out, unsigned loops, unsigned flags)
{
  duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
  o.loops = loops;
  o.flags = flags;
  return duplex_group_new(out, &o);
}

int
dpxgo_set_user(duplex_conn *conn, uintptr_t user)
{
  return duplex_conn_set_user(conn, (void *)user);
}

int
dpxgo_post_listener_close(duplex_loop *loop, uintptr_t user)
{
  return duplex_loop_post(loop, on_listener_close, (void *)user);
}

int
dpxgo_post_listener_barrier(duplex_loop *loop, uintptr_t user)
{
  return duplex_loop_post(loop, on_listener_barrier, (void *)user);
}
