/* duplexcat: netcat on libduplex.
 *
 *   duplexcat [options] HOST PORT | HOST:PORT | [IPV6]:PORT     connect
 *   duplexcat [options] -U PATH | unix:PATH
 *   duplexcat -l [options] [HOST] PORT | [HOST:]PORT            listen
 *   duplexcat -l [options] -U PATH | unix:PATH
 *
 * Copies stdin to the connection and the connection to stdout, both at
 * once, on one loop run by the main thread. End of stdin half-closes the
 * connection (unless --no-shutdown); the program exits when both
 * directions are done, or with -k serves the next client. See
 * docs/duplexcat.md and duplexcat(1).
 *
 * stdin and stdout are adopted as a second conn ("io") and the two conns
 * feed each other from their callbacks, pausing the reading side while the
 * writing side reports backpressure. A stdin that is not a stream (a
 * regular file, /dev/null) is copied into a pipe by a plain thread and the
 * pipe is adopted instead, so every byte of input arrives on the loop
 * thread. A stdout that is not a stream is written with write().
 *
 * --tls speaks TLS on the connection (the library's duplex_tls: a client
 * config, or with -l a server config given to the listener); everything
 * above works unchanged on the decrypted stream, and the half-close of -N
 * sends close_notify first.
 */
#include <duplex.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE ((size_t)1 << 20) /* -L: longest line sent or accepted */
#define MAX_WAITING 32  /* -k: accepted clients held while one is served */
#define MAX_ADDRS 16    /* -4/-6: addresses of a name tried in turn */
#define MAX_ALPN 16     /* --alpn: protocol names */

enum { FAMILY_ANY, FAMILY_4, FAMILY_6 };

static struct {
  /* the command line */
  bool listening, keep, lines, shut_on_eof;
  int family;      /* FAMILY_*: -4, -6 */
  int verbose;     /* 0 = -q, 1, 2 = -v */
  uint32_t idle_ms, wait_ms;
  char *host;      /* TCP host as given (brackets stripped), or NULL */
  uint16_t port;
  char *path;      /* UNIX socket path, or NULL */
  char name[1100]; /* "HOST port N (tcp)" or "PATH (unix)", for messages */

  duplex_loop *loop;
  duplex_conn *net;  /* the connection being served (we hold a ref) */
  duplex_conn *io;   /* adopted stdin (and stdout when it is a stream) */
  duplex_conn *waiting[MAX_WAITING]; /* -k: accepted, paused, ref held */
  size_t n_waiting;
  duplex_listener *listener;  /* -l, while listening */
  duplex_timer *accept_timer; /* -l -w */
  duplex_conn_opts net_opts;  /* connect: for each address tried */
  bool io_writes;             /* stdout goes through io (else write()) */
  bool net_open, net_closed, io_closed, freeing;
  bool stdin_eof, peer_eof, io_full;
  bool finishing;             /* -k: the client is closing, stdin paused */
  char peer[1200];            /* -l: who is being served, for messages */
  int status;                 /* exit status, set on the loop thread */
  char *line;                 /* -L: a partial stdin line */
  size_t line_len, line_cap;
  /* -4/-6 with a host name: its addresses, connected to in turn */
  char addrs[MAX_ADDRS][INET6_ADDRSTRLEN];
  size_t n_addrs, next_addr;
  int64_t deadline_ms; /* -w, on the monotonic clock; 0 = none */
  /* --tls and its options */
  bool tls, insecure;
  const char *cert, *key, *ca, *tls_host;
  char *alpn[MAX_ALPN];
  size_t n_alpn;
  duplex_tls *tls_cfg;        /* made before the loop; we hold a ref */
} cat;

/* ---- messages ------------------------------------------------------------- */

static void
say(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fputs("duplexcat: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

/* Loop thread (or main before the loop runs): remember the first error and
 * say what failed: "connect to HOST port N (tcp): connection refused". */
static void
set_error(const char *what, int rc)
{
  if (cat.freeing || cat.status != 0)
    return;
  cat.status = 1;
  if (cat.verbose > 0)
    say("%s: %s", what, duplex_strerror(rc));
}

/* What the connection is, for a message about it. */
static const char *
net_what(char *buf, size_t len)
{
  if (cat.listening)
    snprintf(buf, len, "connection %s", cat.peer);
  else
    snprintf(buf, len, "%s %s", cat.net_open ? "connection to" : "connect to",
             cat.name);
  return buf;
}

/* ": " and why TLS failed on @p conn, in the TLS library's words, or "". */
static const char *
tls_reason(duplex_conn *conn, char *buf, size_t len)
{
  buf[0] = '\0';
  if (!cat.tls || conn == NULL || len < 3)
    return buf;
  if (duplex_conn_get_tls_error(conn, buf + 2, len - 2) != DUPLEX_EINVAL &&
      buf[2] != '\0') {
    buf[0] = ':';
    buf[1] = ' ';
  } else {
    buf[0] = '\0';
  }
  return buf;
}

/* An error of the connection itself (reset, refused, timed out, a failed
 * TLS handshake, ...). */
static void
net_error(duplex_conn *conn, int rc)
{
  char what[1500], why[600];
  net_what(what, sizeof what);
  if (rc == DUPLEX_ETIMEDOUT && cat.net_open && cat.idle_ms > 0) {
    char idle[64];
    snprintf(idle, sizeof idle, ": nothing sent or received for %g s (-i)",
             cat.idle_ms / 1000.0);
    strncat(what, idle, sizeof what - strlen(what) - 1);
  }
  tls_reason(conn, why, sizeof why);
  if (cat.keep) { /* -k: report, then serve the next client */
    if (cat.verbose > 0 && !cat.freeing)
      say("%s: %s%s", what, duplex_strerror(rc), why);
  } else if (!cat.freeing && cat.status == 0) {
    cat.status = 1;
    if (cat.verbose > 0)
      say("%s: %s%s", what, duplex_strerror(rc), why);
  }
}

/* ---- the UNIX socket file on SIGINT, SIGTERM, SIGHUP ---------------------- */

/* The library removes the socket file when the listener closes, which
 * happens at every normal exit. A fatal signal skips that, so while our
 * listener is open a handler removes the file (only if it is still the
 * one we bound), then dies of the signal with its default action. (A
 * duplex_signal watcher would act only while the loop runs, and the loop's
 * free closes watchers before the listener's file goes; the handler also
 * covers start-up and teardown.) */
static const int cleanup_signals[] = { SIGINT, SIGTERM, SIGHUP };
static volatile sig_atomic_t sock_armed;
static const char *sock_path;
static dev_t sock_dev;
static ino_t sock_ino;

static void
on_fatal_signal(int sig)
{
  struct stat st;
  if (sock_armed && lstat(sock_path, &st) == 0 && st.st_dev == sock_dev &&
      st.st_ino == sock_ino)
    unlink(sock_path);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = SIG_DFL;
  sigemptyset(&sa.sa_mask);
  sigaction(sig, &sa, NULL);
  raise(sig); /* pending until this handler returns, then fatal */
}

static void
block_cleanup_signals(int how)
{
  sigset_t set;
  sigemptyset(&set);
  for (size_t i = 0; i < sizeof cleanup_signals / sizeof *cleanup_signals; i++)
    sigaddset(&set, cleanup_signals[i]);
  pthread_sigmask(how, &set, NULL);
}

/* Main thread, with the signals blocked, right after the bind. A signal
 * that was ignored when we started (a background job, nohup) stays
 * ignored. */
static void
arm_socket_cleanup(const char *path)
{
  struct stat st;
  if (lstat(path, &st) != 0)
    return;
  sock_path = path;
  sock_dev = st.st_dev;
  sock_ino = st.st_ino;
  sock_armed = 1;
  for (size_t i = 0; i < sizeof cleanup_signals / sizeof *cleanup_signals;
       i++) {
    struct sigaction sa, old;
    if (sigaction(cleanup_signals[i], NULL, &old) != 0 ||
        old.sa_handler == SIG_IGN)
      continue;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fatal_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(cleanup_signals[i], &sa, NULL);
  }
}

/* ---- stopping --------------------------------------------------------------- */

static void
close_listener(void)
{
  sock_armed = 0; /* the library removes the file now */
  if (cat.listener != NULL) {
    duplex_listener_close(cat.listener);
    duplex_listener_unref(cat.listener);
    cat.listener = NULL;
  }
  if (cat.accept_timer != NULL) {
    duplex_timer_close(cat.accept_timer);
    duplex_timer_unref(cat.accept_timer);
    cat.accept_timer = NULL;
  }
}

/* Stop the loop once the connection and stdio are both finished. */
static void
maybe_stop(void)
{
  if ((cat.net == NULL || cat.net_closed) && (cat.io == NULL || cat.io_closed))
    duplex_loop_stop(cat.loop);
}

/* A fatal error: report it and wind everything down. */
static void
fail(const char *what, int rc)
{
  set_error(what, rc);
  if (cat.keep) { /* nothing to finish: the teardown closes it all */
    duplex_loop_stop(cat.loop);
    return;
  }
  close_listener();
  if (cat.net != NULL)
    duplex_conn_close(cat.net, DUPLEX_CLOSE_ABORT);
  if (cat.io != NULL)
    duplex_conn_close(cat.io, DUPLEX_CLOSE_GRACEFUL);
  maybe_stop();
}

/* ---- stdin -> connection ------------------------------------------------ */

/* Loop thread: send one chunk (or one line, with -L). The queue cannot
 * reach its hard limit: stdin is paused while the connection reports
 * backpressure, and one read is far below the limit. */
static int
send_chunk(const void *data, size_t len)
{
  return cat.lines ? duplex_conn_write_frame(cat.net, data, len, NULL, NULL)
                   : duplex_conn_write(cat.net, data, len, NULL, NULL);
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

/* -L: send every complete line of this chunk as one frame and keep the
 * unfinished tail for the next one. */
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
  if (cat.net == NULL)
    return; /* not reached: stdin is paused while no client is served */
  int rc = cat.lines ? send_lines(data, len) : send_chunk(data, len);
  if (rc != 0 && rc != DUPLEX_ECLOSED && rc != DUPLEX_ESHUTDOWN)
    fail("stdin", rc);
}

/* Stdin has ended (now, or before this client was served): half-close the
 * connection, or with --no-shutdown leave it open until the peer closes. */
static void
end_of_input(void)
{
  char what[1500];
  int rc = 0;
  if (cat.shut_on_eof) {
    if (cat.verbose > 1)
      say("end of input: shutting down the sending side (-N)");
    rc = duplex_conn_shutdown(cat.net, NULL, NULL);
  } else if (cat.peer_eof) {
    rc = duplex_conn_close(cat.net, DUPLEX_CLOSE_GRACEFUL);
  } else if (cat.verbose > 1) {
    say("end of input: the connection stays open until the peer closes "
        "(--no-shutdown)");
  }
  if (rc != 0 && rc != DUPLEX_ECLOSED && rc != DUPLEX_ESHUTDOWN)
    set_error(net_what(what, sizeof what), rc);
}

static atomic_int pump_err; /* set by the stdin pump before its EOF */

static void
io_eof(duplex_conn *io, void *user)
{
  int rc;
  cat.stdin_eof = true;
  if ((rc = atomic_load(&pump_err)) != 0) {
    fail("stdin", rc); /* the peer must not take a cut input for all */
    return;
  }
  if (cat.net == NULL)
    return;
  if (cat.lines && cat.line_len > 0) { /* a last line without '\n' */
    rc = send_chunk(cat.line, cat.line_len);
    cat.line_len = 0;
    if (rc != 0 && rc != DUPLEX_ECLOSED && rc != DUPLEX_ESHUTDOWN) {
      fail("stdin", rc);
      return;
    }
  }
  end_of_input();
}

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

/* A stdin that is not a stream: a plain thread copies it into a pipe whose
 * other end is adopted. It never touches the loop. Detached: at exit it may
 * be blocked writing into the pipe (until the pipe closes) or reading. */
static int pump_fds[2] = { -1, -1 };

static void *
pump_main(void *arg)
{
  static char buf[64 * 1024];
  sigset_t all;
  ssize_t n;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL); /* EPIPE, not SIGPIPE */
  for (;;) {
    n = read(0, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0 || write_all(pump_fds[1], buf, (size_t)n) != 0)
      break;
  }
  if (n < 0)
    atomic_store(&pump_err, -errno);
  close(pump_fds[1]); /* EOF for the loop */
  return arg;
}

static int
start_pump(void)
{
  pthread_t t;
  if (pipe(pump_fds) != 0)
    return -errno;
  if (pthread_create(&t, NULL, pump_main, NULL) != 0) {
    close(pump_fds[0]);
    close(pump_fds[1]);
    return DUPLEX_ENOMEM;
  }
  pthread_detach(t);
  return 0;
}

/* Adopt stdin and stdout as one conn; a stdout that is not a stream is
 * written with write(), a stdin that is not a stream goes through the
 * pump. */
static int
adopt_stdio(const duplex_conn_opts *opts)
{
  int rc = duplex_conn_adopt_pair(&cat.io, cat.loop, 0, 1, opts);
  cat.io_writes = rc == 0;
  if (rc != DUPLEX_ENOTSOCK)
    return rc;
  if ((rc = duplex_conn_adopt(&cat.io, cat.loop, 0, opts)) != DUPLEX_ENOTSOCK)
    return rc;
  if ((rc = start_pump()) != 0)
    return rc;
  rc = duplex_conn_adopt_pair(&cat.io, cat.loop, pump_fds[0], 1, opts);
  cat.io_writes = rc == 0;
  if (rc == DUPLEX_ENOTSOCK)
    rc = duplex_conn_adopt(&cat.io, cat.loop, pump_fds[0], opts);
  return rc;
}

/* ---- connection -> stdout ----------------------------------------------- */

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

/* The peer is done sending. With -k that ends this client (what was
 * queued for it is flushed first): stdin is shared by every client, so
 * waiting for its end would hold the next ones back. Otherwise stdout is
 * finished (an adopted pair closes fd 1 on shutdown), so a reader sees EOF
 * while we may still send; with --no-shutdown and stdin already over, both
 * sides are done. */
static void
net_eof(duplex_conn *net, void *user)
{
  cat.peer_eof = true;
  if (cat.keep) {
    cat.finishing = true; /* stdin read from now on is for the next one */
    if (cat.io != NULL)
      duplex_conn_pause(cat.io);
    duplex_conn_close(net, DUPLEX_CLOSE_GRACEFUL);
    return;
  }
  if (cat.io_writes)
    duplex_conn_shutdown(cat.io, NULL, NULL);
  if (!cat.shut_on_eof && cat.stdin_eof)
    duplex_conn_close(net, DUPLEX_CLOSE_GRACEFUL);
}

/* Backpressure, both ways: while a conn has too much queued, stop reading
 * the conn that feeds it. */
static void
on_full(duplex_conn *c, size_t queued, void *user)
{
  if (c == cat.io) {
    cat.io_full = true;
    if (cat.net != NULL)
      duplex_conn_pause(cat.net);
  } else if (c == cat.net && cat.io != NULL) {
    duplex_conn_pause(cat.io);
  }
}

static void
on_drained(duplex_conn *c, void *user)
{
  if (c == cat.io) {
    cat.io_full = false;
    if (cat.net != NULL && cat.net_open)
      duplex_conn_resume(cat.net);
  } else if (c == cat.net && cat.io != NULL && !cat.stdin_eof &&
             !cat.finishing) {
    duplex_conn_resume(cat.io);
  }
}

/* ---- connecting ------------------------------------------------------------- */

static int64_t
now_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* -4/-6 with a name: connect to its next address, with what is left of
 * the -w time. */
static int
connect_next(void)
{
  if (cat.deadline_ms != 0) {
    int64_t left = cat.deadline_ms - now_ms();
    if (left <= 0)
      return DUPLEX_ETIMEDOUT;
    cat.net_opts.connect_timeout_ms = (uint32_t)left;
  }
  return duplex_conn_connect_tcp(&cat.net, cat.loop,
                                 cat.addrs[cat.next_addr++], cat.port,
                                 &cat.net_opts);
}

/* Translate a getaddrinfo() error into the library's codes, so that every
 * message uses the same words. */
static int
gai_code(int e)
{
  switch (e) {
  case EAI_NONAME: return DUPLEX_EAI_NONAME;
  case EAI_AGAIN: return DUPLEX_EAI_AGAIN;
  case EAI_FAIL: return DUPLEX_EAI_FAIL;
  case EAI_FAMILY: return DUPLEX_EAI_FAMILY;
#if defined(EAI_ADDRFAMILY)
  case EAI_ADDRFAMILY: return DUPLEX_EAI_FAMILY;
#endif
#if defined(EAI_NODATA) && EAI_NODATA != EAI_NONAME
  case EAI_NODATA: return DUPLEX_EAI_NODATA;
#endif
  case EAI_MEMORY: return DUPLEX_ENOMEM;
  case EAI_SYSTEM: return errno != 0 ? -errno : DUPLEX_EAI_OTHER;
  default: return DUPLEX_EAI_OTHER;
  }
}

/* A name lookup on a thread of its own, so that -w can give up on a
 * resolver that does not answer: the thread is left behind then, and the
 * last of the two to finish frees the state. */
typedef struct lookup {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool done, abandoned;
  char *host;
  int family, status;
  struct addrinfo *res;
} lookup;

static void
lookup_free(lookup *lk)
{
  if (lk->res != NULL)
    freeaddrinfo(lk->res);
  pthread_cond_destroy(&lk->cv);
  pthread_mutex_destroy(&lk->mu);
  free(lk->host);
  free(lk);
}

static void *
lookup_main(void *arg)
{
  lookup *lk = arg;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = lk->family == FAMILY_6 ? AF_INET6 : AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  errno = 0;
  int e = getaddrinfo(lk->host, NULL, &hints, &res);
  int status = e == 0 ? 0 : gai_code(e);
  pthread_mutex_lock(&lk->mu);
  bool abandoned = lk->abandoned;
  lk->res = res;
  lk->status = status;
  lk->done = true;
  pthread_cond_signal(&lk->cv);
  pthread_mutex_unlock(&lk->mu);
  if (abandoned)
    lookup_free(lk);
  return NULL;
}

/* Main thread, before the loop runs: fill cat.addrs with the addresses of
 * cat.host in the family of -4/-6, waiting until cat.deadline_ms at most. */
static int
resolve(void)
{
  lookup *lk = calloc(1, sizeof *lk);
  pthread_condattr_t ca;
  pthread_t t;
  if (lk == NULL || (lk->host = strdup(cat.host)) == NULL) {
    free(lk);
    return DUPLEX_ENOMEM;
  }
  lk->family = cat.family;
  pthread_mutex_init(&lk->mu, NULL);
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&lk->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (pthread_create(&t, NULL, lookup_main, lk) != 0) {
    lookup_free(lk);
    return DUPLEX_ENOMEM;
  }
  pthread_detach(t);

  int rc = 0;
  struct timespec until;
  until.tv_sec = (time_t)(cat.deadline_ms / 1000);
  until.tv_nsec = (long)(cat.deadline_ms % 1000) * 1000000;
  pthread_mutex_lock(&lk->mu);
  while (!lk->done && rc == 0) {
    if (cat.deadline_ms == 0)
      pthread_cond_wait(&lk->cv, &lk->mu);
    else if (pthread_cond_timedwait(&lk->cv, &lk->mu, &until) == ETIMEDOUT &&
             !lk->done)
      rc = DUPLEX_ETIMEDOUT;
  }
  if (rc != 0) {
    lk->abandoned = true; /* the thread frees it */
    pthread_mutex_unlock(&lk->mu);
    return rc;
  }
  pthread_mutex_unlock(&lk->mu);

  rc = lk->status;
  for (struct addrinfo *ai = lk->res; rc == 0 && ai != NULL &&
                                      cat.n_addrs < MAX_ADDRS;
       ai = ai->ai_next) {
    const void *a = ai->ai_family == AF_INET6
        ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
        : (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
    if (inet_ntop(ai->ai_family, a, cat.addrs[cat.n_addrs],
                  sizeof cat.addrs[0]) != NULL)
      cat.n_addrs++;
  }
  if (rc == 0 && cat.n_addrs == 0)
    rc = DUPLEX_EAI_NODATA;
  lookup_free(lk);
  return rc;
}

/* ---- serving ------------------------------------------------------------------ */

/* -v: what the TLS handshake of @p net negotiated. */
static void
say_tls(duplex_conn *net)
{
  duplex_tls_info info;
  memset(&info, 0, sizeof info);
  info.size = sizeof info;
  if (!cat.tls || cat.verbose < 2 || duplex_conn_get_tls_info(net, &info) != 0)
    return;
  say("TLS: %s, %s%s%s%s%s%s%s%s", info.version_name, info.cipher,
      info.alpn[0] != '\0' ? ", ALPN " : "", info.alpn,
      info.peer_subject[0] != '\0' ? ", peer " : "", info.peer_subject,
      cat.listening && info.sni[0] != '\0' ? ", SNI " : "",
      cat.listening ? info.sni : "", info.resumed ? ", resumed" : "");
}

/* -l: start serving an accepted client (now, or after waiting with -k). */
static void
serve(duplex_conn *net)
{
  char peer[256];
  cat.net = net;
  cat.net_open = true;
  cat.net_closed = cat.peer_eof = cat.finishing = false;
  if (duplex_conn_get_peer(net, peer, sizeof peer) == 0 && peer[0] != '\0')
    snprintf(cat.peer, sizeof cat.peer, "from %s", peer);
  else
    snprintf(cat.peer, sizeof cat.peer, "on %s", cat.name);
  if (cat.verbose > 1)
    say("connection %s", cat.peer);
  say_tls(net);
  if (cat.accept_timer != NULL)
    duplex_timer_stop(cat.accept_timer);
  if (cat.idle_ms > 0) /* set now: a waiting client does not time out */
    duplex_conn_set_timeout(net, DUPLEX_TIMEOUT_IDLE, cat.idle_ms);
  if (!cat.io_full)
    duplex_conn_resume(net);
  if (cat.stdin_eof)
    end_of_input();
  else if (cat.io != NULL)
    duplex_conn_resume(cat.io);
}

static void
net_open(duplex_conn *net, void *user)
{
  char peer[256];
  if (!cat.listening) {
    cat.net_open = true;
    if (cat.verbose > 1 && duplex_conn_get_peer(net, peer, sizeof peer) == 0)
      say("connected to %s", peer[0] ? peer : cat.name);
    say_tls(net);
    duplex_conn_resume(cat.io);
    return;
  }
  if (!cat.keep) {
    if (cat.net != NULL) { /* -l serves one connection */
      duplex_conn_close(net, DUPLEX_CLOSE_ABORT);
      return;
    }
    close_listener();
  } else if (cat.net != NULL) { /* -k: serving one already */
    if (cat.n_waiting == MAX_WAITING) {
      duplex_conn_close(net, DUPLEX_CLOSE_ABORT);
      return;
    }
    duplex_conn_ref(net);
    cat.waiting[cat.n_waiting++] = net;
    return;
  }
  duplex_conn_ref(net);
  serve(net);
}

/* --tls -l: an accepted client failed its handshake: "connection from
 * 127.0.0.1:5000: TLS failed: ...: alert received: ...". */
static void
handshake_failed(duplex_conn *net, int reason)
{
  char peer[256], why[600];
  if (duplex_conn_get_peer(net, peer, sizeof peer) == 0 && peer[0] != '\0')
    snprintf(cat.peer, sizeof cat.peer, "from %s", peer);
  else
    snprintf(cat.peer, sizeof cat.peer, "on %s", cat.name);
  tls_reason(net, why, sizeof why);
  if (cat.keep) {
    if (cat.verbose > 0)
      say("connection %s: %s%s", cat.peer, duplex_strerror(reason), why);
    return;
  }
  if (cat.status == 0) {
    cat.status = 1;
    if (cat.verbose > 0)
      say("connection %s: %s%s", cat.peer, duplex_strerror(reason), why);
  }
  close_listener();
  if (cat.io != NULL)
    duplex_conn_close(cat.io, DUPLEX_CLOSE_GRACEFUL);
  maybe_stop();
}

static void
net_close(duplex_conn *net, int reason, void *user)
{
  if (cat.freeing)
    return; /* the teardown drops our references */
  if (net != cat.net) {
    /* -k: a waiting client left; or a second one refused by -l */
    for (size_t i = 0; i < cat.n_waiting; i++)
      if (cat.waiting[i] == net) {
        memmove(&cat.waiting[i], &cat.waiting[i + 1],
                (cat.n_waiting - i - 1) * sizeof *cat.waiting);
        cat.n_waiting--;
        duplex_conn_unref(net);
        return;
      }
    /* --tls -l: a client whose handshake failed (it never opened). It was
     * the one connection of -l: that is the error; -k reports it and
     * serves the next. */
    if (cat.listening && cat.tls && reason != 0 &&
        reason != DUPLEX_ECONNABORTED && (cat.keep || cat.net == NULL))
      handshake_failed(net, reason);
    return;
  }
  if (!cat.net_open && cat.next_addr < cat.n_addrs &&
      reason != DUPLEX_ECONNABORTED && reason != DUPLEX_ETLS &&
      reason != DUPLEX_ETLSVERIFY) {
    /* -4/-6: this address failed, try the next one (not after a TLS
     * failure: the server answered, and said no) */
    if (cat.verbose > 1)
      say("connect to %s (%s) port %u (tcp): %s", cat.host,
          cat.addrs[cat.next_addr - 1], (unsigned)cat.port,
          duplex_strerror(reason));
    duplex_conn_unref(net);
    cat.net = NULL;
    if ((reason = connect_next()) == 0)
      return;
  }
  if (reason != 0)
    net_error(net, reason);
  cat.net_closed = true;
  if (cat.keep) { /* serve the next client, or wait for one */
    duplex_conn_unref(net);
    cat.net = NULL;
    cat.net_open = false;
    if (cat.io != NULL && !cat.io_closed)
      duplex_conn_pause(cat.io);
    if (cat.n_waiting > 0) {
      duplex_conn *next = cat.waiting[0];
      memmove(&cat.waiting[0], &cat.waiting[1],
              --cat.n_waiting * sizeof *cat.waiting);
      serve(next);
    } else if (cat.accept_timer != NULL) {
      duplex_timer_start(cat.accept_timer, cat.wait_ms, 0);
    }
    return;
  }
  if (cat.io != NULL)
    duplex_conn_close(cat.io, DUPLEX_CLOSE_GRACEFUL); /* flush stdout */
  maybe_stop();
}

static void
io_close(duplex_conn *io, int reason, void *user)
{
  if (cat.freeing)
    return;
  cat.io_closed = true;
  if (reason != 0) /* a broken pipe can only be the output */
    fail(reason == DUPLEX_EPIPE && cat.io_writes ? "stdout" : "stdin/stdout",
         reason);
  else if (!cat.keep) /* stdin ended and stdout was finished */
    maybe_stop();
}

static void
accept_timeout(duplex_timer *timer, void *user)
{
  char what[1200];
  snprintf(what, sizeof what, "accept on %s", cat.name);
  fail(what, DUPLEX_ETIMEDOUT);
}

/* ---- command line ------------------------------------------------------- */

static const char synopsis[] =
  "usage: duplexcat [-46LNqv] [-i SEC] [-w SEC] HOST PORT\n"
  "       duplexcat [-46LNqv] [-i SEC] [-w SEC] HOST:PORT | [IPV6]:PORT\n"
  "       duplexcat [-LNqv] [-i SEC] [-w SEC] -U PATH | unix:PATH\n"
  "       duplexcat -l [-46kLNqv] [-i SEC] [-w SEC] [-p FILE] [HOST] PORT\n"
  "       duplexcat -l [-kLNqv] [-i SEC] [-w SEC] [-p FILE] -U PATH | "
  "unix:PATH\n"
  "       duplexcat --tls [--ca FILE | --insecure] [--tls-host NAME] "
  "[--alpn LIST]\n"
  "                 [--cert FILE --key FILE] [OPTIONS] ADDRESS\n"
  "       duplexcat -l --tls --cert FILE --key FILE [--ca FILE] "
  "[--alpn LIST]\n"
  "                 [OPTIONS] ADDRESS\n"
  "       duplexcat -h | --help | --version\n";

static void
help(void)
{
  fputs(synopsis, stdout);
  fputs(
    "\nCopy standard input to a TCP or UNIX-domain connection and the\n"
    "connection to standard output, both ways at once. PORT is a number or\n"
    "a service name (http).\n"
    "\n"
    "  -l, --listen          listen and serve one connection\n"
    "  -k, --keep-open       with -l: after a client leaves, serve the next\n"
    "  -U, --unix            the address is a UNIX socket PATH\n"
    "  -4, --ipv4            IPv4 addresses only\n"
    "  -6, --ipv6            IPv6 addresses only\n"
    "  -N, --shutdown        half-close the connection at the end of stdin\n"
    "                        (the default)\n"
    "      --no-shutdown     keep sending open at the end of stdin; end when\n"
    "                        the peer closes (what nc does without -N)\n"
    "  -L, --lines           line mode: each line is one message\n"
    "  -i, --idle-timeout SEC  give up after SEC seconds with no traffic\n"
    "                        (not nc's -i)\n"
    "  -w, --wait SEC        give up connecting (with -l: waiting for a\n"
    "                        client) after SEC seconds\n"
    "  -p, --address-file FILE  with -l: write the bound address to FILE\n"
    "                        (not nc's -p)\n"
    "  -q, --quiet           print no diagnostics (not nc's -q)\n"
    "  -v, --verbose         report addresses and connections on stderr\n"
    "      --tls             speak TLS (with -l: serve TLS, which needs\n"
    "                        --cert and --key)\n"
    "      --cert FILE       certificate chain, PEM: the server's with -l,\n"
    "                        else a client certificate for mutual TLS\n"
    "      --key FILE        the private key of --cert, PEM\n"
    "      --ca FILE         verify the peer with these CA certificates\n"
    "                        (PEM; default: the system's); with -l: require\n"
    "                        a client certificate they signed\n"
    "      --insecure        accept any server certificate (testing only)\n"
    "      --tls-host NAME   the server name to send (SNI) and verify\n"
    "                        (default: HOST)\n"
    "      --alpn LIST       ALPN protocols, comma-separated, preferred\n"
    "                        first\n"
    "  -h, --help            print this help and exit\n"
    "      --version         print the version and exit\n"
    "\n"
    "Exit status: 0 done, 1 connection or I/O error, 2 usage error;\n"
    "killed by SIGINT, SIGTERM or SIGHUP (128+N) after removing a UNIX\n"
    "socket it listens on. See duplexcat(1).\n", stdout);
}

static int
usage_error(const char *fmt, ...)
{
  if (fmt != NULL) {
    va_list ap;
    va_start(ap, fmt);
    fputs("duplexcat: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
  }
  fputs(synopsis, stderr);
  fputs("Try 'duplexcat --help' for more information.\n", stderr);
  return 2;
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

/* A port number, or a service name looked up in the services database. */
static int
parse_port(const char *s)
{
  char *end;
  if (*s == '\0')
    return usage_error("missing port");
  if (strspn(s, "0123456789") == strlen(s)) {
    long v = strtol(s, &end, 10);
    if (strlen(s) > 5 || v > 65535 || (v == 0 && !cat.listening))
      return usage_error("port out of range: %s", s);
    cat.port = (uint16_t)v;
    return 0;
  }
  struct servent *se = getservbyname(s, "tcp");
  if (se == NULL)
    return usage_error("unknown port or service name: %s (tcp)", s);
  cat.port = ntohs((uint16_t)se->s_port);
  return 0;
}

/* The positional arguments: HOST PORT, HOST:PORT, [V6]:PORT, unix:PATH,
 * PATH with -U, and PORT alone with -l. */
static int
parse_address(int n, char **args, bool unix_flag)
{
  char *host = NULL, *port = NULL;
  if (n < 1 || n > 2)
    return usage_error(n < 1 ? "missing address" : "too many arguments");
  if (unix_flag || strncmp(args[0], "unix:", 5) == 0) {
    cat.path = unix_flag ? args[0] : args[0] + 5;
    if (n != 1)
      return usage_error("a UNIX socket takes no port");
    if (*cat.path == '\0')
      return usage_error("missing socket path");
    if (cat.family != FAMILY_ANY)
      return usage_error("-4 and -6 do not apply to UNIX sockets");
    return 0;
  }
  if (n == 2) {
    host = args[0];
    port = args[1];
    size_t len = strlen(host);
    if (host[0] == '[' && len > 2 && host[len - 1] == ']') {
      host[len - 1] = '\0';
      host++;
    }
  } else if (args[0][0] == '[') {
    char *close = strchr(args[0], ']');
    if (close == NULL || close == args[0] + 1 || close[1] != ':')
      return usage_error("bad address: %s", args[0]);
    *close = '\0';
    host = args[0] + 1;
    port = close + 2;
  } else if ((port = strchr(args[0], ':')) != NULL) {
    if (strchr(port + 1, ':') != NULL)
      return usage_error("bad address: %s (write an IPv6 address as "
                         "[ADDR]:PORT or ADDR PORT)", args[0]);
    *port++ = '\0';
    host = args[0];
  } else if (cat.listening) {
    port = args[0];
  } else {
    return usage_error("missing port: duplexcat HOST PORT");
  }
  if (host != NULL && *host == '\0' && !cat.listening)
    return usage_error("missing host");
  cat.host = host != NULL && *host != '\0' ? host : NULL;
  if (cat.host != NULL && cat.family != FAMILY_ANY) {
    unsigned char buf[sizeof(struct in6_addr)];
    bool v4 = inet_pton(AF_INET, cat.host, buf) == 1;
    bool v6 = inet_pton(AF_INET6, cat.host, buf) == 1;
    if ((cat.family == FAMILY_4 && v6) || (cat.family == FAMILY_6 && v4))
      return usage_error("%s is not an IPv%c address (%s)", cat.host,
                         cat.family == FAMILY_4 ? '4' : '6',
                         cat.family == FAMILY_4 ? "-4" : "-6");
  }
  return parse_port(port);
}

/* -l: the host to hand to duplex_listener_tcp(), which takes a numeric
 * address, "localhost" or "" (every IPv4 address). Other names are looked
 * up here (before the loop runs); the first address is used. */
static int
listen_host(char *buf, size_t len, const char **out)
{
  unsigned char a[sizeof(struct in6_addr)];
  const char *h = cat.host;
  if (h == NULL) {
    *out = cat.family == FAMILY_6 ? "::" : "";
    return 0;
  }
  if (strcmp(h, "localhost") == 0 && cat.family != FAMILY_ANY) {
    *out = cat.family == FAMILY_6 ? "::1" : "127.0.0.1";
    return 0;
  }
  if (strcmp(h, "localhost") == 0 || inet_pton(AF_INET, h, a) == 1 ||
      inet_pton(AF_INET6, h, a) == 1) {
    *out = h;
    return 0;
  }
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = cat.family == FAMILY_4   ? AF_INET
                    : cat.family == FAMILY_6 ? AF_INET6
                                             : AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  errno = 0;
  int e = getaddrinfo(h, NULL, &hints, &res);
  if (e != 0)
    return gai_code(e);
  const void *ip = res->ai_family == AF_INET6
      ? (const void *)&((struct sockaddr_in6 *)res->ai_addr)->sin6_addr
      : (const void *)&((struct sockaddr_in *)res->ai_addr)->sin_addr;
  const char *s = inet_ntop(res->ai_family, ip, buf, (socklen_t)len);
  freeaddrinfo(res);
  if (s == NULL)
    return DUPLEX_EAI_OTHER;
  *out = buf;
  return 0;
}

/* "HOST port N (tcp)" from a bound address "1.2.3.4:N" or "[::1]:N". */
static void
name_from_bound(const char *bound)
{
  const char *colon = strrchr(bound, ':');
  if (colon == NULL)
    return;
  int hl = (int)(colon - bound);
  const char *h = bound;
  if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
    h++;
    hl -= 2;
  }
  snprintf(cat.name, sizeof cat.name, "%.*s port %s (tcp)", hl, h, colon + 1);
}

/* -l: listen, report where, start the -w timer. */
static int
start_listening(duplex_listener_opts *lopts, const char *addr_file)
{
  char bound[1100], numeric[INET6_ADDRSTRLEN];
  const char *h = NULL;
  int rc;
  if (cat.path != NULL) {
    block_cleanup_signals(SIG_BLOCK);
    rc = duplex_listener_unix(&cat.listener, cat.loop, cat.path, lopts);
    if (rc == 0)
      arm_socket_cleanup(cat.path);
    block_cleanup_signals(SIG_UNBLOCK);
  } else if ((rc = listen_host(numeric, sizeof numeric, &h)) == 0) {
    if (cat.family == FAMILY_6)
      lopts->flags |= DUPLEX_LISTEN_IPV6ONLY;
    rc = duplex_listener_tcp(&cat.listener, cat.loop, h, cat.port, lopts);
  }
  if (rc != 0) {
    char what[1200];
    snprintf(what, sizeof what, "listen on %s", cat.name);
    set_error(what, rc);
    return rc;
  }
  if ((rc = duplex_listener_get_address(cat.listener, bound, sizeof bound)) !=
      0) {
    set_error("listen", rc);
    return rc;
  }
  if (cat.path == NULL)
    name_from_bound(bound);
  if (cat.verbose > 1)
    say("listening on %s", bound);
  if (addr_file != NULL) {
    FILE *f = fopen(addr_file, "w");
    if (f == NULL || fprintf(f, "%s\n", bound) < 0 || fclose(f) != 0) {
      char what[1200];
      snprintf(what, sizeof what, "address file %s", addr_file);
      set_error(what, errno != 0 ? -errno : DUPLEX_EIO);
      return DUPLEX_EIO;
    }
  }
  if (cat.wait_ms > 0 &&
      ((rc = duplex_timer_new(&cat.accept_timer, cat.loop, accept_timeout,
                              NULL)) != 0 ||
       (rc = duplex_timer_start(cat.accept_timer, cat.wait_ms, 0)) != 0))
    set_error("timer", rc);
  return rc;
}

/* Connect: TCP by name through the library (which tries every address),
 * or with -4/-6 and a name, through our own lookup. */
static int
start_connecting(void)
{
  unsigned char a[sizeof(struct in6_addr)];
  char what[1200];
  int rc;
  snprintf(what, sizeof what, "connect to %s", cat.name);
  if (cat.path != NULL) {
    rc = duplex_conn_connect_unix(&cat.net, cat.loop, cat.path,
                                  &cat.net_opts);
  } else if (cat.family == FAMILY_ANY || inet_pton(AF_INET, cat.host, a) ||
             inet_pton(AF_INET6, cat.host, a)) {
    rc = duplex_conn_connect_tcp(&cat.net, cat.loop, cat.host, cat.port,
                                 &cat.net_opts);
  } else if ((rc = resolve()) == 0) {
    rc = connect_next();
  }
  if (rc != 0)
    set_error(what, rc);
  return rc;
}

/* The TLS options together: each needs --tls; a server needs its
 * certificate and key; --insecure and --tls-host are a client's. Splits
 * --alpn LIST into cat.alpn. */
static char *alpn_buf;

static int
check_tls_options(const char *alpn_arg)
{
  const char *opt = cat.cert != NULL       ? "--cert"
                    : cat.key != NULL      ? "--key"
                    : cat.ca != NULL       ? "--ca"
                    : cat.insecure         ? "--insecure"
                    : cat.tls_host != NULL ? "--tls-host"
                    : alpn_arg != NULL     ? "--alpn"
                                           : NULL;
  if (!cat.tls)
    return opt != NULL ? usage_error("%s needs --tls", opt) : 0;
  if ((cat.cert == NULL) != (cat.key == NULL))
    return usage_error("--cert and --key go together");
  if (cat.listening) {
    if (cat.cert == NULL)
      return usage_error("--tls with -l needs --cert FILE and --key FILE");
    if (cat.insecure)
      return usage_error("--insecure is for clients (with -l, clients are "
                         "verified only with --ca)");
    if (cat.tls_host != NULL)
      return usage_error("--tls-host is for clients");
  } else {
    if (cat.insecure && cat.ca != NULL)
      return usage_error("--insecure and --ca exclude each other");
    if (cat.path != NULL && cat.tls_host == NULL && !cat.insecure)
      return usage_error("--tls over a UNIX socket needs --tls-host NAME "
                         "(the name to verify) or --insecure");
  }
  if (alpn_arg == NULL)
    return 0;
  if ((alpn_buf = strdup(alpn_arg)) == NULL)
    return usage_error("out of memory");
  for (char *p = alpn_buf, *comma; p != NULL; p = comma) {
    if ((comma = strchr(p, ',')) != NULL)
      *comma++ = '\0';
    if (*p == '\0' || strlen(p) > 255 || cat.n_alpn == MAX_ALPN)
      return usage_error("bad --alpn list: %s (names of 1 to 255 bytes, "
                         "at most %d, separated by commas)", alpn_arg,
                         MAX_ALPN);
    cat.alpn[cat.n_alpn++] = p;
  }
  return 0;
}

/* --tls: the configuration every connection uses (files are read here,
 * before the loop runs). */
static int
make_tls(void)
{
  duplex_tls_config cfg;
  char err[512] = "";
  memset(&cfg, 0, sizeof cfg); /* zero: every field's default */
  cfg.size = sizeof cfg;
  cfg.role = cat.listening ? DUPLEX_TLS_SERVER : DUPLEX_TLS_CLIENT;
  cfg.cert_file = cat.cert;
  cfg.key_file = cat.key;
  cfg.ca_file = cat.ca;
  if (cat.listening)
    cfg.verify = cat.ca != NULL ? DUPLEX_TLS_VERIFY_REQUIRE
                                : DUPLEX_TLS_VERIFY_DEFAULT;
  else
    cfg.verify = cat.insecure ? DUPLEX_TLS_VERIFY_NONE
                              : DUPLEX_TLS_VERIFY_DEFAULT;
  cfg.alpn = (const char *const *)cat.alpn;
  cfg.alpn_count = cat.n_alpn;
  int rc = duplex_tls_new(&cat.tls_cfg, &cfg, err, sizeof err);
  if (rc != 0) {
    cat.status = 1;
    if (cat.verbose > 0 && rc == DUPLEX_ENOTSUP)
      say("--tls: this libduplex was built without TLS");
    else if (cat.verbose > 0)
      say("TLS configuration: %s%s%s", duplex_strerror(rc),
          err[0] != '\0' ? ": " : "", err);
  } else if (cat.verbose > 1) {
    say("TLS: %s", duplex_tls_backend());
  }
  return rc;
}

/* A closed stdin, stdout or stderr would be reused by the next descriptor
 * opened (the loop's own), and then adopted or written to: park /dev/null
 * there instead (no input, output discarded). */
static void
reserve_std_fds(void)
{
  for (int fd = 0; fd <= 2; fd++)
    if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
      int n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
      if (n >= 0 && n != fd) { /* not the lowest free number: give up */
        close(n);
        break;
      }
    }
}

int
main(int argc, char **argv)
{
  static const struct option longopts[] = {
    { "listen", no_argument, NULL, 'l' },
    { "keep-open", no_argument, NULL, 'k' },
    { "unix", no_argument, NULL, 'U' },
    { "ipv4", no_argument, NULL, '4' },
    { "ipv6", no_argument, NULL, '6' },
    { "shutdown", no_argument, NULL, 'N' },
    { "no-shutdown", no_argument, NULL, 'n' + 256 },
    { "lines", no_argument, NULL, 'L' },
    { "idle-timeout", required_argument, NULL, 'i' },
    { "wait", required_argument, NULL, 'w' },
    { "address-file", required_argument, NULL, 'p' },
    { "quiet", no_argument, NULL, 'q' },
    { "verbose", no_argument, NULL, 'v' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' + 256 },
    { "tls", no_argument, NULL, 'T' + 256 },
    { "cert", required_argument, NULL, 'c' + 256 },
    { "key", required_argument, NULL, 'K' + 256 },
    { "ca", required_argument, NULL, 'C' + 256 },
    { "insecure", no_argument, NULL, 'I' + 256 },
    { "tls-host", required_argument, NULL, 'H' + 256 },
    { "alpn", required_argument, NULL, 'A' + 256 },
    { NULL, 0, NULL, 0 },
  };
  const char *addr_file = NULL, *alpn_arg = NULL;
  bool unix_flag = false;
  int c, rc;

  reserve_std_fds();
  cat.verbose = 1;
  cat.shut_on_eof = true;
  opterr = 0; /* our own messages, without argv[0]'s directory */
  while ((c = getopt_long(argc, argv, ":46hkLlNqUvi:p:w:", longopts,
                          NULL)) != -1) {
    switch (c) {
    case '4':
    case '6':
      if (cat.family != FAMILY_ANY && cat.family != (c == '4' ? FAMILY_4
                                                              : FAMILY_6))
        return usage_error("-4 and -6 exclude each other");
      cat.family = c == '4' ? FAMILY_4 : FAMILY_6;
      break;
    case 'k': cat.keep = true; break;
    case 'l': cat.listening = true; break;
    case 'L': cat.lines = true; break;
    case 'N': cat.shut_on_eof = true; break;
    case 'n' + 256: cat.shut_on_eof = false; break;
    case 'q': cat.verbose = 0; break;
    case 'U': unix_flag = true; break;
    case 'v': cat.verbose = 2; break;
    case 'p': addr_file = optarg; break;
    case 'i':
      if (!parse_seconds(optarg, &cat.idle_ms))
        return usage_error("bad number of seconds for -i: %s", optarg);
      break;
    case 'w':
      if (!parse_seconds(optarg, &cat.wait_ms))
        return usage_error("bad number of seconds for -w: %s", optarg);
      break;
    case 'h': help(); return 0;
    case 'V' + 256:
      printf("duplexcat %s (libduplex %s)\n", DUPLEX_VERSION_STRING,
             duplex_version_string());
      return 0;
    case 'T' + 256: cat.tls = true; break;
    case 'c' + 256: cat.cert = optarg; break;
    case 'K' + 256: cat.key = optarg; break;
    case 'C' + 256: cat.ca = optarg; break;
    case 'I' + 256: cat.insecure = true; break;
    case 'H' + 256: cat.tls_host = optarg; break;
    case 'A' + 256: alpn_arg = optarg; break;
    case ':':
      return usage_error("option %s needs a value", argv[optind - 1]);
    default:
      if (optopt != 0 && optopt < 256)
        return usage_error("unknown option -%c", optopt);
      return usage_error("unknown option %s", argv[optind - 1]);
    }
  }
  if (optind == argc && cat.listening && addr_file != NULL)
    return usage_error("missing address (-p names an address file here, "
                       "not nc's port: write duplexcat -l PORT)");
  if ((rc = parse_address(argc - optind, argv + optind, unix_flag)) != 0)
    return rc;
  if (addr_file != NULL && !cat.listening)
    return usage_error("-p (address file) needs -l");
  if (cat.keep && !cat.listening)
    return usage_error("-k needs -l");
  if ((rc = check_tls_options(alpn_arg)) != 0)
    return rc;
  if (cat.path != NULL)
    snprintf(cat.name, sizeof cat.name, "%s (unix)", cat.path);
  else
    snprintf(cat.name, sizeof cat.name, "%s port %u (tcp)",
             cat.host != NULL ? cat.host
             : cat.family == FAMILY_6 ? "::" : "0.0.0.0",
             (unsigned)cat.port);
  if (cat.wait_ms > 0)
    cat.deadline_ms = now_ms() + cat.wait_ms;

  if (cat.tls && make_tls() != 0) {
    free(alpn_buf);
    return 1;
  }
  if ((rc = duplex_loop_new(&cat.loop, NULL)) != 0) {
    set_error("loop", rc);
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
  if (cat.listening) {
    /* Accepted clients read once served; their idle time counts from
     * then (serve()). A TLS client's handshake runs all the same: on_open
     * comes after it. */
    net_opts.flags = DUPLEX_CONN_START_PAUSED;
  } else {
    net_opts.idle_timeout_ms = cat.idle_ms;
    net_opts.connect_timeout_ms = cat.wait_ms;
    /* The name to verify: the host as given, also when -4/-6 connect to
     * the addresses we looked up ourselves. */
    if (cat.tls) {
      net_opts.tls = cat.tls_cfg;
      net_opts.tls_host = cat.tls_host != NULL ? cat.tls_host : cat.host;
    }
  }
  cat.net_opts = net_opts;

  if ((rc = adopt_stdio(&io_opts)) != 0) {
    set_error("stdin/stdout", rc);
  } else if (cat.listening) {
    duplex_listener_opts lopts = DUPLEX_LISTENER_OPTS_INIT;
    lopts.conn_opts = &cat.net_opts;
    lopts.tls = cat.tls_cfg;
    start_listening(&lopts, addr_file);
  } else {
    start_connecting();
  }
  if (cat.status == 0)
    duplex_loop_run(cat.loop, DUPLEX_RUN_DEFAULT);

  cat.freeing = true; /* whatever is still open closes quietly */
  duplex_loop_free(cat.loop); /* closes the listener: the file goes */
  sock_armed = 0;
  if (cat.listener != NULL)
    duplex_listener_unref(cat.listener);
  if (cat.accept_timer != NULL)
    duplex_timer_unref(cat.accept_timer);
  if (cat.net != NULL)
    duplex_conn_unref(cat.net);
  for (size_t i = 0; i < cat.n_waiting; i++)
    duplex_conn_unref(cat.waiting[i]);
  if (cat.io != NULL)
    duplex_conn_unref(cat.io);
  if (cat.tls_cfg != NULL)
    duplex_tls_unref(cat.tls_cfg);
  free(alpn_buf);
  free(cat.line);
  return cat.status;
}
