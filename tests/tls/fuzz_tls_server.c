/* libFuzzer target: arbitrary peer bytes into a server TLS engine
 * (core/src/tls/engine_openssl.c, compiled in with the fuzzer and sanitizer
 * instrumentation).
 *
 * Input byte 0 picks the server config (bits 0-1: default; TLS 1.2 only
 * with ALPN; mutual TLS; TLS 1.3 only), whether a real ClientHello made by
 * a client engine goes first (bit 2; then the rest plays the client's later
 * flights and records), and the chunk sizes the rest is fed in (bits 3-7).
 * After every feed the plaintext is read out and the output drained, as the
 * conn code will do; at the end the transport EOF is fed.
 *
 * Traps on: a queue past its bound, an engine stuck with a full input queue,
 * a stream that does not end in EOF or an error after the transport EOF, an
 * idle engine holding buffers, and a status outside the interface. ASan
 * finds overflows and use-after-free; LeakSanitizer, leaks.
 *
 * Run it longer than the meson test does:
 *   build-dir/tests/tls/fuzz_tls_server -max_len=16384 -timeout=10 CORPUS_DIR */
#include "engine.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(cond)                                                     \
  do {                                                                       \
    if (!(cond))                                                             \
      __builtin_trap();                                                      \
  } while (0)

#define IN_CAP ((size_t)20 * 1024)
#define OUT_CAP ((size_t)16 * 1024)
/* Output beyond which reads refuse (engine_openssl.c: out_cap + 64 KiB),
 * plus the one flight a single call may add. */
#define OUT_BOUND (OUT_CAP + (size_t)64 * 1024 + (size_t)64 * 1024)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static dpx_tls_config *servers[4];
static unsigned char *hello;
static size_t hello_len;

static char *
bio_text(BIO *b)
{
  char *p = NULL;
  long n = BIO_get_mem_data(b, &p);
  FUZZ_CHECK(n > 0);
  char *s = malloc((size_t)n + 1);
  FUZZ_CHECK(s != NULL);
  memcpy(s, p, (size_t)n);
  s[n] = '\0';
  return s;
}

/* A P-256 key and a self-signed certificate for it, as PEM. */
static void
make_identity(char **cert_pem, char **key_pem)
{
  EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
  FUZZ_CHECK(k != NULL);
  X509 *x = X509_new();
  FUZZ_CHECK(x != NULL);
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
  X509_gmtime_adj(X509_getm_notBefore(x), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x), 3600L * 24 * 365);
  X509_NAME *n = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC,
                             (const unsigned char *)"localhost", -1, -1, 0);
  X509_set_issuer_name(x, n);
  X509_set_pubkey(x, k);
  FUZZ_CHECK(X509_sign(x, k, EVP_sha256()) > 0);
  BIO *cb = BIO_new(BIO_s_mem()), *kb = BIO_new(BIO_s_mem());
  FUZZ_CHECK(cb != NULL && kb != NULL);
  FUZZ_CHECK(PEM_write_bio_X509(cb, x) == 1);
  FUZZ_CHECK(PEM_write_bio_PrivateKey(kb, k, NULL, NULL, 0, NULL, NULL) == 1);
  *cert_pem = bio_text(cb);
  *key_pem = bio_text(kb);
  BIO_free(cb);
  BIO_free(kb);
  X509_free(x);
  EVP_PKEY_free(k);
}

/* Everything pending in @p t's output queue, appended to *buf. */
static void
take_all(dpx_tls *t, unsigned char **buf, size_t *len)
{
  dpx_tls_buf b[8];
  size_t n;
  while ((n = dpx_tls_out_peek(t, 0, b, 8)) > 0) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
      if (buf != NULL) {
        *buf = realloc(*buf, *len + b[i].len);
        FUZZ_CHECK(*buf != NULL);
        memcpy(*buf + *len, b[i].base, b[i].len);
        *len += b[i].len;
      }
      total += b[i].len;
    }
    dpx_tls_out_consume(t, total);
  }
  FUZZ_CHECK(dpx_tls_out_pending(t) == 0);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  (void)argc;
  (void)argv;
  char *cert, *key;
  make_identity(&cert, &key);
  static const char *alpn[] = {"h2", "http/1.1"};
  for (int i = 0; i < 4; i++) {
    dpx_tls_config_opts o = {0};
    o.role = DPX_TLS_SERVER;
    o.cert_pem = cert;
    o.key_pem = key;
    o.ca_pem = cert; /* mutual TLS trusts the same self-signed cert */
    if (i == 1) {
      o.max_version = DPX_TLS_V1_2;
      o.alpn = alpn;
      o.alpn_count = 2;
    }
    if (i == 2)
      o.verify = DPX_TLS_VERIFY_REQUIRE;
    if (i == 3)
      o.min_version = DPX_TLS_V1_3;
    char err[256];
    FUZZ_CHECK(dpx_tls_config_new(&servers[i], &o, err, sizeof err) == 0);
  }
  /* One real ClientHello, made once: replaying the same bytes keeps runs
   * reproducible. */
  dpx_tls_config_opts co = {0};
  co.role = DPX_TLS_CLIENT;
  co.verify = DPX_TLS_VERIFY_NONE;
  co.alpn = alpn;
  co.alpn_count = 2;
  dpx_tls_config *client = NULL;
  FUZZ_CHECK(dpx_tls_config_new(&client, &co, NULL, 0) == 0);
  dpx_tls_opts eo = {0};
  eo.host = "localhost";
  dpx_tls *c = NULL;
  FUZZ_CHECK(dpx_tls_new(&c, client, &eo) == 0);
  FUZZ_CHECK(dpx_tls_handshake(c) == DPX_TLS_WANT_INPUT);
  take_all(c, &hello, &hello_len);
  FUZZ_CHECK(hello_len > 0);
  dpx_tls_free(c);
  dpx_tls_config_unref(client);
  free(cert);
  free(key);
  return 0;
}

static bool
status_known(int r)
{
  return (r >= DPX_TLS_OK && r <= DPX_TLS_EOF) ||
         (r <= DPX_TLS_EVERIFY && r >= DPX_TLS_ECONFIG);
}

/* Read plaintext while there is any; answer with a little data when the
 * handshake is done (exercises the write path); drain the output. */
static int
service(dpx_tls *t, size_t fed_max)
{
  static unsigned char buf[4096];
  int r;
  for (;;) {
    size_t n = 0;
    r = dpx_tls_read(t, buf, sizeof buf, &n);
    FUZZ_CHECK(status_known(r));
    FUZZ_CHECK((r == DPX_TLS_OK) == (n > 0));
    FUZZ_CHECK(n <= sizeof buf);
    FUZZ_CHECK(dpx_tls_out_pending(t) <= OUT_BOUND);
    if (r != DPX_TLS_OK)
      break;
    size_t taken = 0;
    int w = dpx_tls_write(t, buf, n, &taken);
    FUZZ_CHECK(status_known(w));
    FUZZ_CHECK(taken <= n);
  }
  FUZZ_CHECK(dpx_tls_in_pending(t) <= IN_CAP + fed_max);
  /* Never stuck: with the output drained, a full input queue always has
   * a whole record for the next read. */
  take_all(t, NULL, NULL);
  if (r == DPX_TLS_FULL)
    return service(t, fed_max);
  if (r == DPX_TLS_WANT_INPUT)
    FUZZ_CHECK(dpx_tls_can_feed(t) || dpx_tls_error(t) != 0);
  return r;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size < 1)
    return 0;
  unsigned sel = data[0];
  data++;
  size--;
  dpx_tls_opts eo = {0};
  eo.in_cap = IN_CAP;
  eo.out_cap = OUT_CAP;
  dpx_tls *t = NULL;
  FUZZ_CHECK(dpx_tls_new(&t, servers[sel & 3u], &eo) == 0);
  FUZZ_CHECK(dpx_tls_buffer_bytes(t) == 0);

  size_t fed_max = 0;
  int r = DPX_TLS_WANT_INPUT;
  if (sel & 4u) {
    FUZZ_CHECK(dpx_tls_feed(t, hello, hello_len) == DPX_TLS_OK);
    fed_max = hello_len;
    r = service(t, fed_max);
  }
  /* chunk sizes 1 .. 2^k from the selector and the position */
  unsigned k = (sel >> 3) % 15u;
  uint32_t x = (sel * 2654435761u) | 1u;
  size_t at = 0;
  while (at < size && r >= 0 && r != DPX_TLS_EOF) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    size_t len = 1 + (size_t)(x % ((uint32_t)1 << k));
    if (len > size - at)
      len = size - at;
    /* each chunk from its own exact-size copy, so ASan sees overreads */
    unsigned char *chunk = malloc(len);
    FUZZ_CHECK(chunk != NULL);
    memcpy(chunk, data + at, len);
    int f = dpx_tls_feed(t, chunk, len);
    free(chunk);
    FUZZ_CHECK(f == DPX_TLS_OK || f == DPX_TLS_FULL || f < 0);
    if (f < 0)
      break;
    if (f == DPX_TLS_OK)
      at += len;
    if (len > fed_max)
      fed_max = len;
    r = service(t, fed_max);
  }

  /* The transport ends: the stream must end too, cleanly or not. */
  dpx_tls_feed_eof(t);
  for (int i = 0; i < 10000 && (r == DPX_TLS_OK || r == DPX_TLS_WANT_INPUT ||
                                r == DPX_TLS_FULL);
       i++)
    r = service(t, fed_max);
  FUZZ_CHECK(r == DPX_TLS_EOF || r < 0);
  if (r < 0)
    FUZZ_CHECK(dpx_tls_error(t) == r && dpx_tls_reason(t)[0] != '\0');
  /* Whatever happened, no buffer is held once the queues are empty (input
   * after a close_notify or an error is never read). */
  take_all(t, NULL, NULL);
  if (dpx_tls_in_pending(t) == 0)
    FUZZ_CHECK(dpx_tls_buffer_bytes(t) == 0);
  dpx_tls_free(t);
  return 0;
}
