/* echo_duplex_tls: TLS echo server on libduplex (C API), for the TLS
 * benchmarks.
 * Usage: echo_duplex_tls PORT CERT.pem KEY.pem
 *        (listens on 127.0.0.1; prints nothing)
 *
 * echo_duplex.c with TLS: one loop run on the main thread, a listener whose
 * duplex_listener_opts.tls is a server-role duplex_tls made from the PEM
 * files (everything else the library's defaults: TLS 1.2 and up, session
 * tickets). The callbacks are the plaintext server's: on_read writes the
 * borrowed plaintext back with duplex_conn_write(), pause/resume on
 * backpressure, half-close (close_notify) after the peer's close_notify.
 */
#include <duplex.h>

#include <stdio.h>

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

int
main(int argc, char **argv)
{
  int port = bench_port(argc, argv, " CERT.pem KEY.pem");
  if (argc != 4) {
    fprintf(stderr, "usage: %s PORT CERT.pem KEY.pem\n", argv[0]);
    return 2;
  }
  duplex_tls_config tcfg = DUPLEX_TLS_CONFIG_INIT;
  tcfg.role = DUPLEX_TLS_SERVER;
  tcfg.cert_file = argv[2];
  tcfg.key_file = argv[3];
  duplex_tls *tls;
  char why[256] = "";
  int rc = duplex_tls_new(&tls, &tcfg, why, sizeof why);
  if (rc != 0) {
    fprintf(stderr, "TLS config: %s: %s\n", duplex_strerror(rc), why);
    return 1;
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
  lopts.tls = tls;

  duplex_loop *loop;
  duplex_listener *listener;
  rc = duplex_loop_new(&loop, NULL);
  if (rc != 0) {
    fprintf(stderr, "loop: %s\n", duplex_strerror(rc));
    return 1;
  }
  rc = duplex_listener_tcp(&listener, loop, "127.0.0.1", (uint16_t)port,
                           &lopts);
  duplex_tls_unref(tls); /* the listener holds its own reference */
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
