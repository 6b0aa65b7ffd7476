// The second translation unit of cpp_basic_test: it includes the C++
// headers one by one, in the reverse order of the umbrella, and uses the same
// inline entities as cpp_basic_test.cpp (the error category, the conn
// trampolines, Channel<T>, Timer, tasks). A non-inline definition in a header
// fails the link; an order-dependent header fails the compile; a category
// object duplicated per TU makes error codes from the two TUs compare unequal.
#include <duplex/timer.hpp>
#include <duplex/channel.hpp>
#include <duplex/listener.hpp>
#include <duplex/conn.hpp>
#include <duplex/task.hpp>
#include <duplex/loop.hpp>
#include <duplex/error.hpp>
#include <duplex/duplex.hpp>

#include <doctest/doctest.h>

#include <string>

const std::error_category *basic_tu_category(); // cpp_basic_test.cpp

namespace {

using namespace std::chrono_literals;

duplex::task<int> answer(duplex::Loop &loop) {
  auto ec = co_await loop.sleep(0ms);
  co_return ec ? -1 : 42;
}

duplex::task<void> ask(duplex::Loop &loop, int *out) {
  *out = co_await answer(loop);
  loop.stop();
}

} // namespace

TEST_CASE("odr: both translation units share one error category") {
  CHECK(&duplex::category() == basic_tu_category());
  std::error_code here = duplex::errc::DUPLEX_ECLOSED;
  CHECK(here == duplex::make_error_code(duplex::errc::DUPLEX_ECLOSED));
  CHECK(here.category() == *basic_tu_category());
}

TEST_CASE("odr: a listener, a conn, a channel, a timer and a task from the second unit") {
  duplex::Loop loop;
  std::string echoed;
  int value = 0, fired = 0, messages = 0;
  auto l = duplex::Listener::tcp(
      loop, "127.0.0.1", 0,
      {.on_read = [](duplex::ConnRef c, std::span<const std::byte> b) {
        (void)c.write(b);
      }});
  auto c = duplex::Conn::connect_tcp(
      loop, "127.0.0.1", l.port(),
      {.on_read = [&](duplex::ConnRef, std::span<const std::byte> b) {
        echoed.append(reinterpret_cast<const char *>(b.data()), b.size());
      }});
  (void)c.write(std::string_view("odr"));
  duplex::Channel<std::string> ch(loop, [&](std::string &&s) { messages += s == "m"; });
  CHECK(ch.send(std::string("m")));
  duplex::Timer t(loop, [&] { fired++; });
  t.start(0ms);
  duplex::spawn(loop, ask(loop, &value));
  loop.run();
  CHECK(value == 42);
  duplex::Timer fence(loop, [&] {
    if (echoed.size() == 3 && fired == 1 && messages == 1)
      loop.stop();
  });
  fence.start(0ms, 1ms);
  loop.run();
  CHECK(echoed == "odr");
  CHECK(fired == 1);
  CHECK(messages == 1);
}
