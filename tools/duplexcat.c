/* duplexcat: netcat on libduplex.
 *
 *   duplexcat [options] HOST:PORT | [IPV6]:PORT | unix:PATH     connect
 *   duplexcat -l [options] [HOST:]PORT | unix:PATH              listen
 *
 * Copies stdin to the connection and the connection to stdout, both at
 * once, on one loop run by the main thread. End of stdin half-closes the
 * connection; the program exits when both directions are done. See
 * docs/duplexcat.md.
 *
 * stdin and stdout are adopted as a second conn when they are streams
 * (pipes, terminals, sockets) and the two conns feed each other from their
 * callbacks, pausing the reading side while the writing side reports
 * backpressure. Regular files are not streams: a regular stdin is read by a
 * plain thread with blocking read() and duplex_conn_write() (any thread may
 * write); a regular stdout is written with write() from the read callback.
 */
#include <duplex.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_LINE ((size_t)1 << 20) /* -L: longest line sent or accepted */

static struct {
  duplex_loop *loop;
  duplex_conn *net;  /* the connection (we hold a ref); NULL until accepted */
  duplex_conn *io;   /* adopted stdin and/or stdout, or NULL */
  duplex_listener *listener; /* -l, until the connection arrives */
  duplex_timer *accept_timer; /* -l -w */
  bool io_reads, io_writes;   /* stdin / stdout go through io */
  bool lines, listening;      /* -L, -l */
  int verbose;                /* 0 = -q, 1, 2 = -v */
  bool net_closed, io_closed, freeing;
  int status;                 /* exit status, set on the loop thread */
  char *line;                 /* -L: a partial stdin line */
  size_t line_len, line_cap;
  pthread_t reader;           /* regular-file stdin */
  bool reader_started;
} cat;

static atomic_int reader_err; /* set by the reader thread */

/* Loop thread (or main before the loop runs): remember the first error. */
static void
set_error(const char *what, int rc)
{
  if (cat.freeing || cat.status != 0)
    return;
  cat.status = 1;
  if (cat.verbose == 0)
    return;
  if (what != NULL)
    fprintf(stderr, "duplexcat: %s: %s\n", what, duplex_strerror(rc));
  else
    fprintf(stderr, "duplexcat: %s\n", duplex_strerror(rc));
}

/* Stop the loop once the connection and stdio are both finished. */
static void
maybe_stop(void)
{
  if ((cat.net == NULL || cat.net_closed) && (cat.io == NULL || cat.io_closed))
    duplex_loop_stop(cat.loop);
}

static void
fail(const char *what, int rc)
{
  set_error(what, rc);
  if (cat.net != NULL)
    duplex_conn_close(cat.net, DUPLEX_CLOSE_ABORT);
  if (cat.io != NULL)
    duplex_conn_close(cat.io, DUPLEX_CLOSE_GRACEFUL);
}

/* ---- stdin -> connection ------------------------------------------------ */

/* Any thread: send one chunk (or one line, with -L). Off the loop thread a
 * full queue is waited out; on the loop thread it cannot fill up, because
 * stdin is paused while the connection reports backpressure. */
static int
send_chunk(const void *data, size_t len)
{
  int rc;
  for (;;) {
    rc = cat.lines ? duplex_conn_write_frame(cat.net, data, len, NULL, NULL)
                   : duplex_conn_write(cat.net, data, len, NULL, NULL);
    if (rc != DUPLEX_EWOULDBLOCK || duplex_loop_on_thread(cat.loop) == 1)
      return rc;
    if ((rc = duplex_conn_wait_writable(cat.net, -1)) != 0)
      return rc;
  }
}

static int
line_append(const char *p, size_t n)
{
  if (cat.line_len + n > MAX_LINE)
    return DUPLEX_EMSGSIZE;
  if (cat.line_len + n > cat.line_cap) {
    size_t cap = cat.line_cap ? cat.line_cap : 256;
    while (cap < cat.line_len + n)
      cap *= 2;
    char *p2 = realloc(cat.line, cap);
    if (p2 == NULL)
      return DUPLEX_ENOMEM;
    cat.line = p2;
    cat.line_cap = cap;
  }
  memcpy(cat.line + cat.line_len, p, n);
  cat.line_len += n;
  return 0;
}

/* -L, loop thread: send every complete line of this chunk as one frame and
 * keep the unfinished tail for the next one. */
static int
send_lines(const char *p, size_t n)
{
  const char *nl;
  int rc = 0;
  while (rc == 0 && (nl = memchr(p, '\n', n)) != NULL) {
    size_t k = (size_t)(nl - p);
    if (cat.line_len == 0) {
      rc = send_chunk(p, k); /* the whole line is in this chunk */
    } else if ((rc = line_append(p, k)) == 0) {
      rc = send_chunk(cat.line, cat.line_len);
      cat.line_len = 0;
    }
    p += k + 1;
    n -= k + 1;
  }
  return rc == 0 && n > 0 ? line_append(p, n) : rc;
}

static void
io_read(duplex_conn *io, const void *data, size_t len, void *user)
{
  int rc = cat.lines ? send_lines(data, len) : send_chunk(data, len);
  if (rc != 0 && rc != DUPLEX_ECLOSED)
    fail("send", rc);
}

/* End of stdin: send a last unterminated line, then half-close. */
static void
io_eof(duplex_conn *io, void *user)
{
  int rc = 0;
  if (cat.lines && cat.line_len > 0)
    rc = send_chunk(cat.line, cat.line_len);
  if (rc == 0)
    rc = duplex_conn_shutdown(cat.net, NULL, NULL);
  if (rc != 0 && rc != DUPLEX_ECLOSED)
    fail("send", rc);
}

/* A regular file on stdin: blocking reads in a plain thread. */
static void *
stdin_reader(void *arg)
{
  int rc = 0;
  if (cat.lines) {
    FILE *in = fdopen(0, "r");
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while (rc == 0 && in != NULL && (n = getline(&line, &cap, in)) > 0)
      rc = send_chunk(line, (size_t)n - (line[n - 1] == '\n'));
    if (rc == 0 && (in == NULL || ferror(in)))
      rc = DUPLEX_EIO;
    free(line);
  } else {
    static char buf[64 * 1024];
    ssize_t n;
    while (rc == 0 && (n = read(0, buf, sizeof buf)) != 0) {
      if (n < 0 && errno != EINTR)
        rc = -errno;
      else if (n > 0)
        rc = send_chunk(buf, (size_t)n);
    }
  }
  if (rc == 0)
    rc = duplex_conn_shutdown(cat.net, NULL, NULL);
  if (rc != 0 && rc != DUPLEX_ECLOSED) {
    if (cat.verbose > 0)
      fprintf(stderr, "duplexcat: stdin: %s\n", duplex_strerror(rc));
    atomic_store(&reader_err, rc);
    duplex_conn_close(cat.net, DUPLEX_CLOSE_ABORT);
  }
  return arg;
}

/* ---- connection -> stdout ----------------------------------------------- */

static int
write_all(int fd, const char *p, size_t n)
{
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno != EINTR)
      return -errno;
    if (w > 0) {
      p += w;
      n -= (size_t)w;
    }
  }
  return 0;
}

static void
net_read(duplex_conn *net, const void *data, size_t len, void *user)
{
  int rc;
  if (cat.io_writes) {
    duplex_buf b[2] = { { data, len }, { "\n", 1 } };
    rc = duplex_conn_writev(cat.io, b, cat.lines ? 2 : 1, NULL, NULL);
  } else {
    rc = write_all(1, data, len);
    if (rc == 0 && cat.lines)
      rc = write_all(1, "\n", 1);
  }
  if (rc != 0 && rc != DUPLEX_ECLOSED)
    fail("stdout", rc);
}

/* The peer is done sending: finish stdout. An adopted pair closes fd 1 on
 * shutdown; stdout adopted alone is closed (flushing first). */
static void
net_eof(duplex_conn *net, void *user)
{
  if (cat.io_writes && cat.io_reads)
    duplex_conn_shutdown(cat.io, NULL, NULL);
  else if (cat.io_writes)
    duplex_conn_close(cat.io, DUPLEX_CLOSE_GRACEFUL);
}

/* Backpressure, both ways: while a conn has too much queued, stop reading
 * the conn that feeds it. (The stdin thread waits in send_chunk instead.) */
static duplex_conn *
feeder(duplex_conn *c)
{
  return c == cat.io ? cat.net : cat.io_reads ? cat.io : NULL;
}

static void
on_full(duplex_conn *c, size_t queued, void *user)
{
  if (feeder(c) != NULL)
    duplex_conn_pause(feeder(c));
}

static void
on_drained(duplex_conn *c, void *user)
{
  if (feeder(c) != NULL)
    duplex_conn_resume(feeder(c));
}

/* ---- lifecycle ------------------------------------------------------------ */

static void
net_open(duplex_conn *net, void *user)
{
  char peer[256];
  if (cat.net != NULL && net != cat.net) { /* -l serves one connection */
    duplex_conn_close(net, DUPLEX_CLOSE_ABORT);
    return;
  }
  if (cat.net == NULL) { /* accepted */
    cat.net = net;
    duplex_conn_ref(net);
    duplex_listener_close(cat.listener);
    duplex_listener_unref(cat.listener);
    cat.listener = NULL;
    if (cat.accept_timer != NULL) {
      duplex_timer_close(cat.accept_timer);
      duplex_timer_unref(cat.accept_timer);
    }
    cat.accept_timer = NULL;
  }
  if (cat.verbose > 1 && duplex_conn_get_peer(net, peer, sizeof peer) == 0)
    fprintf(stderr, "duplexcat: %s %s\n",
            cat.listening ? "connection from" : "connected to",
            peer[0] ? peer : "an unnamed peer");
  if (cat.io_reads) {
    duplex_conn_resume(cat.io);
  } else if (pthread_create(&cat.reader, NULL, stdin_reader, NULL) == 0) {
    cat.reader_started = true;
  } else {
    fail("stdin", DUPLEX_ENOMEM);
  }
}

static void
net_close(duplex_conn *net, int reason, void *user)
{
  if (net != cat.net)
    return; /* a second connection refused by -l */
  cat.net_closed = true;
  if (reason != 0)
    set_error(NULL, reason);
  if (cat.io != NULL)
    duplex_conn_close(cat.io, DUPLEX_CLOSE_GRACEFUL); /* flush stdout */
  maybe_stop();
}

static void
io_close(duplex_conn *io, int reason, void *user)
{
  cat.io_closed = true;
  /* Reason 0: stdout finished; stdin may still be read by the thread. */
  if (reason != 0) {
    set_error("stdio", reason);
    if (cat.net != NULL && !cat.net_closed)
      duplex_conn_close(cat.net, DUPLEX_CLOSE_GRACEFUL);
  }
  maybe_stop();
}

static void
accept_timeout(duplex_timer *timer, void *user)
{
  fail("accept", DUPLEX_ETIMEDOUT);
  duplex_listener_close(cat.listener);
  duplex_listener_unref(cat.listener);
  cat.listener = NULL;
  duplex_timer_close(timer);
  duplex_timer_unref(timer);
  cat.accept_timer = NULL;
  maybe_stop();
}

/* Adopt stdin and stdout as one conn, or whichever of them is a stream. */
static int
adopt_stdio(const duplex_conn_opts *opts)
{
  int rc = duplex_conn_adopt_pair(&cat.io, cat.loop, 0, 1, opts);
  cat.io_reads = cat.io_writes = rc == 0;
  if (rc != DUPLEX_ENOTSOCK)
    return rc;
  if ((rc = duplex_conn_adopt(&cat.io, cat.loop, 0, opts)) == 0)
    cat.io_reads = true;
  else if (rc == DUPLEX_ENOTSOCK &&
           (rc = duplex_conn_adopt(&cat.io, cat.loop, 1, opts)) == 0)
    cat.io_writes = true;
  return rc == DUPLEX_ENOTSOCK ? 0 : rc; /* neither: files both ways */
}

/* ---- command line ------------------------------------------------------- */

static int
usage(FILE *f, int status)
{
  fprintf(f,
    "usage: duplexcat [-Lqv] [-i SEC] [-w SEC] HOST:PORT | [IPV6]:PORT | "
    "unix:PATH\n"
    "       duplexcat -l [-Lqv] [-i SEC] [-w SEC] [-p FILE] [HOST:]PORT | "
    "unix:PATH\n"
    "  -l       listen and serve one connection\n"
    "  -L       line mode: each line is one frame\n"
    "  -i SEC   close after SEC seconds with no traffic\n"
    "  -w SEC   give up connecting (or, with -l, waiting) after SEC seconds\n"
    "  -p FILE  with -l: write the bound address to FILE\n"
    "  -q       no diagnostics;  -v  report addresses on stderr\n");
  return status;
}

static bool
parse_seconds(const char *s, uint32_t *ms)
{
  char *end;
  double v = strtod(s, &end);
  if (end == s || *end != '\0' || !(v > 0) || v > 4e6)
    return false;
  *ms = v * 1000 < 1 ? 1 : (uint32_t)(v * 1000 + 0.5);
  return true;
}

/* "unix:PATH", "[V6]:PORT", "HOST:PORT" or (listening) "PORT". */
static bool
parse_address(char *s, bool server, char **host, char **path, long *port)
{
  char *colon = strrchr(s, ':'), *end;
  *host = *path = NULL;
  if (strncmp(s, "unix:", 5) == 0) {
    *path = s + 5;
    return **path != '\0';
  }
  if (colon == NULL && !server)
    return false;
  if (colon != NULL) {
    *colon = '\0';
    *host = s;
    if (s[0] == '[' && colon > s + 1 && colon[-1] == ']') {
      colon[-1] = '\0';
      *host = s + 1;
    } else if (strchr(s, ':') != NULL) {
      return false; /* bare IPv6 address: put it in brackets */
    }
  }
  const char *p = colon ? colon + 1 : s;
  *port = strtol(p, &end, 10);
  return *p != '\0' && *end == '\0' && *port >= (server ? 0 : 1) &&
         *port <= 65535 && (server || **host != '\0');
}

int
main(int argc, char **argv)
{
  const char *addr_file = NULL;
  uint32_t idle_ms = 0, wait_ms = 0;
  char *host, *path;
  long port = 0;
  int c, rc;

  cat.verbose = 1;
  while ((c = getopt(argc, argv, "hlLqvi:w:p:")) != -1) {
    switch (c) {
    case 'l': cat.listening = true; break;
    case 'L': cat.lines = true; break;
    case 'q': cat.verbose = 0; break;
    case 'v': cat.verbose = 2; break;
    case 'p': addr_file = optarg; break;
    case 'i': if (!parse_seconds(optarg, &idle_ms)) return usage(stderr, 2);
              break;
    case 'w': if (!parse_seconds(optarg, &wait_ms)) return usage(stderr, 2);
              break;
    case 'h': return usage(stdout, 0);
    default: return usage(stderr, 2);
    }
  }
  if (optind != argc - 1 || (addr_file && !cat.listening) ||
      !parse_address(argv[optind], cat.listening, &host, &path, &port))
    return usage(stderr, 2);

  if ((rc = duplex_loop_new(&cat.loop, NULL)) != 0) {
    set_error(NULL, rc);
    return 1;
  }
  duplex_conn_cbs io_cbs = DUPLEX_CONN_CBS_INIT;
  io_cbs.on_read = io_read;
  io_cbs.on_eof = io_eof;
  io_cbs.on_backpressure = on_full;
  io_cbs.on_writable = on_drained;
  io_cbs.on_close = io_close;
  duplex_conn_opts io_opts = DUPLEX_CONN_OPTS_INIT;
  io_opts.cbs = &io_cbs;
  io_opts.flags = DUPLEX_CONN_START_PAUSED; /* read once connected */

  duplex_conn_cbs net_cbs = DUPLEX_CONN_CBS_INIT;
  net_cbs.on_open = net_open;
  net_cbs.on_read = net_read;
  net_cbs.on_eof = net_eof;
  net_cbs.on_backpressure = on_full;
  net_cbs.on_writable = on_drained;
  net_cbs.on_close = net_close;
  duplex_framing lines = DUPLEX_FRAMING_INIT;
  lines.kind = DUPLEX_FRAME_DELIMITED;
  lines.delimiter[0] = '\n';
  lines.delimiter_len = 1;
  lines.max_frame = MAX_LINE;
  duplex_conn_opts net_opts = DUPLEX_CONN_OPTS_INIT;
  net_opts.cbs = &net_cbs;
  net_opts.framing = cat.lines ? &lines : NULL;
  net_opts.idle_timeout_ms = idle_ms;
  net_opts.connect_timeout_ms = cat.listening ? 0 : wait_ms;

  if ((rc = adopt_stdio(&io_opts)) != 0) {
    set_error("stdio", rc);
  } else if (cat.listening) {
    duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
    char bound[256];
    lopts.conn_opts = &net_opts;
    rc = path ? duplex_listener_unix(&cat.listener, cat.loop, path, &lopts)
              : duplex_listener_tcp(&cat.listener, cat.loop, host,
                                    (uint16_t)port, &lopts);
    if (rc == 0)
      rc = duplex_listener_get_address(cat.listener, bound, sizeof bound);
    if (rc == 0 && cat.verbose > 1)
      fprintf(stderr, "duplexcat: listening on %s\n", bound);
    if (rc == 0 && addr_file != NULL) {
      FILE *f = fopen(addr_file, "w");
      rc = f && fprintf(f, "%s\n", bound) > 0 && fclose(f) == 0 ? 0
                                                              : DUPLEX_EIO;
    }
    if (rc == 0 && wait_ms > 0 &&
        (rc = duplex_timer_new(&cat.accept_timer, cat.loop, accept_timeout,
                               NULL)) == 0)
      rc = duplex_timer_start(cat.accept_timer, wait_ms, 0);
  } else {
    rc = path ? duplex_conn_connect_unix(&cat.net, cat.loop, path, &net_opts)
              : duplex_conn_connect_tcp(&cat.net, cat.loop, host,
                                        (uint16_t)port, &net_opts);
  }
  if (rc != 0)
    set_error(NULL, rc);
  if (cat.status == 0)
    duplex_loop_run(cat.loop, DUPLEX_RUN_DEFAULT);

  if (cat.reader_started)
    pthread_join(cat.reader, NULL);
  if (atomic_load(&reader_err) != 0)
    cat.status = 1;
  cat.freeing = true; /* whatever is still open closes quietly */
  if (cat.net != NULL)
    duplex_conn_unref(cat.net);
  if (cat.io != NULL)
    duplex_conn_unref(cat.io);
  duplex_loop_free(cat.loop); /* closes the listener and timer, if any */
  if (cat.listener != NULL)
    duplex_listener_unref(cat.listener);
  if (cat.accept_timer != NULL)
    duplex_timer_unref(cat.accept_timer);
  free(cat.line);
  return cat.status;
}
