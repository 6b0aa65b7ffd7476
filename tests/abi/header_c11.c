/* The public header compiles as strict C11 with -pedantic -Werror, and
 * every option initialiser macro expands to a valid initialiser. */
#include <duplex.h>

int
main(void)
{
  duplex_loop_opts lo = DUPLEX_LOOP_OPTS_INIT;
  duplex_conn_opts co = DUPLEX_CONN_OPTS_INIT;
  duplex_conn_cbs cb = DUPLEX_CONN_CBS_INIT;
  duplex_listener_opts li = DUPLEX_LISTENER_OPTS_INIT;
  duplex_channel_opts ch = DUPLEX_CHANNEL_OPTS_INIT;
  duplex_framing fr = DUPLEX_FRAMING_INIT;
  return (lo.size == sizeof lo && co.size == sizeof co && cb.size == sizeof cb &&
          li.size == sizeof li && ch.size == sizeof ch && fr.size == sizeof fr &&
          duplex_version() == DUPLEX_VERSION_HEX)
             ? 0
             : 1;
}
