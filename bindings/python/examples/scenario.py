"""The docs/design.md scenario: producer threads send messages through a
channel to a socket, and whatever the socket receives is printed. No locks:
the loop owns the socket, and channel and conn are safe from any thread.
The socket's peer is an echo server on the same loop."""
import threading

import duplex


def echo(conn):  # the peer: send back what arrives, finish when we do
    conn.on_read = lambda c, data: c.write(data)
    conn.on_eof = lambda c: c.shutdown()


with duplex.Loop() as loop:
    server = duplex.listen_tcp(loop, "127.0.0.1", 0, on_accept=echo)
    sock = duplex.connect_tcp(
        loop, "127.0.0.1", server.port,
        on_read=lambda conn, data: print(data.decode(), end=""))
    chan = duplex.Channel(loop, on_message=sock.write, capacity=16,
                          on_close=lambda error: sock.shutdown())

    def producer(n):
        for i in range(5):
            chan.send(f"producer {n}: message {i}\n".encode())

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    chan.close()        # what is queued is still delivered, then shutdown
    sock.wait_closed()  # the echo's EOF: everything came back
