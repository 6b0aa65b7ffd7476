/* tls_fetch: fetch one page over HTTPS and print the response (status
 * line, headers and body) on standard output.
 *
 * Usage: tls_fetch [-v] (--ca FILE | --insecure) HOST PORT [PATH]
 *   --ca FILE   verify the server's certificate with these CA
 *               certificates (PEM), and that it names HOST
 *   --insecure  accept any certificate (testing only)
 *   -v          print what the handshake negotiated on standard error
 *   PATH        default /
 * Without either option the system's trusted CAs are used. Try it with
 *   openssl s_server -www -accept 8443 -cert server.pem -key server.key
 *   tls_fetch --ca ca.pem localhost 8443
 *
 * The request is written as soon as the conn is made: the library holds
 * it until the handshake is done and encrypts it then. HTTP/1.0 ends the
 * response by closing, and TLS makes that safe: the server's close_notify
 * is on_eof (the response is complete), while a connection cut without it
 * fails with DUPLEX_ETLSTRUNC, so a truncated page is never taken for a
 * whole one. Exit status 0 when the whole response arrived, 1 otherwise
 * (with the reason, and the TLS library's words for a TLS failure), 2 for
 * a usage error.
 */
#include <duplex.h>

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int verbose;
static int status = 1; /* until the response ends with close_notify */

static void
on_open(duplex_conn *conn, void *user)
{
  duplex_tls_info info;
  (void)user;
  if (!verbose)
    return;
  memset(&info, 0, sizeof info);
  info.size = sizeof info;
  if (duplex_conn_get_tls_info(conn, &info) == 0)
    fprintf(stderr, "tls_fetch: %s %s, server %s%s%s\n", info.version_name,
            info.cipher, info.peer_subject,
            info.alpn[0] != '\0' ? ", ALPN " : "", info.alpn);
}

static void
on_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  (void)conn;
  (void)user;
  fwrite(data, 1, len, stdout);
}

/* The server's close_notify: the response is complete. */
static void
on_eof(duplex_conn *conn, void *user)
{
  (void)user;
  status = 0;
  duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL); /* ours, then close */
}

static void
on_close(duplex_conn *conn, int reason, void *user)
{
  char why[512] = "";
  duplex_loop *loop = user;
  if (reason != 0) {
    status = 1;
    duplex_conn_get_tls_error(conn, why, sizeof why);
    fprintf(stderr, "tls_fetch: %s%s%s\n", duplex_strerror(reason),
            why[0] ? ": " : "", why);
  }
  duplex_loop_stop(loop);
}

static int
usage(void)
{
  fprintf(stderr,
          "usage: tls_fetch [-v] [--ca FILE | --insecure] HOST PORT [PATH]\n");
  return 2;
}

int
main(int argc, char **argv)
{
  static const struct option longopts[] = {
    { "ca", required_argument, NULL, 'c' },
    { "insecure", no_argument, NULL, 'k' },
    { "verbose", no_argument, NULL, 'v' },
    { NULL, 0, NULL, 0 },
  };
  const char *ca = NULL;
  int insecure = 0, opt, rc;
  while ((opt = getopt_long(argc, argv, "v", longopts, NULL)) != -1) {
    switch (opt) {
    case 'c': ca = optarg; break;
    case 'k': insecure = 1; break;
    case 'v': verbose = 1; break;
    default: return usage();
    }
  }
  if (argc - optind < 2 || argc - optind > 3 || (ca != NULL && insecure))
    return usage();
  const char *host = argv[optind], *path = argc - optind == 3
                                               ? argv[optind + 2] : "/";
  char *end;
  errno = 0;
  long port = strtol(argv[optind + 1], &end, 10);
  if (errno != 0 || *end != '\0' || port < 1 || port > 65535)
    return usage();

  /* A client configuration: trust ca (or the system's CAs), or nothing. */
  duplex_tls_config tcfg = DUPLEX_TLS_CONFIG_INIT;
  tcfg.role = DUPLEX_TLS_CLIENT;
  tcfg.ca_file = ca;
  tcfg.verify = insecure ? DUPLEX_TLS_VERIFY_NONE : DUPLEX_TLS_VERIFY_DEFAULT;
  duplex_tls *tls = NULL;
  char err[512] = "";
  if ((rc = duplex_tls_new(&tls, &tcfg, err, sizeof err)) != 0) {
    fprintf(stderr, "tls_fetch: %s%s%s\n", duplex_strerror(rc),
            err[0] ? ": " : "", err);
    return 1;
  }

  duplex_loop *loop = NULL;
  if ((rc = duplex_loop_new(&loop, NULL)) != 0) {
    fprintf(stderr, "tls_fetch: loop: %s\n", duplex_strerror(rc));
    duplex_tls_unref(tls);
    return 1;
  }
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = on_open;
  cbs.on_read = on_read;
  cbs.on_eof = on_eof;
  cbs.on_close = on_close;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  copts.cbs = &cbs;
  copts.user = loop;
  copts.connect_timeout_ms = 30000; /* name lookup, connect and handshake */
  copts.tls = tls;    /* the conn takes its own reference */
  copts.tls_host = NULL; /* SNI and the name verified: HOST */

  duplex_conn *conn = NULL;
  rc = duplex_conn_connect_tcp(&conn, loop, host, (uint16_t)port, &copts);
  duplex_tls_unref(tls);
  if (rc != 0) {
    fprintf(stderr, "tls_fetch: connect to %s port %ld: %s\n", host, port,
            duplex_strerror(rc));
    duplex_loop_free(loop);
    return 1;
  }
  char req[2048];
  int n = snprintf(req, sizeof req,
                   "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: tls_fetch "
                   "(libduplex)\r\n\r\n", path, host);
  if (n < 0 || (size_t)n >= sizeof req) {
    fprintf(stderr, "tls_fetch: path too long\n");
    rc = DUPLEX_EINVAL;
  } else {
    /* Queued now, encrypted and sent once the handshake is done. */
    rc = duplex_conn_write(conn, req, (size_t)n, NULL, NULL);
  }
  if (rc == 0)
    rc = duplex_loop_run(loop, DUPLEX_RUN_DEFAULT); /* until on_close */
  else if (rc != DUPLEX_EINVAL)
    fprintf(stderr, "tls_fetch: write: %s\n", duplex_strerror(rc));
  fflush(stdout);
  duplex_conn_unref(conn);
  duplex_loop_free(loop);
  return rc == 0 ? status : 1;
}
