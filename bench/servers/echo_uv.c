/* echo_uv: TCP echo server on raw libuv, for the benchmarks.
 * Usage: echo_uv PORT   (127.0.0.1; prints nothing)
 *
 * The usual libuv echo: alloc_cb mallocs the suggested size for every
 * read; read_cb hands that buffer to uv_write with a fresh uv_write_t and
 * write_cb frees both. Built twice:
 *   echo_uv      uv_write for every read
 *   echo_uv_try  (-DECHO_TRY_WRITE) uv_try_write first; uv_write only for
 *                what the kernel did not take
 */
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <uv.h>

#include "common.h"

typedef struct {
  uv_write_t req;
  char *base; /* the read buffer, freed when the write completes */
} write_req;

static uv_loop_t *loop;

static void
on_closed(uv_handle_t *h)
{
  free(h);
}

static void
on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
  (void)h;
  buf->base = malloc(suggested);
  buf->len = buf->base != NULL ? suggested : 0;
}

static void
on_write(uv_write_t *req, int status)
{
  write_req *w = (write_req *)req;
  (void)status; /* an error also shows up as a read error */
  free(w->base);
  free(w);
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
  if (nread > 0) {
    uv_buf_t out = uv_buf_init(buf->base, (unsigned)nread);
#ifdef ECHO_TRY_WRITE
    int n = uv_try_write(s, &out, 1);
    if (n == nread) {
      free(buf->base);
      return;
    }
    if (n > 0) {
      out.base += n;
      out.len -= (size_t)n;
    } else if (n != UV_EAGAIN) {
      free(buf->base);
      uv_close((uv_handle_t *)s, on_closed);
      return;
    }
#endif
    write_req *w = malloc(sizeof *w);
    if (w == NULL) {
      free(buf->base);
      uv_close((uv_handle_t *)s, on_closed);
      return;
    }
    w->base = buf->base;
    if (uv_write(&w->req, s, &out, 1, on_write) != 0) {
      free(w->base);
      free(w);
      uv_close((uv_handle_t *)s, on_closed);
    }
    return;
  }
  free(buf->base);
  if (nread < 0 && !uv_is_closing((uv_handle_t *)s))
    uv_close((uv_handle_t *)s, on_closed);
}

static void
on_connection(uv_stream_t *server, int status)
{
  if (status != 0)
    return;
  uv_tcp_t *c = malloc(sizeof *c);
  if (c == NULL)
    return;
  uv_tcp_init(loop, c);
  if (uv_accept(server, (uv_stream_t *)c) != 0) {
    uv_close((uv_handle_t *)c, on_closed);
    return;
  }
  uv_tcp_nodelay(c, 1);
  uv_read_start((uv_stream_t *)c, on_alloc, on_read);
}

int
main(int argc, char **argv)
{
  int port = bench_port(argc, argv, NULL);
  struct sockaddr_in addr;
  uv_tcp_t server;
  loop = uv_default_loop();
  uv_ip4_addr("127.0.0.1", port, &addr);
  uv_tcp_init(loop, &server);
  int r = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  if (r == 0)
    r = uv_listen((uv_stream_t *)&server, 4096, on_connection);
  if (r != 0) {
    fprintf(stderr, "listen on port %d: %s\n", port, uv_strerror(r));
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  return uv_run(loop, UV_RUN_DEFAULT);
}
