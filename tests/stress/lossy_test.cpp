// Lossy link: two network namespaces joined by a veth pair, 5 % of the
// packets entering each namespace dropped by an nftables rule (this kernel
// has no netem), one libduplex loop in each namespace.
//
// Injects: random packet loss in both directions (retransmissions,
//          duplicate ACKs, reordering of what TCP delivers late).
// Asserts: a checksummed transfer (4 MiB light, 64 MiB full) written with
//          copy and zero-copy writes from namespace A arrives at a
//          libduplex listener in namespace B byte for byte; every write
//          completes once with 0; both conns close with reason 0; and the
//          rule really dropped packets (its nftables counter > 0).
// Needs root and `ip netns` / `nft`; otherwise the test exits 77 (meson:
// SKIP) with a message saying why. The namespaces are always removed.
//
// Each loop runs on a thread of ours that first joins its namespace with
// setns(CLONE_NEWNET): network namespaces are per thread, and libduplex
// makes every socket on its loop thread.
#include "stress.hpp"

#include <fcntl.h>
#include <sched.h>
#include <sys/wait.h>

using namespace dtest;
using namespace stress;

namespace {

int sh(const std::string &cmd) {
  int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string sh_out(const std::string &cmd) {
  std::string out;
  if (FILE *p = ::popen(cmd.c_str(), "r")) {
    char buf[512];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0)
      out.append(buf, n);
    ::pclose(p);
  }
  return out;
}

struct Netns;
Netns *g_netns = nullptr;
void remove_netns();

// std::_Exit skips destructors: the namespaces are removed first.
[[noreturn]] void skip(const std::string &why) {
  remove_netns();
  std::fprintf(stderr, "SKIP lossy link: %s\n", why.c_str());
  std::fflush(stderr);
  std::_Exit(77); // meson: skipped
}

struct Netns {
  std::string a, b, va, vb;
  bool made = false;
  Netns() {
    std::string id = std::to_string(::getpid());
    a = "dpx-lossy-a-" + id;
    b = "dpx-lossy-b-" + id;
    va = "dpxa" + id;
    vb = "dpxb" + id;
  }
  ~Netns() { remove(); }
  void remove() {
    if (made) {
      sh("ip netns del " + a);
      sh("ip netns del " + b);
      made = false;
    }
  }
  bool setup(std::string &err) {
    made = true;
    std::vector<std::string> cmds = {
        "ip netns add " + a,
        "ip netns add " + b,
        "ip link add " + va + " netns " + a + " type veth peer name " + vb + " netns " + b,
        "ip -n " + a + " addr add 10.231.77.1/24 dev " + va,
        "ip -n " + b + " addr add 10.231.77.2/24 dev " + vb,
        "ip -n " + a + " link set lo up",
        "ip -n " + b + " link set lo up",
        "ip -n " + a + " link set " + va + " up",
        "ip -n " + b + " link set " + vb + " up",
        "ip netns exec " + a + " nft add table inet dpxloss",
        "ip netns exec " + a + " nft 'add chain inet dpxloss in { type filter hook input "
        "priority 0; policy accept; }'",
        "ip netns exec " + a + " nft add rule inet dpxloss in numgen random mod 100 '<' 5 "
        "counter drop",
        "ip netns exec " + b + " nft add table inet dpxloss",
        "ip netns exec " + b + " nft 'add chain inet dpxloss in { type filter hook input "
        "priority 0; policy accept; }'",
        "ip netns exec " + b + " nft add rule inet dpxloss in numgen random mod 100 '<' 5 "
        "counter drop",
    };
    for (auto &c : cmds) {
      if (sh(c) != 0) {
        err = "`" + c + "` failed";
        return false;
      }
    }
    // Best effort: no segmentation offload, so that loss hits MTU-sized
    // segments rather than 64 KiB super-packets (more drops per MiB).
    for (auto &n : {std::make_pair(a, va), std::make_pair(b, vb)})
      sh("ip -n " + n.first + " link set dev " + n.second + " gso_max_size 1500 gro_max_size 1500");
    return true;
  }
  // Packets the rule dropped in namespace @p ns.
  uint64_t dropped(const std::string &ns) {
    std::string out = sh_out("ip netns exec " + ns + " nft list table inet dpxloss 2>/dev/null");
    auto pos = out.find("counter packets ");
    return pos == std::string::npos ? 0 : std::strtoull(out.c_str() + pos + 16, nullptr, 10);
  }
};

void remove_netns() {
  if (g_netns)
    g_netns->remove();
}

// Runs duplex_loop_run on a thread inside network namespace @p ns.
class NsLoop {
public:
  NsLoop(duplex_loop *loop, const std::string &ns) : loop_(loop) {
    t_ = std::thread([this, ns] {
      int fd = ::open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
      setns_rc_ = fd >= 0 ? ::setns(fd, CLONE_NEWNET) : -1;
      if (fd >= 0)
        ::close(fd);
      entered_.set();
      if (setns_rc_ == 0)
        run_rc_ = duplex_loop_run(loop_, DUPLEX_RUN_DEFAULT);
    });
    entered_.wait();
  }
  ~NsLoop() { stop(); }
  bool in_ns() const { return setns_rc_ == 0; }
  int stop() {
    if (t_.joinable()) {
      duplex_loop_stop(loop_);
      t_.join();
    }
    return run_rc_;
  }

private:
  duplex_loop *loop_;
  std::thread t_;
  Event entered_;
  int setns_rc_ = -1;
  int run_rc_ = kUnset;
};

} // namespace

TEST_CASE("fault: 5% packet loss both ways (netns + nftables): the transfer arrives intact") {
  if (::geteuid() != 0)
    skip("needs root (network namespaces, nftables)");
  if (sh("ip netns list") != 0 || sh("nft --version") != 0)
    skip("`ip netns` or `nft` is not available");
  Netns ns;
  g_netns = &ns;
  std::string err;
  if (!ns.setup(err))
    skip("could not build the namespaces: " + err);

  const size_t kTotal = pick<size_t>(4, 4, 64) * 1024 * 1024;
  const size_t kChunk = 64 * 1024;
  const uint32_t kSeed = 4242;

  duplex_loop *la = nullptr, *lb = nullptr;
  REQUIRE(duplex_loop_new(&la, nullptr) == 0);
  REQUIRE(duplex_loop_new(&lb, nullptr) == 0);
  {
    NsLoop ra(la, ns.a), rb(lb, ns.b);
    REQUIRE(ra.in_ns());
    REQUIRE(rb.in_ns());

    // B: a libduplex listener that checks every byte.
    ConnEvents rx;
    PatternChecker check(kSeed);
    rx.read_hook = [&](duplex_conn *, const uint8_t *d, size_t n) { check.feed(d, n); };
    rx.eof_hook = [](duplex_conn *c) { duplex_conn_close(c, DUPLEX_CLOSE_GRACEFUL); };
    auto rxo = rx.opts();
    duplex_listener_opts lo = DUPLEX_LISTENER_OPTS_INIT;
    lo.conn_opts = &rxo;
    duplex_listener *lst = nullptr;
    // Made on the loop thread itself, so the socket is in namespace B
    // whether or not the library would hand the call over to the loop.
    int lrc = kUnset;
    REQUIRE(on_loop(lb, [&] { lrc = duplex_listener_tcp(&lst, lb, "10.231.77.2", 0, &lo); }));
    REQUIRE_MESSAGE(lrc == 0, err_str(lrc));
    uint16_t port = 0;
    REQUIRE(duplex_listener_get_port(lst, &port) == 0);

    // A: connect across the lossy veth and write.
    ConnEvents tx;
    auto txo = tx.opts(512 * 1024, 128 * 1024, 2 * 1024 * 1024);
    duplex_conn *conn = nullptr;
    int crc = kUnset;
    REQUIRE(on_loop(la, [&] { crc = duplex_conn_connect_tcp(&conn, la, "10.231.77.2", port, &txo); }));
    REQUIRE_MESSAGE(crc == 0, err_str(crc));
    WriteCounter w;
    ZcCounter z;
    uint64_t accepted_w = 0, accepted_z = 0;
    std::vector<uint8_t> chunk(kChunk);
    for (size_t off = 0; off < kTotal; off += kChunk) {
      fill_pattern(chunk.data(), kChunk, off, kSeed);
      bool zc = (off / kChunk) % 2 == 1;
      void *zb = zc ? ZcCounter::alloc_copy(chunk.data(), kChunk) : nullptr;
      int rc = retry_wouldblock(conn, [&] {
        return zc ? duplex_conn_write_zc(conn, zb, kChunk, ZcCounter::release, &z)
                  : duplex_conn_write(conn, chunk.data(), kChunk, WriteCounter::cb, &w);
      });
      REQUIRE_MESSAGE(rc == 0, err_str(rc));
      (zc ? accepted_z : accepted_w)++;
    }
    REQUIRE(duplex_conn_close(conn, DUPLEX_CLOSE_GRACEFUL) == 0);
    const auto guard = std::chrono::seconds(full_mode() ? 600 : 240);
    CHECK(tx.wait_closed(guard));
    CHECK(rx.wait_closed(guard));
    CHECK(wait_until([&] { return w.total.load() == accepted_w && z.released.load() == accepted_z; }));

    CHECK(tx.close_reason.load() == 0);
    CHECK(rx.close_reason.load() == 0);
    CHECK(rx.opens.load() == 1);
    CHECK(tx.opens.load() == 1);
    CHECK(w.ok.load() == accepted_w);
    CHECK(z.ok.load() == accepted_z);
    CHECK(check.ok());
    CHECK(check.offset == kTotal);
    uint64_t drops = ns.dropped(ns.a) + ns.dropped(ns.b);
    CHECK(drops > 0);
    CHECK(duplex_listener_close(lst) == 0);
    CHECK(duplex_listener_unref(lst) == 0);
    CHECK(duplex_conn_unref(conn) == 0);
    CHECK(ra.stop() == 0);
    CHECK(rb.stop() == 0);

    Figures("lossy")
        .add("bytes_moved", check.offset)
        .add("bytes_lost", kTotal - std::min<uint64_t>(kTotal, check.offset))
        .add("first_bad", check.ok() ? std::string("none") : std::to_string(check.first_bad))
        .add("packets_dropped", drops);
  }
  CHECK(duplex_loop_free(la) == 0);
  CHECK(duplex_loop_free(lb) == 0);
  ns.remove();
  g_netns = nullptr;
  CHECK(sh("ip netns list | grep -q " + ns.a) != 0); // cleaned up
}
