/* scenario: the README example, built so it stays true to duplex.h.
 *
 * Four threads write lines into one TCP connection; whatever the socket
 * receives is printed. No lock: the loop owns the socket, writes from any
 * thread are queued whole and carried out in order.
 *
 * Usage: scenario [port]   (default 7000; try examples/echo_server first)
 * Error checks are kept short on purpose.
 */
#include <duplex.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static duplex_conn *conn;
static atomic_int producing = 4;

/* Loop thread. data is borrowed for the call. */
static void
on_read(duplex_conn *c, const void *data, size_t len, void *user)
{
  fwrite(data, 1, len, stdout);
}

/* Both directions finished (or an error): let duplex_loop_run() return. */
static void
on_close(duplex_conn *c, int reason, void *loop)
{
  if (reason != 0)
    fprintf(stderr, "closed: %s\n", duplex_strerror(reason));
  duplex_loop_stop(loop);
}

/* Any thread, no lock: each write is queued whole, in this thread's order. */
static void *
producer(void *arg)
{
  char msg[64];
  for (int i = 0; i < 1000; i++) {
    int n = snprintf(msg, sizeof msg, "thread %d says %d\n",
                     (int)(intptr_t)arg, i);
    while (duplex_conn_write(conn, msg, (size_t)n, NULL, NULL) ==
           DUPLEX_EWOULDBLOCK)
      duplex_conn_wait_writable(conn, -1); /* backpressure: wait, retry */
  }
  if (atomic_fetch_sub(&producing, 1) == 1)  /* the last producer:        */
    duplex_conn_shutdown(conn, NULL, NULL); /* half-close after the flush */
  return NULL;
}

int
main(int argc, char **argv)
{
  uint16_t port = (uint16_t)(argc > 1 ? atoi(argv[1]) : 7000);
  duplex_loop *loop;
  if (duplex_loop_new(&loop, NULL) != 0)
    return 1;

  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_read = on_read;
  cbs.on_close = on_close;
  duplex_conn_opts opts = DUPLEX_CONN_OPTS_INIT;
  opts.cbs = &cbs;
  opts.user = loop;
  int rc = duplex_conn_connect_tcp(&conn, loop, "localhost", port, &opts);
  if (rc != 0) {
    fprintf(stderr, "connect: %s\n", duplex_strerror(rc));
    return 1;
  }

  pthread_t t[4];
  for (int i = 0; i < 4; i++)
    pthread_create(&t[i], NULL, producer, (void *)(intptr_t)i);

  /* This thread is the loop thread until on_close stops the loop. */
  duplex_loop_run(loop, DUPLEX_RUN_DEFAULT);

  for (int i = 0; i < 4; i++)
    pthread_join(t[i], NULL);
  duplex_conn_unref(conn);
  duplex_loop_free(loop);
  return 0;
}
