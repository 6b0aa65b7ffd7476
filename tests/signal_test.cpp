// Signals on the loop: the callback runs on the loop thread, the signal is
// caught from the moment duplex_signal_new() returns, close stops
// callbacks, loop free closes watchers.
#include "fixture.hpp"

#include <csignal>

using namespace dtest;

namespace {

struct Seen {
  std::atomic<int> count{0};
  std::atomic<int> signum{0};
  std::atomic<int> off_loop{0};
  duplex_loop *loop = nullptr;
  static void cb(duplex_signal *, int signum, void *u) {
    auto *s = static_cast<Seen *>(u);
    if (s->loop != nullptr && duplex_loop_on_thread(s->loop) != 1)
      s->off_loop++;
    s->signum = signum;
    s->count++;
  }
};

} // namespace

TEST_CASE("a watched signal runs its callback on the loop thread") {
  Loop runner;
  Seen seen;
  seen.loop = runner;
  duplex_signal *sig = nullptr;
  REQUIRE(duplex_signal_new(&sig, runner, SIGUSR1, Seen::cb, &seen) == 0);
  int signum = 0;
  CHECK(duplex_signal_get_signum(sig, &signum) == 0);
  CHECK(signum == SIGUSR1);
  REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
  REQUIRE(wait_until([&] { return seen.count.load() == 1; }));
  REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
  REQUIRE(wait_until([&] { return seen.count.load() == 2; }));
  CHECK(seen.signum.load() == SIGUSR1);
  CHECK(seen.off_loop.load() == 0);
  CHECK(duplex_signal_close(sig) == 0);
  CHECK(duplex_signal_close(sig) == DUPLEX_ECLOSED);
  CHECK(duplex_signal_unref(sig) == 0);
}

TEST_CASE("the signal is caught as soon as duplex_signal_new returns, before the loop runs") {
  // SIGUSR2's default action ends the process: surviving the kill is the
  // first half of the check.
  Loop loop(false);
  Seen seen;
  duplex_signal *sig = nullptr;
  REQUIRE(duplex_signal_new(&sig, loop, SIGUSR2, Seen::cb, &seen) == 0);
  REQUIRE(::kill(::getpid(), SIGUSR2) == 0);
  CHECK(seen.count.load() == 0); // nothing runs until the loop does
  REQUIRE(pump_until(loop, [&] { return seen.count.load() == 1; }));
  CHECK(seen.signum.load() == SIGUSR2);
  // Freeing the loop closes the watcher; the reference answers ECLOSED.
  CHECK(loop.free() == 0);
  CHECK(duplex_signal_close(sig) == DUPLEX_ECLOSED);
  CHECK(duplex_signal_unref(sig) == 0);
}

TEST_CASE("after close returns no callback starts; two watchers both see a signal") {
  Loop a, b;
  Seen sa, sb;
  sa.loop = a;
  sb.loop = b;
  duplex_signal *wa = nullptr, *wb = nullptr;
  // SIGWINCH is ignored by default, so a signal after the close is harmless.
  REQUIRE(duplex_signal_new(&wa, a, SIGWINCH, Seen::cb, &sa) == 0);
  REQUIRE(duplex_signal_new(&wb, b, SIGWINCH, Seen::cb, &sb) == 0);
  REQUIRE(::kill(::getpid(), SIGWINCH) == 0);
  REQUIRE(wait_until([&] { return sa.count.load() == 1 && sb.count.load() == 1; }));
  REQUIRE(duplex_signal_close(wa) == 0);
  REQUIRE(::kill(::getpid(), SIGWINCH) == 0);
  REQUIRE(wait_until([&] { return sb.count.load() == 2; }));
  REQUIRE(on_loop(a, [] {})); // the loop ran past the signal
  CHECK(sa.count.load() == 1);
  // On the loop thread, close acts at once, from inside the callback too.
  std::atomic<int> close_rc{kUnset};
  REQUIRE(on_loop(b, [&] { close_rc = duplex_signal_close(wb); }));
  CHECK(close_rc.load() == 0);
  CHECK(duplex_signal_unref(wa) == 0);
  CHECK(duplex_signal_unref(wb) == 0);
}

TEST_CASE("a callback may close its own watcher") {
  Loop runner;
  struct Self {
    std::atomic<int> calls{0}, close_rc{kUnset};
    static void cb(duplex_signal *s, int, void *u) {
      auto *me = static_cast<Self *>(u);
      me->calls++;
      me->close_rc = duplex_signal_close(s);
    }
  } self;
  duplex_signal *sig = nullptr;
  REQUIRE(duplex_signal_new(&sig, runner, SIGURG, Self::cb, &self) == 0);
  REQUIRE(::kill(::getpid(), SIGURG) == 0);
  REQUIRE(wait_until([&] { return self.calls.load() == 1; }));
  CHECK(self.close_rc.load() == 0);
  REQUIRE(::kill(::getpid(), SIGURG) == 0); // ignored by default
  REQUIRE(on_loop(runner, [] {}));
  CHECK(self.calls.load() == 1);
  CHECK(duplex_signal_unref(sig) == 0);
}
