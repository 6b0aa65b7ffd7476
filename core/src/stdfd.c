/* Standard descriptors 0-2. libuv never closes them (its close path skips
 * fds <= 2 and asserts that a socket it closes is above them), so:
 * - a socket must never get one of those numbers: any of them that is
 *   closed is opened on /dev/null before the library makes sockets;
 * - a conn that owns one of them (adopted stdin/stdout) releases it by
 *   putting /dev/null in its place, which drops the pipe or socket it
 *   referred to (the peer sees EOF) while the number stays taken. */
#include "internal.h"

#if !defined(_WIN32)
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

static int
open_devnull(void)
{
  int fd;
  do
    fd = open("/dev/null", O_RDWR);
  while (fd < 0 && errno == EINTR);
  return fd;
}

void
dpx_stdio_ensure_open(void)
{
  for (int fd = 0; fd <= 2; fd++) {
    if (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
      continue;
    int n = open_devnull(); /* the lowest free number: fd itself */
    if (n < 0)
      return; /* nothing better to do; sockets may then take 0-2 */
    if (n != fd) {
      (void)dup2(n, fd);
      close(n);
    }
  }
}

void
dpx_stdio_release(int fd)
{
  if (!dpx_is_stdio_fd(fd))
    return;
  int n = open_devnull();
  if (n < 0) {
    close(fd); /* at least drop the peer's end */
    return;
  }
  if (n != fd) {
    int r;
    do
      r = dup2(n, fd);
    while (r < 0 && errno == EINTR);
    close(n);
  }
}
#else
void
dpx_stdio_ensure_open(void)
{
}

void
dpx_stdio_release(int fd)
{
  (void)fd;
}
#endif
