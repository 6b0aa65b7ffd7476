/* loadgen: the benchmark load generator (epoll, C, Linux only).
 *
 *   loadgen pingpong --port P --conns C --size S [--secs T] [--warmup W]
 *                    [--threads K] [--pid PID]
 *       C connections, each sends an S-byte message, waits for all S bytes
 *       to come back (compared byte for byte with what was sent), records
 *       the round trip and sends the next. Reports msg/s, p50/p99.
 *   loadgen stream --port P [--secs T] [--warmup W] [--pid PID]
 *       One connection; the server writes a stream whose byte at offset o
 *       is o % 251. Every byte is checked. Reports MB/s.
 *   loadgen xsink --port P --producers N [--secs T] [--warmup W] [--pid PID]
 *       One connection; N producer threads in the server send 64-byte
 *       messages [u32 producer][u64 seq][52 pattern bytes]. Checks every
 *       message (producer id, per-producer sequence, pattern). Reports msg/s.
 *   loadgen idle --port P --conns N --pid PID
 *       Opens N connections, reads the server's RSS before and after, then
 *       echoes 64 bytes once on each and reads it again. Bytes per conn.
 *
 * With --pid, the server's CPU time (utime+stime from /proc/PID/stat) over
 * the measured window is reported too. Output: one JSON object on stdout.
 * Exit status: 0 ok, 1 usage, 2 connection/system error, 3 bytes mismatch.
 * All connections are closed with RST (SO_LINGER 0) so that repeated runs
 * leave no TIME_WAIT behind.
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

#define PAT 251 /* pattern period: a prime, so shifted copies differ */
#define MAXSIZE (1 << 20)

static struct {
  const char *mode;
  int port;
  int conns;
  int size;
  double secs;
  double warmup;
  int threads;
  int pid;
  int producers;
} opt = { NULL, 0, 1, 64, 2.0, 0.5, 1, 0, 1 };

static unsigned char *tbl; /* tbl[i] = i % PAT, PAT + MAXSIZE bytes */

static void __attribute__((noreturn, format(printf, 2, 3)))
die(int code, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "loadgen %s: ", opt.mode ? opt.mode : "");
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
  /* fields after comm: state(3) ... utime(14) stime(15) */
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
             &ut, &st) != 2)
    return -1;
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
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

/* ---- sockets ------------------------------------------------------------- */

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

static void
set_rst_close(int fd)
{
  struct linger l = { 1, 0 };
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

/* A blocking connect; the socket is then made non-blocking. */
static int
connect_one(void)
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
      set_rst_close(fd);
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

/* Open @p n connections without overflowing the server's accept queue:
 * with --pid, at most 128 may be waiting to be accepted at a time. */
static void
connect_many(int *fds, int n)
{
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
    fds[i] = connect_one();
  }
}

/* ---- ping-pong --------------------------------------------------------- */

/* Round-trip histogram, log-linear: 32 sub-buckets per power of two of
 * nanoseconds (under 3% error), from 1 ns to 2^40 ns (18 minutes). */
#define HIST_SUB 32
#define HIST_N (41 * HIST_SUB)

static int
hist_bucket(uint64_t ns)
{
  if (ns < HIST_SUB)
    return (int)ns;
  int e = 63 - __builtin_clzll(ns);            /* ns in [2^e, 2^(e+1)) */
  int sub = (int)((ns >> (e - 5)) & (HIST_SUB - 1)); /* next 5 bits */
  int b = (e - 4) * HIST_SUB + sub;
  return b < HIST_N ? b : HIST_N - 1;
}

/* The middle of bucket @p b, in ns. */
static double
hist_value(int b)
{
  if (b < HIST_SUB)
    return b;
  int e = b / HIST_SUB + 4, sub = b % HIST_SUB;
  double lo = ldexp(1.0 + sub / (double)HIST_SUB, e);
  return lo + ldexp(0.5 / HIST_SUB, e);
}

typedef struct pp_conn {
  int fd;
  unsigned id;
  uint64_t seq;
  const unsigned char *msg; /* what was sent: a window into tbl */
  int sent, got;
  uint64_t t_send;
  bool want_out;
} pp_conn;

typedef struct pp_thread {
  pthread_t th;
  pp_conn *c;
  int n;
  double t0, t1;
  uint64_t msgs;
  uint32_t *hist;
  uint64_t rtt_max;
  unsigned char *rbuf;
  int err;
  char errmsg[200];
} pp_thread;

static const unsigned char *
pp_msg(const pp_conn *c)
{
  return tbl + (c->seq * 7 + c->id) % PAT;
}

/* Write what is left of the current message; false on error. */
static bool
pp_send(pp_thread *t, int ep, pp_conn *c)
{
  while (c->sent < opt.size) {
    ssize_t w = send(c->fd, c->msg + c->sent, (size_t)(opt.size - c->sent),
                     MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EAGAIN) {
        if (!c->want_out) {
          struct epoll_event ev = { EPOLLIN | EPOLLOUT, { .ptr = c } };
          epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
          c->want_out = true;
        }
        return true;
      }
      snprintf(t->errmsg, sizeof t->errmsg, "send: %s", strerror(errno));
      t->err = 2;
      return false;
    }
    c->sent += (int)w;
  }
  if (c->want_out) {
    struct epoll_event ev = { EPOLLIN, { .ptr = c } };
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = false;
  }
  return true;
}

static void
pp_start_msg(pp_conn *c)
{
  c->msg = pp_msg(c);
  c->sent = 0;
  c->got = 0;
  c->t_send = now_ns();
}

static void *
pp_run(void *arg)
{
  pp_thread *t = arg;
  int ep = epoll_create1(EPOLL_CLOEXEC);
  for (int i = 0; i < t->n; i++) {
    struct epoll_event ev = { EPOLLIN, { .ptr = &t->c[i] } };
    epoll_ctl(ep, EPOLL_CTL_ADD, t->c[i].fd, &ev);
  }
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
      pp_conn *c = evs[j].data.ptr;
      if ((evs[j].events & EPOLLOUT) && !pp_send(t, ep, c))
        goto out;
      if (!(evs[j].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        continue;
      ssize_t r = recv(c->fd, t->rbuf, (size_t)(opt.size - c->got), 0);
      if (r < 0 && errno == EAGAIN)
        continue;
      if (r <= 0) {
        snprintf(t->errmsg, sizeof t->errmsg, "conn %u: %s", c->id,
                 r == 0 ? "closed by the server" : strerror(errno));
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
      if (c->got < opt.size)
        continue;
      if (c->sent < opt.size) {
        snprintf(t->errmsg, sizeof t->errmsg, "conn %u: echo before send",
                 c->id);
        t->err = 3;
        goto out;
      }
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
  int *fds = calloc((size_t)opt.conns, sizeof *fds);
  pp_conn *cs = calloc((size_t)opt.conns, sizeof *cs);
  connect_many(fds, opt.conns);
  for (int i = 0; i < opt.conns; i++) {
    cs[i].fd = fds[i];
    cs[i].id = (unsigned)i;
  }
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
  double cpu0 = server_cpu(), w0 = now();
  sleep_until(t1);
  double cpu1 = server_cpu(), w1 = now();
  uint64_t msgs = 0, rmax = 0;
  uint32_t *h = calloc(HIST_N, sizeof(uint32_t));
  int err = 0;
  for (int i = 0; i < opt.threads; i++) {
    pthread_join(ts[i].th, NULL);
    if (ts[i].err) {
      fprintf(stderr, "loadgen pingpong: %s\n", ts[i].errmsg);
      err = err ? err : ts[i].err;
    }
    msgs += ts[i].msgs;
    if (ts[i].rtt_max > rmax)
      rmax = ts[i].rtt_max;
    for (int j = 0; j < HIST_N; j++)
      h[j] += ts[i].hist[j];
  }
  for (int i = 0; i < opt.conns; i++)
    close(fds[i]);
  if (err)
    return err;
  if (msgs == 0)
    die(2, "no message completed in the window");
  double secs = w1 - w0;
  printf("{\"mode\":\"pingpong\",\"conns\":%d,\"size\":%d,\"threads\":%d,"
         "\"secs\":%.3f,\"msgs\":%llu,\"msg_per_s\":%.1f,\"p50_us\":%.2f,"
         "\"p99_us\":%.2f,\"max_us\":%.1f",
         opt.conns, opt.size, opt.threads, secs, (unsigned long long)msgs,
         (double)msgs / secs, hist_pct(h, msgs, 0.5), hist_pct(h, msgs, 0.99),
         (double)rmax / 1000.0);
  if (cpu0 >= 0 && cpu1 >= 0)
    printf(",\"server_cpu_s\":%.3f,\"cpu_ns_per_msg\":%.1f", cpu1 - cpu0,
           (cpu1 - cpu0) * 1e9 / (double)msgs);
  printf("}\n");
  return 0;
}

/* ---- stream sink -------------------------------------------------------- */

static int
run_stream(void)
{
  int fd = connect_one();
  size_t cap = 256 * 1024;
  unsigned char *buf = malloc(cap);
  uint64_t off = 0, b0 = 0, b1 = 0;
  double start = now(), t0 = start + opt.warmup, t1 = t0 + opt.secs;
  double cpu0 = -1, cpu1 = -1, w0 = 0, w1 = 0;
  bool in = false;
  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = { EPOLLIN, { .fd = fd } };
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  for (;;) {
    ssize_t r = recv(fd, buf, cap, 0);
    if (r < 0 && errno == EAGAIN) {
      epoll_wait(ep, &ev, 1, 100);
    } else if (r <= 0) {
      die(2, "stream: %s", r == 0 ? "closed by the server" : strerror(errno));
    } else {
      if (memcmp(buf, tbl + off % PAT, (size_t)r) != 0)
        die(3, "stream: bytes at offset %llu..%llu differ",
            (unsigned long long)off, (unsigned long long)(off + (uint64_t)r));
      off += (uint64_t)r;
    }
    double t = now();
    if (!in && t >= t0) {
      in = true;
      w0 = t;
      b0 = off;
      cpu0 = server_cpu();
    } else if (in && t >= t1) {
      w1 = t;
      b1 = off;
      cpu1 = server_cpu();
      break;
    }
  }
  close(fd);
  double secs = w1 - w0, mb = (double)(b1 - b0) / 1e6;
  printf("{\"mode\":\"stream\",\"secs\":%.3f,\"bytes\":%llu,\"mb_per_s\":%.1f",
         secs, (unsigned long long)(b1 - b0), mb / secs);
  if (cpu0 >= 0 && cpu1 >= 0)
    printf(",\"server_cpu_s\":%.3f,\"cpu_ns_per_kb\":%.1f", cpu1 - cpu0,
           (cpu1 - cpu0) * 1e9 / (mb * 1000.0));
  printf("}\n");
  return 0;
}

/* ---- cross-thread sink ---------------------------------------------------- */

static int
run_xsink(void)
{
  int P = opt.producers;
  if (P < 1 || P > 64)
    die(1, "--producers 1..64");
  int fd = connect_one();
  size_t cap = 256 * 1024;
  unsigned char *buf = malloc(cap + 64);
  uint64_t expect[64] = { 0 };
  size_t have = 0;
  uint64_t msgs = 0, m0 = 0, m1 = 0;
  double start = now(), t0 = start + opt.warmup, t1 = t0 + opt.secs;
  double cpu0 = -1, cpu1 = -1, w0 = 0, w1 = 0;
  bool in = false;
  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = { EPOLLIN, { .fd = fd } };
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  for (;;) {
    ssize_t r = recv(fd, buf + have, cap - have, 0);
    if (r < 0 && errno == EAGAIN) {
      epoll_wait(ep, &ev, 1, 100);
    } else if (r <= 0) {
      die(2, "xsink: %s", r == 0 ? "closed by the server" : strerror(errno));
    } else {
      have += (size_t)r;
      size_t pos = 0;
      for (; pos + 64 <= have; pos += 64) {
        const unsigned char *m = buf + pos;
        uint32_t id;
        uint64_t seq;
        memcpy(&id, m, 4);
        memcpy(&seq, m + 4, 8);
        if (id >= (uint32_t)P)
          die(3, "xsink: message %llu: producer id %u", (unsigned long long)msgs,
              id);
        if (seq != expect[id])
          die(3, "xsink: producer %u: seq %llu, expected %llu", id,
              (unsigned long long)seq, (unsigned long long)expect[id]);
        if (memcmp(m + 12, tbl + (seq + id) % PAT, 52) != 0)
          die(3, "xsink: producer %u seq %llu: payload differs", id,
              (unsigned long long)seq);
        expect[id]++;
        msgs++;
      }
      memmove(buf, buf + pos, have - pos);
      have -= pos;
    }
    double t = now();
    if (!in && t >= t0) {
      in = true;
      w0 = t;
      m0 = msgs;
      cpu0 = server_cpu();
    } else if (in && t >= t1) {
      w1 = t;
      m1 = msgs;
      cpu1 = server_cpu();
      break;
    }
  }
  close(fd);
  double secs = w1 - w0;
  uint64_t n = m1 - m0;
  printf("{\"mode\":\"xsink\",\"producers\":%d,\"secs\":%.3f,\"msgs\":%llu,"
         "\"msg_per_s\":%.1f",
         P, secs, (unsigned long long)n, (double)n / secs);
  if (cpu0 >= 0 && cpu1 >= 0 && n > 0)
    printf(",\"server_cpu_s\":%.3f,\"cpu_ns_per_msg\":%.1f", cpu1 - cpu0,
           (cpu1 - cpu0) * 1e9 / (double)n);
  printf("}\n");
  return 0;
}

/* ---- idle memory ---------------------------------------------------------- */

static long
settled_rss(void)
{
  /* Let the server finish what it is doing, then take the larger of two
   * readings 100 ms apart (RSS only grows here). */
  usleep(300000);
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
  int *fds = calloc((size_t)n, sizeof *fds);
  double tc = now();
  connect_many(fds, n);
  double deadline = now() + 30;
  while (server_fds() < fd0 + n) {
    if (now() > deadline)
      die(2, "server holds %d of %d connections", server_fds() - fd0, n);
    usleep(2000);
  }
  tc = now() - tc;
  long rss1 = settled_rss();

  /* One 64-byte echo on every connection, all at once. */
  int ep = epoll_create1(EPOLL_CLOEXEC);
  int *got = calloc((size_t)n, sizeof *got);
  for (int i = 0; i < n; i++) {
    const unsigned char *m = tbl + (unsigned)i % PAT;
    if (send(fds[i], m, 64, MSG_NOSIGNAL) != 64)
      die(2, "idle: send on conn %d: %s", i, strerror(errno));
    struct epoll_event ev = { EPOLLIN, { .u32 = (uint32_t)i } };
    epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
  }
  int done = 0;
  unsigned char rb[64];
  struct epoll_event evs[256];
  deadline = now() + 30;
  while (done < n) {
    if (now() > deadline)
      die(2, "idle: %d of %d echoes came back", done, n);
    int k = epoll_wait(ep, evs, 256, 100);
    for (int j = 0; j < k; j++) {
      int i = (int)evs[j].data.u32;
      ssize_t r = recv(fds[i], rb, (size_t)(64 - got[i]), 0);
      if (r < 0 && errno == EAGAIN)
        continue;
      if (r <= 0)
        die(2, "idle: conn %d: %s", i, r == 0 ? "closed" : strerror(errno));
      if (memcmp(rb, tbl + (unsigned)i % PAT + got[i], (size_t)r) != 0)
        die(3, "idle: conn %d: echoed bytes differ", i);
      got[i] += (int)r;
      if (got[i] == 64) {
        epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
        done++;
      }
    }
  }
  long rss2 = settled_rss();
  for (int i = 0; i < n; i++)
    close(fds[i]);
  close(ep);
  printf("{\"mode\":\"idle\",\"conns\":%d,\"connect_s\":%.2f,\"rss_base\":%ld,"
         "\"rss_open\":%ld,\"rss_echo\":%ld,\"bytes_per_conn_open\":%.0f,"
         "\"bytes_per_conn_echo\":%.0f}\n",
         n, tc, rss0, rss1, rss2, (double)(rss1 - rss0) / n,
         (double)(rss2 - rss0) / n);
  return 0;
}

/* ---- main --------------------------------------------------------------- */

static void
usage(void)
{
  fprintf(stderr,
          "usage: loadgen pingpong|stream|xsink|idle --port P [--conns N]\n"
          "       [--size S] [--secs T] [--warmup W] [--threads K]\n"
          "       [--pid PID] [--producers N]\n");
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
    else if (!strcmp(a, "--producers"))
      opt.producers = atoi(v);
    else
      usage();
  }
  if (opt.port <= 0 || opt.port > 65535 || opt.conns < 1 || opt.secs <= 0)
    usage();
  signal(SIGPIPE, SIG_IGN);
  tbl = malloc(PAT + MAXSIZE);
  for (size_t i = 0; i < PAT + MAXSIZE; i++)
    tbl[i] = (unsigned char)(i % PAT);
  int rc;
  if (!strcmp(opt.mode, "pingpong"))
    rc = run_pingpong();
  else if (!strcmp(opt.mode, "stream"))
    rc = run_stream();
  else if (!strcmp(opt.mode, "xsink"))
    rc = run_xsink();
  else if (!strcmp(opt.mode, "idle"))
    rc = run_idle();
  else
    usage();
  fflush(stdout);
  return rc;
}
