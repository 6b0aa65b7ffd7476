#!/bin/sh
# The Go binding's test run (meson test --suite bindings, test 'go').
# Usage: run_tests.sh GO SRC_ROOT BUILD_ROOT LIBDUPLEX_SO
#
# Builds the examples with -race and runs the scenario against the echo
# example, then runs `go test -race`; on success the output ends with go
# test's own ok line. Everything Go writes (build cache, GOPATH) stays inside
# the meson build directory, and GOPROXY=off: the module has no requirements.
#
# Fails fast, never hangs: every wait is bounded, the background echo server
# is killed on every way out (error, set -e, meson's SIGTERM at its timeout)
# so it cannot keep meson's output pipe open, and a failure ends with one
# line saying which step failed.
set -eu
go=$1 src=$2 build=$3 lib=$4
libdir=$(cd "$(dirname "$lib")" && pwd)
state=$build/bindings/go
mkdir -p "$state"

# Hang guards, well inside meson's 600 s timeout, so a stuck step says which.
ECHO_START_S=60   # the echo example prints its address
SCENARIO_S=120    # the scenario runs against it
ECHO_EXIT_S=60    # the echo finishes its one conn afterwards

step="setup"
echo_pid=
fail() { echo "run_tests.sh: $*" >&2; exit 1; }

# Stop the echo example if it is still running: TERM, then KILL after 5 s.
stop_echo() {
  [ -n "$echo_pid" ] || return 0
  if kill -0 "$echo_pid" 2>/dev/null; then
    kill "$echo_pid" 2>/dev/null || true
    i=0
    while kill -0 "$echo_pid" 2>/dev/null && [ "$i" -lt 50 ]; do
      sleep 0.1; i=$((i + 1))
    done
    kill -9 "$echo_pid" 2>/dev/null || true
  fi
  wait "$echo_pid" 2>/dev/null || true
  echo_pid=
}
on_exit() {
  rc=$?
  trap - EXIT INT TERM HUP
  stop_echo
  [ "$rc" -eq 0 ] || echo "run_tests.sh: FAILED (exit $rc) during: $step" >&2
  exit "$rc"
}
trap on_exit EXIT
# Signals (meson sends SIGTERM to the group at its timeout) go through exit,
# so the EXIT trap runs and reports where it was.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# The package finds libduplex with `#cgo pkg-config: libduplex`. For the
# build tree that is a .pc written here: meson's
# meson-uninstalled/libduplex-uninstalled.pc lacks core/include (where
# duplex.h is) in its Cflags. No CGO_CFLAGS / CGO_LDFLAGS are set.
pcdir=$state/pkgconfig
mkdir -p "$pcdir"
version=$(sed -n 's/^Version: *//p' \
  "$build/meson-uninstalled/libduplex-uninstalled.pc" 2>/dev/null || true)
cat > "$pcdir/libduplex.pc" <<EOF
Name: libduplex
Description: libduplex from the build tree $build
Version: ${version:-0}
Libs: -L$libdir -lduplex
Cflags: -I$src/core/include -I$build/core/include
EOF
export PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
unset CGO_CFLAGS CGO_LDFLAGS PKG_CONFIG_SYSROOT_DIR
export CGO_ENABLED=1
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GOCACHE="$state/cache" GOPATH="$state/gopath" GOPROXY=off
export GO111MODULE=on GOFLAGS= GOENV=off
export GODEBUG=cgocheck=2 # check every pointer handed to C
cd "$src/bindings/go"

echo "== examples: scenario against the echo example (both built with -race)"
step="go build -race ./examples/echo"
"$go" build -race -o "$state/echo" ./examples/echo
step="go build -race ./examples/scenario"
"$go" build -race -o "$state/scenario" ./examples/scenario

# The echo's stdout and stderr both go to echo.out (its address, then any
# log.Fatal or race report): it never holds meson's pipe. The file exists
# before the echo starts, so reading it can never race with its creation.
step="starting the echo example"
out=$state/echo.out
: > "$out"
"$state/echo" -n 1 tcp 127.0.0.1:0 > "$out" 2>&1 &
echo_pid=$!
step="waiting for the echo example's address (up to ${ECHO_START_S} s)"
addr=
i=0
while [ -z "$addr" ]; do
  if ! kill -0 "$echo_pid" 2>/dev/null; then
    echo "echo example exited before printing its address; its output:"
    cat "$out"
    fail "echo example exited early"
  fi
  # Only a whole first line: Println ends it with a newline.
  if [ -s "$out" ] && [ "$(wc -l < "$out")" -ge 1 ]; then
    addr=$(sed -n '1s/^listening on //p' "$out")
    if [ -z "$addr" ]; then
      echo "echo example printed no address; its output:"; cat "$out"
      fail "unexpected first line from the echo example"
    fi
    break
  fi
  [ "$i" -lt $((ECHO_START_S * 20)) ] ||
    fail "echo example printed no address within ${ECHO_START_S} s"
  i=$((i + 1))
  sleep 0.05
done

step="scenario against $addr (up to ${SCENARIO_S} s)"
rc=0
timeout -k 5 "$SCENARIO_S" "$state/scenario" "$addr" > "$state/scenario.out" || rc=$?
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq 124 ] && echo "scenario hung: killed after ${SCENARIO_S} s"
  echo "scenario exit $rc; its last lines:"; tail -3 "$state/scenario.out"
  echo "echo example's output:"; cat "$out"
  fail "scenario failed"
fi

step="waiting for the echo example to finish (up to ${ECHO_EXIT_S} s)"
i=0
while kill -0 "$echo_pid" 2>/dev/null; do
  if [ "$i" -ge $((ECHO_EXIT_S * 10)) ]; then
    echo "echo example's output:"; cat "$out"
    fail "echo example hung after the scenario finished"
  fi
  i=$((i + 1))
  sleep 0.1
done
rc=0
wait "$echo_pid" || rc=$?
echo_pid=
if [ "$rc" -ne 0 ]; then
  echo "echo example's output:"; cat "$out"
  fail "echo example exited $rc"
fi

step="checking the scenario's output"
# 4 goroutines x 1000 lines, each goroutine's lines in order.
awk '{ if ($4 != next_[$2] + 0) { print "out of order: " $0; bad = 1 }
       next_[$2] = $4 + 1; n++ }
     END { print n " lines echoed"; exit (bad || n != 4000) }' \
  "$state/scenario.out"

echo "== go test -race"
# go test's own -timeout (default 10 min) panics with every goroutine's
# stack; keep it inside meson's timeout, which includes the builds above.
step="go test -race"
"$go" test -race -count=1 -timeout 300s -v ./...
