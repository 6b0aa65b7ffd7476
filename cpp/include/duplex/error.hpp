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

namespace detail {

/// A system code of the error table: the POSIX errno it stands for.
struct posix_errno {
  int value;
};
constexpr int generic_errno(posix_errno e) noexcept { return e.value; }
constexpr int generic_errno(int) noexcept { return 0; } // a library-only code

/// The generic (std::errc) value of library code @p code, or 0 when it has
/// none. Read from DUPLEX_ERRNO_MAP itself: every entry whose value is
/// DUPLEX_SYSERR_(posix, win) stands for errno `posix` (on every platform,
/// whatever its numeric value there); EAI_* and the library's own codes are
/// plain numbers and map to nothing.
constexpr int generic_errno_of(int code) noexcept {
#pragma push_macro("DUPLEX_SYSERR_")
#undef DUPLEX_SYSERR_
#define DUPLEX_SYSERR_(posix, win) (::duplex::detail::posix_errno{posix})
#define DUPLEX_CPP_GENERIC_(name, value, msg)                                  \
  if (code == DUPLEX_##name)                                                   \
    return ::duplex::detail::generic_errno(value);
  DUPLEX_ERRNO_MAP(DUPLEX_CPP_GENERIC_)
#undef DUPLEX_CPP_GENERIC_
#undef DUPLEX_SYSERR_
#pragma pop_macro("DUPLEX_SYSERR_")
  return 0;
}

} // namespace detail

/// The category of library codes; messages come from duplex_strerror().
/// Every code named after an errno compares equal to the matching
/// std::errc (DUPLEX_ECONNRESET == std::errc::connection_reset,
/// DUPLEX_EWOULDBLOCK == both resource_unavailable_try_again and
/// operation_would_block); library-only codes (ECLOSED, EVERSION,
/// EWRONGTHREAD, EUNKNOWN, ETLS*, EAI_*) match no generic condition.
class error_category_impl final : public std::error_category {
public:
  const char *name() const noexcept override { return "duplex"; }
  std::string message(int ev) const override { return duplex_strerror(ev); }
  std::error_condition default_error_condition(int ev) const noexcept override {
    if (int e = detail::generic_errno_of(ev))
      return {e, std::generic_category()};
    return {ev, *this};
  }
  bool equivalent(int ev, const std::error_condition &cond) const noexcept override {
    if (default_error_condition(ev) == cond)
      return true;
    // EAGAIN and EWOULDBLOCK are two errno values on some platforms.
    return ev == DUPLEX_EWOULDBLOCK &&
           cond == std::errc::operation_would_block;
  }
};

inline const std::error_category &category() noexcept {
  static const error_category_impl cat;
  return cat;
}

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), category()};
}
/// The same for the C enum: make_error_code(DUPLEX_ECONNRESET).
inline std::error_code make_error_code(duplex_error e) noexcept {
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
