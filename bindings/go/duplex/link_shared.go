//go:build !static_build

package duplex

// cgo finds libduplex with pkg-config (libduplex.pc, which meson installs):
// set PKG_CONFIG_PATH for an install outside pkg-config's default path.
// Build with -tags static_build to link libduplex.a instead (link_static.go).

// #cgo pkg-config: libduplex
import "C"
