/* tls_echo_server: a TLS echo server on one libduplex loop, or on a loop
 * group.
 *
 * Usage: tls_echo_server [-t N] [-q] CERT KEY [port] [host]
 *          (defaults: one loop, port 7443, host 127.0.0.1)
 *   CERT  the server's certificate chain (PEM, leaf first)
 *   KEY   its private key (PEM, unencrypted)
 *   -t N  serve on a loop group of N loops, one thread each (0 = one per
 *         CPU); accepted conns go to the loop with the fewest conns
 *   -q    do not print a line per connection
 * Port 0 picks a free port. Try it with
 *   openssl s_client -connect 127.0.0.1:7443 -CAfile ca.pem
 *
 * The only TLS-specific code is the duplex_tls made from CERT and KEY and
 * handed to the listener (duplex_listener_opts.tls): every callback below
 * sees plaintext, exactly as in echo_server.c. on_open runs once a
 * client's handshake is done; a client whose handshake fails never gets
 * it, and its on_close says why (duplex_conn_get_tls_error). The client's
 * close_notify is on_eof, answered with our own by duplex_conn_shutdown().
 *
 * SIGINT / SIGTERM are caught on a loop (duplex_signal) and stop the
 * server. POSIX only.
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

/* The connection's user pointer: whether its handshake finished. */
enum { HANDSHAKING = 0, OPEN = 1 };

static void
on_open(duplex_conn *conn, void *user)
{
  char peer[128];
  duplex_tls_info info;
  (void)user;
  duplex_conn_set_user(conn, (void *)(size_t)OPEN);
  if (quiet)
    return;
  if (duplex_conn_get_peer(conn, peer, sizeof peer) != 0)
    peer[0] = '\0';
  memset(&info, 0, sizeof info);
  info.size = sizeof info;
  if (duplex_conn_get_tls_info(conn, &info) != 0)
    snprintf(info.version_name, sizeof info.version_name, "?");
  printf("open   %s %s %s%s%s\n", peer, info.version_name, info.cipher,
         info.sni[0] != '\0' ? " SNI " : "", info.sni);
  fflush(stdout);
}

static void
on_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  (void)user;
  /* Plaintext, borrowed for this callback: the write copies it, and the
   * library encrypts it. */
  int rc = duplex_conn_write(conn, data, len, NULL, NULL);
  if (rc != 0) {
    fprintf(stderr, "write: %s\n", duplex_strerror(rc));
    duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
  }
}

/* A client that sends but does not read: stop reading it above the high
 * watermark (a paused TLS conn decrypts nothing more), resume below the
 * low one. */
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

/* The client's close_notify: send ours after the last echoes. */
static void
on_eof(duplex_conn *conn, void *user)
{
  (void)user;
  duplex_conn_shutdown(conn, NULL, NULL);
}

static void
on_close(duplex_conn *conn, int reason, void *user)
{
  char peer[128], why[512] = "";
  if (quiet)
    return;
  if (duplex_conn_get_peer(conn, peer, sizeof peer) != 0)
    snprintf(peer, sizeof peer, "(a client)");
  if (reason != 0)
    duplex_conn_get_tls_error(conn, why, sizeof why);
  printf("%s %s (%s%s%s)\n",
         (size_t)user == OPEN ? "close " : "failed", peer,
         reason != 0 ? duplex_strerror(reason) : "ok", why[0] ? ": " : "",
         why);
  fflush(stdout);
}

static void
on_accept_error(duplex_listener *listener, int status, void *user)
{
  (void)listener;
  (void)user;
  fprintf(stderr, "accept: %s\n", duplex_strerror(status));
}

/* Stopping: with one loop the signal callback stops it; with a group it
 * wakes the main thread, which frees the group. */
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
usage(const char *argv0)
{
  fprintf(stderr, "usage: %s [-t N] [-q] CERT KEY [port] [host]\n", argv0);
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
  long port = 7443, threads = -1;
  int opt, rc;
  while ((opt = getopt(argc, argv, "t:q")) != -1) {
    switch (opt) {
    case 't':
      if (parse_long(optarg, 0, DUPLEX_GROUP_MAX_LOOPS, &threads) != 0)
        return usage(argv[0]);
      break;
    case 'q':
      quiet = 1;
      break;
    default:
      return usage(argv[0]);
    }
  }
  if (argc - optind < 2 || argc - optind > 4)
    return usage(argv[0]);
  const char *cert = argv[optind], *key = argv[optind + 1];
  if (optind + 2 < argc && parse_long(argv[optind + 2], 0, 65535, &port) != 0)
    return usage(argv[0]);
  const char *host = optind + 3 < argc ? argv[optind + 3] : "127.0.0.1";

  /* The TLS configuration: read once, shared by every conn of every loop
   * (each holds its own reference). */
  duplex_tls_config tcfg = DUPLEX_TLS_CONFIG_INIT;
  tcfg.role = DUPLEX_TLS_SERVER;
  tcfg.cert_file = cert;
  tcfg.key_file = key;
  duplex_tls *tls = NULL;
  char err[512] = "";
  if ((rc = duplex_tls_new(&tls, &tcfg, err, sizeof err)) != 0) {
    fprintf(stderr, "tls: %s%s%s\n", duplex_strerror(rc), err[0] ? ": " : "",
            err);
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
  copts.user = (void *)(size_t)HANDSHAKING;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &copts;
  lopts.on_error = on_accept_error;
  lopts.tls = tls; /* the listener takes its own reference */

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
  if (rc == 0)
    rc = group != NULL ? duplex_group_listen_tcp(&listener, group, host,
                                                 (uint16_t)port, &lopts)
                       : duplex_listener_tcp(&listener, loop, host,
                                             (uint16_t)port, &lopts);
  duplex_tls_unref(tls); /* the listener and its conns hold theirs */
  for (int i = 0; rc == 0 && i < 2; i++)
    rc = duplex_signal_new(&sigs[i], loop, i == 0 ? SIGINT : SIGTERM,
                           on_signal, &st);
  if (rc == 0)
    rc = duplex_listener_get_address(listener, addr, sizeof addr);
  if (rc != 0) {
    fprintf(stderr, "listen on %s:%ld: %s\n", host, port, duplex_strerror(rc));
  } else {
    printf("echoing TLS on %s with %u loop%s (Ctrl-C to stop)\n", addr,
           nloops, nloops == 1 ? "" : "s");
    fflush(stdout);
    if (group != NULL) {
      rc = duplex_group_start(group);
      pthread_mutex_lock(&st.mu);
      while (rc == 0 && st.signum == 0)
        pthread_cond_wait(&st.cv, &st.mu);
      pthread_mutex_unlock(&st.mu);
    } else {
      rc = duplex_loop_run(loop, DUPLEX_RUN_DEFAULT); /* until a signal */
    }
  }

  for (int i = 0; i < 2; i++)
    if (sigs[i] != NULL) {
      duplex_signal_close(sigs[i]);
      duplex_signal_unref(sigs[i]);
    }
  if (listener != NULL) {
    duplex_listener_close(listener);
    duplex_listener_unref(listener);
  }
  if (group != NULL)
    duplex_group_free(group); /* closes every open conn */
  else if (loop != NULL)
    duplex_loop_free(loop);
  return rc == 0 ? 0 : 1;
}
