// Regression tests for review defects 13 and 14, which need a process whose
// standard descriptors are set up for the case: fd 1 the write end of a pipe
// the test reads (13), or fds 0, 1 and 2 closed (14). Each case fork()s a
// child (this executable is single-threaded whenever it forks: every loop of
// a case lives in the child) and the child reports through its exit status
// only, never through doctest (fd 1 is not doctest's output there).
#include "hardening.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/wait.h>

using namespace dtest;
using namespace hard;

namespace {

// Child exit codes: 0 = all good, anything else names the failed step.
enum ChildStatus : int {
  kChildOk = 0,
  kChildSetup = 10,
  kChildAdopt = 11,
  kChildWrite = 12,
  kChildShutdown = 13,
  kChildShutdownStatus = 14,
  kChildGuard = 15,
  kChildGo = 16,
  kChildListen = 20,
  kChildConnect = 21,
  kChildOpen = 22,
  kChildWriteDone = 23,
  kChildPeerBytes = 24,
  kChildClose = 25,
  kChildFree = 26,
};

// Wait for @p pid for at most @p guard; SIGKILL it after that. Returns the
// wait status, or -1 if it had to be killed.
int wait_child(pid_t pid, std::chrono::milliseconds guard) {
  auto end = std::chrono::steady_clock::now() + guard;
  int st = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &st, WNOHANG);
    if (r == pid)
      return st;
    if (r < 0 && errno != EINTR)
      return -1;
    if (std::chrono::steady_clock::now() >= end) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &st, 0);
      return -1;
    }
    ::usleep(2000);
  }
}

std::string describe(int st) {
  if (st == -1)
    return "hung (killed by the hang guard)";
  if (WIFEXITED(st))
    return "exit status " + std::to_string(WEXITSTATUS(st));
  if (WIFSIGNALED(st))
    return std::string("killed by signal ") + std::to_string(WTERMSIG(st)) + " (" +
           ::strsignal(WTERMSIG(st)) + ")";
  return "status " + std::to_string(st);
}

// In a child: die by a fatal signal as such (doctest's handlers, inherited
// through fork, are not meant for the child), so the parent sees it.
void child_default_signals() {
  for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTERM, SIGINT})
    ::signal(sig, SIG_DFL);
}

// Spin (with sleeps) until @p flag is set or ~20 s pass; for the children,
// which have no doctest.
bool child_wait(const std::atomic<bool> &flag) {
  for (int i = 0; i < 20000 && !flag.load(); i++)
    ::usleep(1000);
  return flag.load();
}

// ---- defect 13 child --------------------------------------------------------

std::atomic<bool> g13_shut_done{false};
std::atomic<int> g13_shut_status{kUnset};
void on13_shut(duplex_conn *, int status, void *) {
  g13_shut_status = status;
  g13_shut_done = true;
}

// fd 1 is the write end of the parent's pipe; @p go is read before exiting.
[[noreturn]] void child13(int go) {
  int in[2];
  if (::pipe(in) != 0)
    ::_exit(kChildSetup);
  duplex_loop *loop = nullptr;
  if (duplex_loop_new(&loop, nullptr) != 0 || duplex_loop_start(loop) != 0)
    ::_exit(kChildSetup);
  duplex_conn *c = nullptr;
  if (duplex_conn_adopt_pair(&c, loop, in[0], 1, nullptr) != 0)
    ::_exit(kChildAdopt);
  if (duplex_conn_write(c, "data\n", 5, nullptr, nullptr) != 0)
    ::_exit(kChildWrite);
  if (duplex_conn_shutdown(c, on13_shut, nullptr) != 0)
    ::_exit(kChildShutdown);
  if (!child_wait(g13_shut_done))
    ::_exit(kChildGuard);
  if (g13_shut_status.load() != 0)
    ::_exit(kChildShutdownStatus);
  // Stay alive until the parent has seen EOF (or gave up waiting for it).
  char b;
  ssize_t n;
  do
    n = ::read(go, &b, 1);
  while (n < 0 && errno == EINTR);
  if (n != 1)
    ::_exit(kChildGo);
  duplex_conn_close(c, DUPLEX_CLOSE_ABORT);
  duplex_conn_unref(c);
  duplex_loop_free(loop);
  ::close(in[1]);
  ::_exit(kChildOk);
}

// ---- defect 14 child --------------------------------------------------------

std::atomic<bool> g14_open{false}, g14_written{false}, g14_closed{false};
std::atomic<int> g14_write_status{kUnset};
std::atomic<uint64_t> g14_server_bytes{0};
void on14_open(duplex_conn *, void *) { g14_open = true; }
void on14_done(duplex_conn *, int status, void *) {
  g14_write_status = status;
  g14_written = true;
}
void on14_close(duplex_conn *, int, void *) { g14_closed = true; }
void on14_server_read(duplex_conn *, const void *, size_t len, void *) {
  g14_server_bytes += len;
}

// Runs with fds 0, 1 and 2 closed.
[[noreturn]] void child14() {
  duplex_loop *loop = nullptr;
  if (duplex_loop_new(&loop, nullptr) != 0 || duplex_loop_start(loop) != 0)
    ::_exit(kChildSetup);
  duplex_conn_cbs scbs = DUPLEX_CONN_CBS_INIT;
  scbs.on_read = on14_server_read;
  duplex_conn_opts sco = DUPLEX_CONN_OPTS_INIT;
  sco.cbs = &scbs;
  duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
  lo.conn_opts = &sco;
  duplex_listener *l = nullptr;
  if (duplex_listener_tcp(&l, loop, "127.0.0.1", 0, &lo) != 0)
    ::_exit(kChildListen);
  uint16_t port = 0;
  if (duplex_listener_get_port(l, &port) != 0)
    ::_exit(kChildListen);

  duplex_conn_cbs cbs = DUPLEX_CONN_CBS_INIT;
  cbs.on_open = on14_open;
  cbs.on_close = on14_close;
  duplex_conn_opts co = DUPLEX_CONN_OPTS_INIT;
  co.cbs = &cbs;
  duplex_conn *c = nullptr;
  if (duplex_conn_connect_tcp(&c, loop, "127.0.0.1", port, &co) != 0)
    ::_exit(kChildConnect);
  if (!child_wait(g14_open))
    ::_exit(kChildOpen);
  if (duplex_conn_write(c, "0123456789", 10, on14_done, nullptr) != 0)
    ::_exit(kChildWrite);
  if (!child_wait(g14_written) || g14_write_status.load() != 0)
    ::_exit(kChildWriteDone);
  for (int i = 0; i < 20000 && g14_server_bytes.load() < 10; i++)
    ::usleep(1000);
  if (g14_server_bytes.load() != 10)
    ::_exit(kChildPeerBytes);
  if (duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL) != 0)
    ::_exit(kChildClose);
  if (!child_wait(g14_closed))
    ::_exit(kChildClose);
  duplex_conn_unref(c);
  duplex_listener_close(l);
  if (duplex_loop_free(loop) != 0)
    ::_exit(kChildFree);
  listener_unref(l);
  ::_exit(kChildOk);
}

} // namespace

// ---------------------------------------------------------------------------
// Defect 13 (adopt_pair_stdio_shutdown.c)
// ---------------------------------------------------------------------------

TEST_CASE("defect 13: shutdown of a conn adopted with write_fd 1 closes fd 1: the reader of "
          "stdout sees EOF while the process still runs") {
  std::fflush(stdout);
  std::cout.flush();
  int out[2], go[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(go, O_CLOEXEC) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    child_default_signals();
    ::close(out[0]);
    ::close(go[1]);
    if (::dup2(out[1], 1) != 1) // fd 1 is now the pipe (dup2 clears CLOEXEC)
      ::_exit(kChildSetup);
    ::close(out[1]);
    child13(go[0]);
  }
  ::close(out[1]);
  ::close(go[0]);
  Fd rd(out[0]), gofd(go[1]);

  // Read the child's stdout until EOF, while the child waits for "go".
  std::string got;
  bool eof = false;
  while (readable_within(rd.get(), kHang)) {
    char b[64];
    ssize_t n = ::read(rd.get(), b, sizeof b);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      eof = n == 0;
      break;
    }
    got.append(b, static_cast<size_t>(n));
  }
  // EOF seen now, before "go", comes from the shutdown: the child still runs.
  bool child_alive = ::waitpid(pid, nullptr, WNOHANG) == 0;
  CHECK_MESSAGE(eof, "no EOF on the child's stdout after duplex_conn_shutdown (read so far: \""
                         << got << "\")");
  CHECK(child_alive);
  CHECK(got == "data\n");
  REQUIRE(write_all(gofd.get(), "g", 1) == 0);
  int st = wait_child(pid, kHang);
  CHECK_MESSAGE((st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == kChildOk),
                "child: " << describe(st));
}

// ---------------------------------------------------------------------------
// Defect 14 (fds 0, 1 and 2 closed)
// ---------------------------------------------------------------------------

TEST_CASE("defect 14: with fds 0, 1 and 2 closed, a TCP connect, write and close work and do "
          "not abort the process") {
  std::fflush(stdout);
  std::cout.flush();
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    child_default_signals();
    ::close(0);
    ::close(1);
    ::close(2);
    child14();
  }
  int st = wait_child(pid, std::chrono::seconds(60));
  CHECK_MESSAGE((st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == kChildOk),
                "child: " << describe(st));
  CHECK_FALSE((st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT));
}
