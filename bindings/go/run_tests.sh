#!/bin/sh
# The Go binding's test run (meson test --suite bindings, test 'go').
# Usage: run_tests.sh GO SRC_ROOT BUILD_ROOT LIBDUPLEX_SO
#
# Builds the examples with -race and runs the scenario against the echo
# example, then runs `go test -race`; the output ends with go test's own
# ok/FAIL line. Everything Go writes (build cache, GOPATH) stays inside the
# meson build directory, and GOPROXY=off: the module has no requirements.
set -eu
go=$1 src=$2 build=$3 lib=$4
libdir=$(cd "$(dirname "$lib")" && pwd)
state=$build/bindings/go
mkdir -p "$state"

export CGO_ENABLED=1
export CGO_CFLAGS="-I$src/core/include -I$build/core/include -g -O2"
export CGO_LDFLAGS="-L$libdir"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GOCACHE="$state/cache" GOPATH="$state/gopath" GOPROXY=off
export GO111MODULE=on GOFLAGS= GOENV=off
export GODEBUG=cgocheck=2 # check every pointer handed to C
cd "$src/bindings/go"

echo "== examples: scenario against the echo example (both built with -race)"
"$go" build -race -o "$state/echo" ./examples/echo
"$go" build -race -o "$state/scenario" ./examples/scenario
rm -f "$state/echo.out"
"$state/echo" -n 1 tcp 127.0.0.1:0 > "$state/echo.out" &
echo_pid=$!
addr=
while [ -z "$addr" ]; do
  if ! kill -0 "$echo_pid" 2>/dev/null; then
    echo "echo example exited early:"; cat "$state/echo.out"; exit 1
  fi
  addr=$(sed -n 's/^listening on //p' "$state/echo.out" 2>/dev/null)
  [ -n "$addr" ] || sleep 0.05
done
# Hang guards well inside meson's timeout, so a stuck pair says which.
if ! timeout 120 "$state/scenario" "$addr" > "$state/scenario.out"; then
  echo "scenario failed or hung; its last lines:"; tail -3 "$state/scenario.out"
  kill "$echo_pid" 2>/dev/null; exit 1
fi
for _ in $(seq 600); do # up to 60 s for the echo to finish its one conn
  kill -0 "$echo_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$echo_pid" 2>/dev/null; then
  echo "echo example hung after the scenario finished"; kill "$echo_pid"; exit 1
fi
wait "$echo_pid" || { echo "echo example failed"; exit 1; }
# 4 goroutines x 1000 lines, each goroutine's lines in order.
awk '{ if ($4 != next_[$2] + 0) { print "out of order: " $0; bad = 1 }
       next_[$2] = $4 + 1; n++ }
     END { print n " lines echoed"; exit (bad || n != 4000) }' \
  "$state/scenario.out"

echo "== go test -race"
exec "$go" test -race -count=1 -v .
