// libduplex C++ layer: error codes as std::error_code.
#pragma once

#include <duplex.h>

#include <string>
#include <system_error>

namespace duplex {

/// Every library code, with the same names and values as the C API
/// (errc::DUPLEX_ECLOSED == DUPLEX_ECLOSED): errno macros such as EINVAL
/// rule out the bare names.
enum class errc : int {
#define DUPLEX_CPP_ERRC_(name, value, msg) DUPLEX_##name = (value),
  DUPLEX_ERRNO_MAP(DUPLEX_CPP_ERRC_)
#undef DUPLEX_CPP_ERRC_
};

/// The category of library codes; messages come from duplex_strerror().
class error_category_impl final : public std::error_category {
public:
  const char *name() const noexcept override { return "duplex"; }
  std::string message(int ev) const override { return duplex_strerror(ev); }
};

inline const std::error_category &category() noexcept {
  static const error_category_impl cat;
  return cat;
}

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), category()};
}

/// A C return code as an error_code (0 -> success).
inline std::error_code to_error_code(int rc) noexcept {
  return rc == 0 ? std::error_code{} : std::error_code{rc, category()};
}

/// Thrown by the throwing overloads; code() carries the library code.
class error : public std::system_error {
public:
  explicit error(int rc, const char *what = "")
      : std::system_error(rc, category(), what) {}
};

namespace detail {
inline void check(int rc, const char *what) {
  if (rc != 0)
    throw error(rc, what);
}
} // namespace detail

} // namespace duplex

template <> struct std::is_error_code_enum<duplex::errc> : std::true_type {};
