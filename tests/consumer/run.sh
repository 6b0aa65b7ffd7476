#!/usr/bin/env bash
# tests/consumer/run.sh KIND BUILD_DIR PREFIX LIBDIR WANT_STATIC
#
# Installs libduplex from the meson build BUILD_DIR into a temporary DESTDIR
# (`meson install --destdir`), then builds and runs one consumer project
# against that install only:
#   cmake   tests/consumer/cmake: find_package(libduplex) with
#           CMAKE_PREFIX_PATH; libduplex::duplex, libduplex::duplex_cpp and
#           (WANT_STATIC=1) libduplex::duplex_static
#   make    tests/consumer/make: a Makefile with `pkg-config --libs`, and
#           (WANT_STATIC=1) `pkg-config --static --libs`
#   meson   tests/consumer/meson: dependency('libduplex'), and
#           (WANT_STATIC=1) dependency('libduplex', static: true)
# pkg-config reads the staged .pc files through PKG_CONFIG_SYSROOT_DIR, as
# for any DESTDIR or sysroot; the CMake config file finds its prefix from
# its own location. WANT_STATIC=1 needs a build with default_library=both:
# each kind then also links libduplex.a, and the cmake and make kinds repeat
# the build against a copy of the install without libduplex.so (a
# static-only install). Every program checks itself (tests/consumer/
# consumer.c, consumer.cpp); this script also checks with readelf that each
# one links the library it should, and with ldd that a shared one loads the
# staged libduplex.so.0, not another. Exit 0 ok, 77 skipped (a tool is
# missing), anything else a failure.
set -euo pipefail

KIND=$1 BUILD_DIR=$2 PREFIX=$3 LIBDIR=$4 WANT_STATIC=$5
# meson test points LD_LIBRARY_PATH at the build tree's libduplex.so: a
# consumer must find the installed one by itself
unset LD_LIBRARY_PATH
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JOBS=${DUPLEX_JOBS:-2}

say() { printf '==> %s\n' "$*"; }
fail() { printf 'consumer %s: FAIL: %s\n' "$KIND" "$*" >&2; exit 1; }
need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || { echo "consumer $KIND: '$t' not found: skipped"; exit 77; }
  done
}

case $KIND in
  cmake) need meson cmake readelf ldd ;;
  make)  need meson make pkg-config readelf ldd ;;
  meson) need meson ninja pkg-config readelf ldd ;;
  *) fail "unknown kind '$KIND' (cmake, make, meson)" ;;
esac

T=$(mktemp -d "${TMPDIR:-/tmp}/duplex-consumer-$KIND.XXXXXX")
trap 'rm -rf "$T"' EXIT

# --- install ----------------------------------------------------------------
STAGE=$T/stage
say "meson install -C $BUILD_DIR --destdir $STAGE"
meson install -C "$BUILD_DIR" --no-rebuild --quiet --destdir "$STAGE" >/dev/null
case $LIBDIR in /*) ;; *) LIBDIR=$PREFIX/$LIBDIR ;; esac
P=$STAGE$PREFIX        # the staged prefix
L=$STAGE$LIBDIR        # the staged libdir
[ -f "$L/pkgconfig/libduplex.pc" ] || fail "no libduplex.pc in $L/pkgconfig"
if [ "$WANT_STATIC" = 1 ] && [ ! -f "$L/libduplex.a" ]; then
  fail "WANT_STATIC=1 but the install has no libduplex.a"
fi

# The same install without the shared library (static only).
make_static_only() {
  SSTAGE=$T/stage-static
  cp -a "$STAGE" "$SSTAGE"
  rm -f "$SSTAGE$LIBDIR"/libduplex.so*
  SP=$SSTAGE$PREFIX
}

# --- checks -------------------------------------------------------------------
check_shared() {
  local prog=$1
  case $(readelf -d "$prog") in
    *'NEEDED'*'[libduplex.so.0]'*) ;;
    *) fail "$prog does not link libduplex.so.0" ;;
  esac
}
check_loads_staged() { # PROG [LD_LIBRARY_PATH]
  local prog=$1 where
  where=$(env ${2:+LD_LIBRARY_PATH="$2"} ldd "$prog" | awk '$1 == "libduplex.so.0" { print $3 }')
  case $where in
    "$T"/*) ;;
    *) fail "$prog loads libduplex.so.0 from '${where:-nowhere}', not from the install under $T" ;;
  esac
}
check_static() {
  local prog=$1 syms
  case $(readelf -d "$prog") in
    *'[libduplex.so'*) fail "$prog should link libduplex.a, but needs libduplex.so" ;;
  esac
  # (read whole: grep -q would stop reading early, and pipefail would
  # count readelf's SIGPIPE as a failure)
  syms=$(readelf -sW "$prog")
  grep -Eq ' FUNC +GLOBAL +DEFAULT +[0-9]+ duplex_loop_new$' <<<"$syms" \
    || fail "$prog has no duplex_loop_new of its own"
}
run() {
  say "run $*"
  "$@" || fail "$* exited $?"
}

# --- the consumers ----------------------------------------------------------
programs=0
case $KIND in
  cmake)
    build_cmake() { # DIR PREFIX_PATH TARGET|all extra-args...
      local dir=$1 pp=$2 target=$3
      shift 3
      say "cmake -S tests/consumer/cmake -DCMAKE_PREFIX_PATH=$pp $*"
      cmake -S "$HERE/cmake" -B "$dir" -DCMAKE_PREFIX_PATH="$pp" \
        -DCMAKE_BUILD_TYPE=Release "$@" >"$dir.log" 2>&1 \
        || { cat "$dir.log" >&2; fail "cmake configure failed"; }
      grep 'libduplex ' "$dir.log" || true
      cmake --build "$dir" -j "$JOBS" --target "$target" >>"$dir.log" 2>&1 \
        || { cat "$dir.log" >&2; fail "cmake build failed"; }
    }
    static_arg=OFF
    [ "$WANT_STATIC" = 1 ] && static_arg=ON
    build_cmake "$T/b" "$P" all -DWANT_STATIC=$static_arg
    # no LD_LIBRARY_PATH: the imported location gives the build RPATH
    for prog in consumer consumer_cpp; do
      check_shared "$T/b/$prog"
      check_loads_staged "$T/b/$prog"
      run "$T/b/$prog"
      programs=$((programs + 1))
    done
    if [ "$WANT_STATIC" = 1 ]; then
      check_static "$T/b/consumer_static"
      run "$T/b/consumer_static"
      make_static_only
      # only libduplex.a: libduplex::duplex is the static library
      build_cmake "$T/bs" "$SP" consumer
      check_static "$T/bs/consumer"
      run "$T/bs/consumer"
      programs=$((programs + 2))
    fi
    ;;

  make)
    export PKG_CONFIG_PATH=$L/pkgconfig PKG_CONFIG_SYSROOT_DIR=$STAGE
    say "pkg-config --cflags --libs libduplex: $(pkg-config --cflags --libs libduplex)"
    mkdir "$T/b"
    make -s -C "$T/b" -f "$HERE/make/Makefile" consumer \
      || fail "make (shared) failed"
    check_shared "$T/b/consumer"
    check_loads_staged "$T/b/consumer" "$L"
    run env LD_LIBRARY_PATH="$L" "$T/b/consumer"
    programs=1
    if [ "$WANT_STATIC" = 1 ]; then
      make_static_only
      export PKG_CONFIG_PATH=$SSTAGE$LIBDIR/pkgconfig PKG_CONFIG_SYSROOT_DIR=$SSTAGE
      say "pkg-config --static --libs libduplex: $(pkg-config --static --libs libduplex)"
      mkdir "$T/bs"
      make -s -C "$T/bs" -f "$HERE/make/Makefile" PKG_CONFIG_FLAGS=--static consumer \
        || fail "make (static) failed"
      check_static "$T/bs/consumer"
      run "$T/bs/consumer"
      programs=2
    fi
    ;;

  meson)
    export PKG_CONFIG_PATH=$L/pkgconfig PKG_CONFIG_SYSROOT_DIR=$STAGE
    opt=false
    [ "$WANT_STATIC" = 1 ] && opt=true
    say "meson setup tests/consumer/meson -Dwant_static=$opt"
    meson setup "$T/b" "$HERE/meson" -Dwant_static=$opt >"$T/setup.log" 2>&1 \
      || { cat "$T/setup.log" >&2; fail "meson setup failed"; }
    grep 'dependency libduplex' "$T/setup.log" || true
    ninja -C "$T/b" -j "$JOBS" >"$T/build.log" 2>&1 \
      || { cat "$T/build.log" >&2; fail "ninja failed"; }
    check_shared "$T/b/consumer"
    check_loads_staged "$T/b/consumer" "$L"
    run env LD_LIBRARY_PATH="$L" "$T/b/consumer"
    programs=1
    if [ "$WANT_STATIC" = 1 ]; then
      check_static "$T/b/consumer_static"
      run "$T/b/consumer_static"
      programs=2
    fi
    ;;
esac

echo "consumer $KIND: $programs programs built against the installed libduplex and passed"
