/* xthread_uv: the straightforward way to write into one libuv conn from
 * other threads, as the baseline for xthread_duplex.
 * Usage: xthread_uv PORT NPRODUCERS   (127.0.0.1; prints nothing)
 *
 * Producers malloc each 64-byte message (xthread_msg.h), append it to a
 * mutex-protected list and call uv_async_send (libuv coalesces wake-ups).
 * On each wake-up the loop takes the whole list and issues one uv_write
 * with one buffer per message; the write callback frees them. Producers
 * wait on a condition variable while 16384 messages (1 MiB) are queued or
 * in flight. uv_async_send is called under the mutex, so the loop cannot
 * close the async handle under a producer.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <uv.h>

#include "common.h"
#include "xthread_msg.h"

#define LIMIT 16384

typedef struct msg {
  struct msg *next;
  unsigned char data[XMSG];
} msg;

typedef struct {
  uv_write_t req;
  msg *head;
  size_t n;
  uv_buf_t bufs[];
} batch;

typedef struct {
  uv_tcp_t tcp;
  uv_async_t async;
  uv_mutex_t mu;
  uv_cond_t cv;
  msg *head, *tail; /* queued, not yet handed to uv_write */
  size_t pending;   /* queued + in flight */
  bool closed;
  int handles;      /* open handles (loop thread) */
  atomic_int refs;  /* producers + the loop */
} xconn;

typedef struct {
  xconn *x;
  uint32_t id;
} producer;

static uv_loop_t *loop;
static int nproducers;
static char rbuf[65536];

static void
free_list(msg *m)
{
  while (m != NULL) {
    msg *next = m->next;
    free(m);
    m = next;
  }
}

static void
xconn_unref(xconn *x)
{
  if (atomic_fetch_sub(&x->refs, 1) != 1)
    return;
  free_list(x->head);
  uv_mutex_destroy(&x->mu);
  uv_cond_destroy(&x->cv);
  free(x);
}

static void
on_handle_closed(uv_handle_t *h)
{
  xconn *x = h->data;
  if (--x->handles == 0)
    xconn_unref(x);
}

static void
xconn_close(xconn *x)
{
  uv_mutex_lock(&x->mu);
  bool was = x->closed;
  x->closed = true;
  uv_cond_broadcast(&x->cv);
  uv_mutex_unlock(&x->mu);
  if (was)
    return;
  uv_close((uv_handle_t *)&x->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&x->async, on_handle_closed);
}

static void *
produce(void *arg)
{
  producer *p = arg;
  xconn *x = p->x;
  for (uint64_t seq = 0;; seq++) {
    msg *m = malloc(sizeof *m);
    if (m == NULL)
      break;
    m->next = NULL;
    xmsg_fill(m->data, p->id, seq);
    uv_mutex_lock(&x->mu);
    while (!x->closed && x->pending >= LIMIT)
      uv_cond_wait(&x->cv, &x->mu);
    if (x->closed) {
      uv_mutex_unlock(&x->mu);
      free(m);
      break;
    }
    if (x->tail != NULL)
      x->tail->next = m;
    else
      x->head = m;
    x->tail = m;
    x->pending++;
    uv_async_send(&x->async);
    uv_mutex_unlock(&x->mu);
  }
  xconn_unref(x);
  free(p);
  return NULL;
}

static void
on_write(uv_write_t *req, int status)
{
  batch *b = (batch *)req;
  xconn *x = req->data;
  free_list(b->head);
  uv_mutex_lock(&x->mu);
  x->pending -= b->n;
  if (x->pending < LIMIT)
    uv_cond_broadcast(&x->cv);
  uv_mutex_unlock(&x->mu);
  free(b);
  if (status != 0)
    xconn_close(x);
}

static void
on_async(uv_async_t *a)
{
  xconn *x = a->data;
  uv_mutex_lock(&x->mu);
  msg *head = x->head;
  x->head = x->tail = NULL;
  uv_mutex_unlock(&x->mu);
  if (head == NULL)
    return;
  size_t n = 0;
  for (msg *m = head; m != NULL; m = m->next)
    n++;
  batch *b = malloc(sizeof *b + n * sizeof(uv_buf_t));
  if (b == NULL) {
    free_list(head);
    xconn_close(x);
    return;
  }
  b->head = head;
  b->n = n;
  b->req.data = x;
  size_t i = 0;
  for (msg *m = head; m != NULL; m = m->next)
    b->bufs[i++] = uv_buf_init((char *)m->data, XMSG);
  if (uv_write(&b->req, (uv_stream_t *)&x->tcp, b->bufs, (unsigned)n,
               on_write) != 0) {
    free_list(head);
    free(b);
    xconn_close(x);
  }
}

static void
on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
  (void)h;
  (void)suggested;
  *buf = uv_buf_init(rbuf, sizeof rbuf);
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
  (void)buf;
  if (nread < 0)
    xconn_close(s->data);
}

static void
on_connection(uv_stream_t *server, int status)
{
  if (status != 0)
    return;
  xconn *x = calloc(1, sizeof *x);
  if (x == NULL)
    return;
  uv_mutex_init(&x->mu);
  uv_cond_init(&x->cv);
  uv_tcp_init(loop, &x->tcp);
  uv_async_init(loop, &x->async, on_async);
  x->tcp.data = x->async.data = x;
  x->handles = 2;
  atomic_init(&x->refs, 1);
  if (uv_accept(server, (uv_stream_t *)&x->tcp) != 0) {
    xconn_close(x);
    return;
  }
  uv_tcp_nodelay(&x->tcp, 1);
  uv_read_start((uv_stream_t *)&x->tcp, on_alloc, on_read);
  for (int i = 0; i < nproducers; i++) {
    producer *p = malloc(sizeof *p);
    pthread_t t;
    p->x = x;
    p->id = (uint32_t)i;
    atomic_fetch_add(&x->refs, 1);
    if (pthread_create(&t, NULL, produce, p) != 0) {
      atomic_fetch_sub(&x->refs, 1);
      free(p);
      xconn_close(x);
      return;
    }
    pthread_detach(t);
  }
}

int
main(int argc, char **argv)
{
  int port = bench_port(argc, argv, " NPRODUCERS");
  nproducers = argc > 2 ? atoi(argv[2]) : 1;
  if (nproducers < 1 || nproducers > 64)
    nproducers = 1;
  xmsg_init();
  signal(SIGPIPE, SIG_IGN);
  loop = uv_default_loop();
  struct sockaddr_in addr;
  uv_tcp_t server;
  uv_ip4_addr("127.0.0.1", port, &addr);
  uv_tcp_init(loop, &server);
  int r = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  if (r == 0)
    r = uv_listen((uv_stream_t *)&server, 128, on_connection);
  if (r != 0) {
    fprintf(stderr, "listen on port %d: %s\n", port, uv_strerror(r));
    return 1;
  }
  return uv_run(loop, UV_RUN_DEFAULT);
}
