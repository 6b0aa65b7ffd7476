/* Layout guards for every public struct on LP64 targets (Linux, macOS,
 * the BSDs on 64-bit): a field that moves or a struct that changes size is
 * an ABI break and fails this build. A deliberate, versioned change updates
 * these numbers together with tests/abi/libduplex.abi (tools/abi-update).
 * layout_check.py makes sure every public struct and field is listed;
 * `layout_check.py --print` prints these lines from a compiler.
 * layout_ilp32.c has the 32-bit x86 numbers. Elsewhere this program exits
 * 77: skipped. */
#include <duplex.h>

#include <stddef.h>
#include <stdint.h>

#if UINTPTR_MAX == UINT64_MAX && !defined(_WIN32)
#define DUPLEX_LAYOUT_GUARDED 1
#define SIZE_IS(T, n, a)                                                     \
  _Static_assert(sizeof(T) == (n) && _Alignof(T) == (a), #T " size")
#define AT(T, f, off)                                                        \
  _Static_assert(offsetof(T, f) == (off), #T "." #f " offset")


SIZE_IS(duplex_buf, 16, 8);
AT(duplex_buf, base, 0);
AT(duplex_buf, len, 8);

SIZE_IS(duplex_loop_opts, 16, 8);
AT(duplex_loop_opts, size, 0);
AT(duplex_loop_opts, flags, 8);
AT(duplex_loop_opts, read_buffer_size, 12);

SIZE_IS(duplex_conn_cbs, 64, 8);
AT(duplex_conn_cbs, size, 0);
AT(duplex_conn_cbs, on_open, 8);
AT(duplex_conn_cbs, on_read, 16);
AT(duplex_conn_cbs, on_eof, 24);
AT(duplex_conn_cbs, on_backpressure, 32);
AT(duplex_conn_cbs, on_writable, 40);
AT(duplex_conn_cbs, on_close, 48);
AT(duplex_conn_cbs, on_read_batch, 56);

SIZE_IS(duplex_framing, 56, 8);
AT(duplex_framing, size, 0);
AT(duplex_framing, kind, 8);
AT(duplex_framing, flags, 12);
AT(duplex_framing, delimiter, 16);
AT(duplex_framing, delimiter_len, 20);
AT(duplex_framing, prefix_bytes, 24);
AT(duplex_framing, max_frame, 32);
AT(duplex_framing, custom, 40);
AT(duplex_framing, custom_user, 48);

SIZE_IS(duplex_conn_opts, 112, 8);
AT(duplex_conn_opts, size, 0);
AT(duplex_conn_opts, cbs, 8);
AT(duplex_conn_opts, user, 16);
AT(duplex_conn_opts, high_watermark, 24);
AT(duplex_conn_opts, low_watermark, 32);
AT(duplex_conn_opts, hard_limit, 40);
AT(duplex_conn_opts, flags, 48);
AT(duplex_conn_opts, framing, 56);
AT(duplex_conn_opts, connect_timeout_ms, 64);
AT(duplex_conn_opts, idle_timeout_ms, 68);
AT(duplex_conn_opts, read_timeout_ms, 72);
AT(duplex_conn_opts, flush_timeout_ms, 76);
AT(duplex_conn_opts, local_host, 80);
AT(duplex_conn_opts, local_port, 88);
AT(duplex_conn_opts, tls, 96);
AT(duplex_conn_opts, tls_host, 104);

SIZE_IS(duplex_listener_opts, 56, 8);
AT(duplex_listener_opts, size, 0);
AT(duplex_listener_opts, conn_opts, 8);
AT(duplex_listener_opts, on_error, 16);
AT(duplex_listener_opts, user, 24);
AT(duplex_listener_opts, backlog, 32);
AT(duplex_listener_opts, flags, 36);
AT(duplex_listener_opts, mode, 40);
AT(duplex_listener_opts, tls, 48);

SIZE_IS(duplex_channel_opts, 48, 8);
AT(duplex_channel_opts, size, 0);
AT(duplex_channel_opts, on_message, 8);
AT(duplex_channel_opts, on_close, 16);
AT(duplex_channel_opts, user, 24);
AT(duplex_channel_opts, capacity, 32);
AT(duplex_channel_opts, flags, 40);

SIZE_IS(duplex_loop_stats, 32, 8);
AT(duplex_loop_stats, size, 0);
AT(duplex_loop_stats, conns, 8);
AT(duplex_loop_stats, queued, 16);
AT(duplex_loop_stats, accepted, 24);

SIZE_IS(duplex_group_opts, 24, 8);
AT(duplex_group_opts, size, 0);
AT(duplex_group_opts, loops, 8);
AT(duplex_group_opts, flags, 12);
AT(duplex_group_opts, loop_opts, 16);

SIZE_IS(duplex_tls_config, 152, 8);
AT(duplex_tls_config, size, 0);
AT(duplex_tls_config, role, 8);
AT(duplex_tls_config, cert_file, 16);
AT(duplex_tls_config, cert_pem, 24);
AT(duplex_tls_config, cert_pem_len, 32);
AT(duplex_tls_config, key_file, 40);
AT(duplex_tls_config, key_pem, 48);
AT(duplex_tls_config, key_pem_len, 56);
AT(duplex_tls_config, ca_file, 64);
AT(duplex_tls_config, ca_dir, 72);
AT(duplex_tls_config, ca_pem, 80);
AT(duplex_tls_config, ca_pem_len, 88);
AT(duplex_tls_config, system_ca, 96);
AT(duplex_tls_config, verify, 100);
AT(duplex_tls_config, alpn, 104);
AT(duplex_tls_config, alpn_count, 112);
AT(duplex_tls_config, min_version, 120);
AT(duplex_tls_config, max_version, 124);
AT(duplex_tls_config, session_cache, 128);
AT(duplex_tls_config, keylog_file, 136);
AT(duplex_tls_config, handshake_timeout_ms, 144);

SIZE_IS(duplex_tls_info, 872, 8);
AT(duplex_tls_info, size, 0);
AT(duplex_tls_info, version, 8);
AT(duplex_tls_info, version_name, 12);
AT(duplex_tls_info, cipher, 28);
AT(duplex_tls_info, alpn, 92);
AT(duplex_tls_info, sni, 348);
AT(duplex_tls_info, peer_subject, 604);
AT(duplex_tls_info, resumed, 860);
AT(duplex_tls_info, peer_cert, 864);

#endif

int
main(void)
{
#ifdef DUPLEX_LAYOUT_GUARDED
  return 0;
#else
  return 77; /* not LP64: nothing was checked (skipped) */
#endif
}
