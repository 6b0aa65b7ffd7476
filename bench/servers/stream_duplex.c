/* stream_duplex: bulk one-way stream from a libduplex conn, for the
 * benchmarks. Usage: stream_duplex PORT [copy|zc]   (127.0.0.1)
 *
 * Each accepted conn is sent an endless byte stream whose byte at offset o
 * is o % 251 (loadgen's `stream` mode reads and checks it). The server is
 * the sender, like `iperf3 -s` with a client's `-R`.
 * Writing: 128 KiB-ish blocks while fewer than the high watermark are
 * queued; at the watermark the conn is congested and on_writable (at the
 * low watermark) resumes writing.
 *   copy  duplex_conn_write(): the library copies each block (default)
 *   zc    duplex_conn_write_zc() of one static block (no copy, no release
 *         callback: static storage outlives the conn)
 */
#include <duplex.h>

#include <stdio.h>
#include <string.h>

#include "common.h"

#define PAT 251
#define BLOCK (PAT * 522) /* 131022 bytes: whole periods, so blocks join */

static unsigned char block[BLOCK];
static int zero_copy;

static void
fill(duplex_conn *conn)
{
  size_t queued = 0;
  while (duplex_conn_get_queued(conn, &queued) == 0 &&
         queued < (size_t)1 << 20) {
    int rc = zero_copy ? duplex_conn_write_zc(conn, block, BLOCK, NULL, NULL)
                       : duplex_conn_write(conn, block, BLOCK, NULL, NULL);
    if (rc != 0)
      return; /* closed, or at the hard limit: on_writable comes later */
  }
}

static void
on_open(duplex_conn *conn, void *user)
{
  (void)user;
  fill(conn);
}

static void
on_writable(duplex_conn *conn, void *user)
{
  (void)user;
  fill(conn);
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
  int port = bench_port(argc, argv, " [copy|zc]");
  zero_copy = argc > 2 && strcmp(argv[2], "zc") == 0;
  for (size_t i = 0; i < BLOCK; i++)
    block[i] = (unsigned char)(i % PAT);
  duplex_loop *loop;
  duplex_listener *listener;
  if (duplex_loop_new(&loop, NULL) != 0)
    return 1;
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = on_open;
  cbs.on_writable = on_writable;
  cbs.on_eof = on_eof;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  copts.cbs = &cbs;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &copts;
  int rc = duplex_listener_tcp(&listener, loop, "127.0.0.1", (uint16_t)port,
                               &lopts);
  if (rc != 0) {
    fprintf(stderr, "listen on port %d: %s\n", port, duplex_strerror(rc));
    return 1;
  }
  duplex_loop_run(loop, DUPLEX_RUN_DEFAULT);
  duplex_loop_free(loop);
  duplex_listener_unref(listener);
  return 0;
}
