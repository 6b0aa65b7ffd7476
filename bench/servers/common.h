/* Shared by the C benchmark servers: argument parsing, nothing else. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

/* The port from argv[1] (1..65535), or exit 2 with a usage line. */
static inline int
bench_port(int argc, char **argv, const char *extra)
{
  char *end;
  long p;
  if (argc < 2)
    goto bad;
  errno = 0;
  p = strtol(argv[1], &end, 10);
  if (errno != 0 || *end != '\0' || p < 1 || p > 65535)
    goto bad;
  return (int)p;
bad:
  fprintf(stderr, "usage: %s PORT%s\n", argv[0], extra ? extra : "");
  exit(2);
}

#endif
