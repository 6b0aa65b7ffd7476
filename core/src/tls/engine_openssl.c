/* The TLS engine (engine.h) on OpenSSL 3.
 *
 * Each engine is one SSL object whose read and write BIO is a small BIO of
 * our own (below), not BIO_s_mem: a memory BIO keeps its buffer at its
 * high-water mark for the life of the connection, while ours holds input in
 * one contiguous buffer that is freed the moment it is drained, and output
 * in segments that never move (so the caller may hand them to an
 * asynchronous write) and are freed as they are consumed. With
 * SSL_MODE_RELEASE_BUFFERS OpenSSL drops its own record buffers whenever
 * no record is in progress, so an idle engine holds no buffer at all.
 *
 * OpenSSL reports errors through a per-thread queue; every entry point
 * clears it before calling in and after reading the reason out, so one
 * engine's failure never shows up as another's on the same loop thread. */
#include "engine.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef _WIN32
#include <fcntl.h>
#include <unistd.h>
#endif

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "the TLS engine needs OpenSSL 3"
#endif

/* A read refuses (FULL) once this much output beyond out_cap waits: the
 * answers reading produces (key updates, alerts) cannot pile up without
 * bound while the peer does not take our bytes. */
#define CTL_SLACK ((size_t)64 * 1024)
/* The input cap is at least one whole record with TLS 1.2's largest
 * expansion, so a full input queue always holds something to decrypt. */
#define MIN_IN_CAP ((size_t)20 * 1024)
/* Output segment size: a few records each. */
#define SEG_SIZE ((size_t)32 * 1024)
#define SESSION_CACHE_DEFAULT 64
#define SESS_PER_KEY 4

/* ---- config -------------------------------------------------------------- */

typedef struct sess_ent {
  char *key;
  SSL_SESSION *sess;
  unsigned long stamp;
  const void *origin; /* the engine that received it, while it lives */
} sess_ent;

struct dpx_tls_config {
  atomic_uint refs;
  int role;
  int verify;
  SSL_CTX *ctx;
  unsigned char *alpn; /* wire format: (len, bytes)* */
  size_t alpn_len;
  /* client session cache */
  CRYPTO_RWLOCK *lock;
  sess_ent *cache;
  size_t cache_n, cache_cap;
  unsigned long clock;
  /* key log */
  FILE *keylog;
  CRYPTO_RWLOCK *keylog_lock;
};

/* ---- engine -------------------------------------------------------------- */

typedef struct seg {
  struct seg *next;
  size_t len; /* bytes written into data */
  size_t cap;
  unsigned char data[];
} seg;

struct dpx_tls {
  dpx_tls_config *cfg;
  SSL *ssl;
  char *session_key; /* client with a cache */
  /* input: in_buf[in_off .. in_len) waits for OpenSSL */
  unsigned char *in_buf;
  size_t in_off, in_len, in_alloc;
  size_t in_cap;
  /* output: from out_off in the head segment to the tail's len */
  seg *out_head, *out_tail;
  size_t out_off, out_len, out_alloc;
  size_t out_cap;
  /* state */
  int err;          /* sticky error, 0 if none */
  char *reason;     /* why (malloc'ed on failure) */
  char *vfy_note;   /* first certificate failure, from the verify callback */
  int vfy_class;
  int alert_in;     /* fatal alert the peer sent, -1 if none */
  unsigned hs_done : 1;
  unsigned trim_due : 1; /* OpenSSL may hold a record buffer (trim) */
  unsigned in_eof : 1;
  unsigned got_close : 1;
  unsigned sent_close : 1;
  unsigned oom : 1;
};

/* ---- small helpers -------------------------------------------------------- */

static void
copy_str(char *dst, size_t cap, const char *src)
{
  if (cap == 0)
    return;
  size_t n = strlen(src);
  if (n >= cap)
    n = cap - 1;
  memcpy(dst, src, n);
  dst[n] = '\0';
}

static char *
dup_str(const char *s)
{
  size_t n = strlen(s) + 1;
  char *p = malloc(n);
  if (p != NULL)
    memcpy(p, s, n);
  return p;
}

static char *
vformat(const char *fmt, va_list ap)
{
  va_list ap2;
  va_copy(ap2, ap);
  int n = vsnprintf(NULL, 0, fmt, ap2);
  va_end(ap2);
  if (n < 0)
    return NULL;
  char *p = malloc((size_t)n + 1);
  if (p != NULL)
    vsnprintf(p, (size_t)n + 1, fmt, ap);
  return p;
}

/* The reason text of the oldest error in OpenSSL's queue, or @p dflt. */
static const char *
ossl_reason(const char *dflt)
{
  unsigned long e = ERR_peek_error();
  if (e == 0)
    return dflt;
  const char *r = ERR_reason_error_string(e);
  return r != NULL ? r : dflt;
}

/* What OpenSSL's error queue says about a failure; empties the queue. */
typedef struct ossl_why {
  char text[160];   /* the oldest error's reason */
  bool vfy_failed;  /* certificate verification failed */
  bool no_cert;     /* the peer sent no certificate where one is required */
} ossl_why;

static void
ossl_collect(ossl_why *w)
{
  copy_str(w->text, sizeof w->text, ossl_reason("unknown error"));
  w->vfy_failed = w->no_cert = false;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    if (ERR_GET_LIB(e) != ERR_LIB_SSL)
      continue;
    if (ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED)
      w->vfy_failed = true;
    if (ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE)
      w->no_cert = true;
  }
}

/* ---- the BIO ---------------------------------------------------------- */

static BIO_METHOD *bio_meth;
static CRYPTO_ONCE bio_once = CRYPTO_ONCE_STATIC_INIT;

static void
in_release(dpx_tls *t)
{
  free(t->in_buf);
  t->in_buf = NULL;
  t->in_off = t->in_len = t->in_alloc = 0;
}

static int
bio_read_ex(BIO *b, char *out, size_t len, size_t *got)
{
  dpx_tls *t = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  *got = 0;
  size_t avail = t->in_len - t->in_off;
  if (avail == 0) {
    if (!t->in_eof)
      BIO_set_retry_read(b);
    return 0; /* no retry flag: EOF */
  }
  if (len > avail)
    len = avail;
  memcpy(out, t->in_buf + t->in_off, len);
  t->in_off += len;
  if (t->in_off == t->in_len)
    in_release(t); /* drained: hold nothing */
  *got = len;
  return 1;
}

static int
bio_write_ex(BIO *b, const char *data, size_t len, size_t *put)
{
  dpx_tls *t = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  *put = 0;
  size_t left = len;
  while (left > 0) {
    seg *s = t->out_tail;
    if (s == NULL || s->len == s->cap) {
      size_t cap = left > SEG_SIZE ? left : SEG_SIZE;
      seg *ns = malloc(sizeof *ns + cap);
      if (ns == NULL) {
        t->oom = 1;
        return 0;
      }
      ns->next = NULL;
      ns->len = 0;
      ns->cap = cap;
      if (s == NULL)
        t->out_head = ns;
      else
        s->next = ns;
      t->out_tail = s = ns;
      t->out_alloc += cap;
    }
    size_t n = s->cap - s->len;
    if (n > left)
      n = left;
    memcpy(s->data + s->len, data, n);
    s->len += n;
    data += n;
    left -= n;
    t->out_len += n;
  }
  *put = len;
  return 1;
}

static long
bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
  dpx_tls *t = BIO_get_data(b);
  (void)num;
  (void)ptr;
  switch (cmd) {
  case BIO_CTRL_FLUSH:
    return 1;
  case BIO_CTRL_PENDING:
    return t != NULL ? (long)(t->in_len - t->in_off) : 0;
  case BIO_CTRL_WPENDING:
    return t != NULL ? (long)t->out_len : 0;
  case BIO_CTRL_EOF:
    return t != NULL && t->in_eof && t->in_len == t->in_off;
  default:
    return 0;
  }
}

static int
bio_create(BIO *b)
{
  BIO_set_init(b, 1);
  return 1;
}

static int
bio_destroy(BIO *b)
{
  BIO_set_data(b, NULL);
  return 1;
}

static void
bio_meth_init(void)
{
  BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK,
                               "libduplex tls");
  if (m == NULL)
    return;
  if (!BIO_meth_set_read_ex(m, bio_read_ex) ||
      !BIO_meth_set_write_ex(m, bio_write_ex) ||
      !BIO_meth_set_ctrl(m, bio_ctrl) || !BIO_meth_set_create(m, bio_create) ||
      !BIO_meth_set_destroy(m, bio_destroy)) {
    BIO_meth_free(m);
    return;
  }
  bio_meth = m;
}

/* ---- status names ------------------------------------------------------ */

const char *
dpx_tls_status_name(int status)
{
  switch (status) {
  case DPX_TLS_OK: return "OK";
  case DPX_TLS_WANT_INPUT: return "WANT_INPUT";
  case DPX_TLS_FULL: return "FULL";
  case DPX_TLS_EOF: return "EOF";
  case DPX_TLS_EVERIFY: return "EVERIFY";
  case DPX_TLS_EALERT: return "EALERT";
  case DPX_TLS_EPROTO: return "EPROTO";
  case DPX_TLS_ETRUNCATED: return "ETRUNCATED";
  case DPX_TLS_ESHUTDOWN: return "ESHUTDOWN";
  case DPX_TLS_ENOMEM: return "ENOMEM";
  case DPX_TLS_EINVAL: return "EINVAL";
  case DPX_TLS_ECONFIG: return "ECONFIG";
  default: return "UNKNOWN";
  }
}

/* ---- config callbacks ---------------------------------------------------- */

/* Encrypted keys are refused rather than prompted for on the terminal. */
static int
no_password(char *buf, int size, int rwflag, void *u)
{
  (void)buf;
  (void)size;
  (void)rwflag;
  (void)u;
  return -1;
}

static int
alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
            const unsigned char *in, unsigned int inlen, void *arg)
{
  const dpx_tls_config *cfg = arg;
  (void)ssl;
  /* The client's list must be well formed before anything is matched. */
  for (unsigned i = 0; i < inlen;) {
    unsigned l = in[i];
    if (l == 0 || i + 1 + l > inlen)
      return SSL_TLSEXT_ERR_ALERT_FATAL;
    i += 1 + l;
  }
  for (size_t j = 0; j < cfg->alpn_len;) {
    unsigned sl = cfg->alpn[j];
    const unsigned char *sp = cfg->alpn + j + 1;
    for (unsigned i = 0; i < inlen;) {
      unsigned cl = in[i];
      if (cl == sl && memcmp(in + i + 1, sp, sl) == 0) {
        *out = in + i + 1;
        *outlen = (unsigned char)cl;
        return SSL_TLSEXT_ERR_OK;
      }
      i += 1 + cl;
    }
    j += 1 + sl;
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL; /* no_application_protocol */
}

static void
keylog_line(const SSL *ssl, const char *line)
{
  dpx_tls_config *cfg = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
  if (cfg == NULL || cfg->keylog == NULL)
    return;
  if (!CRYPTO_THREAD_write_lock(cfg->keylog_lock))
    return;
  fprintf(cfg->keylog, "%s\n", line);
  fflush(cfg->keylog);
  CRYPTO_THREAD_unlock(cfg->keylog_lock);
}

/* The client session cache: up to SESS_PER_KEY sessions per key (a TLS 1.3
 * server sends several tickets, so connections made at once can each
 * resume), cache_cap in all; the oldest goes first. A TLS 1.3 ticket is
 * handed out once (RFC 8446 recommends single use, and OpenSSL marks a
 * ticket it resumed with as spent when new ones arrive); a TLS 1.2 session
 * stays for reuse. */
static void
cache_drop_locked(dpx_tls_config *cfg, size_t i)
{
  free(cfg->cache[i].key);
  SSL_SESSION_free(cfg->cache[i].sess);
  cfg->cache[i] = cfg->cache[--cfg->cache_n];
}

static int
new_session(SSL *ssl, SSL_SESSION *sess)
{
  dpx_tls *t = SSL_get_app_data(ssl);
  if (t == NULL || t->session_key == NULL || !SSL_SESSION_is_resumable(sess))
    return 0;
  dpx_tls_config *cfg = t->cfg;
  char *key = dup_str(t->session_key);
  if (key == NULL || !CRYPTO_THREAD_write_lock(cfg->lock)) {
    free(key);
    return 0;
  }
  size_t same = 0, oldest_same = SIZE_MAX, oldest = SIZE_MAX;
  for (size_t i = 0; i < cfg->cache_n; i++) {
    sess_ent *e = &cfg->cache[i];
    if (oldest == SIZE_MAX || e->stamp < cfg->cache[oldest].stamp)
      oldest = i;
    if (strcmp(e->key, key) != 0)
      continue;
    same++;
    if (oldest_same == SIZE_MAX || e->stamp < cfg->cache[oldest_same].stamp)
      oldest_same = i;
  }
  if (same >= SESS_PER_KEY)
    cache_drop_locked(cfg, oldest_same);
  else if (cfg->cache_n == cfg->cache_cap)
    cache_drop_locked(cfg, oldest);
  sess_ent *e = &cfg->cache[cfg->cache_n++];
  e->key = key;
  e->sess = sess; /* returning 1 keeps OpenSSL's reference */
  e->stamp = ++cfg->clock;
  e->origin = t;
  CRYPTO_THREAD_unlock(cfg->lock);
  return 1;
}

/* The engine @p t goes away: if it failed, the sessions it received go
 * too (a connection ended by an error must not be resumed); otherwise they
 * stay and forget their origin. */
static void
cache_forget(dpx_tls_config *cfg, const dpx_tls *t, bool failed)
{
  if (!CRYPTO_THREAD_write_lock(cfg->lock))
    return;
  for (size_t i = 0; i < cfg->cache_n;) {
    if (cfg->cache[i].origin != t) {
      i++;
    } else if (failed) {
      cache_drop_locked(cfg, i);
    } else {
      cfg->cache[i].origin = NULL;
      i++;
    }
  }
  CRYPTO_THREAD_unlock(cfg->lock);
}

/* The newest usable session for @p key with a reference for the caller,
 * or NULL; spent sessions met on the way are dropped. */
static SSL_SESSION *
cache_get(dpx_tls_config *cfg, const char *key)
{
  SSL_SESSION *s = NULL;
  if (!CRYPTO_THREAD_write_lock(cfg->lock))
    return NULL;
  size_t best = SIZE_MAX;
  for (size_t i = 0; i < cfg->cache_n;) {
    sess_ent *e = &cfg->cache[i];
    if (strcmp(e->key, key) != 0) {
      i++;
      continue;
    }
    if (!SSL_SESSION_is_resumable(e->sess)) {
      cache_drop_locked(cfg, i); /* moves the last entry to i */
      if (best == cfg->cache_n)
        best = i;
      continue;
    }
    if (best == SIZE_MAX || e->stamp > cfg->cache[best].stamp)
      best = i;
    i++;
  }
  if (best != SIZE_MAX) {
    sess_ent *e = &cfg->cache[best];
    if (SSL_SESSION_get_protocol_version(e->sess) >= TLS1_3_VERSION) {
      s = e->sess; /* single use: the cache's reference goes to the caller */
      e->sess = NULL;
      free(e->key);
      cfg->cache[best] = cfg->cache[--cfg->cache_n];
    } else if (SSL_SESSION_up_ref(e->sess)) {
      s = e->sess;
    }
  }
  CRYPTO_THREAD_unlock(cfg->lock);
  return s;
}

static int
vfy_classify(long x)
{
  switch (x) {
  case X509_V_OK:
    return DPX_TLS_VERIFY_OK;
  case X509_V_ERR_CERT_HAS_EXPIRED:
  case X509_V_ERR_CRL_HAS_EXPIRED:
    return DPX_TLS_VERIFY_EXPIRED;
  case X509_V_ERR_CERT_NOT_YET_VALID:
  case X509_V_ERR_CRL_NOT_YET_VALID:
    return DPX_TLS_VERIFY_NOT_YET_VALID;
  case X509_V_ERR_HOSTNAME_MISMATCH:
  case X509_V_ERR_IP_ADDRESS_MISMATCH:
  case X509_V_ERR_EMAIL_MISMATCH:
    return DPX_TLS_VERIFY_HOSTNAME;
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
  case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
  case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
  case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
  case X509_V_ERR_CERT_UNTRUSTED:
  case X509_V_ERR_CERT_REJECTED:
    return DPX_TLS_VERIFY_UNTRUSTED;
  case X509_V_ERR_INVALID_PURPOSE:
  case X509_V_ERR_KEYUSAGE_NO_CERTSIGN:
  case X509_V_ERR_KEYUSAGE_NO_DIGITAL_SIGNATURE:
    return DPX_TLS_VERIFY_USAGE;
  default:
    return DPX_TLS_VERIFY_OTHER;
  }
}

/* Records the first failure of a chain with its depth and subject; the
 * decision stays OpenSSL's. */
static int
verify_note(int ok, X509_STORE_CTX *xs)
{
  if (ok)
    return ok;
  SSL *ssl = X509_STORE_CTX_get_ex_data(xs,
                                        SSL_get_ex_data_X509_STORE_CTX_idx());
  dpx_tls *t = ssl != NULL ? SSL_get_app_data(ssl) : NULL;
  if (t == NULL || t->vfy_note != NULL)
    return ok;
  int x = X509_STORE_CTX_get_error(xs);
  int depth = X509_STORE_CTX_get_error_depth(xs);
  char subj[256] = "";
  X509 *cert = X509_STORE_CTX_get_current_cert(xs);
  if (cert != NULL) {
    BIO *m = BIO_new(BIO_s_mem());
    if (m != NULL) {
      X509_NAME_print_ex(m, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
      int n = BIO_read(m, subj, (int)sizeof subj - 1);
      subj[n > 0 ? n : 0] = '\0';
      BIO_free(m);
    }
  }
  size_t need = (size_t)snprintf(NULL, 0, "%s (depth %d%s%s)",
                                 X509_verify_cert_error_string(x), depth,
                                 subj[0] ? ", " : "", subj) + 1;
  t->vfy_note = malloc(need);
  if (t->vfy_note != NULL)
    snprintf(t->vfy_note, need, "%s (depth %d%s%s)",
             X509_verify_cert_error_string(x), depth, subj[0] ? ", " : "",
             subj);
  t->vfy_class = vfy_classify(x);
  return ok;
}

/* OpenSSL 3.0 names the TLS 1.2 alerts; the later ones say "unknown". */
static const char *
alert_name(int desc)
{
  switch (desc) {
  case 109: return "missing extension";
  case 110: return "unsupported extension";
  case 112: return "unrecognized name";
  case 113: return "bad certificate status response";
  case 115: return "unknown PSK identity";
  case 116: return "certificate required";
  case 120: return "no application protocol";
  default: return SSL_alert_desc_string_long(desc);
  }
}

static void
info_cb(const SSL *ssl, int where, int ret)
{
  if (!(where & SSL_CB_ALERT) || !(where & SSL_CB_READ))
    return; /* only alerts the peer sent */
  dpx_tls *t = SSL_get_app_data(ssl);
  int desc = ret & 0xff;
  if (t == NULL || desc == SSL_AD_CLOSE_NOTIFY || desc == SSL_AD_USER_CANCELLED)
    return;
  if ((ret >> 8) != SSL3_AL_FATAL && SSL_version(ssl) < TLS1_3_VERSION)
    return; /* a TLS 1.2 warning: OpenSSL decides whether it matters */
  if (t->alert_in < 0)
    t->alert_in = desc;
}

/* ---- config ---------------------------------------------------------------- */

static int
cfg_fail(char *err, size_t errlen, int code, const char *fmt, ...)
{
  if (err != NULL && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  ERR_clear_error();
  return code;
}

static int
load_chain_pem(SSL_CTX *ctx, const char *pem, size_t len)
{
  BIO *b = BIO_new_mem_buf(pem, len ? (int)len : -1);
  if (b == NULL)
    return 0;
  int ok = 0;
  X509 *leaf = PEM_read_bio_X509_AUX(b, NULL, no_password, NULL);
  if (leaf != NULL && SSL_CTX_use_certificate(ctx, leaf) == 1) {
    ok = 1;
    X509 *ca;
    while ((ca = PEM_read_bio_X509(b, NULL, no_password, NULL)) != NULL) {
      if (!SSL_CTX_add0_chain_cert(ctx, ca)) {
        X509_free(ca);
        ok = 0;
        break;
      }
    }
    if (ok) {
      unsigned long e = ERR_peek_last_error();
      if (ERR_GET_LIB(e) == ERR_LIB_PEM &&
          ERR_GET_REASON(e) == PEM_R_NO_START_LINE)
        ERR_clear_error(); /* the normal end of the list */
    }
  }
  X509_free(leaf);
  BIO_free(b);
  return ok;
}

static int
load_key_pem(SSL_CTX *ctx, const char *pem, size_t len)
{
  BIO *b = BIO_new_mem_buf(pem, len ? (int)len : -1);
  if (b == NULL)
    return 0;
  EVP_PKEY *k = PEM_read_bio_PrivateKey(b, NULL, no_password, NULL);
  int ok = k != NULL && SSL_CTX_use_PrivateKey(ctx, k) == 1;
  EVP_PKEY_free(k);
  BIO_free(b);
  return ok;
}

/* Add every certificate of @p pem to the trust store (and, for a server
 * asking for client certificates, to the CA names it sends). Returns the
 * number added, or -1. */
static int
load_ca_pem(SSL_CTX *ctx, const char *pem, size_t len, bool names)
{
  BIO *b = BIO_new_mem_buf(pem, len ? (int)len : -1);
  if (b == NULL)
    return -1;
  X509_STORE *st = SSL_CTX_get_cert_store(ctx);
  int n = 0;
  X509 *x;
  while ((x = PEM_read_bio_X509(b, NULL, no_password, NULL)) != NULL) {
    if (!X509_STORE_add_cert(st, x) || (names && !SSL_CTX_add_client_CA(ctx, x))) {
      X509_free(x);
      BIO_free(b);
      return -1;
    }
    X509_free(x);
    n++;
  }
  BIO_free(b);
  ERR_clear_error();
  return n;
}

static int
proto_version(int v)
{
  switch (v) {
  case DPX_TLS_V1_2: return TLS1_2_VERSION;
  case DPX_TLS_V1_3: return TLS1_3_VERSION;
  default: return -1;
  }
}

static void
cfg_free(dpx_tls_config *cfg)
{
  for (size_t i = 0; i < cfg->cache_n; i++) {
    free(cfg->cache[i].key);
    SSL_SESSION_free(cfg->cache[i].sess);
  }
  free(cfg->cache);
  SSL_CTX_free(cfg->ctx);
  free(cfg->alpn);
  if (cfg->keylog != NULL)
    fclose(cfg->keylog);
  CRYPTO_THREAD_lock_free(cfg->lock);
  CRYPTO_THREAD_lock_free(cfg->keylog_lock);
  free(cfg);
}

static FILE *
open_keylog(const char *path)
{
#ifndef _WIN32
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0)
    return NULL;
  FILE *f = fdopen(fd, "a");
  if (f == NULL)
    close(fd);
  return f;
#else
  return fopen(path, "a");
#endif
}

int
dpx_tls_config_new(dpx_tls_config **out, const dpx_tls_config_opts *o,
                   char *err, size_t errlen)
{
  if (err != NULL && errlen > 0)
    err[0] = '\0';
  if (out == NULL || o == NULL)
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "no options");
  *out = NULL;
  bool server = o->role == DPX_TLS_SERVER;
  if (!server && o->role != DPX_TLS_CLIENT)
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "role must be client or server");
  int minv = proto_version(o->min_version ? o->min_version : DPX_TLS_V1_2);
  int maxv = o->max_version ? proto_version(o->max_version) : 0;
  if (minv < 0 || maxv < 0 || (maxv != 0 && maxv < minv))
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "unsupported TLS version range");
  if (o->verify < DPX_TLS_VERIFY_DEFAULT || o->verify > DPX_TLS_VERIFY_OPTIONAL ||
      (!server && o->verify == DPX_TLS_VERIFY_OPTIONAL))
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "verify mode not valid for the role");
  bool has_cert = o->cert_file != NULL || o->cert_pem != NULL;
  bool has_key = o->key_file != NULL || o->key_pem != NULL;
  if ((o->cert_file && o->cert_pem) || (o->key_file && o->key_pem))
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "certificate or key given twice");
  if (has_cert != has_key)
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "a certificate needs its key and a key its certificate");
  if (server && !has_cert)
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "a server needs a certificate and key");
  if (o->alpn_count > 0 && o->alpn == NULL)
    return cfg_fail(err, errlen, DPX_TLS_EINVAL, "alpn list missing");

  ERR_clear_error();
  /* run_once on every call: it orders the read of bio_meth after its
   * initialisation on whichever thread did it. Engines are made from a
   * config, so they see it too. */
  if (!CRYPTO_THREAD_run_once(&bio_once, bio_meth_init) || bio_meth == NULL)
    return cfg_fail(err, errlen, DPX_TLS_ENOMEM, "out of memory");

  dpx_tls_config *cfg = calloc(1, sizeof *cfg);
  if (cfg == NULL)
    return cfg_fail(err, errlen, DPX_TLS_ENOMEM, "out of memory");
  atomic_init(&cfg->refs, 1);
  cfg->role = o->role;
  cfg->verify = o->verify;
  cfg->lock = CRYPTO_THREAD_lock_new();
  cfg->keylog_lock = CRYPTO_THREAD_lock_new();
  cfg->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  int rc = DPX_TLS_ENOMEM;
  if (cfg->lock == NULL || cfg->keylog_lock == NULL || cfg->ctx == NULL) {
    cfg_fail(err, errlen, rc, "out of memory");
    goto fail;
  }
  SSL_CTX *ctx = cfg->ctx;
  SSL_CTX_set_app_data(ctx, cfg);
  SSL_CTX_set_default_passwd_cb(ctx, no_password);

  if (!SSL_CTX_set_min_proto_version(ctx, minv) ||
      !SSL_CTX_set_max_proto_version(ctx, maxv)) {
    rc = cfg_fail(err, errlen, DPX_TLS_EINVAL, "unsupported TLS version range");
    goto fail;
  }
  /* No renegotiation either way (a HelloRequest or a renegotiating
   * ClientHello is refused), no compression. */
  uint64_t ops = SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION;
  if (server)
    ops |= SSL_OP_CIPHER_SERVER_PREFERENCE;
  SSL_CTX_set_options(ctx, ops);
  SSL_CTX_clear_options(ctx, SSL_OP_ALLOW_CLIENT_RENEGOTIATION);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_info_callback(ctx, info_cb);

  /* own certificate and key */
  rc = DPX_TLS_ECONFIG;
  if (o->cert_file != NULL &&
      SSL_CTX_use_certificate_chain_file(ctx, o->cert_file) != 1) {
    cfg_fail(err, errlen, rc, "certificate file %s: %s", o->cert_file,
             ossl_reason("cannot load"));
    goto fail;
  }
  if (o->cert_pem != NULL && !load_chain_pem(ctx, o->cert_pem, o->cert_pem_len)) {
    cfg_fail(err, errlen, rc, "certificate PEM: %s", ossl_reason("cannot load"));
    goto fail;
  }
  if (o->key_file != NULL &&
      SSL_CTX_use_PrivateKey_file(ctx, o->key_file, SSL_FILETYPE_PEM) != 1) {
    cfg_fail(err, errlen, rc, "key file %s: %s", o->key_file,
             ossl_reason("cannot load"));
    goto fail;
  }
  if (o->key_pem != NULL && !load_key_pem(ctx, o->key_pem, o->key_pem_len)) {
    cfg_fail(err, errlen, rc, "key PEM: %s", ossl_reason("cannot load"));
    goto fail;
  }
  if (has_cert && SSL_CTX_check_private_key(ctx) != 1) {
    cfg_fail(err, errlen, rc, "key does not match the certificate: %s",
             ossl_reason("mismatch"));
    goto fail;
  }

  /* trust */
  bool asks = server && (o->verify == DPX_TLS_VERIFY_REQUIRE ||
                         o->verify == DPX_TLS_VERIFY_OPTIONAL);
  if (o->ca_file != NULL || o->ca_dir != NULL) {
    if (SSL_CTX_load_verify_locations(ctx, o->ca_file, o->ca_dir) != 1) {
      cfg_fail(err, errlen, rc, "CA %s: %s",
               o->ca_file != NULL ? o->ca_file : o->ca_dir,
               ossl_reason("cannot load"));
      goto fail;
    }
    if (asks && o->ca_file != NULL) {
      STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(o->ca_file);
      if (names != NULL)
        SSL_CTX_set_client_CA_list(ctx, names);
    }
  }
  if (o->ca_pem != NULL && load_ca_pem(ctx, o->ca_pem, o->ca_pem_len, asks) <= 0) {
    cfg_fail(err, errlen, rc, "CA PEM: no certificate could be loaded");
    goto fail;
  }
  /* The system store only when a peer is verified and no CA was named (or
   * when asked for): a server that asks for no client certificate has no
   * use for it, and with it OpenSSL searches the store's directory to
   * complete the server's chain on every full handshake. */
  bool verifies = asks || (!server && o->verify != DPX_TLS_VERIFY_NONE);
  if (o->system_ca || (verifies && o->ca_file == NULL && o->ca_dir == NULL &&
                       o->ca_pem == NULL)) {
    if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
      cfg_fail(err, errlen, rc, "system CA store: %s", ossl_reason("cannot load"));
      goto fail;
    }
  }
  ERR_clear_error();

  /* verification */
  int mode = SSL_VERIFY_NONE;
  if (!server && o->verify != DPX_TLS_VERIFY_NONE)
    mode = SSL_VERIFY_PEER;
  if (server && o->verify == DPX_TLS_VERIFY_REQUIRE)
    mode = SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
  if (server && o->verify == DPX_TLS_VERIFY_OPTIONAL)
    mode = SSL_VERIFY_PEER;
  SSL_CTX_set_verify(ctx, mode, verify_note);

  /* ALPN */
  rc = DPX_TLS_EINVAL;
  if (o->alpn_count > 0) {
    size_t total = 0;
    for (size_t i = 0; i < o->alpn_count; i++) {
      size_t l = o->alpn[i] != NULL ? strlen(o->alpn[i]) : 0;
      if (l == 0 || l > 255) {
        cfg_fail(err, errlen, rc, "ALPN names must be 1 to 255 bytes");
        goto fail;
      }
      total += 1 + l;
    }
    if (total > 65535) {
      cfg_fail(err, errlen, rc, "ALPN list too long");
      goto fail;
    }
    cfg->alpn = malloc(total);
    if (cfg->alpn == NULL) {
      rc = cfg_fail(err, errlen, DPX_TLS_ENOMEM, "out of memory");
      goto fail;
    }
    size_t at = 0;
    for (size_t i = 0; i < o->alpn_count; i++) {
      size_t l = strlen(o->alpn[i]);
      cfg->alpn[at] = (unsigned char)l;
      memcpy(cfg->alpn + at + 1, o->alpn[i], l);
      at += 1 + l;
    }
    cfg->alpn_len = total;
    if (server) {
      SSL_CTX_set_alpn_select_cb(ctx, alpn_select, cfg);
    } else if (SSL_CTX_set_alpn_protos(ctx, cfg->alpn, (unsigned)total) != 0) {
      rc = cfg_fail(err, errlen, DPX_TLS_ENOMEM, "out of memory");
      goto fail;
    }
  }

  /* sessions */
  if (server) {
    /* Resumption through tickets only: no server-side cache that grows
     * with every client. The id context lets sessions resume when client
     * certificates are verified. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    static const unsigned char sid_ctx[] = "libduplex";
    SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof sid_ctx - 1);
  } else if (o->session_cache >= 0) {
    cfg->cache_cap = o->session_cache ? (size_t)o->session_cache
                                      : SESSION_CACHE_DEFAULT;
    cfg->cache = calloc(cfg->cache_cap, sizeof *cfg->cache);
    if (cfg->cache == NULL) {
      rc = cfg_fail(err, errlen, DPX_TLS_ENOMEM, "out of memory");
      goto fail;
    }
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT |
                                            SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, new_session);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  }

  /* key log */
  if (o->keylog_file != NULL) {
    cfg->keylog = open_keylog(o->keylog_file);
    if (cfg->keylog == NULL) {
      rc = cfg_fail(err, errlen, DPX_TLS_ECONFIG, "key log file %s: cannot open",
                    o->keylog_file);
      goto fail;
    }
    SSL_CTX_set_keylog_callback(ctx, keylog_line);
  }

  ERR_clear_error();
  *out = cfg;
  return 0;

fail:
  cfg_free(cfg);
  ERR_clear_error();
  return rc;
}

void
dpx_tls_config_ref(dpx_tls_config *cfg)
{
  if (cfg != NULL)
    atomic_fetch_add_explicit(&cfg->refs, 1, memory_order_relaxed);
}

void
dpx_tls_config_unref(dpx_tls_config *cfg)
{
  if (cfg != NULL &&
      atomic_fetch_sub_explicit(&cfg->refs, 1, memory_order_acq_rel) == 1)
    cfg_free(cfg);
}

int
dpx_tls_config_role(const dpx_tls_config *cfg)
{
  return cfg != NULL ? cfg->role : 0;
}

/* ---- engine ---------------------------------------------------------------- */

int
dpx_tls_new(dpx_tls **out, dpx_tls_config *cfg, const dpx_tls_opts *opts)
{
  if (out == NULL || cfg == NULL)
    return DPX_TLS_EINVAL;
  *out = NULL;
  dpx_tls_opts o = {0};
  if (opts != NULL)
    o = *opts;
  bool client = cfg->role == DPX_TLS_CLIENT;
  bool verifying = client && cfg->verify != DPX_TLS_VERIFY_NONE;
  if (verifying && (o.host == NULL || o.host[0] == '\0'))
    return DPX_TLS_EINVAL; /* nothing to check the certificate against */

  dpx_tls *t = calloc(1, sizeof *t);
  if (t == NULL)
    return DPX_TLS_ENOMEM;
  t->alert_in = -1;
  t->in_cap = o.in_cap ? o.in_cap : DPX_TLS_DEFAULT_IN_CAP;
  if (t->in_cap < MIN_IN_CAP)
    t->in_cap = MIN_IN_CAP;
  t->out_cap = o.out_cap ? o.out_cap : DPX_TLS_DEFAULT_OUT_CAP;
  dpx_tls_config_ref(cfg);
  t->cfg = cfg;

  ERR_clear_error();
  int rc = DPX_TLS_ENOMEM;
  t->ssl = SSL_new(cfg->ctx);
  BIO *bio = t->ssl != NULL ? BIO_new(bio_meth) : NULL;
  if (bio == NULL)
    goto fail;
  BIO_set_data(bio, t);
  SSL_set_bio(t->ssl, bio, bio); /* one reference for both directions */
  SSL_set_app_data(t->ssl, t);

  if (client) {
    SSL_set_connect_state(t->ssl);
    if (o.host != NULL && o.host[0] != '\0') {
      X509_VERIFY_PARAM *vp = SSL_get0_param(t->ssl);
      if (X509_VERIFY_PARAM_set1_ip_asc(vp, o.host) != 1) {
        /* a DNS name: checked, and sent as SNI */
        ERR_clear_error();
        SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (SSL_set1_host(t->ssl, o.host) != 1 ||
            SSL_set_tlsext_host_name(t->ssl, o.host) != 1) {
          rc = DPX_TLS_EINVAL;
          goto fail;
        }
      }
    }
    if (cfg->cache != NULL) {
      const char *key = o.session_key != NULL ? o.session_key : o.host;
      if (key != NULL) {
        t->session_key = dup_str(key);
        if (t->session_key == NULL)
          goto fail;
        SSL_SESSION *s = cache_get(cfg, key);
        if (s != NULL) {
          SSL_set_session(t->ssl, s);
          SSL_SESSION_free(s);
        }
      }
    }
  } else {
    SSL_set_accept_state(t->ssl);
  }
  ERR_clear_error();
  *out = t;
  return 0;

fail:
  ERR_clear_error();
  dpx_tls_free(t);
  return rc;
}

static void
out_release(dpx_tls *t)
{
  seg *s = t->out_head;
  while (s != NULL) {
    seg *n = s->next;
    free(s);
    s = n;
  }
  t->out_head = t->out_tail = NULL;
  t->out_off = t->out_len = t->out_alloc = 0;
}

void
dpx_tls_free(dpx_tls *t)
{
  if (t == NULL)
    return;
  if (t->session_key != NULL && t->cfg->cache != NULL)
    cache_forget(t->cfg, t, t->err != 0);
  if (t->ssl != NULL) {
    /* OpenSSL marks the session of a connection freed before it sent
     * close_notify as not resumable. A connection that ended without an
     * error keeps its session (a conn closed without shutdown is not a
     * failure); one that failed loses it, and cache_forget above dropped
     * the other sessions it received. */
    if (t->hs_done && !t->err)
      SSL_set_shutdown(t->ssl, SSL_get_shutdown(t->ssl) | SSL_SENT_SHUTDOWN);
    SSL_set_app_data(t->ssl, NULL);
    SSL_free(t->ssl); /* frees the BIO */
  }
  ERR_clear_error();
  in_release(t);
  out_release(t);
  free(t->session_key);
  free(t->reason);
  free(t->vfy_note);
  dpx_tls_config_unref(t->cfg);
  free(t);
}

/* ---- errors ---------------------------------------------------------------- */

static int
set_err(dpx_tls *t, int code, const char *fmt, ...)
{
  if (t->err == 0) {
    t->err = code;
    va_list ap;
    va_start(ap, fmt);
    t->reason = vformat(fmt, ap);
    va_end(ap);
  }
  return t->err;
}

/* Map a failed SSL call (result @p r) to a status; errors become sticky.
 * Leaves OpenSSL's error queue empty. */
static int
ssl_status(dpx_tls *t, int r)
{
  int e = SSL_get_error(t->ssl, r);
  int rc;
  switch (e) {
  case SSL_ERROR_WANT_READ:
    ERR_clear_error();
    return DPX_TLS_WANT_INPUT;
  case SSL_ERROR_ZERO_RETURN:
    ERR_clear_error();
    t->got_close = 1;
    if (!t->hs_done)
      return set_err(t, DPX_TLS_EPROTO,
                     "protocol error: close_notify during the handshake");
    return DPX_TLS_EOF;
  default:
    break;
  }
  ossl_why why;
  ossl_collect(&why);

  if (t->oom) {
    rc = set_err(t, DPX_TLS_ENOMEM, "out of memory");
  } else if (why.vfy_failed) {
    long x = SSL_get_verify_result(t->ssl);
    if (t->vfy_note == NULL)
      t->vfy_class = vfy_classify(x);
    rc = set_err(t, DPX_TLS_EVERIFY, "certificate verify failed: %s",
                 t->vfy_note != NULL ? t->vfy_note
                                     : X509_verify_cert_error_string(x));
  } else if (why.no_cert) {
    t->vfy_class = DPX_TLS_VERIFY_NO_CERT;
    rc = set_err(t, DPX_TLS_EVERIFY,
                 "certificate verify failed: the peer sent no certificate");
  } else if (t->alert_in >= 0) {
    rc = set_err(t, DPX_TLS_EALERT, "alert received: %s (%d)",
                 alert_name(t->alert_in), t->alert_in);
  } else if (t->in_eof && t->in_len == t->in_off && !t->got_close) {
    rc = set_err(t, DPX_TLS_ETRUNCATED,
                 t->hs_done ? "truncated: the transport ended without close_notify"
                            : "truncated: the transport ended during the handshake");
  } else {
    rc = set_err(t, DPX_TLS_EPROTO, "protocol error: %s", why.text);
  }
  return rc;
}

int
dpx_tls_error(const dpx_tls *t)
{
  return t != NULL ? t->err : DPX_TLS_EINVAL;
}

const char *
dpx_tls_reason(const dpx_tls *t)
{
  return t != NULL && t->reason != NULL ? t->reason : "";
}

int
dpx_tls_verify_error(const dpx_tls *t)
{
  return t != NULL ? t->vfy_class : DPX_TLS_VERIFY_OK;
}

int
dpx_tls_alert(const dpx_tls *t)
{
  return t != NULL ? t->alert_in : -1;
}

bool
dpx_tls_sent_close(const dpx_tls *t)
{
  return t != NULL && t->sent_close;
}

bool
dpx_tls_got_close(const dpx_tls *t)
{
  return t != NULL && t->got_close;
}

/* Give OpenSSL's record buffers back when nothing is in progress.
 * SSL_MODE_RELEASE_BUFFERS does it after application records, but a TLS 1.3
 * handshake (tickets) leaves a 16 KiB buffer allocated until the first
 * application record; an idle conn should hold none. Only with no input
 * queued and no partial or unread record inside OpenSSL. Due from the
 * handshake's end until it worked once or an application record was read
 * (from then on OpenSSL releases them itself): the call costs about 6 % of
 * a small echo, too much to make on every read and write. */
static void
trim(dpx_tls *t)
{
  if (t->trim_due && t->hs_done && !t->err && t->in_len == t->in_off &&
      !SSL_has_pending(t->ssl) && SSL_free_buffers(t->ssl) == 1)
    t->trim_due = 0;
}

/* ---- handshake --------------------------------------------------------- */

int
dpx_tls_handshake(dpx_tls *t)
{
  if (t == NULL)
    return DPX_TLS_EINVAL;
  if (t->err)
    return t->err;
  if (t->hs_done)
    return DPX_TLS_OK;
  ERR_clear_error();
  int r = SSL_do_handshake(t->ssl);
  if (r == 1) {
    t->hs_done = 1;
    t->trim_due = 1;
    ERR_clear_error();
    trim(t);
    return DPX_TLS_OK;
  }
  return ssl_status(t, r);
}

bool
dpx_tls_handshake_done(const dpx_tls *t)
{
  return t != NULL && t->hs_done;
}

/* ---- input ------------------------------------------------------------------ */

bool
dpx_tls_can_feed(const dpx_tls *t)
{
  return t != NULL && !t->err && !t->in_eof &&
         t->in_len - t->in_off < t->in_cap;
}

int
dpx_tls_feed(dpx_tls *t, const void *data, size_t len)
{
  if (t == NULL || (data == NULL && len > 0))
    return DPX_TLS_EINVAL;
  if (t->err)
    return t->err;
  if (t->in_eof)
    return DPX_TLS_EINVAL;
  size_t have = t->in_len - t->in_off;
  if (have >= t->in_cap)
    return DPX_TLS_FULL;
  if (len == 0)
    return DPX_TLS_OK;
  if (have == 0) {
    in_release(t);
  } else if (t->in_off > 0) {
    memmove(t->in_buf, t->in_buf + t->in_off, have);
    t->in_off = 0;
    t->in_len = have;
  }
  if (t->in_alloc - t->in_len < len) {
    size_t want = t->in_len + len;
    unsigned char *p = realloc(t->in_buf, want);
    if (p == NULL)
      return set_err(t, DPX_TLS_ENOMEM, "out of memory");
    t->in_buf = p;
    t->in_alloc = want;
  }
  memcpy(t->in_buf + t->in_len, data, len);
  t->in_len += len;
  /* Post-handshake messages (tickets, key updates) may leave OpenSSL a
   * read buffer that only an application record would release. */
  if (t->hs_done)
    t->trim_due = 1;
  return DPX_TLS_OK;
}

void
dpx_tls_feed_eof(dpx_tls *t)
{
  if (t != NULL)
    t->in_eof = 1;
}

size_t
dpx_tls_in_pending(const dpx_tls *t)
{
  return t != NULL ? t->in_len - t->in_off : 0;
}

int
dpx_tls_read(dpx_tls *t, void *buf, size_t cap, size_t *n)
{
  if (n != NULL)
    *n = 0;
  if (t == NULL || n == NULL || buf == NULL || cap == 0)
    return DPX_TLS_EINVAL;
  if (t->err)
    return t->err;
  if (t->got_close && t->hs_done && SSL_pending(t->ssl) == 0)
    return DPX_TLS_EOF;
  if (t->out_len > t->out_cap + CTL_SLACK)
    return DPX_TLS_FULL;
  if (!t->hs_done) {
    int r = dpx_tls_handshake(t);
    if (r != DPX_TLS_OK)
      return r;
  }
  ERR_clear_error();
  size_t got = 0;
  int r = SSL_read_ex(t->ssl, buf, cap, &got);
  if (r == 1) {
    *n = got;
    t->trim_due = 0; /* an application record: OpenSSL releases from now */
    return DPX_TLS_OK;
  }
  int rc = ssl_status(t, r);
  if (rc == DPX_TLS_WANT_INPUT || rc == DPX_TLS_EOF)
    trim(t);
  return rc;
}

size_t
dpx_tls_read_pending(const dpx_tls *t)
{
  if (t == NULL || t->ssl == NULL)
    return 0;
  int p = SSL_pending(t->ssl);
  return p > 0 ? (size_t)p : 0;
}

/* ---- output ------------------------------------------------------------------ */

bool
dpx_tls_can_write(const dpx_tls *t)
{
  return t != NULL && !t->err && t->hs_done && !t->sent_close &&
         t->out_len < t->out_cap;
}

int
dpx_tls_write(dpx_tls *t, const void *data, size_t len, size_t *taken)
{
  if (taken != NULL)
    *taken = 0;
  if (t == NULL || taken == NULL || (data == NULL && len > 0))
    return DPX_TLS_EINVAL;
  if (t->err)
    return t->err;
  if (t->sent_close)
    return DPX_TLS_ESHUTDOWN;
  if (!t->hs_done)
    return DPX_TLS_WANT_INPUT;
  if (len == 0)
    return DPX_TLS_OK;
  if (t->out_len >= t->out_cap)
    return DPX_TLS_FULL;
  size_t room = t->out_cap - t->out_len;
  size_t max = (room + DPX_TLS_MAX_RECORD - 1) / DPX_TLS_MAX_RECORD *
               DPX_TLS_MAX_RECORD;
  size_t take = len < max ? len : max;
  ERR_clear_error();
  size_t w = 0;
  int r = SSL_write_ex(t->ssl, data, take, &w);
  if (r == 1) {
    *taken = w;
    trim(t);
    return DPX_TLS_OK;
  }
  int rc = ssl_status(t, r);
  if (rc == DPX_TLS_WANT_INPUT || rc == DPX_TLS_EOF) /* not expected here */
    rc = set_err(t, DPX_TLS_EPROTO, "protocol error: write refused");
  return rc;
}

int
dpx_tls_shutdown(dpx_tls *t)
{
  if (t == NULL)
    return DPX_TLS_EINVAL;
  if (t->err)
    return t->err;
  if (t->sent_close)
    return DPX_TLS_OK;
  if (!t->hs_done)
    return DPX_TLS_WANT_INPUT;
  ERR_clear_error();
  int r = SSL_shutdown(t->ssl);
  if (r >= 0) {
    t->sent_close = 1;
    ERR_clear_error();
    return DPX_TLS_OK;
  }
  int rc = ssl_status(t, r);
  if (rc >= 0)
    rc = set_err(t, DPX_TLS_EPROTO, "protocol error: close_notify not sent");
  return rc;
}

size_t
dpx_tls_out_pending(const dpx_tls *t)
{
  return t != NULL ? t->out_len : 0;
}

size_t
dpx_tls_out_peek(const dpx_tls *t, size_t skip, dpx_tls_buf *bufs,
                 size_t nbufs)
{
  if (t == NULL || bufs == NULL)
    return 0;
  size_t k = 0;
  size_t off = t->out_off;
  for (const seg *s = t->out_head; s != NULL && k < nbufs; s = s->next) {
    size_t avail = s->len - off;
    if (skip >= avail) {
      skip -= avail;
    } else {
      bufs[k].base = s->data + off + skip;
      bufs[k].len = avail - skip;
      skip = 0;
      k++;
    }
    off = 0;
  }
  return k;
}

void
dpx_tls_out_consume(dpx_tls *t, size_t n)
{
  if (t == NULL)
    return;
  if (n > t->out_len)
    n = t->out_len;
  t->out_len -= n;
  while (n > 0 && t->out_head != NULL) {
    seg *s = t->out_head;
    size_t avail = s->len - t->out_off;
    if (n < avail) {
      t->out_off += n;
      break;
    }
    n -= avail;
    t->out_head = s->next;
    if (t->out_head == NULL)
      t->out_tail = NULL;
    t->out_alloc -= s->cap;
    t->out_off = 0;
    free(s);
  }
  if (t->out_len == 0 && t->out_head != NULL) {
    /* a tail segment fully consumed but not yet freed */
    out_release(t);
  }
}

size_t
dpx_tls_buffer_bytes(const dpx_tls *t)
{
  return t != NULL ? t->in_alloc + t->out_alloc : 0;
}

/* ---- information ---------------------------------------------------------- */

void
dpx_tls_get_info(const dpx_tls *t, dpx_tls_info *info)
{
  if (info == NULL)
    return;
  memset(info, 0, sizeof *info);
  info->version_name = "";
  info->cipher = "";
  if (t == NULL || !t->hs_done)
    return;
  int v = SSL_version(t->ssl);
  info->version = v == TLS1_3_VERSION ? DPX_TLS_V1_3
                  : v == TLS1_2_VERSION ? DPX_TLS_V1_2 : v;
  info->version_name = SSL_get_version(t->ssl);
  const char *c = SSL_get_cipher_name(t->ssl);
  info->cipher = c != NULL ? c : "";
  const unsigned char *alpn = NULL;
  unsigned alen = 0;
  SSL_get0_alpn_selected(t->ssl, &alpn, &alen);
  if (alpn != NULL && alen > 0) {
    memcpy(info->alpn, alpn, alen < 255 ? alen : 255);
    info->alpn[alen < 255 ? alen : 255] = '\0';
  }
  if (t->cfg->role == DPX_TLS_SERVER) {
    const char *sni = SSL_get_servername(t->ssl, TLSEXT_NAMETYPE_host_name);
    if (sni != NULL)
      copy_str(info->sni, sizeof info->sni, sni);
  }
  info->resumed = SSL_session_reused(t->ssl) == 1;
  info->peer_cert = SSL_get0_peer_certificate(t->ssl) != NULL;
}

int
dpx_tls_peer_subject(const dpx_tls *t, char *buf, size_t len)
{
  if (t == NULL || t->ssl == NULL)
    return -1;
  X509 *cert = SSL_get0_peer_certificate(t->ssl);
  if (cert == NULL)
    return -1;
  BIO *m = BIO_new(BIO_s_mem());
  if (m == NULL)
    return -1;
  X509_NAME_print_ex(m, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  char *p = NULL;
  long n = BIO_get_mem_data(m, &p);
  if (n < 0)
    n = 0;
  if (buf != NULL && len > 0) {
    size_t c = (size_t)n < len - 1 ? (size_t)n : len - 1;
    if (c > 0)
      memcpy(buf, p, c);
    buf[c] = '\0';
  }
  BIO_free(m);
  ERR_clear_error();
  return (int)n;
}
