/* libFuzzer target: arbitrary peer bytes into a libduplex TLS SERVER conn,
 * through the public API only. The library's sources are compiled into the
 * target with the fuzzer and sanitizer instrumentation (tests/tls/meson.build).
 *
 * Each input: a socketpair; one end adopted as a conn (duplex_conn_adopt)
 * that becomes a TLS server at once (duplex_conn_start_tls with a server
 * config); the input is written into the other end in chunks, with the
 * loop pumped (DUPLEX_RUN_NOWAIT, on this thread) and whatever the server
 * answers drained between chunks; then the peer ends its side (a FIN, or a
 * close) and the conn must close by itself. Then the conn is dropped.
 *
 * Input byte 0: bits 0-1 pick the server config (default; TLS 1.2 only
 * with ALPN; mutual TLS required; TLS 1.3 only), bit 2 sends a real
 * ClientHello (made once at start-up by a libduplex client conn) before the
 * rest, bits 3-5 the chunk size, bit 6 delimited framing on the decrypted
 * stream, bit 7 how the peer ends (FIN or close).
 *
 * Traps on: a callback out of its contract (on_close not exactly once, or
 * not last; the start_tls callback not exactly once; on_open with random
 * peer bytes), a conn that does not close after the peer's end, a queue
 * past its hard limit, a conn left on the loop. ASan finds overflows and
 * use-after-free; LeakSanitizer, leaks.
 *
 * Run it longer than the meson test does:
 *   build-dir/tests/tls/fuzz_tls_conn -max_len=16384 -timeout=10 CORPUS_DIR */
#include <duplex.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define FUZZ_CHECK(cond)                                                     \
  do {                                                                       \
    if (!(cond))                                                             \
      __builtin_trap();                                                      \
  } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define HARD_LIMIT ((size_t)256 * 1024)

static duplex_loop *loop;
static duplex_tls *servers[4];
static unsigned char hello[4096];
static size_t hello_len;

/* ---- one conn's callbacks ------------------------------------------------ */

struct watch {
  int opens, closes, eofs, started, after_close;
  int reason, start_status;
  size_t bytes;
};

static void
on_open(duplex_conn *c, void *user)
{
  struct watch *w = user;
  (void)c;
  w->after_close += w->closes;
  w->opens++;
}

static void
on_read(duplex_conn *c, const void *d, size_t n, void *user)
{
  struct watch *w = user;
  w->after_close += w->closes;
  w->bytes += n;
  /* Answer a little (the write path), as an echo would. */
  duplex_conn_write(c, d, n < 64 ? n : 64, NULL, NULL);
}

static void
on_eof(duplex_conn *c, void *user)
{
  struct watch *w = user;
  (void)c;
  w->after_close += w->closes;
  w->eofs++;
}

static void
on_close(duplex_conn *c, int reason, void *user)
{
  struct watch *w = user;
  (void)c;
  w->after_close += w->closes;
  w->closes++;
  w->reason = reason;
}

static void
on_started(duplex_conn *c, int status, void *user)
{
  struct watch *w = user;
  (void)c;
  w->after_close += w->closes;
  w->started++;
  w->start_status = status;
}

static const duplex_conn_cbs cbs = {sizeof(duplex_conn_cbs), on_open, on_read, on_eof,
                                    NULL, NULL, on_close, NULL};

/* ---- helpers --------------------------------------------------------------- */

static void
pump(int passes)
{
  for (int i = 0; i < passes; i++)
    FUZZ_CHECK(duplex_loop_run(loop, DUPLEX_RUN_NOWAIT) == 0);
}

/* Read and drop what the server sent; into @p keep if not NULL. */
static size_t
drain(int fd, unsigned char *keep, size_t cap)
{
  unsigned char buf[16384];
  size_t got = 0;
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return got;
    if (keep != NULL && got + (size_t)n <= cap)
      memcpy(keep + got, buf, (size_t)n);
    got += (size_t)n;
  }
}

/* Write all of @p len bytes into the non-blocking @p fd, pumping the loop
 * while the socket is full; false if the conn stopped taking bytes. */
static bool
feed(int fd, const uint8_t *p, size_t len)
{
  int stuck = 0;
  while (len > 0) {
    ssize_t n = send(fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      p += n;
      len -= (size_t)n;
      stuck = 0;
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
      return false; /* the conn closed its end */
    if (++stuck > 64)
      return false; /* not reading (paused on its output): stop feeding */
    pump(2);
    drain(fd, NULL, 0);
  }
  return true;
}

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

/* A self-signed P-256 identity for "localhost", as PEM text. */
static void
identity(char **cert_pem, char **key_pem)
{
  EVP_PKEY *key = EVP_EC_gen("P-256");
  FUZZ_CHECK(key != NULL);
  X509 *crt = X509_new();
  FUZZ_CHECK(crt != NULL);
  FUZZ_CHECK(X509_set_version(crt, X509_VERSION_3) == 1);
  FUZZ_CHECK(ASN1_INTEGER_set(X509_get_serialNumber(crt), 4242) == 1);
  FUZZ_CHECK(X509_gmtime_adj(X509_getm_notBefore(crt), -60) != NULL);
  FUZZ_CHECK(X509_gmtime_adj(X509_getm_notAfter(crt), 86400L * 30) != NULL);
  X509_NAME *name = X509_get_subject_name(crt);
  FUZZ_CHECK(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                        (const unsigned char *)"localhost", -1,
                                        -1, 0) == 1);
  FUZZ_CHECK(X509_set_issuer_name(crt, name) == 1);
  FUZZ_CHECK(X509_set_pubkey(crt, key) == 1);
  FUZZ_CHECK(X509_sign(crt, key, EVP_sha256()) > 0);
  BIO *cb = BIO_new(BIO_s_mem());
  BIO *kb = BIO_new(BIO_s_mem());
  FUZZ_CHECK(cb != NULL && kb != NULL);
  FUZZ_CHECK(PEM_write_bio_X509(cb, crt) == 1);
  FUZZ_CHECK(PEM_write_bio_PrivateKey(kb, key, NULL, NULL, 0, NULL, NULL) == 1);
  *cert_pem = bio_text(cb);
  *key_pem = bio_text(kb);
  BIO_free(cb);
  BIO_free(kb);
  X509_free(crt);
  EVP_PKEY_free(key);
}

/* The first flight of a libduplex client conn: a real ClientHello. */
static void
make_hello(void)
{
  static const char *const alpn[] = {"h2", "http/1.1"};
  duplex_tls_config cfg = DUPLEX_TLS_CONFIG_INIT;
  cfg.role = DUPLEX_TLS_CLIENT;
  cfg.verify = DUPLEX_TLS_VERIFY_NONE;
  cfg.alpn = alpn;
  cfg.alpn_count = 2;
  duplex_tls *client = NULL;
  FUZZ_CHECK(duplex_tls_new(&client, &cfg, NULL, 0) == 0);
  int sv[2];
  FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  struct watch w;
  memset(&w, 0, sizeof w);
  duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
  o.cbs = &cbs;
  o.user = &w;
  o.tls = client;
  o.tls_host = "localhost";
  duplex_conn *c = NULL;
  FUZZ_CHECK(duplex_conn_adopt(&c, loop, sv[0], &o) == 0);
  for (int i = 0; i < 1000 && hello_len == 0; i++) {
    pump(1);
    hello_len = drain(sv[1], hello, sizeof hello);
  }
  FUZZ_CHECK(hello_len > 0 && hello_len <= sizeof hello);
  FUZZ_CHECK(duplex_conn_close(c, DUPLEX_CLOSE_ABORT) == 0);
  for (int i = 0; i < 1000 && w.closes == 0; i++)
    pump(1);
  FUZZ_CHECK(w.closes == 1 && w.opens == 0);
  FUZZ_CHECK(duplex_conn_unref(c) == 0);
  close(sv[1]);
  FUZZ_CHECK(duplex_tls_unref(client) == 0);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  (void)argc;
  (void)argv;
  FUZZ_CHECK(duplex_loop_new(&loop, NULL) == 0);
  char *cert, *key;
  identity(&cert, &key);
  static const char *const alpn[] = {"h2", "http/1.1"};
  for (int i = 0; i < 4; i++) {
    duplex_tls_config cfg = DUPLEX_TLS_CONFIG_INIT;
    cfg.role = DUPLEX_TLS_SERVER;
    cfg.cert_pem = cert;
    cfg.key_pem = key;
    cfg.ca_pem = cert; /* mutual TLS trusts the same self-signed cert */
    if (i == 1) {
      cfg.max_version = DUPLEX_TLS_V1_2;
      cfg.alpn = alpn;
      cfg.alpn_count = 2;
    } else if (i == 2) {
      cfg.verify = DUPLEX_TLS_VERIFY_REQUIRE;
    } else if (i == 3) {
      cfg.min_version = DUPLEX_TLS_V1_3;
    }
    char err[256] = "";
    FUZZ_CHECK(duplex_tls_new(&servers[i], &cfg, err, sizeof err) == 0);
  }
  free(cert);
  free(key);
  make_hello();
  return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  uint8_t ctl = data[0];
  data++;
  size--;

  int sv[2];
  FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  struct watch w;
  memset(&w, 0, sizeof w);
  duplex_framing fr = DUPLEX_FRAMING_INIT;
  fr.kind = DUPLEX_FRAME_DELIMITED;
  fr.delimiter[0] = '\n';
  fr.delimiter_len = 1;
  fr.max_frame = 4096;
  duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
  o.cbs = &cbs;
  o.user = &w;
  o.high_watermark = HARD_LIMIT / 2;
  o.hard_limit = HARD_LIMIT;
  if (ctl & 0x40)
    o.framing = &fr;
  duplex_conn *c = NULL;
  FUZZ_CHECK(duplex_conn_adopt(&c, loop, sv[0], &o) == 0);
  FUZZ_CHECK(duplex_conn_start_tls(c, servers[ctl & 3], NULL, on_started, &w) == 0);
  pump(2);
  FUZZ_CHECK(w.opens == 1); /* the plaintext open; TLS brings no second */

  bool alive = true;
  if (ctl & 4)
    alive = feed(sv[1], hello, hello_len);
  static const size_t chunks[8] = {1, 5, 64, 300, 1024, 4096, 16384, 1 << 20};
  size_t chunk = chunks[(ctl >> 3) & 7];
  while (alive && size > 0 && w.closes == 0) {
    size_t n = size < chunk ? size : chunk;
    alive = feed(sv[1], data, n);
    data += n;
    size -= n;
    pump(3);
    drain(sv[1], NULL, 0);
    size_t q = 0;
    FUZZ_CHECK(duplex_conn_get_queued(c, &q) == 0);
    FUZZ_CHECK(q <= HARD_LIMIT);
  }

  /* The peer ends its side; the conn must close by itself (the handshake
   * cannot complete with made-up bytes, and its end comes with the EOF). */
  if (ctl & 0x80) {
    close(sv[1]);
    sv[1] = -1;
  } else {
    shutdown(sv[1], SHUT_WR);
  }
  for (int i = 0; i < 2000 && w.closes == 0; i++) {
    pump(1);
    if (sv[1] >= 0)
      drain(sv[1], NULL, 0);
  }
  FUZZ_CHECK(w.closes == 1);
  FUZZ_CHECK(w.after_close == 0);
  FUZZ_CHECK(w.started == 1);
  FUZZ_CHECK(w.start_status != 0); /* no handshake completes */
  FUZZ_CHECK(w.reason != 0);
  FUZZ_CHECK(w.opens == 1);
  FUZZ_CHECK(w.eofs == 0 && w.bytes == 0); /* nothing decrypted */
  char why[256];
  int wr = duplex_conn_get_tls_error(c, why, sizeof why);
  FUZZ_CHECK(wr == 0 || wr == DUPLEX_ENOBUFS);
  FUZZ_CHECK(duplex_conn_unref(c) == 0);
  if (sv[1] >= 0)
    close(sv[1]);
  duplex_loop_stats st = DUPLEX_LOOP_STATS_INIT;
  FUZZ_CHECK(duplex_loop_get_stats(loop, &st) == 0);
  FUZZ_CHECK(st.conns == 0);
  return 0;
}
