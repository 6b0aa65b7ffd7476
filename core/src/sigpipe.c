/* SIGPIPE without touching the process's signal disposition.
 *
 * Every write the library makes happens on a loop thread, so blocking
 * SIGPIPE in that thread alone is enough: a write to a reset peer then
 * fails with EPIPE and the thread-directed signal stays pending. Before a
 * borrowed thread (duplex_loop_run) gets its old mask back, a SIGPIPE that
 * became pending meanwhile is consumed so it cannot be delivered late.
 * BSD/macOS: libuv also sets SO_NOSIGPIPE. Windows has no SIGPIPE. */
#include "internal.h"

#include <string.h>

#if defined(_WIN32)

void dpx_sigpipe_block(dpx_sigstate *st) { st->active = false; }
void dpx_sigpipe_restore(dpx_sigstate *st) { st->active = false; }
void dpx_thread_block_signals(void) {}

#else

#include <pthread.h>
#include <signal.h>
#include <time.h>

typedef struct {
  sigset_t old;
  bool was_pending;
} dpx_sigsave;

_Static_assert(sizeof(dpx_sigsave) <= sizeof(((dpx_sigstate *)0)->opaque),
               "dpx_sigstate too small for this platform's sigset_t");

void
dpx_sigpipe_block(dpx_sigstate *st)
{
  dpx_sigsave s;
  sigset_t set, pending;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  st->active = pthread_sigmask(SIG_BLOCK, &set, &s.old) == 0;
  s.was_pending = false;
  if (st->active && sigpending(&pending) == 0)
    s.was_pending = sigismember(&pending, SIGPIPE) == 1;
  memcpy(st->opaque, &s, sizeof s);
}

void
dpx_sigpipe_restore(dpx_sigstate *st)
{
  dpx_sigsave s;
  if (!st->active)
    return;
  memcpy(&s, st->opaque, sizeof s);
  if (!s.was_pending && !sigismember(&s.old, SIGPIPE)) {
    sigset_t pending, set;
    if (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1) {
      struct timespec zero = { 0, 0 };
      sigemptyset(&set);
      sigaddset(&set, SIGPIPE);
      while (sigtimedwait(&set, NULL, &zero) == -1 && errno == EINTR) {
      }
    }
  }
  pthread_sigmask(SIG_SETMASK, &s.old, NULL);
  st->active = false;
}

void
dpx_thread_block_signals(void)
{
  sigset_t set;
  sigfillset(&set);
  /* Synchronous faults must still reach this thread. */
  sigdelset(&set, SIGSEGV);
  sigdelset(&set, SIGBUS);
  sigdelset(&set, SIGFPE);
  sigdelset(&set, SIGILL);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
}

#endif
