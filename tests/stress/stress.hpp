// Shared helpers for the reliability suites (tests/stress): the light/full
// mode switch, memory probes, per-thread CPU time and the one-line figure
// summaries that tools/stress collects into docs/reliability.md.
//
// Light mode (default) is bounded so that CI runs every case in well under
// two minutes, also under ASan/TSan on 2 cores. DUPLEX_STRESS=full makes the
// soaks longer and wider. Durations here bound how long a producer pushes;
// no assertion depends on how fast anything goes.
#ifndef DUPLEX_TESTS_STRESS_HPP
#define DUPLEX_TESTS_STRESS_HPP

#include "fixture.hpp"

#include <malloc.h>
#include <pthread.h>
#include <time.h>

#include <cinttypes>
#include <fstream>
#include <sstream>

namespace stress {

using namespace dtest;

inline bool full_mode() {
  const char *m = std::getenv("DUPLEX_STRESS");
  return m != nullptr && std::strcmp(m, "full") == 0;
}

// Running under valgrind (tools/stress runs the suites with --wrapper
// valgrind): its preload library is in LD_PRELOAD.
inline bool under_valgrind() {
  const char *p = std::getenv("LD_PRELOAD");
  return p != nullptr && std::strstr(p, "vgpreload") != nullptr;
}

// Slow instrumentation: sanitizers or valgrind. Sizes scale down there.
inline bool slow_build() { return kSanitized || under_valgrind(); }

// Pick a value by mode: light (plain), light under instrumentation, full.
template <class T> T pick(T light, T light_slow, T full) {
  if (full_mode())
    return slow_build() ? light : full;
  return slow_build() ? light_slow : light;
}

// Bytes of heap in use as glibc's allocator sees it (every arena, plus
// mmapped chunks). Meaningful only with glibc's malloc: sanitizers and
// valgrind replace it, so heap_probe_valid() says whether to trust it.
inline uint64_t heap_in_use() {
  struct mallinfo2 mi = mallinfo2();
  return static_cast<uint64_t>(mi.uordblks) + static_cast<uint64_t>(mi.hblkhd);
}
inline bool heap_probe_valid() { return !slow_build(); }

// Resident set size in bytes (reported, never asserted: RSS keeps freed
// pages the allocator has not returned).
inline uint64_t rss_bytes() {
  std::ifstream f("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

// CPU time of one thread, readable from any thread while it lives.
inline uint64_t thread_cpu_ns(clockid_t cid) {
  timespec ts{};
  if (::clock_gettime(cid, &ts) != 0)
    return 0;
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<uint64_t>(ts.tv_nsec);
}

// The CPU clock of the loop thread, fetched from inside a posted callback.
inline bool loop_thread_clock(duplex_loop *loop, clockid_t *out) {
  std::atomic<int> rc{kUnset};
  bool ran = on_loop(loop, [&] { rc = ::pthread_getcpuclockid(::pthread_self(), out); });
  return ran && rc.load() == 0;
}

inline uint64_t mono_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<uint64_t>(ts.tv_nsec);
}

// One-line figure summary: "[figures] case=<name> key=value ...". Printed
// on stderr (meson keeps it in the test log) and appended to
// $DUPLEX_FIGURES_FILE when set (tools/stress collects them there).
class Figures {
public:
  explicit Figures(std::string name) { os_ << "[figures] case=" << name; }
  template <class T> Figures &add(const char *key, const T &v) {
    os_ << ' ' << key << '=' << v;
    return *this;
  }
  ~Figures() {
    os_ << " mode=" << (full_mode() ? "full" : "light")
        << " build=" << (kTsan ? "tsan" : kSanitized ? "asan" : under_valgrind() ? "valgrind" : "plain");
    std::string line = os_.str();
    std::fprintf(stderr, "%s\n", line.c_str());
    if (const char *path = std::getenv("DUPLEX_FIGURES_FILE")) {
      if (FILE *f = std::fopen(path, "a")) {
        std::fprintf(f, "%s\n", line.c_str());
        std::fclose(f);
      }
    }
  }

private:
  std::ostringstream os_;
};

// A steady-clock deadline for producers ("push for N ms"): bounds the
// amount of work, not an assertion.
struct Deadline {
  explicit Deadline(std::chrono::milliseconds d)
      : end(std::chrono::steady_clock::now() + d) {}
  bool passed() const { return std::chrono::steady_clock::now() >= end; }
  std::chrono::steady_clock::time_point end;
};

} // namespace stress

#endif // DUPLEX_TESTS_STRESS_HPP
