/* xthread_duplex: writes from other threads into one libduplex conn.
 * Usage: xthread_duplex PORT NPRODUCERS   (127.0.0.1; prints nothing)
 *
 * For each accepted conn, NPRODUCERS threads each send 64-byte messages
 * (xthread_msg.h) with duplex_conn_write() until the conn closes. Past the
 * hard limit a producer waits with duplex_conn_wait_writable(). The loop
 * runs on the main thread.
 */
#include <duplex.h>

#include <pthread.h>
#include <stdlib.h>

#include "common.h"
#include "xthread_msg.h"

static int nproducers;

typedef struct {
  duplex_conn *conn; /* our own reference */
  uint32_t id;
} producer;

static void *
produce(void *arg)
{
  producer *p = arg;
  unsigned char m[XMSG];
  for (uint64_t seq = 0;; seq++) {
    xmsg_fill(m, p->id, seq);
    int rc;
    while ((rc = duplex_conn_write(p->conn, m, XMSG, NULL, NULL)) ==
           DUPLEX_EWOULDBLOCK)
      if (duplex_conn_wait_writable(p->conn, -1) != 0)
        break;
    if (rc != 0)
      break; /* closed */
  }
  duplex_conn_unref(p->conn);
  free(p);
  return NULL;
}

static void
on_open(duplex_conn *conn, void *user)
{
  (void)user;
  for (int i = 0; i < nproducers; i++) {
    producer *p = malloc(sizeof *p);
    pthread_t t;
    duplex_conn_ref(conn);
    p->conn = conn;
    p->id = (uint32_t)i;
    if (pthread_create(&t, NULL, produce, p) != 0) {
      duplex_conn_unref(conn);
      free(p);
      duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
      return;
    }
    pthread_detach(t);
  }
}

static void
on_eof(duplex_conn *conn, void *user)
{
  (void)user;
  duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
}

int
main(int argc, char **argv)
{
  int port = bench_port(argc, argv, " NPRODUCERS");
  nproducers = argc > 2 ? atoi(argv[2]) : 1;
  if (nproducers < 1 || nproducers > 64)
    nproducers = 1;
  xmsg_init();
  duplex_loop *loop;
  duplex_listener *listener;
  if (duplex_loop_new(&loop, NULL) != 0)
    return 1;
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = on_open;
  cbs.on_eof = on_eof;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  copts.cbs = &cbs;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &copts;
  if (duplex_listener_tcp(&listener, loop, "127.0.0.1", (uint16_t)port,
                          &lopts) != 0) {
    fprintf(stderr, "listen on port %d failed\n", port);
    return 1;
  }
  duplex_loop_run(loop, DUPLEX_RUN_DEFAULT);
  duplex_loop_free(loop);
  duplex_listener_unref(listener);
  return 0;
}
