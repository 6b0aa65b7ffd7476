/* channel_to_socket: the scenario from docs/design.md, in C.
 *
 * Producer threads push messages into a channel. The channel delivers them
 * on the loop thread, where each one is copied to a socket. Whatever the
 * socket receives is printed. With a blocking reader thread plus writer
 * threads this is a data race; here it needs no lock: the loop owns the
 * socket, and the channel and the conn are safe to use from any thread.
 *
 * The socket talks to an echo peer in the same process (a listener on
 * 127.0.0.1, port 0), so the example runs on its own.
 *
 * Usage: channel_to_socket [messages-per-producer]   (default 5)
 * Exit status 0 when every message came back.
 */
#include <duplex.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define PRODUCERS 4

static int per_producer = 5;
static duplex_channel *chan;
static atomic_int producing = PRODUCERS;
static atomic_int send_errors;

/* Only the loop thread touches these (callbacks run there, one at a time);
 * main reads them after duplex_loop_run() returned. */
static long delivered, written_bytes, echoed_lines, echoed_bytes;
static int close_reason = -1;

/* ---- the echo peer: writes back what it reads --------------------------- */

static void
echo_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  duplex_conn_write(conn, data, len, NULL, NULL);
}

static void
echo_eof(duplex_conn *conn, void *user)
{
  duplex_conn_shutdown(conn, NULL, NULL); /* after the echoes queued so far */
}

/* ---- channel -> socket --------------------------------------------------- */

/* Loop thread: one message, borrowed for the call. The write copies it. */
static void
on_message(duplex_channel *ch, void *data, size_t len, void *conn)
{
  if (duplex_conn_write(conn, data, len, NULL, NULL) == 0) {
    delivered++;
    written_bytes += (long)len;
  }
}

/* Loop thread: the channel was closed and every message was delivered, so
 * the socket has had all of them: half-close it. */
static void
on_channel_close(duplex_channel *ch, int reason, void *conn)
{
  duplex_conn_shutdown(conn, NULL, NULL);
}

/* ---- socket -> stdout ---------------------------------------------------- */

static void
on_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  const char *p = data; /* borrowed for this callback */
  fwrite(p, 1, len, stdout);
  for (size_t i = 0; i < len; i++)
    echoed_lines += p[i] == '\n';
  echoed_bytes += (long)len;
}

/* Both directions are done (or an error): let duplex_loop_run() return. */
static void
on_close(duplex_conn *conn, int reason, void *loop)
{
  close_reason = reason;
  duplex_loop_stop(loop);
}

/* ---- producers: plain threads, no lock ------------------------------------ */

static void *
producer(void *arg)
{
  char msg[64];
  for (int i = 0; i < per_producer; i++) {
    int n = snprintf(msg, sizeof msg, "producer %d: message %d\n",
                     (int)(intptr_t)arg, i);
    /* -1: wait while the channel is full (it holds 16 messages). */
    if (duplex_channel_send(chan, msg, (size_t)n, -1) != 0)
      atomic_fetch_add(&send_errors, 1);
  }
  if (atomic_fetch_sub(&producing, 1) == 1) /* the last one out */
    duplex_channel_close(chan);  /* queued messages are still delivered */
  return NULL;
}

static int
fail(const char *what, int rc)
{
  fprintf(stderr, "channel_to_socket: %s: %s\n", what, duplex_strerror(rc));
  return 1;
}

int
main(int argc, char **argv)
{
  duplex_loop *loop;
  duplex_listener *echo;
  duplex_conn *conn;
  uint16_t port;
  int rc;

  if (argc > 1 && (per_producer = atoi(argv[1])) < 1) {
    fprintf(stderr, "usage: %s [messages-per-producer]\n", argv[0]);
    return 2;
  }
  if ((rc = duplex_loop_new(&loop, NULL)) != 0)
    return fail("loop", rc);

  /* The echo peer. */
  duplex_conn_cbs echo_cbs = DUPLEX_CONN_CBS_INIT;
  echo_cbs.on_read = echo_read;
  echo_cbs.on_eof = echo_eof;
  duplex_conn_opts echo_opts = DUPLEX_CONN_OPTS_INIT;
  echo_opts.cbs = &echo_cbs;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &echo_opts;
  if ((rc = duplex_listener_tcp(&echo, loop, "127.0.0.1", 0, &lopts)) != 0 ||
      (rc = duplex_listener_get_port(echo, &port)) != 0)
    return fail("listen", rc);

  /* The socket: prints what it receives. */
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_read = on_read;
  cbs.on_close = on_close;
  duplex_conn_opts opts = DUPLEX_CONN_OPTS_INIT;
  opts.cbs = &cbs;
  opts.user = loop;
  if ((rc = duplex_conn_connect_tcp(&conn, loop, "127.0.0.1", port, &opts)))
    return fail("connect", rc);

  /* The channel: its messages go to the socket. */
  duplex_channel_opts copts = DUPLEX_CHANNEL_OPTS_INIT;
  copts.on_message = on_message;
  copts.on_close = on_channel_close;
  copts.user = conn;
  copts.capacity = 16;
  if ((rc = duplex_channel_new(&chan, loop, &copts)) != 0)
    return fail("channel", rc);

  pthread_t t[PRODUCERS];
  for (int i = 0; i < PRODUCERS; i++)
    pthread_create(&t[i], NULL, producer, (void *)(intptr_t)i);

  /* This thread is the loop thread until on_close stops the loop. */
  if ((rc = duplex_loop_run(loop, DUPLEX_RUN_DEFAULT)) != 0)
    return fail("run", rc);
  for (int i = 0; i < PRODUCERS; i++)
    pthread_join(t[i], NULL);

  long want = (long)PRODUCERS * per_producer;
  int ok = delivered == want && echoed_lines == want &&
           echoed_bytes == written_bytes && close_reason == 0 &&
           atomic_load(&send_errors) == 0;
  printf("%d producers -> channel -> %ld messages (%ld bytes) to "
         "127.0.0.1:%u; %ld lines (%ld bytes) came back; %s\n",
         PRODUCERS, delivered, written_bytes, (unsigned)port, echoed_lines,
         echoed_bytes, close_reason == 0 ? "closed cleanly"
                                         : duplex_strerror(close_reason));

  duplex_channel_unref(chan);
  duplex_conn_unref(conn);
  duplex_listener_close(echo);
  duplex_listener_unref(echo);
  duplex_loop_free(loop);
  return ok ? 0 : 1;
}
