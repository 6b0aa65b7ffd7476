/* echo_server: a TCP echo server on one libduplex loop.
 *
 * Usage: echo_server [port] [host]    (defaults: 7000, 127.0.0.1)
 *        port 0 picks a free port; try it with `nc 127.0.0.1 7000`.
 *
 * The loop runs on the main thread (duplex_loop_run). SIGINT / SIGTERM are
 * taken by a small signal thread with sigwait(), which asks the loop to
 * stop: duplex_loop_stop() may be called from any thread. POSIX only.
 */
#include <duplex.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

static void
on_open(duplex_conn *conn, void *user)
{
  char peer[128];
  (void)user;
  if (duplex_conn_get_peer(conn, peer, sizeof peer) != 0)
    peer[0] = '\0';
  printf("open   %s\n", peer);
  fflush(stdout);
}

static void
on_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  (void)user;
  /* data is borrowed for this callback: the write copies it. */
  int rc = duplex_conn_write(conn, data, len, NULL, NULL);
  if (rc != 0) {
    fprintf(stderr, "write: %s\n", duplex_strerror(rc));
    duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
  }
}

/* A client that sends but does not read would make us queue without end:
 * stop reading from it above the high watermark, resume below the low. */
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

/* The client is done sending: finish our side once the echoes are out. */
static void
on_eof(duplex_conn *conn, void *user)
{
  (void)user;
  duplex_conn_shutdown(conn, NULL, NULL);
}

static void
on_close(duplex_conn *conn, int reason, void *user)
{
  char peer[128];
  (void)user;
  if (duplex_conn_get_peer(conn, peer, sizeof peer) != 0)
    peer[0] = '\0';
  printf("close  %s (%s)\n", peer, reason ? duplex_strerror(reason) : "ok");
  fflush(stdout);
}

static void
on_accept_error(duplex_listener *listener, int status, void *user)
{
  (void)listener;
  (void)user;
  fprintf(stderr, "accept: %s\n", duplex_strerror(status));
}

static void *
signal_thread(void *arg)
{
  duplex_loop *loop = arg;
  sigset_t set;
  int sig;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  if (sigwait(&set, &sig) == 0) {
    fprintf(stderr, "\nsignal %d: stopping\n", sig);
    duplex_loop_stop(loop);
  }
  return NULL;
}

int
main(int argc, char **argv)
{
  long port = 7000;
  const char *host = argc > 2 ? argv[2] : "127.0.0.1";
  duplex_loop *loop;
  duplex_listener *listener;
  char addr[128];
  int rc;

  if (argc > 1) {
    char *end;
    errno = 0;
    port = strtol(argv[1], &end, 10);
    if (errno != 0 || *end != '\0' || port < 0 || port > 65535) {
      fprintf(stderr, "usage: %s [port] [host]\n", argv[0]);
      return 2;
    }
  }

  /* Block SIGINT/SIGTERM here so every thread inherits the mask and only
   * the signal thread receives them (through sigwait). */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, NULL);

  if ((rc = duplex_loop_new(&loop, NULL)) != 0) {
    fprintf(stderr, "loop: %s\n", duplex_strerror(rc));
    return 1;
  }

  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = on_open;
  cbs.on_read = on_read;
  cbs.on_eof = on_eof;
  cbs.on_backpressure = on_backpressure;
  cbs.on_writable = on_writable;
  cbs.on_close = on_close;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  copts.cbs = &cbs;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &copts;
  lopts.on_error = on_accept_error;

  rc = duplex_listener_tcp(&listener, loop, host, (uint16_t)port, &lopts);
  if (rc != 0) {
    fprintf(stderr, "listen on %s:%ld: %s\n", host, port, duplex_strerror(rc));
    duplex_loop_free(loop);
    return 1;
  }
  if (duplex_listener_get_address(listener, addr, sizeof addr) == 0)
    printf("echoing on %s (Ctrl-C to stop)\n", addr);
  fflush(stdout);

  pthread_t sig_thread;
  if (pthread_create(&sig_thread, NULL, signal_thread, loop) != 0) {
    fprintf(stderr, "cannot start the signal thread\n");
    duplex_loop_free(loop);
    return 1;
  }

  rc = duplex_loop_run(loop, DUPLEX_RUN_DEFAULT); /* until a signal */
  if (rc != 0) {
    fprintf(stderr, "run: %s\n", duplex_strerror(rc));
    pthread_kill(sig_thread, SIGTERM); /* release the signal thread */
  }

  pthread_join(sig_thread, NULL);
  duplex_listener_close(listener);
  duplex_listener_unref(listener);
  duplex_loop_free(loop); /* closes every open conn */
  return rc == 0 ? 0 : 1;
}
