// Channels: many producers, one consumer on the loop thread. Per-producer
// order, exact counts, delivery on the loop thread only, pointer messages
// released exactly once when the loop is freed with messages in flight,
// bounded channels (refuse, time out, wait, would-deadlock), close semantics
// and references that outlive the channel.
//
// No assertion depends on how long anything takes; the only clock use is a
// sanity check that a timed send did not give up before its timeout.
#include "fixture.hpp"

#include <string_view>

#ifdef __GLIBC__
#include <malloc.h>
#endif

using namespace dtest;

namespace {

// Counts every channel callback. The channel's user pointer is this object.
// Must outlive the loop (on_close(DUPLEX_ECANCELED) runs inside
// duplex_loop_free()).
struct Chan {
  duplex_loop *loop = nullptr;
  std::atomic<uint64_t> messages{0};
  std::atomic<uint64_t> off_loop_thread{0}; // on_message not on the loop thread
  std::atomic<uint64_t> after_close{0};     // a callback after on_close
  std::atomic<uint64_t> reentered{0};       // on_message inside on_message
  std::atomic<int> closes{0};
  std::atomic<int> close_reason{kUnset};
  std::atomic<int> close_on_thread{kUnset};
  std::atomic<uint64_t> messages_at_close{0};
  std::atomic<bool> in_message{false};

  bool keep = false; // keep a copy of every bytes message
  std::function<void(duplex_channel *, void *, size_t)> hook;

  duplex_channel_opts opts(size_t capacity = 0) {
    duplex_channel_opts o = DUPLEX_CHANNEL_OPTS_INIT;
    o.on_message = &s_message;
    o.on_close = &s_close;
    o.user = this;
    o.capacity = capacity;
    return o;
  }

  std::vector<std::string> kept() {
    std::lock_guard<std::mutex> lk(mu_);
    return kept_;
  }

  bool wait_closed() {
    return wait_until([&] { return closes.load() > 0; });
  }
  bool wait_messages(uint64_t n) {
    return wait_until([&] { return messages.load() >= n || closes.load() > 0; });
  }

  static void s_message(duplex_channel *ch, void *data, size_t len, void *user) {
    auto *c = static_cast<Chan *>(user);
    if (c->in_message.exchange(true))
      c->reentered++;
    if (c->closes.load() > 0)
      c->after_close++;
    if (c->loop != nullptr && duplex_loop_on_thread(c->loop) != 1)
      c->off_loop_thread++;
    if (c->keep) {
      std::lock_guard<std::mutex> lk(c->mu_);
      c->kept_.emplace_back(static_cast<const char *>(data), len);
    }
    if (c->hook)
      c->hook(ch, data, len);
    c->messages++;
    c->in_message = false;
  }
  static void s_close(duplex_channel *, int reason, void *user) {
    auto *c = static_cast<Chan *>(user);
    if (c->closes.load() > 0)
      c->after_close++;
    c->close_reason = reason;
    c->messages_at_close = c->messages.load();
    if (c->loop != nullptr)
      c->close_on_thread = duplex_loop_on_thread(c->loop);
    c->closes++;
  }

private:
  std::mutex mu_;
  std::vector<std::string> kept_;
};

duplex_channel *new_channel(duplex_loop *loop, const duplex_channel_opts *o) {
  duplex_channel *ch = nullptr;
  int rc = duplex_channel_new(&ch, loop, o);
  REQUIRE_MESSAGE(rc == 0, "duplex_channel_new: " << err_str(rc));
  REQUIRE(ch != nullptr);
  return ch;
}

size_t pending(duplex_channel *ch) {
  size_t n = SIZE_MAX;
  int rc = duplex_channel_get_pending(ch, &n);
  CHECK_MESSAGE(rc == 0, "duplex_channel_get_pending: " << err_str(rc));
  return n;
}

// Pointer messages: each is a heap object with an id. It must end exactly
// once: delivered to on_message (which frees it) or released (which frees
// it). A double end is a double free (ASan) and is also counted.
struct PtrMsg {
  uint32_t id;
};

struct PtrTally {
  explicit PtrTally(size_t n) : state(n) {
    for (auto &s : state)
      s = 0;
  }
  std::vector<std::atomic<uint8_t>> state; // 0 live, 1 delivered, 2 released
  std::atomic<uint64_t> delivered{0}, released{0}, twice{0};
  std::atomic<uint64_t> release_bad_status{0}, release_bad_len{0};

  void end(uint32_t id, uint8_t how) {
    uint8_t expect = 0;
    if (id >= state.size() || !state[id].compare_exchange_strong(expect, how))
      twice++;
  }
  static void release(void *data, size_t len, int status, void *user) {
    auto *t = static_cast<PtrTally *>(user);
    auto *m = static_cast<PtrMsg *>(data);
    if (status != DUPLEX_ECANCELED)
      t->release_bad_status++;
    if (len != sizeof(PtrMsg))
      t->release_bad_len++;
    t->end(m->id, 2);
    delete m;
    t->released++;
  }
  // For Chan::hook: the message's ownership passed to on_message.
  void deliver(void *data, size_t len) {
    auto *m = static_cast<PtrMsg *>(data);
    if (len != sizeof(PtrMsg))
      release_bad_len++;
    end(m->id, 1);
    delete m;
    delivered++;
  }
};

struct Seq {
  uint32_t tid;
  uint32_t seq;
};

// Bytes of heap in use as glibc's allocator sees it (every arena plus the
// mmapped chunks), or 0 when it cannot be trusted: a sanitizer replaces the
// allocator, or this is not glibc.
uint64_t heap_in_use() {
#ifdef __GLIBC__
  if (!kSanitized) {
    struct mallinfo2 mi = mallinfo2();
    return uint64_t(mi.uordblks) + uint64_t(mi.hblkhd);
  }
#endif
  return 0;
}

// A bytes message whose content says which one it is: its number in the
// first 4 bytes, every other byte derived from the number and the offset.
std::vector<uint8_t> numbered(uint32_t seq, size_t len) {
  std::vector<uint8_t> m(len);
  for (size_t i = 0; i < len; i++)
    m[i] = uint8_t(seq * 7u + i);
  if (len >= sizeof seq)
    std::memcpy(m.data(), &seq, sizeof seq);
  return m;
}

} // namespace

TEST_CASE("8 producers x 100000 messages: each producer's in send order, none lost or "
          "doubled, all on the loop thread") {
  constexpr unsigned kProducers = 8;
  const uint32_t kPer = kTsan ? 20000 : 100000;
  Loop loop;
  Chan ev;
  ev.loop = loop;
  std::vector<uint32_t> next(kProducers, 0); // loop thread only
  std::atomic<uint64_t> order_errors{0};
  ev.hook = [&](duplex_channel *, void *data, size_t len) {
    Seq s;
    if (len != sizeof s) {
      order_errors++;
      return;
    }
    std::memcpy(&s, data, sizeof s);
    if (s.tid >= kProducers || s.seq != next[s.tid])
      order_errors++;
    else
      next[s.tid]++;
  };
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);

  std::atomic<uint64_t> send_errors{0};
  std::atomic<int> last_error{0};
  Event go;
  std::vector<std::thread> producers;
  for (unsigned t = 0; t < kProducers; t++)
    producers.emplace_back([&, t] {
      go.wait();
      for (uint32_t i = 0; i < kPer; i++) {
        Seq s{t, i};
        int rc = duplex_channel_send(ch, &s, sizeof s, -1);
        if (rc != 0) {
          send_errors++;
          last_error = rc;
        }
      }
    });
  go.set();
  for (auto &p : producers)
    p.join();
  CHECK_MESSAGE(send_errors.load() == 0, "last send error " << err_str(last_error.load()));

  REQUIRE(duplex_channel_close(ch) == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.messages.load() == uint64_t(kProducers) * kPer);
  CHECK(ev.messages_at_close.load() == uint64_t(kProducers) * kPer);
  CHECK(order_errors.load() == 0);
  for (unsigned t = 0; t < kProducers; t++)
    CHECK(next[t] == kPer);
  CHECK(ev.off_loop_thread.load() == 0);
  CHECK(ev.reentered.load() == 0);
  CHECK(ev.after_close.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.close_on_thread.load() == 1);
  CHECK(pending(ch) == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("messages sent before the loop runs are delivered, in order, once it starts") {
  Loop loop(false);
  Chan ev;
  ev.loop = loop;
  ev.keep = true;
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);
  CHECK(pending(ch) == 0);
  for (int i = 0; i < 50; i++) {
    std::string m = "m" + std::to_string(i);
    REQUIRE(duplex_channel_send(ch, m.data(), m.size(), 0) == 0);
  }
  // An empty message is a message too.
  REQUIRE(duplex_channel_send(ch, nullptr, 0, 0) == 0);
  CHECK(pending(ch) == 51);
  CHECK(ev.messages.load() == 0);
  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(ev.wait_messages(51));
  REQUIRE(wait_until([&] { return pending(ch) == 0; }));
  auto kept = ev.kept();
  REQUIRE(kept.size() == 51);
  for (int i = 0; i < 50; i++)
    CHECK(kept[size_t(i)] == "m" + std::to_string(i));
  CHECK(kept[50].empty());
  CHECK(ev.off_loop_thread.load() == 0);
  CHECK(ev.closes.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
  CHECK(ev.messages.load() == 51);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("a message sent from on_message is delivered later, never inside the send") {
  Loop loop;
  Chan ev;
  ev.loop = loop;
  ev.keep = true;
  std::atomic<int> send_rc{kUnset};
  ev.hook = [&](duplex_channel *ch, void *data, size_t len) {
    if (std::string_view(static_cast<const char *>(data), len) == "first")
      send_rc = duplex_channel_send(ch, "second", 6, 0);
  };
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);
  REQUIRE(duplex_channel_send(ch, "first", 5, -1) == 0);
  REQUIRE(ev.wait_messages(2));
  CHECK(send_rc.load() == 0);
  CHECK(ev.reentered.load() == 0);
  auto kept = ev.kept();
  REQUIRE(kept.size() == 2);
  CHECK(kept[0] == "first");
  CHECK(kept[1] == "second");
  CHECK(loop.free() == 0);
  CHECK(ev.messages.load() == 2);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("pointer messages: freeing the loop releases each undelivered one exactly once; "
          "delivered ones reach on_message once and are never released") {
  // Deterministic split: the loop is pumped on this thread, so exactly the
  // first batch is delivered and the second is in flight when it is freed.
  constexpr uint32_t kFirst = 10, kSecond = 15;
  Loop loop(false);
  Chan ev;
  PtrTally tally(kFirst + kSecond);
  ev.hook = [&](duplex_channel *, void *data, size_t len) { tally.deliver(data, len); };
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);
  uint32_t id = 0;
  for (; id < kFirst; id++) {
    auto *m = new PtrMsg{id};
    int rc = duplex_channel_send_ptr(ch, m, sizeof *m, PtrTally::release, &tally, 0);
    REQUIRE(rc == 0);
  }
  REQUIRE(pump_until(loop, [&] { return ev.messages.load() == kFirst; }));
  CHECK(tally.delivered.load() == kFirst);
  for (; id < kFirst + kSecond; id++) {
    auto *m = new PtrMsg{id};
    int rc = duplex_channel_send_ptr(ch, m, sizeof *m, PtrTally::release, &tally, -1);
    REQUIRE(rc == 0);
  }
  CHECK(pending(ch) == kSecond);
  CHECK(tally.released.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(tally.delivered.load() == kFirst);
  CHECK(tally.released.load() == kSecond);
  CHECK(tally.twice.load() == 0);
  CHECK(tally.release_bad_status.load() == 0);
  CHECK(tally.release_bad_len.load() == 0);
  for (uint32_t i = 0; i < kFirst + kSecond; i++) {
    INFO("message " << i);
    CHECK(tally.state[i].load() == (i < kFirst ? 1 : 2));
  }
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
  CHECK(ev.after_close.load() == 0);
  // The reference outlives the loop: calls return DUPLEX_ECLOSED.
  PtrMsg keep{999};
  CHECK(duplex_channel_send_ptr(ch, &keep, sizeof keep, PtrTally::release, &tally, 0) ==
        DUPLEX_ECLOSED);
  CHECK(duplex_channel_send(ch, "x", 1, -1) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_close(ch) == DUPLEX_ECLOSED);
  CHECK(pending(ch) == 0);
  CHECK(tally.released.load() == kSecond);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("pointer messages from 4 producers while the loop is freed: delivered + released "
          "== accepted, none twice") {
  constexpr unsigned kProducers = 4;
  const uint32_t kPer = kSanitized ? 20000 : 100000;
  Loop loop;
  Chan ev;
  PtrTally tally(size_t(kProducers) * kPer);
  ev.hook = [&](duplex_channel *, void *data, size_t len) { tally.deliver(data, len); };
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);

  std::atomic<uint64_t> accepted{0}, closed_refusals{0}, other_errors{0};
  std::atomic<int> last_other{0};
  Event go;
  std::vector<std::thread> producers;
  for (unsigned t = 0; t < kProducers; t++)
    producers.emplace_back([&, t] {
      go.wait();
      for (uint32_t i = 0; i < kPer; i++) {
        auto *m = new PtrMsg{t * kPer + i};
        int rc = duplex_channel_send_ptr(ch, m, sizeof *m, PtrTally::release, &tally, -1);
        if (rc == 0) {
          accepted++;
          continue;
        }
        delete m; // refused: the caller keeps it
        if (rc == DUPLEX_ECLOSED) {
          closed_refusals++;
          break; // the loop is gone
        }
        other_errors++;
        last_other = rc;
      }
    });
  go.set();
  // Free while the producers are (very likely) still sending.
  REQUIRE(wait_until([&] { return tally.delivered.load() >= 1000; }));
  CHECK(loop.free() == 0);
  for (auto &p : producers)
    p.join();

  CHECK_MESSAGE(other_errors.load() == 0, "last error " << err_str(last_other.load()));
  CHECK(tally.twice.load() == 0);
  CHECK(tally.release_bad_status.load() == 0);
  CHECK(tally.release_bad_len.load() == 0);
  CHECK(tally.delivered.load() + tally.released.load() == accepted.load());
  uint64_t ended = 0;
  for (auto &s : tally.state)
    ended += s.load() != 0;
  CHECK(ended == accepted.load());
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
  CHECK(ev.after_close.load() == 0);
  MESSAGE("accepted " << accepted.load() << ", delivered " << tally.delivered.load()
                      << ", released " << tally.released.load() << ", producers refused "
                      << closed_refusals.load() << " times after free");
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("freeing the loop with bytes messages queued cancels the channel once and leaks "
          "nothing") {
  Loop loop(false);
  Chan ev;
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);
  std::vector<uint8_t> big(100000, 'b');
  for (int i = 0; i < 100; i++)
    REQUIRE(duplex_channel_send(ch, big.data(), big.size(), 0) == 0);
  CHECK(pending(ch) == 100);
  CHECK(loop.free() == 0);
  CHECK(ev.messages.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
  CHECK(pending(ch) == 0);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("bounded channel: refuse when full, time out while the loop is not draining, "
          "then a waiting sender proceeds once the loop drains") {
  Loop loop(false); // not running: nothing drains
  Chan ev;
  ev.loop = loop;
  ev.keep = true;
  auto o = ev.opts(4);
  duplex_channel *ch = new_channel(loop, &o);
  for (int i = 0; i < 4; i++) {
    std::string m = std::to_string(i);
    REQUIRE(duplex_channel_send(ch, m.data(), m.size(), 0) == 0);
  }
  CHECK(pending(ch) == 4);

  // Full, timeout 0: refused at once; the caller keeps a pointer message.
  CHECK(duplex_channel_send(ch, "refused", 7, 0) == DUPLEX_EWOULDBLOCK);
  PtrTally tally(1);
  auto *kept_ptr = new PtrMsg{0};
  CHECK(duplex_channel_send_ptr(ch, kept_ptr, sizeof *kept_ptr, PtrTally::release, &tally, 0) ==
        DUPLEX_EWOULDBLOCK);

  // Full, timed: gives up with ETIMEDOUT, and not before the timeout.
  auto t0 = std::chrono::steady_clock::now();
  CHECK(duplex_channel_send(ch, "timed", 5, 50) == DUPLEX_ETIMEDOUT);
  auto waited = std::chrono::steady_clock::now() - t0;
  CHECK(waited >= std::chrono::milliseconds(50));
  CHECK(duplex_channel_send_ptr(ch, kept_ptr, sizeof *kept_ptr, PtrTally::release, &tally, 20) ==
        DUPLEX_ETIMEDOUT);
  CHECK(tally.released.load() == 0);
  delete kept_ptr; // still ours
  CHECK(pending(ch) == 4);
  CHECK(ev.messages.load() == 0);

  // Two senders wait for room (for ever, and with a long timeout); they
  // proceed once the loop starts draining. Nothing here observes that they
  // are already waiting when it starts; either way both must succeed.
  std::atomic<int> forever_rc{kUnset}, timed_rc{kUnset};
  std::thread forever([&] { forever_rc = duplex_channel_send(ch, "W", 1, -1); });
  std::thread timed([&] { timed_rc = duplex_channel_send(ch, "T", 1, 60000); });
  std::this_thread::sleep_for(20ms); // let them block (not required for the outcome)
  CHECK(forever_rc.load() == kUnset);
  CHECK(timed_rc.load() == kUnset);
  REQUIRE(duplex_loop_start(loop) == 0);
  forever.join();
  timed.join();
  CHECK(forever_rc.load() == 0);
  CHECK(timed_rc.load() == 0);
  REQUIRE(ev.wait_messages(6));
  REQUIRE(duplex_channel_close(ch) == 0);
  REQUIRE(ev.wait_closed());
  auto kept = ev.kept();
  REQUIRE(kept.size() == 6);
  CHECK(kept[0] == "0");
  CHECK(kept[1] == "1");
  CHECK(kept[2] == "2");
  CHECK(kept[3] == "3");
  // The two waiters in either order; the refused and timed-out never.
  CHECK(((kept[4] == "W" && kept[5] == "T") || (kept[4] == "T" && kept[5] == "W")));
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(loop.free() == 0);
  CHECK(ev.messages.load() == 6);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("bounded channel on the loop thread: a send that would wait returns "
          "DUPLEX_EDEADLK instead of hanging") {
  Loop loop;
  Chan ev;
  ev.loop = loop;
  auto o = ev.opts(2);
  duplex_channel *ch = new_channel(loop, &o);
  PtrTally tally(1);
  auto *m = new PtrMsg{0};
  int r_fill1 = kUnset, r_fill2 = kUnset, r_zero = kUnset, r_timed = kUnset,
      r_forever = kUnset, r_ptr = kUnset, r_delivered_inside = kUnset;
  // Nothing drains while this job runs on the loop thread.
  REQUIRE(on_loop(loop, [&] {
    r_fill1 = duplex_channel_send(ch, "a", 1, 0);
    r_fill2 = duplex_channel_send(ch, "b", 1, 0);
    r_zero = duplex_channel_send(ch, "c", 1, 0);
    r_timed = duplex_channel_send(ch, "d", 1, 1000);
    r_forever = duplex_channel_send(ch, "e", 1, -1);
    r_ptr = duplex_channel_send_ptr(ch, m, sizeof *m, PtrTally::release, &tally, -1);
    r_delivered_inside = int(ev.messages.load());
  }));
  CHECK(r_fill1 == 0);
  CHECK(r_fill2 == 0);
  CHECK(r_zero == DUPLEX_EWOULDBLOCK);
  CHECK(r_timed == DUPLEX_EDEADLK);
  CHECK(r_forever == DUPLEX_EDEADLK);
  CHECK(r_ptr == DUPLEX_EDEADLK);
  CHECK(r_delivered_inside == 0);
  CHECK(tally.released.load() == 0);
  delete m; // refused: still ours
  REQUIRE(ev.wait_messages(2));
  REQUIRE(wait_until([&] { return pending(ch) == 0; }));
  // With room, a waiting-allowed send on the loop thread simply succeeds.
  int r_room = kUnset;
  REQUIRE(on_loop(loop, [&] { r_room = duplex_channel_send(ch, "f", 1, -1); }));
  CHECK(r_room == 0);
  REQUIRE(ev.wait_messages(3));
  CHECK(loop.free() == 0);
  CHECK(ev.messages.load() == 3);
  CHECK(ev.off_loop_thread.load() == 0);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("close delivers every queued message, then on_close(0) exactly once; later calls "
          "return DUPLEX_ECLOSED through references that stay valid") {
  Loop loop(false);
  Chan ev;
  ev.loop = loop;
  ev.keep = true;
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);
  for (int i = 0; i < 100; i++) {
    std::string m = "q" + std::to_string(i);
    REQUIRE(duplex_channel_send(ch, m.data(), m.size(), 0) == 0);
  }
  REQUIRE(duplex_channel_close(ch) == 0);
  // After close: refused, the caller keeps pointers, nothing is queued.
  PtrTally tally(1);
  PtrMsg stack_msg{0};
  CHECK(duplex_channel_send(ch, "late", 4, 0) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_send(ch, "late", 4, -1) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_send_ptr(ch, &stack_msg, sizeof stack_msg, PtrTally::release, &tally,
                                0) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_close(ch) == DUPLEX_ECLOSED);
  CHECK(pending(ch) == 100);
  CHECK(ev.closes.load() == 0); // never inside the close call

  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.messages_at_close.load() == 100);
  CHECK(ev.close_on_thread.load() == 1);
  CHECK(ev.after_close.load() == 0);
  auto kept = ev.kept();
  REQUIRE(kept.size() == 100);
  for (int i = 0; i < 100; i++)
    CHECK(kept[size_t(i)] == "q" + std::to_string(i));

  // The channel is finished; our reference still works.
  CHECK(duplex_channel_send(ch, "x", 1, 0) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_close(ch) == DUPLEX_ECLOSED);
  CHECK(pending(ch) == 0);
  CHECK(duplex_channel_ref(ch) == 0);
  CHECK(duplex_channel_unref(ch) == 0);

  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1); // not again with DUPLEX_ECANCELED
  CHECK(ev.messages.load() == 100);
  // And after the loop is gone.
  CHECK(duplex_channel_send(ch, "x", 1, 0) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_send_ptr(ch, &stack_msg, sizeof stack_msg, PtrTally::release, &tally,
                                -1) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_close(ch) == DUPLEX_ECLOSED);
  CHECK(pending(ch) == 0);
  CHECK(tally.released.load() == 0);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("close wakes a sender waiting for room with DUPLEX_ECLOSED; what was queued is "
          "still delivered") {
  Loop loop(false);
  Chan ev;
  ev.loop = loop;
  ev.keep = true;
  auto o = ev.opts(1);
  duplex_channel *ch = new_channel(loop, &o);
  REQUIRE(duplex_channel_send(ch, "only", 4, 0) == 0);
  std::atomic<int> waiter_rc{kUnset}, timed_rc{kUnset};
  std::thread waiter([&] { waiter_rc = duplex_channel_send(ch, "never", 5, -1); });
  std::thread timed([&] { timed_rc = duplex_channel_send(ch, "never", 5, 60000); });
  std::this_thread::sleep_for(20ms); // let them block (not required for the outcome)
  REQUIRE(duplex_channel_close(ch) == 0);
  waiter.join();
  timed.join();
  CHECK(waiter_rc.load() == DUPLEX_ECLOSED);
  CHECK(timed_rc.load() == DUPLEX_ECLOSED);
  CHECK(pending(ch) == 1);
  REQUIRE(duplex_loop_start(loop) == 0);
  REQUIRE(ev.wait_closed());
  auto kept = ev.kept();
  REQUIRE(kept.size() == 1);
  CHECK(kept[0] == "only");
  CHECK(ev.close_reason.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("a channel never closed ends with on_close(DUPLEX_ECANCELED) when its loop is "
          "freed; the caller's reference stays valid") {
  Loop loop;
  Chan ev;
  ev.loop = loop;
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);
  REQUIRE(duplex_channel_send(ch, "x", 1, -1) == 0);
  REQUIRE(ev.wait_messages(1));
  CHECK(duplex_channel_ref(ch) == 0); // a second holder
  CHECK(loop.free() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
  CHECK(ev.messages.load() == 1);
  CHECK(duplex_channel_close(ch) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_unref(ch) == 0);
  CHECK(duplex_channel_send(ch, "y", 1, 0) == DUPLEX_ECLOSED);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("get_pending counts messages queued and not yet delivered") {
  Loop loop(false);
  Chan ev;
  ev.loop = loop;
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);
  CHECK(pending(ch) == 0);
  for (size_t i = 1; i <= 5; i++) {
    REQUIRE(duplex_channel_send(ch, "p", 1, 0) == 0);
    CHECK(pending(ch) == i);
  }
  auto *m = new PtrMsg{0};
  PtrTally tally(1);
  REQUIRE(duplex_channel_send_ptr(ch, m, sizeof *m, PtrTally::release, &tally, 0) == 0);
  CHECK(pending(ch) == 6);
  ev.hook = [&](duplex_channel *, void *data, size_t len) {
    if (len == sizeof(PtrMsg))
      tally.deliver(data, len);
  };
  REQUIRE(pump_until(loop, [&] { return ev.messages.load() == 6; }));
  CHECK(pending(ch) == 0);
  CHECK(tally.delivered.load() == 1);
  CHECK(loop.free() == 0);
  CHECK(tally.released.load() == 0);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("large messages and a burst queued while the loop is busy: delivered intact and in "
          "order; afterwards the channel holds no more than a small working arena") {
  // The sizes straddle the point where a bytes message gets a copy of its
  // own instead of arena space (64 KiB in channel.c); the burst grows the
  // arena and message vector far beyond what a drained channel keeps.
  const std::vector<size_t> large = {65535, 65536, 65537, size_t(8) << 20, 1};
  const uint32_t kBurst = kTsan ? 20000 : 100000;
  std::vector<std::vector<uint8_t>> msgs; // built before measuring the heap
  for (size_t len : large)
    msgs.push_back(numbered(uint32_t(msgs.size()), len));
  for (uint32_t i = 0; i < kBurst; i++)
    msgs.push_back(numbered(uint32_t(msgs.size()), 100));
  for (size_t len : large)
    msgs.push_back(numbered(uint32_t(msgs.size()), len));

  Loop loop;
  Chan ev;
  ev.loop = loop;
  Event gate;
  std::atomic<bool> held{false};
  std::atomic<uint64_t> bad{0}, checked{0};
  uint32_t next = 0; // loop thread only
  ev.hook = [&](duplex_channel *, void *data, size_t len) {
    if (len == 4 && std::memcmp(data, "hold", 4) == 0) {
      held = true;
      gate.wait(); // the loop is busy: the producer's messages pile up
      return;
    }
    if (len == 4 && std::memcmp(data, "warm", 4) == 0)
      return;
    if (next >= msgs.size() || len != msgs[next].size() ||
        std::memcmp(data, msgs[next].data(), len) != 0)
      bad++;
    next++;
    checked++;
  };
  auto o = ev.opts();
  duplex_channel *ch = new_channel(loop, &o);

  // Warm up: the loop and the channel at their small steady size.
  for (int i = 0; i < 1000; i++)
    REQUIRE(duplex_channel_send(ch, "warm", 4, -1) == 0);
  REQUIRE(ev.wait_messages(1000));
  REQUIRE(wait_until([&] { return pending(ch) == 0; }));
  const uint64_t heap0 = heap_in_use();

  REQUIRE(duplex_channel_send(ch, "hold", 4, -1) == 0);
  REQUIRE(wait_until([&] { return held.load(); }));
  for (auto &m : msgs)
    REQUIRE(duplex_channel_send(ch, m.data(), m.size(), -1) == 0);
  CHECK(pending(ch) == msgs.size() + 1); // and "hold", being delivered
  gate.set();
  REQUIRE(wait_until([&] { return checked.load() == msgs.size(); }));
  REQUIRE(wait_until([&] { return pending(ch) == 0; }));
  CHECK(bad.load() == 0);

  // What a drained channel keeps: two arenas and two message vectors of a
  // few hundred KiB at most, against tens of MiB queued above.
  const uint64_t heap1 = heap_in_use();
  if (heap0 != 0) {
    INFO("heap in use before the burst " << heap0 << ", after " << heap1);
    CHECK(heap1 <= heap0 + (uint64_t(2) << 20));
  } else {
    MESSAGE("heap level not measured: the allocator is replaced (sanitizer) or not glibc");
  }

  // The working arena still serves small messages after the trim.
  for (uint32_t i = 0; i < 10; i++)
    REQUIRE(duplex_channel_send(ch, "warm", 4, -1) == 0);
  REQUIRE(duplex_channel_close(ch) == 0);
  REQUIRE(ev.wait_closed());
  CHECK(ev.close_reason.load() == 0);
  CHECK(ev.messages.load() == 1000 + 1 + msgs.size() + 10);
  CHECK(ev.off_loop_thread.load() == 0);
  CHECK(loop.free() == 0);
  CHECK(duplex_channel_unref(ch) == 0);
}

TEST_CASE("a large bytes message that is refused (full, timed out, closed) is not queued and "
          "leaks nothing; one queued when the loop is freed is dropped without a leak") {
  Loop loop(false); // not running: nothing drains
  Chan ev;
  ev.loop = loop;
  auto o = ev.opts(1);
  duplex_channel *ch = new_channel(loop, &o);
  std::vector<uint8_t> big = numbered(1, size_t(1) << 20);
  REQUIRE(duplex_channel_send(ch, big.data(), big.size(), 0) == 0);
  CHECK(duplex_channel_send(ch, big.data(), big.size(), 0) == DUPLEX_EWOULDBLOCK);
  CHECK(duplex_channel_send(ch, big.data(), big.size(), 10) == DUPLEX_ETIMEDOUT);
  CHECK(pending(ch) == 1);
  CHECK(loop.free() == 0); // ASan: the queued copy is freed, not leaked
  CHECK(ev.messages.load() == 0);
  CHECK(ev.closes.load() == 1);
  CHECK(ev.close_reason.load() == DUPLEX_ECANCELED);
  CHECK(duplex_channel_send(ch, big.data(), big.size(), -1) == DUPLEX_ECLOSED);
  CHECK(pending(ch) == 0);
  CHECK(duplex_channel_unref(ch) == 0);
}
