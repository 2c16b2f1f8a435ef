"""A hostile or broken upstream at the byte level, for what an HTTP framework cannot be made to send:
a response head of megabytes, a body that breaks off before its Content-Length.

Runs in a thread of the test process on a loopback port. What it answers is chosen by the
request path's last segment (the rest of the path is free, so any provider's path works):

- `.../huge-head`: 200 with 200,000 headers (about 4 MB of head), then a small JSON body.
- `.../break-body`: 200, `Content-Length: 4000`, 40 bytes of an OpenAI chat completion, then a reset.
- `.../close-early`: the connection closed without a byte of response.
Anything else: a 404 JSON body. Every request's head is kept in `requests`.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

HUGE_HEADERS = 200_000
BREAK_AFTER = 40


class RawUpstream:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._stopped = False

    def start(self) -> RawUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                self.requests.append(head)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(rest) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    rest += data
                path = head.split(b" ", 2)[1].split(b"?")[0]
                what = path.rsplit(b"/", 1)[-1]
                if what == b"huge-head":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                    line = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 8) for i in range(1000))
                    for _ in range(HUGE_HEADERS // 1000):
                        conn.sendall(line)
                    conn.sendall(b"Content-Length: 2\r\n\r\n{}")
                elif what == b"break-body":
                    body = (b'{"id":"chatcmpl-raw","object":"chat.completion","model":"gpt-4o-mini",'
                            b'"choices":[{"index":0,"message":{"role":"assistant","content":"hello"}}]}')
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
                                 + body[:BREAK_AFTER])
                    time.sleep(0.2)  # the sidecar has the head and the first bytes before the reset
                    # a reset rather than a clean close: the body is cut, not ended
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif what == b"close-early":
                    pass
                else:
                    body = b'{"error":{"message":"no such route","type":"invalid_request_error"}}'
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                return
