/* consumer: the program every consumer project in tests/consumer builds
 * against an installed libduplex (CMake, pkg-config + make, meson).
 *
 * It checks that the headers and the library it was linked with agree on
 * the version, then opens a loop, adopts both ends of a socketpair, sends
 * "ping" one way and "pong" back, half-closes both ends and waits until
 * both conns have closed cleanly. Prints one line and exits 0 on success. */
#include <duplex.h>
#include <duplex/version.h>

#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct end {
  const char *reply; /* sent back when a message arrives, then shut down */
  char got[16];
  size_t len;
  int closed, reason;
};

static duplex_loop *loop;
static int closed_ends;

static void on_read(duplex_conn *c, const void *data, size_t len, void *user) {
  struct end *e = user;
  if (len > sizeof e->got - 1 - e->len)
    len = sizeof e->got - 1 - e->len;
  memcpy(e->got + e->len, data, len);
  e->len += len;
  if (e->reply && e->len == 4) {
    duplex_conn_write(c, e->reply, strlen(e->reply), NULL, NULL);
    duplex_conn_shutdown(c, NULL, NULL);
  }
}

static void on_close(duplex_conn *c, int reason, void *user) {
  struct end *e = user;
  e->closed = 1;
  e->reason = reason;
  if (++closed_ends == 2)
    duplex_loop_stop(loop);
}

static int check(int rc, const char *what) {
  if (rc != 0)
    fprintf(stderr, "consumer: %s: %s\n", what, duplex_strerror(rc));
  return rc;
}

int main(void) {
  alarm(20); /* a hang guard: SIGALRM ends the process */

  if (duplex_version() != DUPLEX_VERSION_HEX ||
      strcmp(duplex_version_string(), DUPLEX_VERSION_STRING) != 0) {
    fprintf(stderr, "consumer: headers are %s, library is %s\n",
            DUPLEX_VERSION_STRING, duplex_version_string());
    return 1;
  }

  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) {
    perror("consumer: socketpair");
    return 1;
  }

  struct end a = {NULL, {0}, 0, 0, 0}, b = {"pong", {0}, 0, 0, 0};
  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_read = on_read;
  cbs.on_close = on_close;
  duplex_conn_opts opts_a = DUPLEX_CONN_OPTS_INIT, opts_b = DUPLEX_CONN_OPTS_INIT;
  opts_a.cbs = opts_b.cbs = &cbs;
  opts_a.user = &a;
  opts_b.user = &b;

  duplex_conn *ca = NULL, *cb = NULL;
  if (check(duplex_loop_new(&loop, NULL), "duplex_loop_new") ||
      check(duplex_conn_adopt(&ca, loop, fds[0], &opts_a), "adopt a") ||
      check(duplex_conn_adopt(&cb, loop, fds[1], &opts_b), "adopt b") ||
      check(duplex_conn_write(ca, "ping", 4, NULL, NULL), "write") ||
      check(duplex_conn_shutdown(ca, NULL, NULL), "shutdown") ||
      check(duplex_loop_run(loop, DUPLEX_RUN_DEFAULT), "duplex_loop_run"))
    return 1;

  duplex_conn_unref(ca);
  duplex_conn_unref(cb);
  if (check(duplex_loop_free(loop), "duplex_loop_free"))
    return 1;

  if (strcmp(b.got, "ping") != 0 || strcmp(a.got, "pong") != 0 ||
      !a.closed || !b.closed || a.reason != 0 || b.reason != 0) {
    fprintf(stderr, "consumer: got '%s' and '%s', close reasons %s and %s\n",
            b.got, a.got, duplex_err_name(b.reason), duplex_err_name(a.reason));
    return 1;
  }
  printf("consumer: libduplex %s: ping/pong over a socketpair ok\n",
         duplex_version_string());
  return 0;
}
