/* The cross-thread benchmark's 64-byte message, shared by both servers:
 * [u32 producer][u64 seq][52 bytes: pattern (i % 251) from (seq + id) % 251].
 * loadgen's `xsink` mode checks every field. */
#ifndef BENCH_XTHREAD_MSG_H
#define BENCH_XTHREAD_MSG_H

#include <stdint.h>
#include <string.h>

#define XMSG 64
#define XPAT 251

static unsigned char xpat[XPAT + XMSG];

static inline void
xmsg_init(void)
{
  for (unsigned i = 0; i < sizeof xpat; i++)
    xpat[i] = (unsigned char)(i % XPAT);
}

static inline void
xmsg_fill(unsigned char *m, uint32_t id, uint64_t seq)
{
  memcpy(m, &id, 4);
  memcpy(m + 4, &seq, 8);
  memcpy(m + 12, xpat + (seq + id) % XPAT, XMSG - 12);
}

#endif
