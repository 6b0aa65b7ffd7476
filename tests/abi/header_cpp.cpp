// The public C header compiles as C++ (-pedantic -Werror) and links.
#include <duplex.h>

int main() {
  duplex_conn_opts co = DUPLEX_CONN_OPTS_INIT;
  return co.size == sizeof co && duplex_strerror(DUPLEX_ECLOSED)[0] != '\0' ? 0 : 1;
}
