#!/bin/sh
# The test 'go-installed' (meson test --suite bindings): the Go binding used
# the way a program outside this tree uses it, against an *installed*
# libduplex.
# Usage: installed_test.sh GO MESON SRC_ROOT BUILD_ROOT
#
# 1. `meson install --destdir` puts the build into a temporary root (the
#    configured prefix inside it; nothing is rebuilt).
# 2. A fresh module directory gets testdata/installed/main.go and a go.mod
#    that requires the binding's module and replaces it with bindings/go.
# 3. `go build` there with no CGO_* flags: `#cgo pkg-config: libduplex`
#    finds the installed libduplex.pc through PKG_CONFIG_PATH, and
#    PKG_CONFIG_SYSROOT_DIR maps the .pc's paths into the temporary root
#    (pkg-config's own way to use a staged install).
# 4. The program runs with LD_LIBRARY_PATH at the installed library only,
#    and must print the installed version (pkg-config --modversion) and its
#    reply.
# Everything Go writes stays in the build directory; GOPROXY=off.
set -eu
go=$1 meson=$2 src=$3 build=$4
state=$build/bindings/go/installed
step="setup"
fail() { echo "installed_test.sh: $*" >&2; exit 1; }
on_exit() {
  rc=$?
  [ "$rc" -eq 0 ] || echo "installed_test.sh: FAILED (exit $rc) during: $step" >&2
}
trap on_exit EXIT

rm -rf "$state"
mkdir -p "$state/app"
root=$state/root

step="meson install --destdir $root"
if ! "$meson" install -C "$build" --no-rebuild --destdir "$root" \
    > "$state/install.log" 2>&1; then
  cat "$state/install.log"
  fail "meson install failed"
fi
pc=$(find "$root" -path '*/pkgconfig/libduplex.pc' | head -n 1)
lib=$(find "$root" -name 'libduplex.so' | head -n 1)
[ -n "$pc" ] || fail "no pkgconfig/libduplex.pc was installed"
[ -n "$lib" ] || fail "no libduplex.so was installed"
libdir=$(dirname "$lib")
echo "== installed into $root: $(echo "$pc" | sed "s|^$root||")"

# Only the installed library: no flags or paths from the build tree.
unset CGO_CFLAGS CGO_CPPFLAGS CGO_LDFLAGS LD_LIBRARY_PATH
export PKG_CONFIG_PATH=$(dirname "$pc") PKG_CONFIG_SYSROOT_DIR=$root
export CGO_ENABLED=1 GOFLAGS=-mod=mod GOPROXY=off GO111MODULE=on GOENV=off
export GOCACHE="$build/bindings/go/cache" GOPATH="$build/bindings/go/gopath"
step="pkg-config libduplex"
version=$(pkg-config --modversion libduplex)
echo "pkg-config: libduplex $version: $(pkg-config --cflags --libs libduplex)"

step="writing the module in $state/app"
cp "$src/bindings/go/testdata/installed/main.go" "$state/app/"
cat > "$state/app/go.mod" <<EOF
module example.com/installed

go 1.19

require github.com/libduplex/libduplex/bindings/go v0.0.0

replace github.com/libduplex/libduplex/bindings/go => $src/bindings/go
EOF

step="go build in $state/app"
cd "$state/app"
"$go" build -o installed .

step="checking which libduplex the program loads"
export LD_LIBRARY_PATH=$libdir
loaded=$(ldd ./installed | sed -n 's/^[[:space:]]*libduplex\.so[^ ]* => \([^ ]*\).*/\1/p')
case $loaded in
  "$libdir"/*) echo "loads $(echo "$loaded" | sed "s|^$root||") (installed)" ;;
  *) fail "the program loads libduplex from '$loaded', not from $libdir" ;;
esac

step="running the program"
out=$(timeout -k 5 60 ./installed)
echo "$out"
[ "$out" = "libduplex $version: hello duplex" ] ||
  fail "unexpected output; want 'libduplex $version: hello duplex'"
echo "ok: built with go build against the installed libduplex $version"
