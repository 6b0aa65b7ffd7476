/* loadgen_tls: the TLS benchmark load generator (OpenSSL 3, epoll, C,
 * Linux only). The same program drives every server of the TLS matrix;
 * with --plain it speaks plaintext through the same code, for the cost of
 * TLS.
 *
 *   loadgen_tls pingpong --port P --conns C --size S [--secs T] [--warmup W]
 *                        [--threads K] [--pid PID]
 *       C connections (handshakes done before the clock starts), each sends
 *       an S-byte message, waits for all S bytes to come back (compared
 *       byte for byte with what was sent) and sends the next. msg/s,
 *       p50/p99 round trip, server CPU per message.
 *   loadgen_tls stream --port P [--secs T] [--warmup W] [--block B]
 *                      [--window N] [--pid PID]
 *       One connection streaming both ways: B-byte writes (default 16384,
 *       one full TLS record each) of a period-251 pattern while fewer than
 *       N bytes (default 1 MiB) are unechoed; every echoed byte is checked.
 *       MB/s echoed (each byte crosses the server once each way), server CPU
 *       per KB.
 *   loadgen_tls handshake --port P [--conns K] [--resume] [--secs T]
 *                         [--warmup W] [--pid PID]
 *       K slots, each in turn: connect, handshake, one 32-byte echo
 *       (checked), close; then the next. With --resume every connection
 *       offers the TLS 1.3 ticket its slot's previous connection received
 *       (each ticket used once); the fraction actually resumed is reported.
 *       Handshakes/s, server CPU per handshake.
 *   loadgen_tls idle --port P --conns N --pid PID
 *       Opens N connections and completes their handshakes, waits until the
 *       server's CPU time stops moving, reads its RSS (before and after),
 *       then echoes 64 bytes once on each and reads it again. Bytes/conn.
 *
 * TLS: version 1.3 only, cipher suite --cipher (default
 * TLS_AES_128_GCM_SHA256: offered alone, so every server negotiates the
 * same one), key exchange X25519, SNI "localhost". The server's
 * certificate is pinned: --cert FILE must hold the very certificate the
 * server presents (compared with X509_cmp; the chain is not built, which
 * keeps the client's cost per handshake low). Every connection is closed
 * with RST (SO_LINGER 0), no close_notify, so repeated runs leave no
 * TIME_WAIT.
 *
 * Output: one JSON object on stdout. Exit status: 0 ok, 1 usage, 2
 * connection, TLS or system error, 3 bytes mismatch.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#define PAT 251 /* pattern period: a prime, so shifted copies differ */
#define MAXSIZE (1 << 20)
#define HS_WINDOW 64 /* handshakes in progress at once while setting up */

static struct {
  const char *mode;
  int port;
  int conns;
  int size;
  double secs;
  double warmup;
  int threads;
  int pid;
  int block;
  int window;
  bool resume;
  bool plain;
  const char *cert;
  const char *cipher;
} opt = { NULL, 0, 1, 64, 2.0, 0.5, 1, 0, 16384, 1 << 20, false, false, NULL,
          "TLS_AES_128_GCM_SHA256" };

static unsigned char *tbl; /* tbl[i] = i % PAT, PAT + MAXSIZE bytes */
static SSL_CTX *ctx;
static X509 *pinned;

static void __attribute__((noreturn, format(printf, 2, 3)))
die(int code, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "loadgen_tls %s: ", opt.mode ? opt.mode : "");
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(code);
}

static double
now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t
now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
sleep_until(double t)
{
  double d;
  while ((d = t - now()) > 0) {
    struct timespec ts = { (time_t)d, (long)((d - (double)(time_t)d) * 1e9) };
    nanosleep(&ts, NULL);
  }
}

/* ---- the server process ------------------------------------------------ */

/* The user-space part of the last server_cpu() reading, in seconds. */
static double server_user_last;

/* utime + stime of the whole process, in seconds (-1 without --pid). */
static double
server_cpu(void)
{
  if (opt.pid <= 0)
    return -1;
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", opt.pid);
  FILE *f = fopen(path, "r");
  if (f == NULL)
    die(2, "server %d is gone (%s)", opt.pid, strerror(errno));
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  char *p = strrchr(buf, ')'); /* comm may contain spaces */
  if (p == NULL)
    return -1;
  unsigned long long ut = 0, st = 0;
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
             &ut, &st) != 2)
    return -1;
  server_user_last = (double)ut / (double)sysconf(_SC_CLK_TCK);
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* This process's own CPU time (all threads), in seconds: the load
 * generator's cost, to tell a client-bound run. */
static double
self_cpu(void)
{
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
         (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

/* VmRSS in bytes. */
static long
server_rss(void)
{
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", opt.pid);
  FILE *f = fopen(path, "r");
  if (f == NULL)
    die(2, "server %d is gone", opt.pid);
  long kb = -1;
  while (fgets(line, sizeof line, f) != NULL)
    if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
      break;
  fclose(f);
  return kb * 1024;
}

static int
server_fds(void)
{
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/fd", opt.pid);
  DIR *d = opendir(path);
  if (d == NULL)
    die(2, "server %d is gone", opt.pid);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return n;
}

/* ---- TLS setup --------------------------------------------------------- */

/* Instead of building and verifying a chain: the server's certificate must
 * be the pinned one. */
static int
verify_pinned(X509_STORE_CTX *x, void *arg)
{
  (void)arg;
  X509 *peer = X509_STORE_CTX_get0_cert(x);
  if (peer != NULL && X509_cmp(peer, pinned) == 0)
    return 1;
  X509_STORE_CTX_set_error(x, X509_V_ERR_CERT_REJECTED);
  return 0;
}

typedef struct tconn tconn;
static int conn_ex_index = -1;
static void keep_session(tconn *c, SSL_SESSION *s);

/* Every ticket the server sends: the slot keeps the newest. */
static int
on_new_session(SSL *ssl, SSL_SESSION *s)
{
  tconn *c = SSL_get_ex_data(ssl, conn_ex_index);
  if (c == NULL)
    return 0;
  keep_session(c, s);
  return 1; /* we own the reference now */
}

static void
tls_init(void)
{
  if (opt.plain)
    return;
  if (opt.cert == NULL)
    die(1, "--cert FILE (the server's certificate) or --plain");
  FILE *f = fopen(opt.cert, "r");
  if (f == NULL)
    die(2, "%s: %s", opt.cert, strerror(errno));
  pinned = PEM_read_X509(f, NULL, NULL, NULL);
  fclose(f);
  if (pinned == NULL)
    die(2, "%s: no PEM certificate", opt.cert);
  ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == NULL ||
      !SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
      !SSL_CTX_set_ciphersuites(ctx, opt.cipher) ||
      !SSL_CTX_set1_groups_list(ctx, "X25519"))
    die(2, "TLS client setup failed (cipher %s?)", opt.cipher);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  SSL_CTX_set_cert_verify_callback(ctx, verify_pinned, NULL);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                            SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                            SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_read_ahead(ctx, 1); /* one recv per burst, not two per record */
  if (opt.resume) {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT |
                                            SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  }
  conn_ex_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

/* The last OpenSSL error (or errno) as text; empties the error queue. */
static void
tls_why(char *buf, size_t len, int sslerr)
{
  unsigned long e = ERR_get_error();
  if (e != 0) {
    ERR_error_string_n(e, buf, len);
    ERR_clear_error();
  } else if (sslerr == SSL_ERROR_SYSCALL) {
    snprintf(buf, len, "transport: %s",
             errno ? strerror(errno) : "closed by the server");
  } else if (sslerr == SSL_ERROR_ZERO_RETURN) {
    snprintf(buf, len, "close_notify from the server");
  } else {
    snprintf(buf, len, "SSL error %d", sslerr);
  }
}

/* ---- connections ------------------------------------------------------- */

struct tconn {
  int fd;
  SSL *ssl; /* NULL with --plain */
  unsigned id;
  uint32_t events; /* the epoll interest now registered (0: not added) */
  uint32_t want;   /* what the last call would block on */
  bool hs_done;
  SSL_SESSION *sess; /* handshake --resume: the ticket for the next conn */
  /* ping-pong / echo state */
  uint64_t seq;
  const unsigned char *msg;
  int sent, got;
  uint64_t t_send;
  char err[200];
};

static void
keep_session(tconn *c, SSL_SESSION *s)
{
  if (c->sess != NULL)
    SSL_SESSION_free(c->sess);
  c->sess = s;
}

static void
raise_nofile(int need)
{
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  if (rl.rlim_cur >= (rlim_t)need)
    return;
  rl.rlim_cur = rl.rlim_max;
  if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < (rlim_t)need) {
    rl.rlim_max = (rlim_t)need;
    rl.rlim_cur = (rlim_t)need;
  }
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
    die(2, "need %d fds: raise RLIMIT_NOFILE (ulimit -n)", need);
}

/* A blocking connect; the socket is then made non-blocking. */
static int
connect_fd(void)
{
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)opt.port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (int attempt = 0;; attempt++) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
      die(2, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      struct linger l = { 1, 0 }; /* close with RST */
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
      return fd;
    }
    int e = errno;
    close(fd);
    if ((e == ECONNREFUSED || e == EAGAIN || e == EADDRNOTAVAIL) &&
        attempt < 100) {
      usleep(20000);
      continue;
    }
    die(2, "connect to port %d: %s", opt.port, strerror(e));
  }
}

/* Connect @p c (and, with TLS, make its SSL in the client state). */
static void
conn_open(tconn *c)
{
  c->fd = connect_fd();
  c->events = 0;
  c->want = EPOLLIN;
  c->hs_done = opt.plain;
  c->ssl = NULL;
  if (opt.plain)
    return;
  c->ssl = SSL_new(ctx);
  if (c->ssl == NULL)
    die(2, "SSL_new failed");
  SSL_set_fd(c->ssl, c->fd);
  SSL_set_tlsext_host_name(c->ssl, "localhost");
  SSL_set_ex_data(c->ssl, conn_ex_index, c);
  if (opt.resume && c->sess != NULL) {
    SSL_set_session(c->ssl, c->sess); /* takes its own reference */
    keep_session(c, NULL);            /* each ticket used once */
  }
  SSL_set_connect_state(c->ssl);
}

/* Close with RST and no close_notify. The session is flagged as shut down
 * so that OpenSSL does not mark the tickets it delivered unresumable. */
static void
conn_close(tconn *c)
{
  if (c->ssl != NULL) {
    SSL_set_shutdown(c->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    SSL_free(c->ssl);
    c->ssl = NULL;
  }
  if (c->fd >= 0)
    close(c->fd); /* also leaves any epoll set */
  c->fd = -1;
  c->events = 0;
}

/* Register in @p ep for what the conn waits on: always input, and output
 * when @p out. */
static void
conn_arm(int ep, tconn *c, bool out)
{
  uint32_t want = EPOLLIN | (out ? EPOLLOUT : 0);
  if (c->events == want)
    return;
  struct epoll_event ev = { want, { .ptr = c } };
  if (epoll_ctl(ep, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) != 0)
    die(2, "epoll_ctl: %s", strerror(errno));
  c->events = want;
}

/* One handshake step: 1 done, 0 would block (c->want says on what),
 * -1 failed (c->err says why). */
static int
conn_handshake(tconn *c)
{
  if (c->hs_done)
    return 1;
  ERR_clear_error();
  int r = SSL_do_handshake(c->ssl);
  if (r == 1) {
    c->hs_done = true;
    return 1;
  }
  int e = SSL_get_error(c->ssl, r);
  if (e == SSL_ERROR_WANT_READ) {
    c->want = EPOLLIN;
    return 0;
  }
  if (e == SSL_ERROR_WANT_WRITE) {
    c->want = EPOLLOUT;
    return 0;
  }
  char why[160];
  tls_why(why, sizeof why, e);
  snprintf(c->err, sizeof c->err, "handshake: %s", why);
  return -1;
}

/* Read: > 0 bytes, 0 would block (c->want), -1 failed or closed (c->err). */
static ssize_t
conn_read(tconn *c, void *buf, size_t len)
{
  if (c->ssl == NULL) {
    ssize_t r = recv(c->fd, buf, len, 0);
    if (r > 0)
      return r;
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
      c->want = EPOLLIN;
      return 0;
    }
    snprintf(c->err, sizeof c->err, "%s",
             r == 0 ? "closed by the server" : strerror(errno));
    return -1;
  }
  size_t n = 0;
  ERR_clear_error();
  int r = SSL_read_ex(c->ssl, buf, len, &n);
  if (r == 1)
    return (ssize_t)n;
  int e = SSL_get_error(c->ssl, r);
  if (e == SSL_ERROR_WANT_READ) {
    c->want = EPOLLIN;
    return 0;
  }
  if (e == SSL_ERROR_WANT_WRITE) {
    c->want = EPOLLOUT;
    return 0;
  }
  tls_why(c->err, sizeof c->err, e);
  return -1;
}

/* Write: > 0 bytes taken, 0 would block (c->want), -1 failed (c->err). */
static ssize_t
conn_write(tconn *c, const void *buf, size_t len)
{
  if (c->ssl == NULL) {
    ssize_t w = send(c->fd, buf, len, MSG_NOSIGNAL);
    if (w >= 0)
      return w;
    if (errno == EAGAIN || errno == EINTR) {
      c->want = EPOLLOUT;
      return 0;
    }
    snprintf(c->err, sizeof c->err, "send: %s", strerror(errno));
    return -1;
  }
  size_t n = 0;
  ERR_clear_error();
  int r = SSL_write_ex(c->ssl, buf, len, &n);
  if (r == 1)
    return (ssize_t)n;
  int e = SSL_get_error(c->ssl, r);
  if (e == SSL_ERROR_WANT_WRITE) {
    c->want = EPOLLOUT;
    return 0;
  }
  if (e == SSL_ERROR_WANT_READ) {
    c->want = EPOLLIN;
    return 0;
  }
  tls_why(c->err, sizeof c->err, e);
  return -1;
}

/* Connect @p n conns and complete their handshakes, at most HS_WINDOW in
 * progress at once (which also keeps the server's accept queue short).
 * With --plain, the plain loadgen's rule: at most 128 waiting to be
 * accepted (needs --pid). Returns the seconds it took. */
static double
open_all(tconn *cs, int n)
{
  double t0 = now();
  if (opt.plain) {
    int base = opt.pid > 0 ? server_fds() : 0;
    for (int i = 0; i < n; i++) {
      if (opt.pid > 0 && i % 64 == 0 && i > 0) {
        double deadline = now() + 20;
        while (server_fds() < base + i - 128) {
          if (now() > deadline)
            die(2, "server accepted only %d of %d connections",
                server_fds() - base, i);
          usleep(500);
        }
      }
      conn_open(&cs[i]);
    }
    return now() - t0;
  }
  int ep = epoll_create1(EPOLL_CLOEXEC);
  int next = 0, busy = 0, done = 0;
  struct epoll_event evs[256];
  double deadline = now() + 60;
  while (done < n) {
    while (busy < HS_WINDOW && next < n) {
      tconn *c = &cs[next++];
      conn_open(c);
      int r = conn_handshake(c);
      if (r < 0)
        die(2, "conn %u: %s", c->id, c->err);
      if (r == 1) {
        done++;
        continue;
      }
      conn_arm(ep, c, c->want == EPOLLOUT);
      busy++;
    }
    if (now() > deadline)
      die(2, "%d of %d handshakes done in 60 s", done, n);
    int k = epoll_wait(ep, evs, 256, 100);
    for (int j = 0; j < k; j++) {
      tconn *c = evs[j].data.ptr;
      int r = conn_handshake(c);
      if (r < 0)
        die(2, "conn %u: %s", c->id, c->err);
      if (r == 1) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        c->events = 0;
        busy--;
        done++;
      } else {
        conn_arm(ep, c, c->want == EPOLLOUT);
      }
    }
  }
  close(ep);
  return now() - t0;
}

/* What the first TLS conn negotiated, as JSON fields (or ""). */
static void
print_tls_fields(const tconn *c)
{
  if (c->ssl == NULL) {
    printf(",\"tls\":false");
    return;
  }
  printf(",\"tls\":true,\"tls_version\":\"%s\",\"cipher\":\"%s\"",
         SSL_get_version(c->ssl), SSL_get_cipher_name(c->ssl));
}

/* ---- ping-pong --------------------------------------------------------- */

/* Round-trip histogram, log-linear: 32 sub-buckets per power of two of
 * nanoseconds (under 3% error), from 1 ns to 2^40 ns. */
#define HIST_SUB 32
#define HIST_N (41 * HIST_SUB)

static int
hist_bucket(uint64_t ns)
{
  if (ns < HIST_SUB)
    return (int)ns;
  int e = 63 - __builtin_clzll(ns);
  int sub = (int)((ns >> (e - 5)) & (HIST_SUB - 1));
  int b = (e - 4) * HIST_SUB + sub;
  return b < HIST_N ? b : HIST_N - 1;
}

static double
hist_value(int b)
{
  if (b < HIST_SUB)
    return b;
  int e = b / HIST_SUB + 4, sub = b % HIST_SUB;
  double lo = ldexp(1.0 + sub / (double)HIST_SUB, e);
  return lo + ldexp(0.5 / HIST_SUB, e);
}

static double
hist_pct(const uint32_t *h, uint64_t total, double p)
{
  uint64_t want = (uint64_t)((double)total * p), acc = 0;
  if (want >= total)
    want = total - 1;
  for (int i = 0; i < HIST_N; i++) {
    acc += h[i];
    if (acc > want)
      return hist_value(i) / 1000.0; /* us */
  }
  return hist_value(HIST_N - 1) / 1000.0;
}

typedef struct pp_thread {
  pthread_t th;
  tconn *c;
  int n;
  double t0, t1;
  uint64_t msgs;
  uint32_t *hist;
  uint64_t rtt_max;
  unsigned char *rbuf;
  int err;
  char errmsg[240];
} pp_thread;

static void
pp_start_msg(tconn *c)
{
  c->msg = tbl + (c->seq * 7 + c->id) % PAT;
  c->sent = 0;
  c->got = 0;
  c->t_send = now_ns();
}

/* Write what is left of the current message; false on error. */
static bool
pp_send(pp_thread *t, int ep, tconn *c)
{
  while (c->sent < opt.size) {
    ssize_t w = conn_write(c, c->msg + c->sent, (size_t)(opt.size - c->sent));
    if (w < 0) {
      snprintf(t->errmsg, sizeof t->errmsg, "conn %u: send: %s", c->id,
               c->err);
      t->err = 2;
      return false;
    }
    if (w == 0) {
      conn_arm(ep, c, c->want == EPOLLOUT);
      return true;
    }
    c->sent += (int)w;
  }
  conn_arm(ep, c, false);
  return true;
}

static void *
pp_run(void *arg)
{
  pp_thread *t = arg;
  int ep = epoll_create1(EPOLL_CLOEXEC);
  for (int i = 0; i < t->n; i++) {
    pp_start_msg(&t->c[i]);
    if (!pp_send(t, ep, &t->c[i]))
      goto out;
  }
  struct epoll_event evs[256];
  double tnow = now();
  while (tnow < t->t1) {
    int k = epoll_wait(ep, evs, 256, 100);
    if (k < 0 && errno != EINTR) {
      snprintf(t->errmsg, sizeof t->errmsg, "epoll: %s", strerror(errno));
      t->err = 2;
      goto out;
    }
    uint64_t tns = now_ns();
    tnow = now();
    bool measuring = tnow >= t->t0 && tnow < t->t1;
    for (int j = 0; j < k; j++) {
      tconn *c = evs[j].data.ptr;
      if (c->sent < opt.size) {
        if (!pp_send(t, ep, c))
          goto out;
        if (c->sent < opt.size)
          continue;
      }
      /* Read until the whole echo is in or nothing more is ready (OpenSSL
       * may hold read-ahead bytes: loop until it says it wants more). */
      while (c->got < opt.size) {
        ssize_t r = conn_read(c, t->rbuf, (size_t)(opt.size - c->got));
        if (r == 0)
          break;
        if (r < 0) {
          snprintf(t->errmsg, sizeof t->errmsg, "conn %u: %s", c->id, c->err);
          t->err = 2;
          goto out;
        }
        if (memcmp(t->rbuf, c->msg + c->got, (size_t)r) != 0) {
          snprintf(t->errmsg, sizeof t->errmsg,
                   "conn %u msg %llu: echoed bytes %d..%d differ", c->id,
                   (unsigned long long)c->seq, c->got, c->got + (int)r);
          t->err = 3;
          goto out;
        }
        c->got += (int)r;
      }
      if (c->got < opt.size)
        continue;
      if (measuring) {
        uint64_t rtt = tns - c->t_send;
        t->hist[hist_bucket(rtt)]++;
        if (rtt > t->rtt_max)
          t->rtt_max = rtt;
        t->msgs++;
      }
      c->seq++;
      pp_start_msg(c);
      if (!pp_send(t, ep, c))
        goto out;
    }
  }
out:
  close(ep);
  return NULL;
}

static int
run_pingpong(void)
{
  if (opt.size < 1 || opt.size > MAXSIZE - PAT)
    die(1, "--size out of range");
  if (opt.threads < 1)
    opt.threads = 1;
  if (opt.threads > opt.conns)
    opt.threads = opt.conns;
  raise_nofile(opt.conns + 64);
  tconn *cs = calloc((size_t)opt.conns, sizeof *cs);
  for (int i = 0; i < opt.conns; i++)
    cs[i].id = (unsigned)i;
  double hs_s = open_all(cs, opt.conns);
  pp_thread *ts = calloc((size_t)opt.threads, sizeof *ts);
  double start = now();
  double t0 = start + opt.warmup, t1 = t0 + opt.secs;
  int per = opt.conns / opt.threads, extra = opt.conns % opt.threads, off = 0;
  for (int i = 0; i < opt.threads; i++) {
    ts[i].c = cs + off;
    ts[i].n = per + (i < extra);
    off += ts[i].n;
    ts[i].t0 = t0;
    ts[i].t1 = t1;
    ts[i].hist = calloc(HIST_N, sizeof(uint32_t));
    ts[i].rbuf = malloc((size_t)opt.size);
    pthread_create(&ts[i].th, NULL, pp_run, &ts[i]);
  }
  sleep_until(t0);
  double cpu0 = server_cpu(), u0 = server_user_last, me0 = self_cpu();
  double w0 = now();
  sleep_until(t1);
  double cpu1 = server_cpu(), u1 = server_user_last, me1 = self_cpu();
  double w1 = now();
  uint64_t msgs = 0, rmax = 0;
  uint32_t *h = calloc(HIST_N, sizeof(uint32_t));
  int err = 0;
  for (int i = 0; i < opt.threads; i++) {
    pthread_join(ts[i].th, NULL);
    if (ts[i].err) {
      fprintf(stderr, "loadgen_tls pingpong: %s\n", ts[i].errmsg);
      err = err ? err : ts[i].err;
    }
    msgs += ts[i].msgs;
    if (ts[i].rtt_max > rmax)
      rmax = ts[i].rtt_max;
    for (int j = 0; j < HIST_N; j++)
      h[j] += ts[i].hist[j];
  }
  if (err)
    return err;
  if (msgs == 0)
    die(2, "no message completed in the window");
  double secs = w1 - w0;
  printf("{\"mode\":\"pingpong\",\"conns\":%d,\"size\":%d,\"threads\":%d,"
         "\"secs\":%.3f,\"msgs\":%llu,\"msg_per_s\":%.1f,\"p50_us\":%.2f,"
         "\"p99_us\":%.2f,\"max_us\":%.1f,\"setup_s\":%.3f",
         opt.conns, opt.size, opt.threads, secs, (unsigned long long)msgs,
         (double)msgs / secs, hist_pct(h, msgs, 0.5), hist_pct(h, msgs, 0.99),
         (double)rmax / 1000.0, hs_s);
  printf(",\"client_cpu_pct\":%.1f", 100.0 * (me1 - me0) / secs);
  print_tls_fields(&cs[0]);
  if (cpu0 >= 0 && cpu1 >= 0)
    printf(",\"server_cpu_s\":%.3f,\"cpu_ns_per_msg\":%.1f,"
           "\"cpu_user_ns_per_msg\":%.1f",
           cpu1 - cpu0, (cpu1 - cpu0) * 1e9 / (double)msgs,
           (u1 - u0) * 1e9 / (double)msgs);
  printf("}\n");
  for (int i = 0; i < opt.conns; i++)
    conn_close(&cs[i]);
  return 0;
}

/* ---- bulk: one conn echoing a stream ----------------------------------- */

static int
run_stream(void)
{
  if (opt.block < 1 || opt.block > MAXSIZE)
    die(1, "--block 1..%d", MAXSIZE);
  if (opt.window < opt.block)
    opt.window = opt.block;
  tconn c0 = { .fd = -1 }, *c = &c0;
  open_all(c, 1);
  size_t cap = 256 * 1024;
  unsigned char *buf = malloc(cap);
  uint64_t sent = 0, got = 0, b0 = 0, b1 = 0;
  double start = now(), t0 = start + opt.warmup, t1 = t0 + opt.secs;
  double cpu0 = -1, cpu1 = -1, w0 = 0, w1 = 0, me0 = 0, me1 = 0;
  double u0 = 0, u1 = 0;
  bool in = false;
  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev;
  for (;;) {
    bool blocked_out = false;
    while (sent - got < (uint64_t)opt.window) {
      size_t len = (size_t)opt.block;
      if (sent - got + len > (uint64_t)opt.window)
        len = (size_t)(opt.window - (int)(sent - got));
      ssize_t w = conn_write(c, tbl + sent % PAT, len);
      if (w < 0)
        die(2, "stream: send: %s", c->err);
      if (w == 0) {
        blocked_out = c->want == EPOLLOUT;
        break;
      }
      sent += (uint64_t)w;
    }
    bool progress = false;
    for (;;) {
      ssize_t r = conn_read(c, buf, cap);
      if (r < 0)
        die(2, "stream: %s", c->err);
      if (r == 0)
        break;
      if ((uint64_t)r > sent - got)
        die(3, "stream: %zd bytes came back, %llu were sent", r,
            (unsigned long long)(sent - got));
      if (memcmp(buf, tbl + got % PAT, (size_t)r) != 0)
        die(3, "stream: echoed bytes at offset %llu..%llu differ",
            (unsigned long long)got, (unsigned long long)(got + (uint64_t)r));
      got += (uint64_t)r;
      progress = true;
    }
    double t = now();
    if (!in && t >= t0) {
      in = true;
      w0 = t;
      b0 = got;
      cpu0 = server_cpu();
      u0 = server_user_last;
      me0 = self_cpu();
    } else if (in && t >= t1) {
      w1 = t;
      b1 = got;
      cpu1 = server_cpu();
      u1 = server_user_last;
      me1 = self_cpu();
      break;
    }
    if (!progress) {
      conn_arm(ep, c, blocked_out);
      epoll_wait(ep, &ev, 1, 100);
    }
  }
  close(ep);
  double secs = w1 - w0, mb = (double)(b1 - b0) / 1e6;
  printf("{\"mode\":\"stream\",\"secs\":%.3f,\"bytes\":%llu,\"mb_per_s\":%.1f,"
         "\"block\":%d,\"window\":%d",
         secs, (unsigned long long)(b1 - b0), mb / secs, opt.block,
         opt.window);
  printf(",\"client_cpu_pct\":%.1f", 100.0 * (me1 - me0) / secs);
  print_tls_fields(c);
  if (cpu0 >= 0 && cpu1 >= 0 && mb > 0)
    printf(",\"server_cpu_s\":%.3f,\"cpu_ns_per_kb\":%.1f,"
           "\"cpu_user_ns_per_kb\":%.1f",
           cpu1 - cpu0, (cpu1 - cpu0) * 1e9 / (mb * 1000.0),
           (u1 - u0) * 1e9 / (mb * 1000.0));
  printf("}\n");
  conn_close(c);
  return 0;
}

/* ---- handshakes: connect, handshake, one echo, close, again ------------ */

#define HS_MSG 32

/* Advance one slot as far as it goes without blocking: true when a
 * connection completed (and the slot was closed), false when it waits. */
static bool
hs_advance(tconn *c, unsigned char *rbuf)
{
  if (!c->hs_done) {
    int r = conn_handshake(c);
    if (r < 0)
      die(2, "conn %u: %s", c->id, c->err);
    if (r == 0)
      return false;
  }
  while (c->sent < HS_MSG) {
    ssize_t w = conn_write(c, c->msg + c->sent, (size_t)(HS_MSG - c->sent));
    if (w < 0)
      die(2, "conn %u: send: %s", c->id, c->err);
    if (w == 0)
      return false;
    c->sent += (int)w;
  }
  while (c->got < HS_MSG) {
    ssize_t r = conn_read(c, rbuf, (size_t)(HS_MSG - c->got));
    if (r < 0)
      die(2, "conn %u: %s", c->id, c->err);
    if (r == 0)
      return false;
    if (memcmp(rbuf, c->msg + c->got, (size_t)r) != 0)
      die(3, "conn %u: echoed bytes differ", c->id);
    c->got += (int)r;
  }
  return true;
}

static void
hs_begin(tconn *c)
{
  conn_open(c);
  c->seq++;
  c->msg = tbl + (c->seq * 7 + c->id) % PAT;
  c->sent = 0;
  c->got = 0;
}

static int
run_handshake(void)
{
  int k = opt.conns;
  if (k < 1 || k > 4096)
    die(1, "--conns 1..4096 (slots)");
  raise_nofile(k + 64);
  tconn *cs = calloc((size_t)k, sizeof *cs);
  unsigned char rbuf[HS_MSG];
  int ep = epoll_create1(EPOLL_CLOEXEC);
  double start = now(), t0 = start + opt.warmup, t1 = t0 + opt.secs;
  double cpu0 = -1, cpu1 = -1, w0 = 0, w1 = 0, me0 = 0, me1 = 0;
  double u0 = 0, u1 = 0;
  uint64_t total = 0, resumed = 0, n0 = 0, r0 = 0, n1 = 0, r1 = 0;
  char version[32] = "", cipher[64] = "";
  bool in = false;
  for (int i = 0; i < k; i++) {
    cs[i].id = (unsigned)i;
    cs[i].fd = -1;
  }
  /* A slot finished its connection: count it, close, start the next. */
#define HS_NEXT(c)                                                           \
  do {                                                                       \
    total++;                                                                 \
    if ((c)->ssl != NULL) {                                                  \
      if (SSL_session_reused((c)->ssl))                                      \
        resumed++;                                                           \
      if (version[0] == '\0') {                                              \
        snprintf(version, sizeof version, "%s", SSL_get_version((c)->ssl));  \
        snprintf(cipher, sizeof cipher, "%s",                                \
                 SSL_get_cipher_name((c)->ssl));                             \
      }                                                                      \
    }                                                                        \
    conn_close(c);                                                           \
    hs_begin(c);                                                             \
  } while (0)
  for (int i = 0; i < k; i++) {
    hs_begin(&cs[i]);
    while (hs_advance(&cs[i], rbuf))
      HS_NEXT(&cs[i]);
    conn_arm(ep, &cs[i], cs[i].want == EPOLLOUT);
  }
  struct epoll_event evs[256];
  for (;;) {
    int n = epoll_wait(ep, evs, 256, 100);
    if (n < 0 && errno != EINTR)
      die(2, "epoll: %s", strerror(errno));
    for (int j = 0; j < n; j++) {
      tconn *c = evs[j].data.ptr;
      while (hs_advance(c, rbuf))
        HS_NEXT(c);
      conn_arm(ep, c, c->want == EPOLLOUT);
    }
    double t = now();
    if (!in && t >= t0) {
      in = true;
      w0 = t;
      n0 = total;
      r0 = resumed;
      cpu0 = server_cpu();
      u0 = server_user_last;
      me0 = self_cpu();
    } else if (in && t >= t1) {
      w1 = t;
      n1 = total;
      r1 = resumed;
      cpu1 = server_cpu();
      u1 = server_user_last;
      me1 = self_cpu();
      break;
    }
  }
#undef HS_NEXT
  close(ep);
  for (int i = 0; i < k; i++) {
    conn_close(&cs[i]);
    keep_session(&cs[i], NULL);
  }
  uint64_t n = n1 - n0;
  if (n == 0)
    die(2, "no connection completed in the window");
  double secs = w1 - w0;
  printf("{\"mode\":\"handshake\",\"slots\":%d,\"resume\":%s,\"secs\":%.3f,"
         "\"conns_done\":%llu,\"hs_per_s\":%.1f,\"resumed_frac\":%.3f",
         k, opt.resume ? "true" : "false", secs, (unsigned long long)n,
         (double)n / secs, (double)(r1 - r0) / (double)n);
  printf(",\"client_cpu_pct\":%.1f", 100.0 * (me1 - me0) / secs);
  if (opt.plain)
    printf(",\"tls\":false");
  else
    printf(",\"tls\":true,\"tls_version\":\"%s\",\"cipher\":\"%s\"", version,
           cipher);
  if (cpu0 >= 0 && cpu1 >= 0)
    printf(",\"server_cpu_s\":%.3f,\"server_cpu_pct\":%.1f,"
           "\"cpu_us_per_hs\":%.2f,\"cpu_user_us_per_hs\":%.2f",
           cpu1 - cpu0, 100.0 * (cpu1 - cpu0) / secs,
           (cpu1 - cpu0) * 1e6 / (double)n, (u1 - u0) * 1e6 / (double)n);
  printf("}\n");
  return 0;
}

/* ---- idle memory ------------------------------------------------------- */

/* Wait until the server is done with what it was doing (its CPU time
 * unchanged over 200 ms, at most 20 s), then the larger of two RSS
 * readings 100 ms apart (RSS only grows here). */
static long
settled_rss(void)
{
  double deadline = now() + 20, last = server_cpu();
  int still = 0;
  while (still < 2 && now() < deadline) {
    usleep(100000);
    double c = server_cpu();
    still = c == last ? still + 1 : 0;
    last = c;
  }
  usleep(100000);
  long a = server_rss();
  usleep(100000);
  long b = server_rss();
  return a > b ? a : b;
}

static int
run_idle(void)
{
  if (opt.pid <= 0)
    die(1, "idle needs --pid");
  int n = opt.conns;
  raise_nofile(n + 64);
  long rss0 = settled_rss();
  int fd0 = server_fds();
  tconn *cs = calloc((size_t)n, sizeof *cs);
  for (int i = 0; i < n; i++)
    cs[i].id = (unsigned)i;
  double tc = open_all(cs, n);
  double deadline = now() + 30;
  while (server_fds() < fd0 + n) {
    if (now() > deadline)
      die(2, "server holds %d of %d connections", server_fds() - fd0, n);
    usleep(2000);
  }
  long rss1 = settled_rss();

  /* One 64-byte echo on every connection, all at once. */
  int ep = epoll_create1(EPOLL_CLOEXEC);
  unsigned char rb[64];
  for (int i = 0; i < n; i++) {
    tconn *c = &cs[i];
    c->msg = tbl + (unsigned)i % PAT;
    c->sent = c->got = 0;
    while (c->sent < 64) {
      ssize_t w = conn_write(c, c->msg + c->sent, (size_t)(64 - c->sent));
      if (w < 0)
        die(2, "idle: conn %d: send: %s", i, c->err);
      if (w == 0)
        break;
      c->sent += (int)w;
    }
    conn_arm(ep, c, c->sent < 64);
  }
  int done = 0;
  struct epoll_event evs[256];
  deadline = now() + 30;
  while (done < n) {
    if (now() > deadline)
      die(2, "idle: %d of %d echoes came back", done, n);
    int k = epoll_wait(ep, evs, 256, 100);
    for (int j = 0; j < k; j++) {
      tconn *c = evs[j].data.ptr;
      while (c->sent < 64) {
        ssize_t w = conn_write(c, c->msg + c->sent, (size_t)(64 - c->sent));
        if (w < 0)
          die(2, "idle: conn %u: send: %s", c->id, c->err);
        if (w == 0)
          break;
        c->sent += (int)w;
      }
      while (c->got < 64) {
        ssize_t r = conn_read(c, rb, (size_t)(64 - c->got));
        if (r < 0)
          die(2, "idle: conn %u: %s", c->id, c->err);
        if (r == 0)
          break;
        if (memcmp(rb, c->msg + c->got, (size_t)r) != 0)
          die(3, "idle: conn %u: echoed bytes differ", c->id);
        c->got += (int)r;
      }
      if (c->got == 64) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        c->events = 0;
        done++;
      } else {
        conn_arm(ep, c, c->sent < 64);
      }
    }
  }
  long rss2 = settled_rss();
  close(ep);
  printf("{\"mode\":\"idle\",\"conns\":%d,\"connect_s\":%.2f,\"rss_base\":%ld,"
         "\"rss_open\":%ld,\"rss_echo\":%ld,\"bytes_per_conn_open\":%.0f,"
         "\"bytes_per_conn_echo\":%.0f",
         n, tc, rss0, rss1, rss2, (double)(rss1 - rss0) / n,
         (double)(rss2 - rss0) / n);
  print_tls_fields(&cs[0]);
  printf("}\n");
  for (int i = 0; i < n; i++)
    conn_close(&cs[i]);
  return 0;
}

/* ---- main --------------------------------------------------------------- */

static void
usage(void)
{
  fprintf(stderr,
          "usage: loadgen_tls pingpong|stream|handshake|idle --port P\n"
          "       (--cert SERVER_CERT.pem | --plain) [--conns N] [--size S]\n"
          "       [--secs T] [--warmup W] [--threads K] [--pid PID]\n"
          "       [--block B] [--window N] [--resume] [--cipher SUITE]\n");
  exit(1);
}

int
main(int argc, char **argv)
{
  if (argc < 2)
    usage();
  opt.mode = argv[1];
  for (int i = 2; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--resume")) {
      opt.resume = true;
      continue;
    }
    if (!strcmp(a, "--plain")) {
      opt.plain = true;
      continue;
    }
    if (i + 1 >= argc)
      usage();
    const char *v = argv[++i];
    if (!strcmp(a, "--port"))
      opt.port = atoi(v);
    else if (!strcmp(a, "--conns"))
      opt.conns = atoi(v);
    else if (!strcmp(a, "--size"))
      opt.size = atoi(v);
    else if (!strcmp(a, "--secs"))
      opt.secs = atof(v);
    else if (!strcmp(a, "--warmup"))
      opt.warmup = atof(v);
    else if (!strcmp(a, "--threads"))
      opt.threads = atoi(v);
    else if (!strcmp(a, "--pid"))
      opt.pid = atoi(v);
    else if (!strcmp(a, "--block"))
      opt.block = atoi(v);
    else if (!strcmp(a, "--window"))
      opt.window = atoi(v);
    else if (!strcmp(a, "--cert"))
      opt.cert = v;
    else if (!strcmp(a, "--cipher"))
      opt.cipher = v;
    else
      usage();
  }
  if (opt.port <= 0 || opt.port > 65535 || opt.conns < 1 || opt.secs <= 0)
    usage();
  if (opt.resume && opt.plain)
    die(1, "--resume needs TLS");
  signal(SIGPIPE, SIG_IGN);
  tbl = malloc(PAT + MAXSIZE);
  for (size_t i = 0; i < PAT + MAXSIZE; i++)
    tbl[i] = (unsigned char)(i % PAT);
  tls_init();
  int rc;
  if (!strcmp(opt.mode, "pingpong"))
    rc = run_pingpong();
  else if (!strcmp(opt.mode, "stream"))
    rc = run_stream();
  else if (!strcmp(opt.mode, "handshake"))
    rc = run_handshake();
  else if (!strcmp(opt.mode, "idle"))
    rc = run_idle();
  else
    usage();
  fflush(stdout);
  return rc;
}
