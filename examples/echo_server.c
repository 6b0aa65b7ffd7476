/* echo_server: a TCP echo server on one libduplex loop, or on a group of
 * loops that uses every core.
 *
 * Usage: echo_server [-t N] [-r] [-q] [port] [host]
 *          (defaults: one loop, port 7000, host 127.0.0.1)
 *   -t N  serve on a loop group of N loops, one thread each (0 = one per
 *         CPU); accepted conns go to the loop with the fewest conns
 *   -r    with -t: one SO_REUSEPORT socket per loop instead (Linux)
 *   -q    do not print a line per connection
 * Port 0 picks a free port; try it with `nc 127.0.0.1 7000`.
 *
 * SIGINT / SIGTERM are caught on a loop (duplex_signal): the callback stops
 * the server, which closes every conn and, with -t, prints how many conns
 * each loop accepted. POSIX only.
 */
#include <duplex.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int quiet;

static void
on_open(duplex_conn *conn, void *user)
{
  char peer[128];
  (void)user;
  if (quiet)
    return;
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
  if (quiet)
    return;
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

/* Stopping: the signal callback runs on a loop thread. With one loop it
 * stops the loop (duplex_loop_run returns on the main thread); with a group
 * it wakes the main thread, which frees the group. */
struct stopper {
  duplex_loop *loop; /* one-loop mode */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int signum;
};

static void
on_signal(duplex_signal *sig, int signum, void *user)
{
  struct stopper *st = user;
  (void)sig;
  fprintf(stderr, "\nsignal %d: stopping\n", signum);
  if (st->loop != NULL) {
    duplex_loop_stop(st->loop);
    return;
  }
  pthread_mutex_lock(&st->mu);
  st->signum = signum;
  pthread_cond_signal(&st->cv);
  pthread_mutex_unlock(&st->mu);
}

static int
watch_signals(duplex_loop *loop, struct stopper *st, duplex_signal *sigs[2])
{
  static const int which[2] = { SIGINT, SIGTERM };
  for (int i = 0; i < 2; i++) {
    int rc = duplex_signal_new(&sigs[i], loop, which[i], on_signal, st);
    if (rc != 0) {
      fprintf(stderr, "signal: %s\n", duplex_strerror(rc));
      return rc;
    }
  }
  return 0;
}

static void
unwatch_signals(duplex_signal *sigs[2])
{
  for (int i = 0; i < 2; i++) {
    if (sigs[i] != NULL) {
      duplex_signal_close(sigs[i]);
      duplex_signal_unref(sigs[i]);
    }
  }
}

static int
usage(const char *argv0)
{
  fprintf(stderr, "usage: %s [-t N] [-r] [-q] [port] [host]\n", argv0);
  return 2;
}

static int
parse_long(const char *text, long lo, long hi, long *out)
{
  char *end;
  errno = 0;
  long v = strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi)
    return -1;
  *out = v;
  return 0;
}

int
main(int argc, char **argv)
{
  long port = 7000, threads = -1;
  int reuseport = 0, opt, rc;
  while ((opt = getopt(argc, argv, "t:rq")) != -1) {
    switch (opt) {
    case 't':
      if (parse_long(optarg, 0, DUPLEX_GROUP_MAX_LOOPS, &threads) != 0)
        return usage(argv[0]);
      break;
    case 'r':
      reuseport = 1;
      break;
    case 'q':
      quiet = 1;
      break;
    default:
      return usage(argv[0]);
    }
  }
  if (argc - optind > 2 || (reuseport && threads < 0))
    return usage(argv[0]);
  if (optind < argc && parse_long(argv[optind], 0, 65535, &port) != 0)
    return usage(argv[0]);
  const char *host = optind + 1 < argc ? argv[optind + 1] : "127.0.0.1";

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
  if (reuseport)
    lopts.flags |= DUPLEX_LISTEN_REUSEPORT;

  struct stopper st = { NULL, PTHREAD_MUTEX_INITIALIZER,
                        PTHREAD_COND_INITIALIZER, 0 };
  duplex_signal *sigs[2] = { NULL, NULL };
  duplex_loop *loop = NULL;
  duplex_loop_group *group = NULL;
  duplex_listener *listener = NULL;
  unsigned nloops = 1;
  char addr[128];

  if (threads < 0) {
    rc = duplex_loop_new(&loop, NULL);
    st.loop = loop;
  } else {
    duplex_group_opts gopts = DUPLEX_GROUP_OPTS_INIT;
    gopts.loops = (unsigned)threads;
    rc = duplex_group_new(&group, &gopts);
    if (rc == 0)
      rc = duplex_group_get_count(group, &nloops);
    if (rc == 0)
      rc = duplex_group_get_loop(group, 0, &loop);
  }
  if (rc != 0) {
    fprintf(stderr, "loop: %s\n", duplex_strerror(rc));
    return 1;
  }
  if (group != NULL)
    rc = duplex_group_listen_tcp(&listener, group, host, (uint16_t)port,
                                 &lopts);
  else
    rc = duplex_listener_tcp(&listener, loop, host, (uint16_t)port, &lopts);
  if (rc != 0) {
    fprintf(stderr, "listen on %s:%ld: %s\n", host, port,
            duplex_strerror(rc));
    if (group != NULL)
      duplex_group_free(group);
    else
      duplex_loop_free(loop);
    return 1;
  }
  if (watch_signals(loop, &st, sigs) != 0)
    rc = 1;
  if (rc == 0 && duplex_listener_get_address(listener, addr, sizeof addr) == 0)
    printf("echoing on %s with %u loop%s (Ctrl-C to stop)\n", addr, nloops,
           nloops == 1 ? "" : "s");
  fflush(stdout);

  if (rc == 0 && group != NULL) {
    rc = duplex_group_start(group);
    if (rc == 0) {
      pthread_mutex_lock(&st.mu);
      while (st.signum == 0)
        pthread_cond_wait(&st.cv, &st.mu);
      pthread_mutex_unlock(&st.mu);
    }
  } else if (rc == 0) {
    rc = duplex_loop_run(loop, DUPLEX_RUN_DEFAULT); /* until a signal */
  }
  if (rc != 0)
    fprintf(stderr, "run: %s\n", duplex_strerror(rc));

  unwatch_signals(sigs);
  duplex_listener_close(listener);
  duplex_listener_unref(listener);
  if (group != NULL) {
    for (unsigned i = 0; i < nloops; i++) {
      duplex_loop *l;
      duplex_loop_stats stats = DUPLEX_LOOP_STATS_INIT;
      if (duplex_group_get_loop(group, i, &l) == 0 &&
          duplex_loop_get_stats(l, &stats) == 0)
        printf("loop %u: accepted %llu\n", i,
               (unsigned long long)stats.accepted);
    }
    fflush(stdout);
    duplex_group_free(group); /* closes every open conn */
  } else {
    duplex_loop_free(loop);
  }
  return rc == 0 ? 0 : 1;
}
