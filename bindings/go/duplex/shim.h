/* C side of the Go binding: the callback table and small wrappers, so that
 * Go never hands C a Go pointer it would keep. User data is always a
 * runtime/cgo.Handle value carried as an integer. */
#ifndef DUPLEX_GO_SHIM_H
#define DUPLEX_GO_SHIM_H

#include <duplex.h>
#include <stdint.h>

typedef struct dpxgo_limits {
  size_t high, low, hard;
} dpxgo_limits;

/* tls/tls_host: duplex_conn_opts.tls and .tls_host (NULL: plain, or the
 * default name); a listener's tls goes to duplex_listener_opts.tls. */
int dpxgo_connect_tcp(duplex_conn **out, duplex_loop *loop, const char *host,
                      uint16_t port, uintptr_t user, dpxgo_limits lim,
                      duplex_tls *tls, const char *tls_host);
int dpxgo_connect_unix(duplex_conn **out, duplex_loop *loop, const char *path,
                       uintptr_t user, dpxgo_limits lim, duplex_tls *tls,
                       const char *tls_host);
int dpxgo_listen_tcp(duplex_listener **out, duplex_loop *loop,
                     const char *host, uint16_t port, int backlog,
                     unsigned flags, uintptr_t user, dpxgo_limits lim,
                     duplex_tls *tls);
int dpxgo_listen_unix(duplex_listener **out, duplex_loop *loop,
                      const char *path, int backlog, unsigned flags,
                      uintptr_t user, dpxgo_limits lim, duplex_tls *tls);
int dpxgo_group_listen_tcp(duplex_listener **out, duplex_loop_group *group,
                           const char *host, uint16_t port, int backlog,
                           unsigned flags, uintptr_t user, dpxgo_limits lim,
                           duplex_tls *tls);
int dpxgo_group_listen_unix(duplex_listener **out, duplex_loop_group *group,
                            const char *path, int backlog, unsigned flags,
                            uintptr_t user, dpxgo_limits lim,
                            duplex_tls *tls);
/* duplex_conn_start_tls with goOnTLSDone(conn, status, user) as its
 * callback. */
int dpxgo_start_tls(duplex_conn *conn, duplex_tls *tls, const char *host,
                    uintptr_t user);
int dpxgo_group_new(duplex_loop_group **out, unsigned loops, unsigned flags);
int dpxgo_set_user(duplex_conn *conn, uintptr_t user);
/* Post goListenerClosed(user, status) to the loop thread. */
int dpxgo_post_listener_close(duplex_loop *loop, uintptr_t user);
/* Post goListenerBarrier(user, status) to the loop thread (a group
 * listener's Close: once it has run on every loop of the group, no accept
 * that began before the close can still call back). */
int dpxgo_post_listener_barrier(duplex_loop *loop, uintptr_t user);

#endif
