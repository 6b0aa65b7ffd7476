// Test support for the libduplex doctest suites.
//
// Everything here is plain POSIX + C++20 around the public C API in
// <duplex.h>: the "peer" side of a conn is ordinary blocking code on a raw
// fd, never libduplex, so the tests check the library against the kernel and
// not against itself.
//
// Time appears only as a hang guard (kGuard): a test that would otherwise
// hang gives up and fails. No assertion depends on how long anything takes.
#ifndef DUPLEX_TESTS_FIXTURE_HPP
#define DUPLEX_TESTS_FIXTURE_HPP

#include <duplex.h>

#include <doctest/doctest.h>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace dtest {

using namespace std::chrono_literals;

// How long any single wait may take before the test gives up. A hang guard
// only: generous so that sanitizer builds on a loaded 2-core box never trip
// it, and far below meson's per-test timeout.
inline constexpr std::chrono::seconds kGuard{60};

// Sentinel for "callback never ran" in atomics holding a status.
inline constexpr int kUnset = INT_MIN;

// True in sanitizer builds, where stress loops are scaled down.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

#if defined(__SANITIZE_THREAD__)
inline constexpr bool kTsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool kTsan = true;
#else
inline constexpr bool kTsan = false;
#endif
#else
inline constexpr bool kTsan = false;
#endif

inline std::string err_str(int rc) {
  return std::string(duplex_err_name(rc)) + " (" + std::to_string(rc) + ")";
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

// Poll @p pred until it holds or @p guard expires; returns pred()'s last
// value. A hang guard, never a timing assertion.
template <class Pred>
bool wait_until(Pred &&pred, std::chrono::milliseconds guard = kGuard) {
  auto deadline = std::chrono::steady_clock::now() + guard;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline)
      return pred();
    std::this_thread::sleep_for(200us);
  }
  return true;
}

// A one-shot latch usable from any thread.
class Event {
public:
  void set() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      set_ = true;
    }
    cv_.notify_all();
  }
  bool is_set() {
    std::lock_guard<std::mutex> lk(mu_);
    return set_;
  }
  bool wait(std::chrono::milliseconds guard = kGuard) {
    std::unique_lock<std::mutex> lk(mu_);
    return cv_.wait_for(lk, guard, [&] { return set_; });
  }

private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

// ---------------------------------------------------------------------------
// File descriptors and peers (plain POSIX, not libduplex)
// ---------------------------------------------------------------------------

// Owns one fd; closes it unless release()d (e.g. after a successful adopt).
class Fd {
public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd &) = delete;
  Fd &operator=(const Fd &) = delete;
  Fd(Fd &&o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd &operator=(Fd &&o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0)
      ::close(fd_);
    fd_ = fd;
  }
  explicit operator bool() const { return fd_ >= 0; }

private:
  int fd_ = -1;
};

// An AF_UNIX SOCK_STREAM socketpair: `ours` goes to the library (adopt),
// `peer` stays with the test's blocking peer.
struct SocketPair {
  Fd ours;
  Fd peer;
};

inline SocketPair socket_pair() {
  int sv[2] = {-1, -1};
  int rc = ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
  REQUIRE_MESSAGE(rc == 0, "socketpair: " << std::string(std::strerror(errno)));
  return SocketPair{Fd(sv[0]), Fd(sv[1])};
}

inline void set_nonblocking(int fd, bool on) {
  int fl = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

inline bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

inline bool is_socket(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

// Write all of @p len bytes, blocking. Uses MSG_NOSIGNAL on sockets. Returns
// 0 or an errno value.
inline int write_all(int fd, const void *data, size_t len) {
  const char *p = static_cast<const char *>(data);
  bool sock = is_socket(fd);
  while (len > 0) {
    ssize_t n = sock ? ::send(fd, p, len, MSG_NOSIGNAL) : ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return errno;
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return 0;
}

// Read until EOF (returns 0) or an error (returns errno), handing each chunk
// to @p sink. Stops early when @p sink returns false.
inline int read_until_eof(int fd,
                          const std::function<bool(const uint8_t *, size_t)> &sink,
                          size_t chunk = 256 * 1024) {
  std::vector<uint8_t> buf(chunk);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return errno;
    }
    if (n == 0)
      return 0;
    if (!sink(buf.data(), static_cast<size_t>(n)))
      return 0;
  }
}

// Read exactly @p len bytes (blocking); false on EOF or error first.
inline bool read_exactly(int fd, void *out, size_t len) {
  char *p = static_cast<char *>(out);
  while (len > 0) {
    ssize_t n = ::read(fd, p, len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

// Fill the kernel send buffer of @p fd (switched to non-blocking for the
// duration) until it refuses even one byte. Returns the bytes written. Used
// so that a conn adopted afterwards cannot move anything to the kernel until
// the peer reads: queue growth then becomes deterministic.
inline size_t fill_send_buffer(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  std::vector<char> junk(64 * 1024, 'J');
  size_t total = 0;
  for (size_t chunk : {size_t(64 * 1024), size_t(4096), size_t(1)}) {
    for (;;) {
      ssize_t n = ::send(fd, junk.data(), chunk, MSG_NOSIGNAL);
      if (n > 0) {
        total += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR)
        continue;
      break;
    }
  }
  ::fcntl(fd, F_SETFL, fl);
  return total;
}

// Discard exactly @p len bytes from @p fd (blocking); false on EOF/error.
inline bool drain_exactly(int fd, size_t len) {
  std::vector<char> buf(64 * 1024);
  while (len > 0) {
    ssize_t n = ::read(fd, buf.data(), std::min(len, buf.size()));
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return false;
    len -= static_cast<size_t>(n);
  }
  return true;
}

// A std::thread for peer code. SIGPIPE is blocked in that thread only (the
// process's disposition is untouched), so a peer writing into a conn that
// has just closed gets EPIPE instead of killing the test. Joins on
// destruction.
class PeerThread {
public:
  PeerThread() = default;
  template <class F> explicit PeerThread(F &&f) {
    t_ = std::thread([fn = std::forward<F>(f)]() mutable {
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGPIPE);
      pthread_sigmask(SIG_BLOCK, &set, nullptr);
      fn();
    });
  }
  PeerThread(PeerThread &&) = default;
  PeerThread &operator=(PeerThread &&o) noexcept {
    join();
    t_ = std::move(o.t_);
    return *this;
  }
  ~PeerThread() { join(); }
  void join() {
    if (t_.joinable())
      t_.join();
  }

private:
  std::thread t_;
};

// A temporary directory removed (recursively) on destruction.
class TempDir {
public:
  TempDir() {
    std::string tmpl = "/tmp/duplex-test-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    char *p = ::mkdtemp(buf.data());
    REQUIRE_MESSAGE(p != nullptr, "mkdtemp: " << std::string(std::strerror(errno)));
    path_ = p;
  }
  TempDir(const TempDir &) = delete;
  TempDir &operator=(const TempDir &) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string &path() const { return path_; }
  std::string file(const std::string &name) const { return path_ + "/" + name; }

private:
  std::string path_;
};

// ---------------------------------------------------------------------------
// Byte patterns
// ---------------------------------------------------------------------------

// The byte at stream offset @p off of the pattern stream @p seed.
inline uint8_t pattern_byte(uint64_t off, uint32_t seed) {
  uint64_t x = (off + seed) * 0x9E3779B97F4A7C15ull;
  return static_cast<uint8_t>((x >> 56) ^ (off >> 8) ^ seed);
}

inline void fill_pattern(void *buf, size_t len, uint64_t off, uint32_t seed) {
  auto *p = static_cast<uint8_t *>(buf);
  for (size_t i = 0; i < len; i++)
    p[i] = pattern_byte(off + i, seed);
}

inline std::vector<uint8_t> pattern(size_t len, uint64_t off, uint32_t seed) {
  std::vector<uint8_t> v(len);
  fill_pattern(v.data(), len, off, seed);
  return v;
}

// Checks a byte stream chunk by chunk against pattern @p seed.
struct PatternChecker {
  explicit PatternChecker(uint32_t s) : seed(s) {}
  uint32_t seed;
  uint64_t offset = 0;           // bytes seen so far
  uint64_t first_bad = UINT64_MAX; // offset of the first wrong byte
  void feed(const void *data, size_t len) {
    const auto *p = static_cast<const uint8_t *>(data);
    if (first_bad == UINT64_MAX) {
      for (size_t i = 0; i < len; i++) {
        if (p[i] != pattern_byte(offset + i, seed)) {
          first_bad = offset + i;
          break;
        }
      }
    }
    offset += len;
  }
  bool ok() const { return first_bad == UINT64_MAX; }
};

// ---------------------------------------------------------------------------
// Framed writes: each write carries (thread id, sequence number, length) and
// a payload derived from them, so a peer can check per-thread order, that no
// write was split or interleaved with another, and every byte.
//
//   [0] 0xA5  [1] tid  [2..3] total length (LE)  [4..7] seq (LE)  payload
// ---------------------------------------------------------------------------
namespace frame {

inline constexpr size_t kHeader = 8;
inline constexpr uint8_t kMagic = 0xA5;

inline uint8_t payload_byte(uint8_t tid, uint32_t seq, size_t i) {
  return static_cast<uint8_t>(seq * 131u + tid * 17u + i * 7u + (i >> 8));
}

// Write a frame of @p len bytes (kHeader <= len <= 65535) into @p out.
inline void encode(uint8_t *out, uint8_t tid, uint32_t seq, size_t len) {
  out[0] = kMagic;
  out[1] = tid;
  out[2] = static_cast<uint8_t>(len & 0xff);
  out[3] = static_cast<uint8_t>((len >> 8) & 0xff);
  out[4] = static_cast<uint8_t>(seq & 0xff);
  out[5] = static_cast<uint8_t>((seq >> 8) & 0xff);
  out[6] = static_cast<uint8_t>((seq >> 16) & 0xff);
  out[7] = static_cast<uint8_t>((seq >> 24) & 0xff);
  for (size_t i = kHeader; i < len; i++)
    out[i] = payload_byte(tid, seq, i);
}

inline std::vector<uint8_t> make(uint8_t tid, uint32_t seq, size_t len) {
  std::vector<uint8_t> v(len);
  encode(v.data(), tid, seq, len);
  return v;
}

// Streaming verifier for the peer side. Not thread-safe: one reader.
class Verifier {
public:
  explicit Verifier(unsigned nthreads) : next_(nthreads, 0) {}

  void feed(const uint8_t *data, size_t len) {
    bytes_ += len;
    if (!error_.empty())
      return;
    buf_.insert(buf_.end(), data, data + len);
    size_t pos = 0;
    while (buf_.size() - pos >= kHeader) {
      const uint8_t *f = buf_.data() + pos;
      size_t flen = size_t(f[2]) | (size_t(f[3]) << 8);
      uint32_t seq = uint32_t(f[4]) | (uint32_t(f[5]) << 8) |
                     (uint32_t(f[6]) << 16) | (uint32_t(f[7]) << 24);
      uint8_t tid = f[1];
      if (f[0] != kMagic || tid >= next_.size() || flen < kHeader) {
        fail(pos, "bad frame header (split or interleaved write?)");
        return;
      }
      if (buf_.size() - pos < flen)
        break;
      if (seq != next_[tid]) {
        fail(pos, "thread " + std::to_string(tid) + " expected seq " +
                      std::to_string(next_[tid]) + " got " +
                      std::to_string(seq));
        return;
      }
      for (size_t i = kHeader; i < flen; i++) {
        if (f[i] != payload_byte(tid, seq, i)) {
          fail(pos, "payload mismatch in thread " + std::to_string(tid) +
                        " seq " + std::to_string(seq) + " at byte " +
                        std::to_string(i));
          return;
        }
      }
      next_[tid]++;
      frames_++;
      frame_bytes_ += flen;
      pos += flen;
    }
    buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(pos));
    consumed_ += pos;
  }

  bool ok() const { return error_.empty(); }
  // Whole frames only, nothing dangling.
  bool complete() const { return ok() && buf_.empty(); }
  const std::string &error() const { return error_; }
  uint64_t frames() const { return frames_; }
  uint64_t frame_bytes() const { return frame_bytes_; }
  uint64_t bytes() const { return bytes_; }
  uint32_t count(unsigned tid) const { return next_[tid]; }
  size_t dangling() const { return buf_.size(); }

private:
  void fail(size_t pos, std::string why) {
    error_ = "at stream offset " + std::to_string(consumed_ + pos) + ": " +
             std::move(why);
  }
  std::vector<uint32_t> next_;
  std::vector<uint8_t> buf_;
  std::string error_;
  uint64_t frames_ = 0, frame_bytes_ = 0, bytes_ = 0, consumed_ = 0;
};

} // namespace frame

// Small deterministic PRNG (xorshift64*), one per producer.
struct Rng {
  explicit Rng(uint64_t seed) : s(seed * 0x2545F4914F6CDD1Dull + 1) {}
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  // Uniform-ish in [lo, hi].
  size_t range(size_t lo, size_t hi) { return lo + next() % (hi - lo + 1); }
};

// ---------------------------------------------------------------------------
// Loops
// ---------------------------------------------------------------------------

// Owns a duplex_loop. Started on its own thread (duplex_loop_start) unless
// constructed with start = false. The destructor frees it if the test did not
// (the test should call free() and CHECK the result itself).
class Loop {
public:
  explicit Loop(bool start = true, const duplex_loop_opts *opts = nullptr) {
    int rc = duplex_loop_new(&loop_, opts);
    REQUIRE_MESSAGE(rc == 0, "duplex_loop_new: " << err_str(rc));
    REQUIRE(loop_ != nullptr);
    if (start) {
      rc = duplex_loop_start(loop_);
      REQUIRE_MESSAGE(rc == 0, "duplex_loop_start: " << err_str(rc));
    }
  }
  Loop(const Loop &) = delete;
  Loop &operator=(const Loop &) = delete;
  ~Loop() {
    if (loop_) {
      int rc = duplex_loop_free(loop_);
      CHECK_MESSAGE(rc == 0, "duplex_loop_free: " << err_str(rc));
    }
  }
  duplex_loop *get() const { return loop_; }
  operator duplex_loop *() const { return loop_; }
  // Free now; returns duplex_loop_free()'s result.
  int free() {
    int rc = duplex_loop_free(loop_);
    if (rc == 0)
      loop_ = nullptr;
    return rc;
  }

private:
  duplex_loop *loop_ = nullptr;
};

// Runs duplex_loop_run(DUPLEX_RUN_DEFAULT) on a std::thread.
class LoopRunner {
public:
  explicit LoopRunner(duplex_loop *loop) : loop_(loop) {
    t_ = std::thread([this] {
      tid_.store(std::this_thread::get_id());
      rc_.store(duplex_loop_run(loop_, DUPLEX_RUN_DEFAULT));
    });
  }
  LoopRunner(const LoopRunner &) = delete;
  LoopRunner &operator=(const LoopRunner &) = delete;
  ~LoopRunner() {
    if (t_.joinable()) {
      duplex_loop_stop(loop_);
      t_.join();
    }
  }
  // Ask the loop to stop and wait for duplex_loop_run() to return its code.
  int stop_and_join() {
    duplex_loop_stop(loop_);
    return join();
  }
  int join() {
    if (t_.joinable())
      t_.join();
    return rc_.load();
  }

private:
  duplex_loop *loop_;
  std::thread t_;
  std::atomic<std::thread::id> tid_{};
  std::atomic<int> rc_{kUnset};
};

namespace detail {
struct Job {
  std::function<void()> fn;
  Event done;
  std::atomic<int> status{kUnset};
};
extern "C" inline void run_job(duplex_loop *, int status, void *arg) {
  std::unique_ptr<std::shared_ptr<Job>> job(static_cast<std::shared_ptr<Job> *>(arg));
  (*job)->status.store(status);
  if (status == 0)
    (*job)->fn();
  (*job)->done.set();
}
} // namespace detail

// Run @p fn on the loop thread (via duplex_loop_post) and wait for it.
// Returns true if it ran (status 0) within the hang guard.
inline bool on_loop(duplex_loop *loop, std::function<void()> fn) {
  auto job = std::make_shared<detail::Job>();
  job->fn = std::move(fn);
  auto *arg = new std::shared_ptr<detail::Job>(job);
  int rc = duplex_loop_post(loop, detail::run_job, arg);
  if (rc != 0) {
    delete arg;
    return false;
  }
  return job->done.wait() && job->status.load() == 0;
}

// Pump a loop that is not running elsewhere on the calling thread
// (DUPLEX_RUN_NOWAIT) until @p pred holds or the guard expires.
template <class Pred> bool pump_until(duplex_loop *loop, Pred &&pred) {
  auto deadline = std::chrono::steady_clock::now() + kGuard;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline)
      return pred();
    int rc = duplex_loop_run(loop, DUPLEX_RUN_NOWAIT);
    if (rc != 0)
      return pred();
  }
  return true;
}

// ---------------------------------------------------------------------------
// Conn callbacks with exact counters
// ---------------------------------------------------------------------------

// Counts every conn callback and checks the documented ordering (on_open at
// most once and before any read; on_close exactly once and last). The conn's
// user pointer is this object. Optional hooks run inside the callbacks (on
// the loop thread). Must outlive the loop.
struct ConnEvents {
  std::atomic<int> opens{0}, reads{0}, eofs{0}, backpressures{0},
      writables{0}, closes{0};
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<int> close_reason{kUnset};
  std::atomic<size_t> last_bp_queued{0};
  std::atomic<bool> congested{false}; // between on_backpressure and on_writable
  std::atomic<int> order_errors{0};
  std::atomic<std::thread::id> close_thread{};

  // Keep a copy of everything read (for small exchanges).
  bool keep_data = false;

  std::function<void(duplex_conn *)> open_hook, eof_hook, writable_hook;
  std::function<void(duplex_conn *, const uint8_t *, size_t)> read_hook;
  std::function<void(duplex_conn *, size_t)> backpressure_hook;
  std::function<void(duplex_conn *, int)> close_hook;

  duplex_conn_cbs table = DUPLEX_CONN_CBS_INIT;

  ConnEvents() {
    table.on_open = &s_open;
    table.on_read = &s_read;
    table.on_eof = &s_eof;
    table.on_backpressure = &s_bp;
    table.on_writable = &s_writable;
    table.on_close = &s_close;
  }
  ConnEvents(const ConnEvents &) = delete;
  ConnEvents &operator=(const ConnEvents &) = delete;

  // Options that route every callback here, with optional watermarks.
  duplex_conn_opts opts(size_t high = 0, size_t low = 0, size_t hard = 0,
                        unsigned flags = 0) {
    duplex_conn_opts o = DUPLEX_CONN_OPTS_INIT;
    o.cbs = &table;
    o.user = this;
    o.high_watermark = high;
    o.low_watermark = low;
    o.hard_limit = hard;
    o.flags = flags;
    return o;
  }

  std::string data() {
    std::lock_guard<std::mutex> lk(mu_);
    return data_;
  }

  bool wait_closed(std::chrono::milliseconds guard = kGuard) {
    return wait_until([&] { return closes.load() > 0; }, guard);
  }
  bool wait_open(std::chrono::milliseconds guard = kGuard) {
    return wait_until([&] { return opens.load() > 0 || closes.load() > 0; },
                      guard);
  }
  bool wait_bytes(uint64_t n, std::chrono::milliseconds guard = kGuard) {
    return wait_until(
        [&] { return bytes_read.load() >= n || closes.load() > 0; }, guard);
  }

private:
  static ConnEvents *self(void *user) { return static_cast<ConnEvents *>(user); }
  void after_close_check() {
    if (closes.load() > 0)
      order_errors++;
  }
  static void s_open(duplex_conn *c, void *u) {
    auto *e = self(u);
    e->after_close_check();
    if (e->opens.load() > 0 || e->reads.load() > 0)
      e->order_errors++;
    e->opens++;
    if (e->open_hook)
      e->open_hook(c);
  }
  static void s_read(duplex_conn *c, const void *data, size_t len, void *u) {
    auto *e = self(u);
    e->after_close_check();
    if (e->opens.load() == 0 || e->eofs.load() > 0)
      e->order_errors++;
    if (e->keep_data) {
      std::lock_guard<std::mutex> lk(e->mu_);
      e->data_.append(static_cast<const char *>(data), len);
    }
    if (e->read_hook)
      e->read_hook(c, static_cast<const uint8_t *>(data), len);
    e->reads++;
    e->bytes_read += len;
  }
  static void s_eof(duplex_conn *c, void *u) {
    auto *e = self(u);
    e->after_close_check();
    if (e->eofs.load() > 0)
      e->order_errors++;
    e->eofs++;
    if (e->eof_hook)
      e->eof_hook(c);
  }
  static void s_bp(duplex_conn *c, size_t queued, void *u) {
    auto *e = self(u);
    e->after_close_check();
    // Never two backpressures without a writable between them (a writable
    // may also come alone: after a refused write).
    if (e->congested.exchange(true))
      e->order_errors++;
    e->last_bp_queued = queued;
    if (e->backpressure_hook)
      e->backpressure_hook(c, queued);
    e->backpressures++;
  }
  static void s_writable(duplex_conn *c, void *u) {
    auto *e = self(u);
    e->after_close_check();
    e->congested = false;
    if (e->writable_hook)
      e->writable_hook(c);
    e->writables++;
  }
  static void s_close(duplex_conn *c, int reason, void *u) {
    auto *e = self(u);
    e->after_close_check();
    e->close_thread.store(std::this_thread::get_id());
    e->close_reason = reason;
    if (e->close_hook)
      e->close_hook(c, reason);
    e->closes++;
  }

  std::mutex mu_;
  std::string data_;
};

// Counts write-done callbacks by status. Pass as the user pointer together
// with WriteCounter::cb.
struct WriteCounter {
  std::atomic<uint64_t> total{0}, ok{0}, canceled{0}, failed{0};
  std::atomic<int> last_error{0};
  static void cb(duplex_conn *, int status, void *user) {
    auto *w = static_cast<WriteCounter *>(user);
    if (status == 0)
      w->ok++;
    else if (status == DUPLEX_ECANCELED)
      w->canceled++;
    else {
      w->failed++;
      w->last_error = status;
    }
    w->total++;
  }
};

// Zero-copy buffers: allocates with malloc, counts releases by status and
// frees in the release callback. A double release is a double free, which
// ASan reports.
struct ZcCounter {
  std::atomic<uint64_t> released{0}, ok{0}, canceled{0}, failed{0};
  std::atomic<uint64_t> bytes_released{0};
  static void release(void *data, size_t len, int status, void *user) {
    auto *z = static_cast<ZcCounter *>(user);
    if (status == 0)
      z->ok++;
    else if (status == DUPLEX_ECANCELED)
      z->canceled++;
    else
      z->failed++;
    z->bytes_released += len;
    std::free(data);
    z->released++;
  }
  static void *alloc_copy(const void *src, size_t len) {
    void *p = std::malloc(len ? len : 1);
    REQUIRE(p != nullptr);
    if (len)
      std::memcpy(p, src, len);
    return p;
  }
};

// Call @p attempt() until it returns anything but DUPLEX_EWOULDBLOCK, waiting
// for the conn with duplex_conn_wait_writable() in between (the refused write
// was not queued, so the same write is retried). Returns the final result,
// or DUPLEX_ETIMEDOUT if the conn stayed congested past the hang guard.
template <class Attempt>
int retry_wouldblock(duplex_conn *conn, Attempt &&attempt,
                     std::atomic<uint64_t> *wouldblocks = nullptr) {
  auto deadline = std::chrono::steady_clock::now() + kGuard;
  for (;;) {
    int rc = attempt();
    if (rc != DUPLEX_EWOULDBLOCK)
      return rc;
    if (wouldblocks)
      (*wouldblocks)++;
    int w = duplex_conn_wait_writable(conn, 1000);
    if (w == DUPLEX_ETIMEDOUT) {
      if (std::chrono::steady_clock::now() >= deadline)
        return DUPLEX_ETIMEDOUT;
      continue;
    }
    if (w != 0 && w != DUPLEX_ECLOSED)
      return w;
  }
}

// Adopt @p fd into a conn on @p loop; REQUIREs success and returns the
// caller's reference.
inline duplex_conn *adopt(duplex_loop *loop, Fd &fd, const duplex_conn_opts *opts) {
  duplex_conn *c = nullptr;
  int rc = duplex_conn_adopt(&c, loop, fd.get(), opts);
  REQUIRE_MESSAGE(rc == 0, "duplex_conn_adopt: " << err_str(rc));
  REQUIRE(c != nullptr);
  fd.release();
  return c;
}

// SIGPIPE disposition of the process is the default (no handler, not ignored).
inline bool sigpipe_is_default() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  if (::sigaction(SIGPIPE, nullptr, &sa) != 0)
    return false;
  return sa.sa_handler == SIG_DFL && !(sa.sa_flags & SA_SIGINFO);
}

inline bool sigpipe_blocked_here() {
  sigset_t cur;
  pthread_sigmask(SIG_BLOCK, nullptr, &cur);
  return sigismember(&cur, SIGPIPE) == 1;
}

inline bool sigpipe_pending() {
  sigset_t pend;
  sigpending(&pend);
  return sigismember(&pend, SIGPIPE) == 1;
}

} // namespace dtest

#endif // DUPLEX_TESTS_FIXTURE_HPP
