// libduplex C++ layer: TLS configurations (duplex::Tls, counted) and what
// a TLS conn negotiated (duplex::TlsInfo). The conn side (ConnOptions::tls,
// ListenerOptions::tls, ConnRef::start_tls, tls_info, tls_error) is in
// conn.hpp and listener.hpp.
#pragma once

#include <duplex/error.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace duplex {

/// Which side of the handshake a configuration is for
/// (duplex_tls_config.role).
enum class TlsRole : int {
  client = DUPLEX_TLS_CLIENT,
  server = DUPLEX_TLS_SERVER,
};

/// How the peer is verified (duplex_tls_config.verify).
enum class TlsVerify : int {
  /// Clients verify the server's chain and host name; servers ask for no
  /// client certificate.
  standard = DUPLEX_TLS_VERIFY_DEFAULT,
  /// Client: accept any server certificate (testing only).
  none = DUPLEX_TLS_VERIFY_NONE,
  /// Server: mutual TLS, a valid client certificate is required.
  require = DUPLEX_TLS_VERIFY_REQUIRE,
  /// Server: ask for a client certificate; verify it if one is sent.
  optional = DUPLEX_TLS_VERIFY_OPTIONAL,
};

/// Protocol versions (duplex_tls_config.min_version / max_version, and
/// TlsInfo::version). `any`: the library's default.
enum class TlsVersion : int {
  any = 0,
  v1_2 = DUPLEX_TLS_V1_2,
  v1_3 = DUPLEX_TLS_V1_3,
};

/// What a duplex::Tls is made from: duplex_tls_config with owning fields.
/// Empty strings and zeros mean "default", as in C. Files are read and PEM
/// is parsed when the Tls is made; the TlsConfig is not needed afterwards.
///
///     duplex::Tls server(duplex::TlsConfig::server("cert.pem", "key.pem"));
///     duplex::Tls client(duplex::TlsConfig::client("ca.pem"));
///     duplex::Tls h2({.role = duplex::TlsRole::client, .alpn = {"h2"}});
struct TlsConfig {
  TlsRole role = TlsRole::client;
  /// Own certificate chain (leaf first), PEM: a file or the text itself.
  /// Servers need one; clients only for mutual TLS.
  std::string cert_file = {}, cert_pem = {};
  /// Its private key, PEM (unencrypted): a file or the text itself.
  std::string key_file = {}, key_pem = {};
  /// Trust for verifying the peer: a CA file, a hashed CA directory, CA
  /// certificates as text; with none of the three, the system store.
  std::string ca_file = {}, ca_dir = {}, ca_pem = {};
  /// Also trust the system store (with one of the above).
  bool system_ca = false;
  TlsVerify verify = TlsVerify::standard;
  /// ALPN protocol names in preference order (each 1..255 bytes).
  std::vector<std::string> alpn = {};
  TlsVersion min_version = TlsVersion::any; ///< any = TLS 1.2
  TlsVersion max_version = TlsVersion::any; ///< any = the highest supported
  /// Client session resumption: 0 = the default cache (64 sessions),
  /// negative = off.
  int session_cache = 0;
  /// Debugging only: append NSS key-log lines to this file ("" = off).
  std::string keylog_file = {};
  /// Longest a handshake may take before the conn closes with
  /// errc::DUPLEX_ETIMEDOUT; 0 = 10 s.
  std::chrono::milliseconds handshake_timeout{0};

  /// A client that trusts @p ca_file ("" = the system store) and verifies
  /// the server's name.
  static TlsConfig client(std::string ca_file = {}) {
    TlsConfig c;
    c.role = TlsRole::client;
    c.ca_file = std::move(ca_file);
    return c;
  }
  /// A server with this certificate chain and key (PEM files).
  static TlsConfig server(std::string cert_file, std::string key_file) {
    TlsConfig c;
    c.role = TlsRole::server;
    c.cert_file = std::move(cert_file);
    c.key_file = std::move(key_file);
    return c;
  }
};

/// An immutable TLS configuration (duplex_tls), shared by any number of
/// conns and listeners on any loops. Counted: a copy takes a reference
/// (duplex_tls_ref), destroying drops it, and conns and listeners hold
/// their own, so a Tls may go as soon as they were made. A
/// default-constructed Tls is empty (plain TCP where it is an option).
class Tls {
public:
  Tls() noexcept = default;
  /// Load @p cfg (reads its files: do it at start-up, not on a busy loop
  /// thread). Throws duplex::error: errc::DUPLEX_ETLSCONFIG (a
  /// certificate, key or CA would not load), DUPLEX_EINVAL (bad fields),
  /// DUPLEX_ENOTSUP (built without TLS), DUPLEX_ENOMEM; what() carries the
  /// library's reason ("cert.pem: no such file", "key does not match").
  explicit Tls(const TlsConfig &cfg) {
    std::error_code ec;
    std::string why;
    *this = make(cfg, ec, &why);
    if (ec)
      throw error(ec.value(), why.empty() ? "duplex_tls_new"
                                          : ("duplex_tls_new: " + why).c_str());
  }
  /// The same, without throwing: an empty Tls and @p ec set on failure
  /// (and @p why, when given, the library's reason).
  static Tls make(const TlsConfig &cfg, std::error_code &ec,
                  std::string *why = nullptr) {
    std::vector<const char *> alpn;
    alpn.reserve(cfg.alpn.size());
    for (const auto &a : cfg.alpn)
      alpn.push_back(a.c_str());
    // Zeros are every field's default (what DUPLEX_TLS_CONFIG_INIT means).
    duplex_tls_config c;
    std::memset(&c, 0, sizeof c);
    c.size = sizeof c;
    c.role = static_cast<int>(cfg.role);
    c.cert_file = str_or_null(cfg.cert_file);
    c.cert_pem = str_or_null(cfg.cert_pem);
    c.cert_pem_len = cfg.cert_pem.size();
    c.key_file = str_or_null(cfg.key_file);
    c.key_pem = str_or_null(cfg.key_pem);
    c.key_pem_len = cfg.key_pem.size();
    c.ca_file = str_or_null(cfg.ca_file);
    c.ca_dir = str_or_null(cfg.ca_dir);
    c.ca_pem = str_or_null(cfg.ca_pem);
    c.ca_pem_len = cfg.ca_pem.size();
    c.system_ca = cfg.system_ca ? 1 : 0;
    c.verify = static_cast<int>(cfg.verify);
    c.alpn = alpn.empty() ? nullptr : alpn.data();
    c.alpn_count = alpn.size();
    c.min_version = static_cast<int>(cfg.min_version);
    c.max_version = static_cast<int>(cfg.max_version);
    c.session_cache = cfg.session_cache;
    c.keylog_file = str_or_null(cfg.keylog_file);
    c.handshake_timeout_ms =
        static_cast<uint32_t>(cfg.handshake_timeout.count());
    char err[512] = "";
    Tls t;
    ec = to_error_code(duplex_tls_new(&t.t_, &c, err, sizeof err));
    if (ec) {
      t.t_ = nullptr;
      if (why != nullptr)
        *why = err;
    }
    return t;
  }
  /// Share a C configuration: takes its own reference to @p t.
  static Tls ref(duplex_tls *t) noexcept {
    Tls r;
    if (t != nullptr && duplex_tls_ref(t) == 0)
      r.t_ = t;
    return r;
  }

  Tls(const Tls &o) noexcept : t_(o.t_) {
    if (t_ != nullptr)
      duplex_tls_ref(t_);
  }
  Tls(Tls &&o) noexcept : t_(std::exchange(o.t_, nullptr)) {}
  Tls &operator=(Tls o) noexcept {
    std::swap(t_, o.t_);
    return *this;
  }
  ~Tls() {
    if (t_ != nullptr)
      duplex_tls_unref(t_);
  }

  explicit operator bool() const noexcept { return t_ != nullptr; }
  [[nodiscard]] duplex_tls *native() const noexcept { return t_; }

  /// The TLS library this build uses ("OpenSSL 3.0.15 3 Sep 2024"), or ""
  /// when it was built without TLS.
  [[nodiscard]] static std::string backend() {
    const char *b = duplex_tls_backend();
    return b != nullptr ? b : "";
  }
  /// Whether this build speaks TLS at all (else every TLS call fails with
  /// errc::DUPLEX_ENOTSUP).
  [[nodiscard]] static bool available() noexcept {
    return duplex_tls_backend() != nullptr;
  }

private:
  static const char *str_or_null(const std::string &s) noexcept {
    return s.empty() ? nullptr : s.c_str();
  }
  duplex_tls *t_ = nullptr;
};

/// What a TLS conn negotiated (ConnRef::tls_info()).
struct TlsInfo {
  TlsVersion version = TlsVersion::any;
  std::string version_name; ///< "TLSv1.3"
  std::string cipher;       ///< "TLS_AES_256_GCM_SHA384"
  std::string alpn;         ///< the ALPN protocol, "" if none
  std::string sni;          ///< server side: the name the client asked for
  std::string peer_subject; ///< RFC 2253 subject, "" without a certificate
  bool resumed = false;     ///< the session was resumed
  bool peer_cert = false;   ///< the peer presented a certificate
};

} // namespace duplex
