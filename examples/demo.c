/* demo: many threads write into one connection; one loop owns the socket.
 *
 * A loop runs on its own thread. On it live an echo peer (a listener on
 * 127.0.0.1, port 0, whose conns write back whatever they read) and one
 * client conn connected to it. Four producer threads write tagged lines
 * "p<thread>:<seq>\n" into that one client conn at the same time, with no
 * lock: libduplex queues the writes and the loop carries them out in order.
 * The client's read callback reassembles the echoed lines and checks that
 * every producer's lines come back complete and in order.
 *
 * A small hard limit on the client makes producers hit DUPLEX_EWOULDBLOCK;
 * they then block in duplex_conn_wait_writable() and retry, which is how a
 * producer thread takes backpressure.
 *
 * Usage: demo [messages-per-producer]   (default 50000)
 * Exit status 0 when every line came back in order.
 */
#include <duplex.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PRODUCERS 4
#define DEFAULT_PER_PRODUCER 50000L
#define TIMEOUT_S 60

static long per_producer = DEFAULT_PER_PRODUCER;

/* The client conn every producer writes into. Set before the producers
 * start; they share it without a lock (that is the point of libduplex). */
static duplex_conn *client;

/* Producer-side counters: several threads add to them, so atomics. */
static atomic_long sent_msgs;
static atomic_long sent_bytes;
static atomic_long would_block;
static atomic_int producer_error;

/* Reader-side state. Only the loop thread touches it (every callback runs
 * there, one at a time), so it needs no synchronisation; main reads it
 * after the loop signalled `finished` below. */
static struct {
  char line[64];
  size_t line_len;
  bool line_long;
  long next_seq[PRODUCERS];
  long msgs;
  long bytes;
  bool in_order;
  long bad_lines;
  long backpressure_events;
  bool eof;
  int close_reason;
} rd = { .in_order = true };

/* The one lock in the program: main sleeps until the client conn closes. */
static pthread_mutex_t finish_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t finish_cv = PTHREAD_COND_INITIALIZER;
static bool finished;

static double
now_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ---- echo peer: every accepted conn writes back what it reads ---------- */

static void
echo_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  (void)user;
  /* On the loop thread with nothing queued this writes at once. */
  int rc = duplex_conn_write(conn, data, len, NULL, NULL);
  if (rc != 0) {
    fprintf(stderr, "demo: echo write: %s\n", duplex_strerror(rc));
    duplex_conn_close(conn, DUPLEX_CLOSE_ABORT);
  }
}

/* Flow control: stop reading while the echo queue is above its high
 * watermark, so a slow client cannot make the echo peer buffer forever. */
static void
echo_backpressure(duplex_conn *conn, size_t queued, void *user)
{
  (void)queued;
  (void)user;
  duplex_conn_pause(conn);
}

static void
echo_writable(duplex_conn *conn, void *user)
{
  (void)user;
  duplex_conn_resume(conn);
}

/* The client finished sending: finish ours too (after the echoes queued so
 * far). With EOF seen and shutdown done, the conn then closes by itself. */
static void
echo_eof(duplex_conn *conn, void *user)
{
  (void)user;
  duplex_conn_shutdown(conn, NULL, NULL);
}

/* ---- client: reassemble lines and check per-producer order ------------- */

/* "p<id>:<seq>" -> id, seq; false if the line is malformed. */
static bool
parse_line(const char *s, size_t n, int *id, long *seq)
{
  size_t i = 1;
  long v = 0;
  if (n < 4 || s[0] != 'p')
    return false;
  *id = 0;
  for (; i < n && s[i] >= '0' && s[i] <= '9'; i++)
    *id = *id * 10 + (s[i] - '0');
  if (i == 1 || i >= n || s[i] != ':' || *id >= PRODUCERS)
    return false;
  size_t start = ++i;
  for (; i < n && s[i] >= '0' && s[i] <= '9'; i++)
    v = v * 10 + (s[i] - '0');
  if (i == start || i != n)
    return false;
  *seq = v;
  return true;
}

static void
check_line(const char *s, size_t n)
{
  int id;
  long seq;
  if (!parse_line(s, n, &id, &seq)) {
    rd.bad_lines++;
    rd.in_order = false;
    return;
  }
  if (seq != rd.next_seq[id])
    rd.in_order = false;
  rd.next_seq[id] = seq + 1;
  rd.msgs++;
}

static void
client_read(duplex_conn *conn, const void *data, size_t len, void *user)
{
  (void)conn;
  (void)user;
  const char *p = data; /* borrowed for this callback only */
  rd.bytes += (long)len;
  for (size_t i = 0; i < len; i++) {
    if (p[i] == '\n') {
      if (rd.line_long) {
        rd.bad_lines++;
        rd.in_order = false;
      } else {
        check_line(rd.line, rd.line_len);
      }
      rd.line_len = 0;
      rd.line_long = false;
    } else if (rd.line_len < sizeof rd.line) {
      rd.line[rd.line_len++] = p[i];
    } else {
      rd.line_long = true; /* counted as malformed at its '\n' */
    }
  }
}

static void
client_backpressure(duplex_conn *conn, size_t queued, void *user)
{
  (void)conn;
  (void)queued;
  (void)user;
  rd.backpressure_events++;
}

static void
client_eof(duplex_conn *conn, void *user)
{
  (void)conn;
  (void)user;
  rd.eof = true;
}

static void
client_close(duplex_conn *conn, int reason, void *user)
{
  (void)conn;
  (void)user;
  rd.close_reason = reason;
  pthread_mutex_lock(&finish_mu);
  finished = true;
  pthread_cond_signal(&finish_cv);
  pthread_mutex_unlock(&finish_mu);
}

/* ---- producers: plain threads writing into the shared conn ------------- */

static void *
producer(void *arg)
{
  int id = (int)(intptr_t)arg;
  char msg[32];

  for (long seq = 0; seq < per_producer; seq++) {
    int n = snprintf(msg, sizeof msg, "p%d:%ld\n", id, seq);
    int rc;
    /* Past the hard limit the write is refused whole and we keep the
     * bytes: wait until the conn drains to its low watermark, retry. */
    while ((rc = duplex_conn_write(client, msg, (size_t)n, NULL, NULL)) ==
           DUPLEX_EWOULDBLOCK) {
      atomic_fetch_add(&would_block, 1);
      rc = duplex_conn_wait_writable(client, -1);
      if (rc != 0)
        break;
    }
    if (rc != 0) {
      fprintf(stderr, "demo: producer %d: write: %s\n", id,
              duplex_strerror(rc));
      atomic_store(&producer_error, rc);
      return NULL;
    }
    atomic_fetch_add(&sent_msgs, 1);
    atomic_fetch_add(&sent_bytes, n);
  }
  return NULL;
}

static int
fail(const char *what, int rc)
{
  fprintf(stderr, "demo: %s: %s (%s)\n", what, duplex_strerror(rc),
          duplex_err_name(rc));
  return 1;
}

int
main(int argc, char **argv)
{
  duplex_loop *loop;
  duplex_listener *listener;
  uint16_t port;
  pthread_t threads[PRODUCERS];
  int rc;

  if (argc > 1) {
    char *end;
    errno = 0;
    per_producer = strtol(argv[1], &end, 10);
    if (errno != 0 || *end != '\0' || per_producer < 1 ||
        per_producer > 10000000) {
      fprintf(stderr, "usage: %s [messages-per-producer (1..10000000)]\n",
              argv[0]);
      return 2;
    }
  }

  /* 1. A loop on its own thread. */
  if ((rc = duplex_loop_new(&loop, NULL)) != 0)
    return fail("duplex_loop_new", rc);
  if ((rc = duplex_loop_start(loop)) != 0)
    return fail("duplex_loop_start", rc);

  /* 2. The echo peer: a listener whose accepted conns echo. */
  duplex_conn_cbs echo_cbs = DUPLEX_CONN_CBS_INIT;
  echo_cbs.on_read = echo_read;
  echo_cbs.on_eof = echo_eof;
  echo_cbs.on_backpressure = echo_backpressure;
  echo_cbs.on_writable = echo_writable;
  duplex_conn_opts echo_opts = DUPLEX_CONN_OPTS_INIT;
  echo_opts.cbs = &echo_cbs;
  duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
  lopts.conn_opts = &echo_opts;
  if ((rc = duplex_listener_tcp(&listener, loop, "127.0.0.1", 0, &lopts)) != 0)
    return fail("duplex_listener_tcp", rc);
  if ((rc = duplex_listener_get_port(listener, &port)) != 0)
    return fail("duplex_listener_get_port", rc);

  /* 3. The client conn, with small limits so backpressure shows. */
  duplex_conn_cbs client_cbs = DUPLEX_CONN_CBS_INIT;
  client_cbs.on_read = client_read;
  client_cbs.on_eof = client_eof;
  client_cbs.on_backpressure = client_backpressure;
  client_cbs.on_close = client_close;
  duplex_conn_opts copts = DUPLEX_CONN_OPTS_INIT;
  copts.cbs = &client_cbs;
  copts.high_watermark = 32 * 1024;
  copts.low_watermark = 8 * 1024;
  copts.hard_limit = 64 * 1024;
  /* Writes made before the conn opens are queued: no need to wait. */
  if ((rc = duplex_conn_connect_tcp(&client, loop, "127.0.0.1", port,
                                    &copts)) != 0)
    return fail("duplex_conn_connect_tcp", rc);

  printf("libduplex %s demo: %d producer threads -> 1 conn -> echo peer on "
         "127.0.0.1:%u -> back\n",
         duplex_version_string(), PRODUCERS, (unsigned)port);
  fflush(stdout);

  /* 4. Producers write concurrently into the one conn. */
  double t0 = now_ms();
  int started = 0;
  for (int i = 0; i < PRODUCERS; i++) {
    if (pthread_create(&threads[i], NULL, producer, (void *)(intptr_t)i) != 0)
      break;
    started++;
  }
  for (int i = 0; i < started; i++)
    pthread_join(threads[i], NULL);

  /* 5. Half-close once every write is flushed; the echo peer answers with
   *    its own shutdown, and the client closes when both sides are done. */
  rc = duplex_conn_shutdown(client, NULL, NULL);
  if (rc != 0 && rc != DUPLEX_ECLOSED)
    fprintf(stderr, "demo: shutdown: %s\n", duplex_strerror(rc));

  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += TIMEOUT_S;
  bool timed_out = false;
  pthread_mutex_lock(&finish_mu);
  while (!finished && !timed_out)
    timed_out = pthread_cond_timedwait(&finish_cv, &finish_mu, &deadline) ==
                ETIMEDOUT;
  pthread_mutex_unlock(&finish_mu);
  double elapsed = now_ms() - t0;

  if (timed_out) {
    /* rd belongs to the loop thread while it runs: report no details. */
    fprintf(stderr, "demo: timed out after %d s waiting for the close\n",
            TIMEOUT_S);
    duplex_conn_unref(client);
    duplex_loop_free(loop);
    return 1;
  }

  long want = (long)PRODUCERS * per_producer;
  long sent = atomic_load(&sent_msgs);
  long sbytes = atomic_load(&sent_bytes);
  bool ok = started == PRODUCERS && atomic_load(&producer_error) == 0 &&
            sent == want && rd.msgs == sent && rd.bytes == sbytes &&
            rd.in_order && rd.bad_lines == 0 && rd.line_len == 0 &&
            rd.eof && rd.close_reason == 0;

  printf("  sent       %ld messages, %ld bytes, from %d threads\n", sent,
         sbytes, started);
  printf("  received   %ld messages, %ld bytes\n", rd.msgs, rd.bytes);
  printf("  in order   %s (per producer)%s\n", rd.in_order ? "yes" : "no",
         rd.bad_lines ? ", some lines malformed" : "");
  printf("  backpressure: %ld writes refused past the hard limit, waited "
         "and retried; %ld high-watermark events\n",
         (long)atomic_load(&would_block), rd.backpressure_events);
  if (rd.close_reason == 0)
    printf("  closed     cleanly (shutdown both ways)\n");
  else
    printf("  closed     with error: %s\n", duplex_strerror(rd.close_reason));
  printf("  elapsed    %.0f ms (%.0f messages/s)\n", elapsed,
         elapsed > 0 ? (double)rd.msgs * 1e3 / elapsed : 0.0);
  printf("%s\n", ok ? "OK" : "FAILED");

  /* 6. Tear down: drop our ref, close the listener, free the loop. */
  duplex_conn_unref(client);
  duplex_listener_close(listener);
  duplex_listener_unref(listener);
  if ((rc = duplex_loop_free(loop)) != 0)
    return fail("duplex_loop_free", rc);
  return ok ? 0 : 1;
}
