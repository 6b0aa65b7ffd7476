package duplex

import (
	"net"
	"net/netip"
)

// makeAddr turns an address as libduplex writes it ("1.2.3.4:80",
// "[::1]:80", a socket path, or "" for an unnamed end) into the net.Addr
// the net package would give: a *net.TCPAddr or a *net.UnixAddr. A TCP
// address that is not an IP and port (a host name not yet resolved, as
// given to Dial) stays text.
func makeAddr(network, s string) net.Addr {
	if network == "unix" {
		return &net.UnixAddr{Name: s, Net: "unix"}
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return net.TCPAddrFromAddrPort(ap)
	}
	return textAddr{network, s}
}

// textAddr is a net.Addr that is just text: a "host:port" target of Dial
// whose host is a name.
type textAddr struct{ net, s string }

func (a textAddr) Network() string { return a.net }
func (a textAddr) String() string  { return a.s }
