/* The error table: strings, names and libuv translation. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

const char *
duplex_strerror(int err)
{
  switch (err) {
  case 0:
    return "success";
#define DPX_STR_(name, value, msg)                                           \
  case DUPLEX_##name:                                                        \
    return msg;
    DUPLEX_ERRNO_MAP(DPX_STR_)
#undef DPX_STR_
  default:
    return "unknown error";
  }
}

const char *
duplex_err_name(int err)
{
  switch (err) {
  case 0:
    return "DUPLEX_OK";
#define DPX_NAME_(name, value, msg)                                          \
  case DUPLEX_##name:                                                        \
    return "DUPLEX_" #name;
    DUPLEX_ERRNO_MAP(DPX_NAME_)
#undef DPX_NAME_
  default:
    return "DUPLEX_UNKNOWN";
  }
}

int
dpx_err(int status)
{
  if (status >= 0)
    return status;
  switch (status) {
#define DPX_KNOWN_(name, value, msg) case DUPLEX_##name:
    DUPLEX_ERRNO_MAP(DPX_KNOWN_)
#undef DPX_KNOWN_
    return status;
  case UV_EAI_CANCELED:
    return DUPLEX_ECANCELED;
  case UV_EAI_MEMORY:
    return DUPLEX_ENOMEM;
  default:
    break;
  }
  /* libuv's getaddrinfo codes occupy -3000..-3099 on every platform. */
  if (status <= -3000 && status > -3100)
    return DUPLEX_EAI_OTHER;
  return DUPLEX_EUNKNOWN;
}

char *
dpx_strdup(const char *s)
{
  size_t n = strlen(s) + 1;
  char *p = malloc(n);
  if (p != NULL)
    memcpy(p, s, n);
  return p;
}

int
dpx_check_size(const void *p, size_t given, size_t min_size, size_t our_size)
{
  if (given < min_size)
    return DUPLEX_EVERSION;
  if (given > our_size) {
    /* A newer caller: accept only if every field we do not know is zero. */
    const unsigned char *b = (const unsigned char *)p;
    if (given > 4096)
      return DUPLEX_EVERSION;
    for (size_t i = our_size; i < given; i++)
      if (b[i] != 0)
        return DUPLEX_EVERSION;
  }
  return 0;
}
