//go:build static_build

package duplex

// With -tags static_build, pkg-config --static also gives what libduplex.a
// needs (libuv, the thread library), for an install of the static library
// (meson setup -Ddefault_library=static or both).

// #cgo pkg-config: --static libduplex
import "C"
