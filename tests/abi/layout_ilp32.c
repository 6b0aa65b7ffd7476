/* Layout guards for every public struct on 32-bit x86 (i386 / i686 System V
 * ABI: Linux and the BSDs), the ILP32 target CI builds and runs (tools/dev
 * test i386). A field that moves or a struct that changes size is an ABI
 * break and fails this build; layout_check.py makes sure every public
 * struct and field is listed, and `layout_check.py --print` prints these
 * lines from a compiler (docs/abi.md).
 *
 * i386 aligns 8-byte members (uint64_t, long long, double) to 4 inside
 * structs, so duplex_loop_stats differs from other ILP32 ABIs (armhf,
 * 32-bit MIPS and PowerPC align them to 8); those would need their own
 * numbers. Elsewhere this program exits 77: skipped. */
#include <duplex.h>

#include <stddef.h>
#include <stdint.h>

#if UINTPTR_MAX == UINT32_MAX && defined(__i386__) && !defined(_WIN32)
#define DUPLEX_LAYOUT_GUARDED 1
#define SIZE_IS(T, n, a)                                                     \
  _Static_assert(sizeof(T) == (n) && _Alignof(T) == (a), #T " size")
#define AT(T, f, off)                                                        \
  _Static_assert(offsetof(T, f) == (off), #T "." #f " offset")

SIZE_IS(duplex_buf, 8, 4);
AT(duplex_buf, base, 0);
AT(duplex_buf, len, 4);

SIZE_IS(duplex_loop_opts, 12, 4);
AT(duplex_loop_opts, size, 0);
AT(duplex_loop_opts, flags, 4);
AT(duplex_loop_opts, read_buffer_size, 8);

SIZE_IS(duplex_loop_stats, 28, 4);
AT(duplex_loop_stats, size, 0);
AT(duplex_loop_stats, conns, 4);
AT(duplex_loop_stats, queued, 12);
AT(duplex_loop_stats, accepted, 20);

SIZE_IS(duplex_conn_cbs, 32, 4);
AT(duplex_conn_cbs, size, 0);
AT(duplex_conn_cbs, on_open, 4);
AT(duplex_conn_cbs, on_read, 8);
AT(duplex_conn_cbs, on_eof, 12);
AT(duplex_conn_cbs, on_backpressure, 16);
AT(duplex_conn_cbs, on_writable, 20);
AT(duplex_conn_cbs, on_close, 24);
AT(duplex_conn_cbs, on_read_batch, 28);

SIZE_IS(duplex_framing, 36, 4);
AT(duplex_framing, size, 0);
AT(duplex_framing, kind, 4);
AT(duplex_framing, flags, 8);
AT(duplex_framing, delimiter, 12);
AT(duplex_framing, delimiter_len, 16);
AT(duplex_framing, prefix_bytes, 20);
AT(duplex_framing, max_frame, 24);
AT(duplex_framing, custom, 28);
AT(duplex_framing, custom_user, 32);

SIZE_IS(duplex_conn_opts, 64, 4);
AT(duplex_conn_opts, size, 0);
AT(duplex_conn_opts, cbs, 4);
AT(duplex_conn_opts, user, 8);
AT(duplex_conn_opts, high_watermark, 12);
AT(duplex_conn_opts, low_watermark, 16);
AT(duplex_conn_opts, hard_limit, 20);
AT(duplex_conn_opts, flags, 24);
AT(duplex_conn_opts, framing, 28);
AT(duplex_conn_opts, connect_timeout_ms, 32);
AT(duplex_conn_opts, idle_timeout_ms, 36);
AT(duplex_conn_opts, read_timeout_ms, 40);
AT(duplex_conn_opts, flush_timeout_ms, 44);
AT(duplex_conn_opts, local_host, 48);
AT(duplex_conn_opts, local_port, 52);
AT(duplex_conn_opts, tls, 56);
AT(duplex_conn_opts, tls_host, 60);

SIZE_IS(duplex_listener_opts, 32, 4);
AT(duplex_listener_opts, size, 0);
AT(duplex_listener_opts, conn_opts, 4);
AT(duplex_listener_opts, on_error, 8);
AT(duplex_listener_opts, user, 12);
AT(duplex_listener_opts, backlog, 16);
AT(duplex_listener_opts, flags, 20);
AT(duplex_listener_opts, mode, 24);
AT(duplex_listener_opts, tls, 28);

SIZE_IS(duplex_group_opts, 16, 4);
AT(duplex_group_opts, size, 0);
AT(duplex_group_opts, loops, 4);
AT(duplex_group_opts, flags, 8);
AT(duplex_group_opts, loop_opts, 12);

SIZE_IS(duplex_channel_opts, 24, 4);
AT(duplex_channel_opts, size, 0);
AT(duplex_channel_opts, on_message, 4);
AT(duplex_channel_opts, on_close, 8);
AT(duplex_channel_opts, user, 12);
AT(duplex_channel_opts, capacity, 16);
AT(duplex_channel_opts, flags, 20);

SIZE_IS(duplex_tls_config, 84, 4);
AT(duplex_tls_config, size, 0);
AT(duplex_tls_config, role, 4);
AT(duplex_tls_config, cert_file, 8);
AT(duplex_tls_config, cert_pem, 12);
AT(duplex_tls_config, cert_pem_len, 16);
AT(duplex_tls_config, key_file, 20);
AT(duplex_tls_config, key_pem, 24);
AT(duplex_tls_config, key_pem_len, 28);
AT(duplex_tls_config, ca_file, 32);
AT(duplex_tls_config, ca_dir, 36);
AT(duplex_tls_config, ca_pem, 40);
AT(duplex_tls_config, ca_pem_len, 44);
AT(duplex_tls_config, system_ca, 48);
AT(duplex_tls_config, verify, 52);
AT(duplex_tls_config, alpn, 56);
AT(duplex_tls_config, alpn_count, 60);
AT(duplex_tls_config, min_version, 64);
AT(duplex_tls_config, max_version, 68);
AT(duplex_tls_config, session_cache, 72);
AT(duplex_tls_config, keylog_file, 76);
AT(duplex_tls_config, handshake_timeout_ms, 80);

SIZE_IS(duplex_tls_info, 864, 4);
AT(duplex_tls_info, size, 0);
AT(duplex_tls_info, version, 4);
AT(duplex_tls_info, version_name, 8);
AT(duplex_tls_info, cipher, 24);
AT(duplex_tls_info, alpn, 88);
AT(duplex_tls_info, sni, 344);
AT(duplex_tls_info, peer_subject, 600);
AT(duplex_tls_info, resumed, 856);
AT(duplex_tls_info, peer_cert, 860);

#endif

int
main(void)
{
#ifdef DUPLEX_LAYOUT_GUARDED
  return 0;
#else
  return 77; /* not i386: nothing was checked */
#endif
}
