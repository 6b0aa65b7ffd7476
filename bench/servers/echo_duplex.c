/* echo_duplex: TCP echo server on libduplex (C API), for the benchmarks.
 * Usage: echo_duplex PORT [LOOPS]   (listens on 127.0.0.1; prints nothing)
 *
 * Without LOOPS: one loop run on the main thread. With LOOPS (>= 1): a loop
 * group of that many loops, one library-owned thread each, and a group
 * listener handing each accepted conn to the loop with the fewest conns
 * (the scaling scenario).
 *
 * The idiomatic server: on_read writes the borrowed bytes back with
 * duplex_conn_write() (written at once when nothing is queued, copied
 * otherwise); pause/resume on backpressure; half-close after the peer's EOF.
 */
#include <duplex.h>

#include <stdio.h>
#include <unistd.h>

#include "common.h"

static void
on_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  (void)user;
  if (duplex_conn_write(conn, data, len, NULL, NULL) != 0)
    duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
}

static void
on_backpressure(duplex_conn *conn, size_t queued, void *user)
{
  (void)queued;
  (void)user;
  duplex_conn_pause(conn);
}

static void
on_writable(duplex_conn *conn, void *user)
{
  (void)user;
  duplex_conn_resume(conn);
}

static void
on_eof(duplex_conn *conn, void *user)
{
  (void)user;
  duplex_conn_shutdown(conn, NULL, NULL);
}

static int
serve_group(int port, long loops, const duplex_listener_opts *lopts)
{
  duplex_group_opts gopts = DUPLEX_GROUP_OPTS_INIT;
  gopts.loops = (unsigned)loops;
  duplex_loop_group *group;
  duplex_listener *listener;
  int rc = duplex_group_new(&group, &gopts);
  if (rc == 0)
    rc = duplex_group_listen_tcp(&listener, group, "127.0.0.1",
                                 (uint16_t)port, lopts);
  if (rc == 0)
    rc = duplex_group_start(group);
  if (rc != 0) {
    fprintf(stderr, "group on port %d: %s\n", port, duplex_strerror(rc));
    return 1;
  }
  for (;;)
    pause(); /* until killed */
}

int
main(int argc, char **argv)
{
  int port = bench_port(argc, argv, " [LOOPS]");
  long loops = 0;
  if (argc > 2) {
    char *end;
    loops = strtol(argv[2], &end, 10);
    if (*end != '\0' || loops < 1 || loops > 1024) {
      fprintf(stderr, "usage: %s PORT [LOOPS]\n", argv[0]);
      return 2;
    }
  }
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_read = on_read;
  cbs.on_eof = on_eof;
  cbs.on_backpressure = on_backpressure;
  cbs.on_writable = on_writable;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  copts.cbs = &cbs;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &copts;
  lopts.backlog = 4096;
  if (loops > 0)
    return serve_group(port, loops, &lopts);

  duplex_loop *loop;
  duplex_listener *listener;
  int rc = duplex_loop_new(&loop, NULL);
  if (rc != 0) {
    fprintf(stderr, "loop: %s\n", duplex_strerror(rc));
    return 1;
  }
  rc = duplex_listener_tcp(&listener, loop, "127.0.0.1", (uint16_t)port,
                           &lopts);
  if (rc != 0) {
    fprintf(stderr, "listen on port %d: %s\n", port, duplex_strerror(rc));
    return 1;
  }
  rc = duplex_loop_run(loop, DUPLEX_RUN_DEFAULT); /* until killed */
  duplex_listener_close(listener);
  duplex_listener_unref(listener);
  duplex_loop_free(loop);
  return rc == 0 ? 0 : 1;
}
