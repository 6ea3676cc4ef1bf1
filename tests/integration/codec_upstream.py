"""An RPC server for protocols with no runnable peer here (Motan2): a thread per
connection decodes requests with Shoal's codec and answers each after ``delay``, in a
timer thread, so answers to concurrent requests can come back out of order."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from types import TracebackType

from shoal.codec.rpc.base import RpcCodec, RpcFrame

Answer = Callable[[RpcFrame], bytes]


class CodecUpstream:
    def __init__(self, codec: RpcCodec, answer: Answer, delay: float = 0.0) -> None:
        self.codec = codec
        self.answer = answer
        self.delay = delay
        self.requests: list[RpcFrame] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = self.codec.decoder()
        lock = threading.Lock()

        def reply(frame: RpcFrame) -> None:
            with lock:
                conn.sendall(self.answer(frame))

        with conn:
            while data := _recv(conn):
                for frame in decoder.feed(data):
                    self.requests.append(frame)
                    if frame.oneway:
                        continue
                    threading.Timer(self.delay, reply, (frame,)).start()

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()

    def __enter__(self) -> CodecUpstream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except OSError:
        return b""
