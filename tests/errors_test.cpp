// Error codes and strings: DUPLEX_ERRNO_MAP is the single source of truth;
// duplex_strerror() and duplex_err_name() are total. Also the version
// functions (same header section: static strings and plain values).
#include <duplex.h>

#include <doctest/doctest.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <set>
#include <string>
#include <vector>

namespace {

struct Code {
  const char *name; // "DUPLEX_EINVAL"
  int value;
  const char *msg;
};

const std::vector<Code> &codes() {
  static const std::vector<Code> table = {
#define XX(name, value, msg) {"DUPLEX_" #name, (value), (msg)},
      DUPLEX_ERRNO_MAP(XX)
#undef XX
  };
  return table;
}

bool is_known(int v) {
  for (const auto &c : codes())
    if (c.value == v)
      return true;
  return v == 0;
}

} // namespace

// The enum is generated from the same table.
#define XX(name, value, msg) static_assert(DUPLEX_##name == (value));
DUPLEX_ERRNO_MAP(XX)
#undef XX
static_assert(DUPLEX_OK == 0);
static_assert(DUPLEX_EAGAIN == DUPLEX_EWOULDBLOCK);
#if !defined(_WIN32)
// System codes are -errno on Unix.
static_assert(DUPLEX_EINVAL == -EINVAL);
static_assert(DUPLEX_EWOULDBLOCK == -EAGAIN);
static_assert(DUPLEX_ECANCELED == -ECANCELED);
static_assert(DUPLEX_EPIPE == -EPIPE);
static_assert(DUPLEX_ECONNRESET == -ECONNRESET);
#endif

TEST_CASE("every error code has a distinct negative value") {
  std::set<int> values;
  for (const auto &c : codes()) {
    INFO(c.name);
    CHECK(c.value < 0);
    CHECK(values.insert(c.value).second);
  }
  CHECK(values.size() == codes().size());
  CHECK(values.count(0) == 0);
}

TEST_CASE("library codes live at -30000 and below, apart from system codes") {
  for (const auto &c : codes()) {
    INFO(c.name);
    std::string n = c.name;
    bool lib = n == "DUPLEX_ECLOSED" || n == "DUPLEX_EVERSION" ||
               n == "DUPLEX_EWRONGTHREAD" || n == "DUPLEX_EUNKNOWN" ||
               n.rfind("DUPLEX_ETLS", 0) == 0;
    if (lib)
      CHECK(c.value <= -30000);
    else
      CHECK(c.value > -30000);
  }
}

TEST_CASE("every error code has a distinct name matching its enumerator") {
  std::set<std::string> names;
  for (const auto &c : codes()) {
    INFO(c.name);
    const char *got = duplex_err_name(c.value);
    REQUIRE(got != nullptr);
    CHECK(std::string(got) == c.name);
    CHECK(names.insert(got).second);
  }
}

TEST_CASE("every error code has a distinct non-empty message from the table") {
  std::set<std::string> msgs;
  for (const auto &c : codes()) {
    INFO(c.name);
    const char *got = duplex_strerror(c.value);
    REQUIRE(got != nullptr);
    CHECK(std::strlen(got) > 0);
    CHECK(std::string(got) == c.msg);
    CHECK(std::string(got) != "unknown error");
    CHECK(msgs.insert(got).second);
  }
}

TEST_CASE("zero is success") {
  REQUIRE(duplex_strerror(0) != nullptr);
  REQUIRE(duplex_err_name(0) != nullptr);
  CHECK(std::string(duplex_strerror(0)) == "success");
  CHECK(std::string(duplex_err_name(0)) == "DUPLEX_OK");
}

TEST_CASE("strerror and err_name are total over int") {
  std::vector<int> unknown = {INT_MIN,    INT_MIN + 1, -1000000, -30000,
                              -30006,     -29999,      -3000,    -3100,
                              -9999,      1,           2,        22,
                              30001,      INT_MAX,     4096};
  for (int v : unknown) {
    if (is_known(v))
      continue; // e.g. a platform where one of these is a real errno
    INFO("value " << v);
    const char *s = duplex_strerror(v);
    const char *n = duplex_err_name(v);
    REQUIRE(s != nullptr);
    REQUIRE(n != nullptr);
    CHECK(std::string(s) == "unknown error");
    CHECK(std::string(n) == "DUPLEX_UNKNOWN");
  }
  // Sweep a wide range: every value yields a non-empty static string.
  for (int v = -40000; v <= 200; v++) {
    const char *s = duplex_strerror(v);
    const char *n = duplex_err_name(v);
    if (s == nullptr || n == nullptr || *s == '\0' || *n == '\0') {
      FAIL("empty or NULL string for " << v);
      break;
    }
  }
}

TEST_CASE("returned strings are static: the same pointer every call") {
  for (const auto &c : codes()) {
    INFO(c.name);
    CHECK(duplex_strerror(c.value) == duplex_strerror(c.value));
    CHECK(duplex_err_name(c.value) == duplex_err_name(c.value));
  }
  CHECK(duplex_strerror(INT_MIN) == duplex_strerror(INT_MIN));
  CHECK(duplex_err_name(12345) == duplex_err_name(12345));
}

TEST_CASE("EAGAIN is an alias of EWOULDBLOCK") {
  CHECK(std::string(duplex_err_name(DUPLEX_EAGAIN)) == "DUPLEX_EWOULDBLOCK");
}

TEST_CASE("duplex_version matches the headers compiled against") {
  CHECK(duplex_version() == static_cast<unsigned>(DUPLEX_VERSION_HEX));
  CHECK(duplex_version() ==
        ((unsigned(DUPLEX_VERSION_MAJOR) << 16) |
         (unsigned(DUPLEX_VERSION_MINOR) << 8) | unsigned(DUPLEX_VERSION_PATCH)));
  const char *s = duplex_version_string();
  REQUIRE(s != nullptr);
  CHECK(std::string(s) == DUPLEX_VERSION_STRING);
  CHECK(s == duplex_version_string());
  std::string expect = std::to_string(DUPLEX_VERSION_MAJOR) + "." +
                       std::to_string(DUPLEX_VERSION_MINOR) + "." +
                       std::to_string(DUPLEX_VERSION_PATCH);
  CHECK(std::string(s) == expect);
}
