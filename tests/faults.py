"""Fault injectors for the reliability tests and bench/reliability.py: real outages, not mocks.

``TcpProxy`` sits between a client and a real server (PostgreSQL here); ``cut()`` drops every
open connection and refuses new ones until ``restore()``, which is what a database restart or a
network partition looks like from the client. ``RedisServer`` is a private redis-server that can
be stopped and started again on the same port. ``ack_lost_once`` makes a committed write look failed
to the client, as a connection lost on the COMMIT acknowledgement does.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
from urllib.parse import urlsplit, urlunsplit

from tests.services import free_port, redis_answers, wait_until


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; can cut and restore connectivity."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = False
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @classmethod
    def for_url(cls, url: str) -> tuple[TcpProxy, str]:
        """A proxy in front of ``url``'s host:port, and ``url`` pointed at the proxy."""
        parts = urlsplit(url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 5432)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{proxy.port}"
        new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return proxy, urlunsplit(parts._replace(netloc=new))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                with self._lock:
                    self._open.discard(s)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones (until :meth:`restore`)."""
        self._cut = True
        self.cuts += 1
        with self._lock:
            victims, self._open = list(self._open), set()
        for s in victims:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._cut = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


class RedisServer:
    """A private redis-server on a fixed port that can be restarted (data is not persisted)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="dfq-redis-fault-")
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            self.dir,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: redis_answers("127.0.0.1", self.port), 30, "redis-server")

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: the append-only file is flushed), as a restart would do."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def ack_lost_once(monkeypatch, row_type) -> list:
    """Patch worker.progress so that the connection drops while COMMIT is acknowledged, once, in the
    first write that adds a ``row_type`` row: the transaction landed, the client sees an
    OperationalError and retries the whole write (seen once in CI with PostgreSQL cut mid-job)."""
    from sqlalchemy.exc import OperationalError

    from worker.db import session_scope
    from worker.retry import with_retry

    failed = []

    @contextlib.contextmanager
    def ack_lost_once(url):
        with session_scope(url) as s:
            yield s
            writes = any(isinstance(row, row_type) for row in [*s.new, *s.identity_map.values()])
        if writes and not failed:  # committed above; now the client is told it was not
            failed.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr("worker.progress.session_scope", ack_lost_once)
    monkeypatch.setattr(
        "worker.progress.with_retry", lambda fn, what, policy: with_retry(fn, what, policy, lambda s: None)
    )
    return failed  # [True] once the fault has fired
