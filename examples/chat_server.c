/* chat_server: a line-based chat on one libduplex loop.
 *
 * Every client conn is framed with DUPLEX_FRAME_DELIMITED '\n', so on_read
 * gets one whole line per call. Each line is sent to every other client as
 * "ADDRESS: line" with duplex_conn_write_frame(), which adds the '\n'.
 * Joins and leaves are announced as "* ADDRESS joined" / "* ADDRESS left".
 * A client that stops reading cannot make the server buffer without bound:
 * once its queue is past the hard limit it is dropped.
 *
 * Usage: chat_server [port] [host]   (defaults: 0 = any free port, 127.0.0.1)
 * Prints "chat on HOST:PORT"; try `duplexcat -L HOST:PORT` as a client.
 * SIGINT / SIGTERM stop it (POSIX; a sigwait() thread stops the loop).
 */
#include <duplex.h>

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LINE 4096

/* One per client, in a list only the loop thread touches. */
typedef struct client {
  duplex_conn *conn;
  char name[64];
  struct client *prev, *next;
} client;

static client *clients;

/* Send one line to every client except @p from. */
static void
broadcast(const client *from, const char *line, size_t len)
{
  for (client *c = clients; c != NULL; c = c->next) {
    if (c == from)
      continue;
    int rc = duplex_conn_write_frame(c->conn, line, len, NULL, NULL);
    if (rc == DUPLEX_EWOULDBLOCK) /* not reading: drop it */
      duplex_conn_close(c->conn, DUPLEX_CLOSE_ABORT);
  }
}

static void
announce(const client *who, const char *what)
{
  char msg[128];
  int n = snprintf(msg, sizeof msg, "* %s %s", who->name, what);
  broadcast(who, msg, (size_t)n);
}

static void
on_open(duplex_conn *conn, void *user)
{
  client *c = calloc(1, sizeof *c);
  if (c == NULL) {
    duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
    return;
  }
  c->conn = conn;
  if (duplex_conn_get_peer(conn, c->name, sizeof c->name) != 0)
    strcpy(c->name, "?");
  c->next = clients;
  if (clients != NULL)
    clients->prev = c;
  clients = c;
  duplex_conn_set_user(conn, c); /* later callbacks get the client */
  announce(c, "joined");
}

/* One whole line, without its '\n', borrowed for the call. */
static void
on_read(duplex_conn *conn, const void *line, size_t len, void *user)
{
  client *from = user;
  char msg[MAX_LINE + 1]; /* a frame is at most MAX_LINE: cut the tail */
  int n = snprintf(msg, sizeof msg, "%s: %.*s", from->name, (int)len,
                   (const char *)line);
  broadcast(from, msg, n < MAX_LINE ? (size_t)n : MAX_LINE);
}

/* The client is done sending: finish our side too, then the conn closes. */
static void
on_eof(duplex_conn *conn, void *user)
{
  duplex_conn_shutdown(conn, NULL, NULL);
}

static void
on_close(duplex_conn *conn, int reason, void *user)
{
  client *c = user;
  if (c == NULL) /* closed before on_open */
    return;
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    clients = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
  announce(c, reason == 0 ? "left" : duplex_strerror(reason));
  free(c);
}

static void *
signal_thread(void *loop)
{
  sigset_t set;
  int sig;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  if (sigwait(&set, &sig) == 0)
    duplex_loop_stop(loop); /* any thread */
  return NULL;
}

int
main(int argc, char **argv)
{
  int port = argc > 1 ? atoi(argv[1]) : 0;
  const char *host = argc > 2 ? argv[2] : "127.0.0.1";
  duplex_loop *loop;
  duplex_listener *listener;
  char addr[128];
  int rc;

  if (port < 0 || port > 65535) {
    fprintf(stderr, "usage: %s [port] [host]\n", argv[0]);
    return 2;
  }
  /* Only the signal thread takes SIGINT/SIGTERM (threads inherit this). */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, NULL);

  if ((rc = duplex_loop_new(&loop, NULL)) != 0) {
    fprintf(stderr, "loop: %s\n", duplex_strerror(rc));
    return 1;
  }
  duplex_framing lines = DUPLEX_FRAMING_INIT;
  lines.kind = DUPLEX_FRAME_DELIMITED;
  lines.delimiter[0] = '\n';
  lines.delimiter_len = 1;
  lines.max_frame = MAX_LINE; /* a longer line closes that client */
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = on_open;
  cbs.on_read = on_read;
  cbs.on_eof = on_eof;
  cbs.on_close = on_close;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  copts.cbs = &cbs;
  copts.framing = &lines;
  copts.high_watermark = 64 * 1024;
  copts.hard_limit = 256 * 1024;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &copts;

  rc = duplex_listener_tcp(&listener, loop, host, (uint16_t)port, &lopts);
  if (rc != 0) {
    fprintf(stderr, "listen on %s:%d: %s\n", host, port, duplex_strerror(rc));
    duplex_loop_free(loop);
    return 1;
  }
  duplex_listener_get_address(listener, addr, sizeof addr);
  printf("chat on %s\n", addr);
  fflush(stdout);

  pthread_t sig;
  if (pthread_create(&sig, NULL, signal_thread, loop) != 0) {
    duplex_loop_free(loop);
    return 1;
  }
  rc = duplex_loop_run(loop, DUPLEX_RUN_DEFAULT); /* until a signal */
  if (rc != 0)
    pthread_kill(sig, SIGTERM); /* release the signal thread */
  pthread_join(sig, NULL);
  duplex_listener_close(listener);
  duplex_listener_unref(listener);
  duplex_loop_free(loop); /* closes every client */
  return rc == 0 ? 0 : 1;
}
