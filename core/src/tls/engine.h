/* The TLS engine: one internal interface between libduplex and a TLS
 * library (today OpenSSL 3, engine_openssl.c). Prefix: dpx_tls_.
 *
 * An engine is a pure byte transformer. It never touches a socket, never
 * blocks and never calls back into the conn code: the caller feeds it the
 * ciphertext it read, pulls plaintext out, hands it plaintext to encrypt
 * and pulls the ciphertext to send. Everything the TLS library says is
 * mapped to the few status codes below, so no TLS library type appears
 * here and another backend could implement the same header.
 *
 * Threads: a config (dpx_tls_config) is immutable after creation and may
 * be shared by any number of engines on any threads; ref/unref from any
 * thread. An engine (dpx_tls) is used by one thread at a time (the loop
 * thread of its conn); nothing in it is locked.
 *
 * Memory: an engine holds ciphertext in two queues, input (fed, not yet
 * decrypted) and output (encrypted, not yet sent). Both are bounded (see
 * dpx_tls_opts) and both hold no allocation at all while empty; the TLS
 * library's own record buffers are released while idle too. Plaintext is
 * never queued by the engine: dpx_tls_read decrypts into the caller's
 * buffer, dpx_tls_write encrypts straight into the output queue.
 *
 * docs/tls-engine.md describes the contracts at length. */
#ifndef DPX_TLS_ENGINE_H
#define DPX_TLS_ENGINE_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes -------------------------------------------------------
 * Non-negative: the call worked, and says what to do next. Negative: the
 * engine failed; the error is sticky (every later call returns it) and
 * dpx_tls_reason() explains it. After any error the output queue may still
 * hold an alert for the peer: send it if you can, then close. */
enum {
  DPX_TLS_OK = 0,
  DPX_TLS_WANT_INPUT = 1, /* nothing more until the peer's bytes are fed */
  DPX_TLS_FULL = 2,       /* a queue is at its cap: drain it, then retry */
  DPX_TLS_EOF = 3,        /* the peer's close_notify: a clean end of data */

  DPX_TLS_EVERIFY = -1,   /* peer certificate refused (dpx_tls_verify_error) */
  DPX_TLS_EALERT = -2,    /* the peer sent a fatal alert (dpx_tls_alert) */
  DPX_TLS_EPROTO = -3,    /* malformed or unexpected data, failed handshake */
  DPX_TLS_ETRUNCATED = -4,/* transport EOF without close_notify */
  DPX_TLS_ESHUTDOWN = -5, /* write after our close_notify (not sticky) */
  DPX_TLS_ENOMEM = -6,
  DPX_TLS_EINVAL = -7,    /* bad argument or option (not sticky) */
  DPX_TLS_ECONFIG = -8    /* config: a certificate, key or CA failed to load */
};

/* Static name ("EVERIFY", "WANT_INPUT", ...) of any status or error. */
const char *dpx_tls_status_name(int status);

/* Why certificate verification failed (backend-neutral classes). */
enum {
  DPX_TLS_VERIFY_OK = 0,
  DPX_TLS_VERIFY_UNTRUSTED,     /* chain does not end at a trusted CA */
  DPX_TLS_VERIFY_EXPIRED,       /* a certificate is past notAfter */
  DPX_TLS_VERIFY_NOT_YET_VALID, /* a certificate is before notBefore */
  DPX_TLS_VERIFY_HOSTNAME,      /* the leaf does not match the host name */
  DPX_TLS_VERIFY_NO_CERT,       /* the peer sent no certificate (mTLS) */
  DPX_TLS_VERIFY_USAGE,         /* wrong key usage / purpose */
  DPX_TLS_VERIFY_OTHER
};

/* ---- config ------------------------------------------------------------- */

enum { DPX_TLS_CLIENT = 1, DPX_TLS_SERVER = 2 };

enum {
  DPX_TLS_V1_2 = 0x0303, /* the default minimum */
  DPX_TLS_V1_3 = 0x0304
};

/* Peer verification. DEFAULT: clients verify the server's chain and host
 * name; servers do not ask for a client certificate. */
enum {
  DPX_TLS_VERIFY_DEFAULT = 0,
  DPX_TLS_VERIFY_NONE,     /* client: accept any server (testing only) */
  DPX_TLS_VERIFY_REQUIRE,  /* server: mutual TLS, a valid client cert needed */
  DPX_TLS_VERIFY_OPTIONAL  /* server: ask; verify one if the client sends it */
};

/* Everything is borrowed for the call: dpx_tls_config_new copies or loads
 * what it needs. Zero / NULL means "default" for every field. */
typedef struct dpx_tls_config_opts {
  int role; /* DPX_TLS_CLIENT or DPX_TLS_SERVER (required) */

  /* Own certificate chain (leaf first) and private key, PEM: from a file
   * or from memory (len 0: NUL-terminated). Servers need both; a client
   * sets them for mutual TLS. Encrypted keys are refused (no prompt). */
  const char *cert_file;
  const char *cert_pem;
  size_t cert_pem_len;
  const char *key_file;
  const char *key_pem;
  size_t key_pem_len;

  /* Trust for verifying the peer: any mix of a CA file, a hashed CA
   * directory, CA certificates in memory (PEM) and the system store.
   * With none of the first three, a config that verifies its peer uses
   * the system store (a server that asks for no certificate loads none). */
  const char *ca_file;
  const char *ca_dir;
  const char *ca_pem;
  size_t ca_pem_len;
  bool system_ca;

  int verify; /* DPX_TLS_VERIFY_* */

  /* ALPN protocol names in preference order (each 1..255 bytes). A server
   * picks its first that the client offers and refuses the handshake
   * (no_application_protocol) when the client offers ALPN with no match. */
  const char *const *alpn;
  size_t alpn_count;

  int min_version; /* DPX_TLS_V1_2 (default) or DPX_TLS_V1_3 */
  int max_version; /* 0: the highest supported */

  /* Client session resumption: the config keeps up to 4 sessions per
   * session key (dpx_tls_opts.session_key), newest first; a TLS 1.3 ticket
   * is used by one connection only, and a failed connection's sessions are
   * dropped. Entries in all: 0 means 64; <0: off. */
  int session_cache;

  /* Opt-in: append NSS key-log lines (SSLKEYLOGFILE format) here, for
   * decrypting captures while debugging. The file is created 0600. */
  const char *keylog_file;
} dpx_tls_config_opts;

typedef struct dpx_tls_config dpx_tls_config;

/* Make a config (refcount 1). On failure returns DPX_TLS_EINVAL (bad
 * options), DPX_TLS_ECONFIG (a file or PEM would not load; @p err gets
 * the reason) or DPX_TLS_ENOMEM; @p err (may be NULL) is always
 * NUL-terminated when errlen > 0. */
int dpx_tls_config_new(dpx_tls_config **out, const dpx_tls_config_opts *opts,
                       char *err, size_t errlen);
void dpx_tls_config_ref(dpx_tls_config *cfg);
void dpx_tls_config_unref(dpx_tls_config *cfg);
int dpx_tls_config_role(const dpx_tls_config *cfg);

/* ---- engine ------------------------------------------------------------- */

typedef struct dpx_tls dpx_tls;

#define DPX_TLS_DEFAULT_IN_CAP ((size_t)64 * 1024)
#define DPX_TLS_DEFAULT_OUT_CAP ((size_t)128 * 1024)
/* The most plaintext one record carries. */
#define DPX_TLS_MAX_RECORD ((size_t)16384)

typedef struct dpx_tls_opts {
  /* Client: the server's name, sent as SNI and checked against its
   * certificate (an IP literal is checked as an address and not sent).
   * Required when the client verifies; ignored by servers. */
  const char *host;
  /* Client: the resumption key, e.g. "host:port"; NULL: the host. */
  const char *session_key;
  /* Queue caps in ciphertext bytes; 0: the defaults above. */
  size_t in_cap;
  size_t out_cap;
} dpx_tls_opts;

/* A new engine on @p cfg (takes its own reference). @p opts may be NULL.
 * Returns 0, DPX_TLS_EINVAL (a verifying client without a host) or
 * DPX_TLS_ENOMEM. */
int dpx_tls_new(dpx_tls **out, dpx_tls_config *cfg, const dpx_tls_opts *opts);
void dpx_tls_free(dpx_tls *t);

/* Drive the handshake without reading plaintext. A client calls it once
 * to produce its ClientHello (then sends the output). Returns OK once the
 * handshake is complete, WANT_INPUT while it waits for the peer, or the
 * error. dpx_tls_read drives the handshake as well. */
int dpx_tls_handshake(dpx_tls *t);
bool dpx_tls_handshake_done(const dpx_tls *t);

/* ---- input: ciphertext from the peer ---- */

/* Queue @p len bytes the transport delivered (copied). Takes all of them,
 * or none: FULL when the input queue already holds its cap (in_cap); then
 * read plaintext out first. So the input queue never exceeds in_cap plus
 * one feed. Nothing is decrypted here. Returns OK, FULL, ENOMEM, or the
 * sticky error; EINVAL after dpx_tls_feed_eof. */
int dpx_tls_feed(dpx_tls *t, const void *data, size_t len);
/* Whether a feed would be taken now (not full, no error, no EOF yet). */
bool dpx_tls_can_feed(const dpx_tls *t);
/* The transport reached EOF: no more input. Reads then end with EOF if the
 * peer's close_notify came first, and with ETRUNCATED otherwise. */
void dpx_tls_feed_eof(dpx_tls *t);

/* Decrypt into @p buf (at most @p cap bytes; drives the handshake first).
 * Returns OK with *n > 0; WANT_INPUT (*n 0) when the queued input holds no
 * more whole record; EOF once the peer's close_notify was read (every
 * later read says EOF again); FULL (*n 0) when the output queue is far
 * past its cap (out_cap + 64 KiB) with answers the peer has not taken:
 * send output first; or an error (ETRUNCATED after dpx_tls_feed_eof
 * without close_notify). Reading may produce output (handshake messages,
 * tickets, alerts, key updates): after every call, send what is pending. */
int dpx_tls_read(dpx_tls *t, void *buf, size_t cap, size_t *n);
/* Plaintext already decrypted and waiting inside the engine for a read. */
size_t dpx_tls_read_pending(const dpx_tls *t);

/* ---- output: plaintext to encrypt ---- */

/* Encrypt from @p data: *taken bytes (a prefix) become records appended to
 * the output queue, in call order; records never mix bytes of two calls
 * and a call's records are consecutive. Takes all of @p len unless the
 * output queue would pass out_cap: then it takes whole records up to
 * about the cap (rounded up to one record) and returns OK with
 * *taken < len; at or past the cap it takes nothing and returns FULL.
 * The caller continues with the rest of the same write before starting
 * another, so a write stays consecutive on the wire.
 * Before the handshake completes: WANT_INPUT, nothing taken. After
 * dpx_tls_shutdown: ESHUTDOWN. len 0: OK, nothing produced. */
int dpx_tls_write(dpx_tls *t, const void *data, size_t len, size_t *taken);
/* Whether a write would take bytes now. */
bool dpx_tls_can_write(const dpx_tls *t);

/* Queue our close_notify (half-close: reading goes on; the peer sees a
 * clean EOF). Only after the handshake: before, WANT_INPUT and nothing is
 * sent. Returns OK (also when already sent), or the sticky error. */
int dpx_tls_shutdown(dpx_tls *t);

/* ---- ciphertext to send ---- */

typedef struct dpx_tls_buf {
  const void *base;
  size_t len;
} dpx_tls_buf;

/* Bytes waiting in the output queue. */
size_t dpx_tls_out_pending(const dpx_tls *t);
/* Describe the pending output after its first @p skip bytes (the ones the
 * caller has in flight) in up to @p nbufs pieces; returns how many were
 * filled. The bytes stay valid and unchanged until consumed or the engine
 * is freed, whatever else the engine does meanwhile: they may be given to
 * an asynchronous write. */
size_t dpx_tls_out_peek(const dpx_tls *t, size_t skip, dpx_tls_buf *bufs,
                        size_t nbufs);
/* The first @p n pending bytes were sent: drop them. */
void dpx_tls_out_consume(dpx_tls *t, size_t n);

/* ---- state and information ---- */

/* The sticky error, or 0. */
int dpx_tls_error(const dpx_tls *t);
/* Why the engine failed (or ""): e.g. "certificate verify failed:
 * certificate has expired (depth 0, CN=localhost)", "alert received:
 * handshake failure", "protocol error: wrong version number". Valid until
 * the engine is freed. */
const char *dpx_tls_reason(const dpx_tls *t);
/* DPX_TLS_VERIFY_* of a failed (or tolerated) verification. */
int dpx_tls_verify_error(const dpx_tls *t);
/* The TLS alert number the peer sent with its failure, or -1. */
int dpx_tls_alert(const dpx_tls *t);
/* Whether we sent / received close_notify. */
bool dpx_tls_sent_close(const dpx_tls *t);
bool dpx_tls_got_close(const dpx_tls *t);

typedef struct dpx_tls_info {
  int version;         /* DPX_TLS_V1_2 / _V1_3; 0 before the handshake */
  const char *version_name; /* "TLSv1.3" (static) */
  const char *cipher;  /* "TLS_AES_256_GCM_SHA384" (static), "" before */
  char alpn[256];      /* negotiated protocol, "" if none */
  char sni[256];       /* server: the name the client asked for, "" if none */
  bool resumed;        /* the session was resumed */
  bool peer_cert;      /* the peer presented a certificate */
} dpx_tls_info;
void dpx_tls_get_info(const dpx_tls *t, dpx_tls_info *info);
/* The peer certificate's subject as RFC 2253 text ("CN=localhost,O=x")
 * into @p buf (truncated, always NUL-terminated); returns the full length,
 * or -1 when there is no peer certificate. */
int dpx_tls_peer_subject(const dpx_tls *t, char *buf, size_t len);

/* Bytes of ciphertext held in the queues, and the bytes the engine has
 * allocated for them (0 when idle). */
size_t dpx_tls_in_pending(const dpx_tls *t);
size_t dpx_tls_buffer_bytes(const dpx_tls *t);

#ifdef __cplusplus
}
#endif

#endif /* DPX_TLS_ENGINE_H */
