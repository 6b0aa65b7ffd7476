package duplex_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libduplex/libduplex/bindings/go/duplex"
)

// ---- certificates, made with crypto/x509 for each run --------------------

type testCert struct {
	certPEM, keyPEM []byte
	cert            *x509.Certificate
	key             *ecdsa.PrivateKey
	pair            tls.Certificate
}

type testPKI struct {
	ca, otherCA    *testCert
	server, client *testCert
	pool           *x509.CertPool // trusts ca
}

var (
	pkiOnce sync.Once
	pki     *testPKI
	pkiErr  error
)

func makeCert(tmpl *x509.Certificate, parent *testCert) (*testCert, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	signer, parentCert := key, tmpl
	if parent != nil {
		signer, parentCert = parent.key, parent.cert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parentCert, &key.PublicKey, signer)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	c := &testCert{
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}),
		cert:    cert,
		key:     key,
	}
	c.pair, err = tls.X509KeyPair(c.certPEM, c.keyPEM)
	return c, err
}

func newPKI() (*testPKI, error) {
	now := time.Now()
	ca := func(serial int64, cn string) (*testCert, error) {
		return makeCert(&x509.Certificate{
			SerialNumber:          big.NewInt(serial),
			Subject:               pkix.Name{CommonName: cn},
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.Add(24 * time.Hour),
			IsCA:                  true,
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}, nil)
	}
	p := &testPKI{}
	var err error
	if p.ca, err = ca(1, "duplex test CA"); err != nil {
		return nil, err
	}
	if p.otherCA, err = ca(2, "another CA"); err != nil {
		return nil, err
	}
	if p.server, err = makeCert(&x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, p.ca); err != nil {
		return nil, err
	}
	if p.client, err = makeCert(&x509.Certificate{
		SerialNumber: big.NewInt(4),
		Subject:      pkix.Name{CommonName: "duplex client"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, p.ca); err != nil {
		return nil, err
	}
	p.pool = x509.NewCertPool()
	p.pool.AddCert(p.ca.cert)
	return p, nil
}

// needTLS skips without TLS in libduplex and returns the run's PKI.
func needTLS(t *testing.T) *testPKI {
	t.Helper()
	if duplex.TLSBackend() == "" {
		t.Skip("libduplex was built without TLS")
	}
	pkiOnce.Do(func() { pki, pkiErr = newPKI() })
	if pkiErr != nil {
		t.Fatal(pkiErr)
	}
	return pki
}

func tlsConfig(t *testing.T, o duplex.TLSOptions) *duplex.TLSConfig {
	t.Helper()
	cfg, err := duplex.NewTLSConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cfg.Close(); err != nil {
			t.Errorf("TLSConfig.Close: %v", err)
		}
	})
	return cfg
}

func (p *testPKI) clientOpts() duplex.TLSOptions {
	return duplex.TLSOptions{CAPEM: p.ca.certPEM}
}

func (p *testPKI) serverOpts() duplex.TLSOptions {
	return duplex.TLSOptions{Server: true, CertPEM: p.server.certPEM, KeyPEM: p.server.keyPEM}
}

// goTLSServer serves one connection with crypto/tls on its own goroutine;
// the returned channel gets serve's error.
func goTLSServer(t *testing.T, cfg *tls.Config, serve func(*tls.Conn) error) (string, <-chan error) {
	t.Helper()
	ln := peer(t)
	errc := make(chan error, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			errc <- err
			return
		}
		raw.SetDeadline(time.Now().Add(30 * time.Second))
		tc := tls.Server(raw, cfg)
		err = serve(tc)
		raw.Close()
		errc <- err
	}()
	return ln.Addr().String(), errc
}

func waitErr(t *testing.T, errc <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("hang guard: %s", what)
		return nil
	}
}

// duplexEcho serves every conn of a duplex Listener until it closes:
// copies each back, then half-closes (over TLS: close_notify).
func duplexEcho(ln *duplex.Listener) {
	for {
		c, err := ln.AcceptConn()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			io.Copy(c, c)
			c.CloseWrite()
		}()
	}
}

func payload(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

// ---- tests ---------------------------------------------------------------

func TestTLSConfigErrors(t *testing.T) {
	p := needTLS(t)
	if !strings.Contains(duplex.TLSBackend(), "OpenSSL") {
		t.Errorf("TLSBackend() = %q", duplex.TLSBackend())
	}
	_, err := duplex.NewTLSConfig(duplex.TLSOptions{Server: true, CertFile: "/nonexistent/cert.pem", KeyFile: "/nonexistent/key.pem"})
	var te *duplex.TLSError
	if !errors.Is(err, duplex.ETLSCONFIG) || !errors.As(err, &te) || te.Reason == "" {
		t.Fatalf("missing files: %v (%T), want a *TLSError ETLSCONFIG with a reason", err, err)
	}
	_, err = duplex.NewTLSConfig(duplex.TLSOptions{Server: true, CertPEM: p.server.certPEM, KeyPEM: p.client.keyPEM})
	if !errors.Is(err, duplex.ETLSCONFIG) {
		t.Errorf("a key of another certificate: %v", err)
	}
	if _, err = duplex.NewTLSConfig(duplex.TLSOptions{Server: true}); !errors.Is(err, duplex.EINVAL) {
		t.Errorf("a server without a certificate: %v", err)
	}
	if _, err = duplex.NewTLSConfig(duplex.TLSOptions{Verify: duplex.VerifyRequire}); !errors.Is(err, duplex.EINVAL) {
		t.Errorf("VerifyRequire on a client: %v", err)
	}

	loop := newLoop(t)
	srv := tlsConfig(t, p.serverOpts())
	cli := tlsConfig(t, p.clientOpts())
	if !srv.Server() || cli.Server() {
		t.Error("Server() is wrong")
	}
	if _, err := loop.Dial(context.Background(), "tcp", "127.0.0.1:1", duplex.WithTLS(srv)); !errors.Is(err, duplex.EINVAL) {
		t.Errorf("Dial with a server-role config: %v", err)
	}
	if _, err := loop.Listen("tcp", "127.0.0.1:0", duplex.WithTLS(cli)); !errors.Is(err, duplex.EINVAL) {
		t.Errorf("Listen with a client-role config: %v", err)
	}
	if _, err := loop.Dial(context.Background(), "unix", "/nonexistent", duplex.WithTLS(cli)); !errors.Is(err, duplex.EINVAL) {
		t.Errorf("a verifying client on unix without a server name: %v", err)
	}
	closed, err := duplex.NewTLSConfig(p.clientOpts())
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	if err := closed.Close(); !errors.Is(err, duplex.ECLOSED) {
		t.Errorf("second Close: %v", err)
	}
	if _, err := loop.Dial(context.Background(), "tcp", "127.0.0.1:1", duplex.WithTLS(closed)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Dial with a closed config: %v", err)
	}
}

// A duplex client against a crypto/tls server: echo, then half-close
// (close_notify) while the server still sends what it owes.
func TestTLSDialAgainstCryptoTLSServer(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	data := payload(3 << 20)
	addr, errc := goTLSServer(t, &tls.Config{Certificates: []tls.Certificate{p.server.pair}},
		func(tc *tls.Conn) error {
			n, err := io.Copy(tc, tc) // until our close_notify
			if err != nil {
				return err
			}
			fmt.Fprintf(tc, "echoed %d bytes", n)
			return tc.CloseWrite() // its close_notify
		})
	_, port, _ := net.SplitHostPort(addr)
	c, err := loop.Dial(context.Background(), "tcp", "localhost:"+port,
		duplex.WithTLS(tlsConfig(t, p.clientOpts())))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.TLSInfo()
	if err != nil {
		t.Fatal(err)
	}
	if info.Version != tls.VersionTLS13 || info.VersionName != "TLSv1.3" || info.CipherSuite == "" ||
		!info.PeerCertificate || !strings.Contains(info.PeerSubject, "CN=localhost") || info.DidResume {
		t.Errorf("TLSInfo = %+v", info)
	}
	go func() {
		c.Write(data)
		c.CloseWrite() // close_notify after the data; reading goes on
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	want := append(append([]byte{}, data...), fmt.Sprintf("echoed %d bytes", len(data))...)
	if !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want %d", len(got), len(want))
	}
	if err := waitErr(t, errc, "the crypto/tls server"); err != nil {
		t.Fatalf("server: %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("hang guard: the conn never closed after both close_notify")
	}
	if err := c.CloseErr(); err != nil {
		t.Errorf("CloseErr = %v", err)
	}
}

// A crypto/tls client against a duplex Listener: ALPN, SNI, and the
// client's half-close answered after our EOF.
func TestTLSCryptoTLSClientAgainstListener(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	opts := p.serverOpts()
	opts.ALPN = []string{"h2", "http/1.1"}
	ln, err := loop.Listen("tcp", "127.0.0.1:0", duplex.WithTLS(tlsConfig(t, opts)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	infos := make(chan duplex.TLSInfo, 1)
	go func() {
		c, err := ln.AcceptConn()
		if err != nil {
			return
		}
		defer c.Close()
		info, _ := c.TLSInfo()
		infos <- info
		n, _ := io.Copy(io.Discard, c) // until the client's close_notify
		fmt.Fprintf(c, "read %d bytes after your EOF", n)
		c.CloseWrite()
	}()
	tc, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		RootCAs: p.pool, ServerName: "localhost", NextProtos: []string{"http/1.1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if st := tc.ConnectionState(); st.NegotiatedProtocol != "http/1.1" {
		t.Errorf("ALPN = %q", st.NegotiatedProtocol)
	}
	tc.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := tc.Write(payload(100000)); err != nil {
		t.Fatal(err)
	}
	if err := tc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(tc)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "read 100000 bytes after your EOF" {
		t.Errorf("got %q", got)
	}
	info := <-infos
	if info.ServerName != "localhost" || info.NegotiatedProtocol != "http/1.1" || info.PeerCertificate {
		t.Errorf("server TLSInfo = %+v", info)
	}
}

func TestTLSMutual(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	opts := p.serverOpts()
	opts.Verify = duplex.VerifyRequire
	opts.CAPEM = p.ca.certPEM
	ln, err := loop.Listen("tcp", "127.0.0.1:0", duplex.WithTLS(tlsConfig(t, opts)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go duplexEcho(ln)
	copts := p.clientOpts()
	copts.CertPEM, copts.KeyPEM = p.client.certPEM, p.client.keyPEM
	c, err := loop.Dial(context.Background(), "tcp", ln.Addr().String(),
		duplex.WithTLS(tlsConfig(t, copts)), duplex.WithServerName("localhost"))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("mutual"))
	c.CloseWrite()
	if got, err := recvAll(c); string(got) != "mutual" || err != io.EOF {
		t.Errorf("echo: %q, %v", got, err)
	}
	// crypto/tls with the client certificate, then without.
	tc, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		RootCAs: p.pool, ServerName: "localhost", Certificates: []tls.Certificate{p.client.pair},
	})
	if err != nil {
		t.Fatal(err)
	}
	tc.SetDeadline(time.Now().Add(30 * time.Second))
	tc.Write([]byte("x"))
	buf := make([]byte, 1)
	if _, err := io.ReadFull(tc, buf); err != nil {
		t.Errorf("with a client certificate: %v", err)
	}
	tc.Close()
	tc, err = tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: p.pool, ServerName: "localhost"})
	if err == nil { // TLS 1.3: the server's refusal comes after the client's handshake
		tc.SetDeadline(time.Now().Add(30 * time.Second))
		tc.Write([]byte("x"))
		_, err = io.ReadFull(tc, buf)
		tc.Close()
	}
	if err == nil {
		t.Error("a client without a certificate was served")
	}
}

func TestTLSVerificationFailure(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	srv := tlsConfig(t, p.serverOpts())
	ln, err := loop.Listen("tcp", "127.0.0.1:0", duplex.WithTLS(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	untrusting := tlsConfig(t, duplex.TLSOptions{CAPEM: p.otherCA.certPEM})
	trusting := tlsConfig(t, p.clientOpts())
	for _, tc := range []struct {
		name string
		opts []duplex.Option
	}{
		{"unknown issuer", []duplex.Option{duplex.WithTLS(untrusting), duplex.WithServerName("localhost")}},
		{"wrong host name", []duplex.Option{duplex.WithTLS(trusting), duplex.WithServerName("wrong.example")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := loop.Dial(context.Background(), "tcp", ln.Addr().String(), tc.opts...)
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			var op *net.OpError
			var ve *duplex.CertificateVerificationError
			if !errors.As(err, &op) || op.Op != "dial" || !errors.As(err, &ve) || ve.Reason == "" ||
				!errors.Is(err, duplex.ETLSVERIFY) {
				t.Fatalf("Dial: %v (%T), want a *net.OpError around a *CertificateVerificationError", err, err)
			}
			if !strings.Contains(err.Error(), ve.Reason) {
				t.Errorf("%q does not say %q", err, ve.Reason)
			}
			t.Logf("%v", err)
		})
	}
	// The same server passes with a trusting client and its IP address as
	// the name (the certificate has it).
	c, err := loop.Dial(context.Background(), "tcp", ln.Addr().String(), duplex.WithTLS(trusting))
	if err != nil {
		t.Fatalf("dial by IP address: %v", err)
	}
	c.Close()
	// And crypto/tls refuses a duplex server it does not trust.
	_, err = tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "localhost", RootCAs: x509.NewCertPool()})
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Errorf("crypto/tls against an unknown server: %v", err)
	}
}

func TestTLSTruncationIsNotEOF(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	ln := peer(t)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(raw, &tls.Config{Certificates: []tls.Certificate{p.server.pair}})
		tc.Write([]byte("partial"))
		raw.Close() // no close_notify
	}()
	c, err := loop.Dial(context.Background(), "tcp", ln.Addr().String(),
		duplex.WithTLS(tlsConfig(t, p.clientOpts())), duplex.WithServerName("localhost"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := recvAll(c)
	if string(got) != "partial" {
		t.Errorf("got %q", got)
	}
	var te *duplex.TLSError
	if err == io.EOF || !errors.Is(err, io.ErrUnexpectedEOF) || !errors.Is(err, duplex.ETLSTRUNC) ||
		!errors.As(err, &te) {
		t.Fatalf("Err() = %v (%T), want a truncation", err, err)
	}
	<-c.Done()
	if err := c.CloseErr(); !errors.Is(err, duplex.ETLSTRUNC) {
		t.Errorf("CloseErr = %v", err)
	}
}

// STARTTLS both ways: a duplex client upgrading against a crypto/tls
// server, and a duplex server's accepted conn upgrading for a crypto/tls
// client.
func TestTLSStartTLS(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	cli := tlsConfig(t, p.clientOpts())
	srv := tlsConfig(t, p.serverOpts())

	t.Run("client", func(t *testing.T) {
		ln := peer(t)
		errc := make(chan error, 1)
		go func() {
			raw, err := ln.Accept()
			if err != nil {
				errc <- err
				return
			}
			defer raw.Close()
			raw.SetDeadline(time.Now().Add(30 * time.Second))
			line, err := bufio.NewReader(raw).ReadString('\n') // nothing follows it before our reply
			if err != nil || line != "STARTTLS\n" {
				errc <- fmt.Errorf("line %q, %v", line, err)
				return
			}
			raw.Write([]byte("GO\n"))
			tc := tls.Server(raw, &tls.Config{Certificates: []tls.Certificate{p.server.pair}})
			if _, err := io.Copy(tc, tc); err != nil {
				errc <- err
				return
			}
			errc <- tc.CloseWrite()
		}()
		_, port, _ := net.SplitHostPort(ln.Addr().String())
		c, err := loop.Dial(context.Background(), "tcp", "localhost:"+port)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.TLSInfo(); !errors.Is(err, duplex.ENOTSUP) {
			t.Errorf("TLSInfo before StartTLS: %v", err)
		}
		c.Write([]byte("STARTTLS\n"))
		buf := make([]byte, 3)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "GO\n" {
			t.Fatalf("reply %q, %v", buf, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.StartTLS(ctx, cli, ""); err != nil {
			t.Fatal(err)
		}
		info, err := c.TLSInfo()
		if err != nil || !strings.Contains(info.PeerSubject, "CN=localhost") {
			t.Errorf("TLSInfo = %+v, %v", info, err)
		}
		if err := c.StartTLS(ctx, cli, ""); !errors.Is(err, duplex.EBUSY) {
			t.Errorf("second StartTLS: %v", err)
		}
		c.Write([]byte("secret"))
		c.CloseWrite()
		if got, err := io.ReadAll(c); string(got) != "secret" || err != nil {
			t.Errorf("echo %q, %v", got, err)
		}
		if err := waitErr(t, errc, "the STARTTLS server"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("server", func(t *testing.T) {
		ln, err := loop.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		errc := make(chan error, 1)
		go func() {
			c, err := ln.AcceptConn()
			if err != nil {
				errc <- err
				return
			}
			defer c.Close()
			buf := make([]byte, 9)
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "STARTTLS\n" {
				errc <- fmt.Errorf("line %q, %v", buf, err)
				return
			}
			c.Write([]byte("GO\n")) // plaintext: queued before the upgrade
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := c.StartTLS(ctx, srv, ""); err != nil {
				errc <- err
				return
			}
			b, err := io.ReadAll(c)
			if err != nil {
				errc <- err
				return
			}
			c.Write(bytes.ToUpper(b))
			errc <- c.CloseWrite()
		}()
		raw, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		raw.SetDeadline(time.Now().Add(30 * time.Second))
		raw.Write([]byte("STARTTLS\n"))
		buf := make([]byte, 3)
		if _, err := io.ReadFull(raw, buf); err != nil || string(buf) != "GO\n" {
			t.Fatalf("reply %q, %v", buf, err)
		}
		tc := tls.Client(raw, &tls.Config{RootCAs: p.pool, ServerName: "localhost"})
		tc.Write([]byte("quiet"))
		tc.CloseWrite()
		if got, err := io.ReadAll(tc); string(got) != "QUIET" || err != nil {
			t.Errorf("got %q, %v", got, err)
		}
		if err := waitErr(t, errc, "the duplex STARTTLS server"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("verification failure", func(t *testing.T) {
		ln, err := loop.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.AcceptConn()
			if err != nil {
				return
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c.StartTLS(ctx, srv, "")
		}()
		c, err := loop.Dial(context.Background(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		untrusting := tlsConfig(t, duplex.TLSOptions{CAPEM: p.otherCA.certPEM})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err = c.StartTLS(ctx, untrusting, "localhost")
		var ve *duplex.CertificateVerificationError
		var op *net.OpError
		if !errors.As(err, &op) || op.Op != "starttls" || !errors.As(err, &ve) || ve.Reason == "" {
			t.Fatalf("StartTLS: %v (%T)", err, err)
		}
		<-c.Done()
		if err := c.CloseErr(); !errors.As(err, &ve) {
			t.Errorf("CloseErr = %v", err)
		}
	})
}

// net/http's client over duplex TLS conns (DialTLSContext) against
// httptest's TLS server.
func TestTLSHTTPClient(t *testing.T) {
	needTLS(t)
	loop := newLoop(t)
	ts := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.URL.Path)
	}))
	defer ts.Close()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw})
	cfg := tlsConfig(t, duplex.TLSOptions{CAPEM: ca, ALPN: []string{"http/1.1"}})
	client := &http.Client{Transport: &http.Transport{
		DialTLSContext: loop.DialFunc(duplex.WithTLS(cfg), duplex.WithServerName("example.com")),
	}}
	defer client.CloseIdleConnections()
	resp, err := client.Get(ts.URL + "/over-duplex")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hello /over-duplex" {
		t.Errorf("body %q", body)
	}
}

func TestTLSKeyLogAndFiles(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	srv := tlsConfig(t, duplex.TLSOptions{Server: true,
		CertFile: write("server.pem", p.server.certPEM), KeyFile: write("server.key", p.server.keyPEM),
		MinVersion: tls.VersionTLS13})
	keylog := filepath.Join(dir, "keys.log")
	cli := tlsConfig(t, duplex.TLSOptions{CAFile: write("ca.pem", p.ca.certPEM), KeyLogFile: keylog,
		HandshakeTimeout: 5 * time.Second, MaxVersion: tls.VersionTLS13})
	ln, err := loop.Listen("tcp", "127.0.0.1:0", duplex.WithTLS(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go duplexEcho(ln)
	c, err := loop.Dial(context.Background(), "tcp", ln.Addr().String(), duplex.WithTLS(cli))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("x"))
	c.CloseWrite()
	if got, err := recvAll(c); string(got) != "x" || err != io.EOF {
		t.Errorf("echo %q, %v", got, err)
	}
	b, err := os.ReadFile(keylog)
	if err != nil || !bytes.Contains(b, []byte("CLIENT_TRAFFIC_SECRET_0")) {
		t.Errorf("key log: %v, %q", err, b)
	}
	if st, err := os.Stat(keylog); err == nil && st.Mode().Perm() != 0o600 {
		t.Errorf("key log mode %v", st.Mode())
	}
}

// A TLS listener closed while handshakes are under way: the conn that
// finishes its handshake afterwards is aborted, the one still in it ends
// with the loop, and no callback finds its listener's handle gone.
func TestTLSListenerCloseWithHandshakesUnderWay(t *testing.T) {
	p := needTLS(t)
	loop := newLoop(t)
	ln, err := loop.Listen("tcp", "127.0.0.1:0", duplex.WithTLS(tlsConfig(t, p.serverOpts())))
	if err != nil {
		t.Fatal(err)
	}
	var raws []net.Conn
	for i := 0; i < 2; i++ {
		raw, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		raw.SetDeadline(time.Now().Add(30 * time.Second))
		raws = append(raws, raw)
	}
	for i := 0; ; i++ { // both accepted, neither has sent a byte
		st, err := loop.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if st.Accepted == 2 {
			break
		}
		if i == 3000 {
			t.Fatalf("hang guard: %d accepted", st.Accepted)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(raws[0], &tls.Config{RootCAs: p.pool, ServerName: "localhost"})
	if err := tc.Handshake(); err == nil {
		if _, err := tc.Read(make([]byte, 1)); err == nil {
			t.Error("a conn accepted by a closed listener was served")
		}
	}
	// raws[1] never speaks: its conn ends when the loop closes (cleanup).
}
