/* echo_libevent: TCP echo server on libevent bufferevents, for the
 * benchmarks. Usage: echo_libevent PORT (127.0.0.1; prints nothing)
 *
 * evconnlistener accepts; each conn is a socket bufferevent whose read
 * callback moves its input buffer to its output buffer.
 */
#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>

#include "common.h"

static void
on_read(struct bufferevent *bev, void *arg)
{
  (void)arg;
  evbuffer_add_buffer(bufferevent_get_output(bev), bufferevent_get_input(bev));
}

static void
on_event(struct bufferevent *bev, short what, void *arg)
{
  (void)arg;
  if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
    bufferevent_free(bev);
}

static void
on_accept(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
          int socklen, void *arg)
{
  (void)sa;
  (void)socklen;
  (void)arg;
  struct event_base *base = evconnlistener_get_base(l);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct bufferevent *bev =
      bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
  if (bev == NULL) {
    evutil_closesocket(fd);
    return;
  }
  bufferevent_setcb(bev, on_read, NULL, on_event, NULL);
  bufferevent_enable(bev, EV_READ | EV_WRITE);
}

int
main(int argc, char **argv)
{
  int port = bench_port(argc, argv, NULL);
  struct sockaddr_in sin;
  signal(SIGPIPE, SIG_IGN);
  struct event_base *base = event_base_new();
  if (base == NULL)
    return 1;
  memset(&sin, 0, sizeof sin);
  sin.sin_family = AF_INET;
  sin.sin_port = htons((uint16_t)port);
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct evconnlistener *l = evconnlistener_new_bind(
      base, on_accept, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, 4096,
      (struct sockaddr *)&sin, sizeof sin);
  if (l == NULL) {
    fprintf(stderr, "listen on port %d failed\n", port);
    return 1;
  }
  event_base_dispatch(base);
  evconnlistener_free(l);
  event_base_free(base);
  return 0;
}
