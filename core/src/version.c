#include "internal.h"

unsigned
duplex_version(void)
{
  return DUPLEX_VERSION_HEX;
}

const char *
duplex_version_string(void)
{
  return DUPLEX_VERSION_STRING;
}
