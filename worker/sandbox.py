"""Running untrusted-input work in a separate process with memory, CPU-time and wall-clock limits.

Intake parses files that anyone with a token can upload. ``weights_only`` loading and the format
checks in ``dfq.models.checkpoint`` keep code from running, but a hostile file can still ask the
parser for a huge allocation or a very long decode. Doing that work in a forked child with
``RLIMIT_AS`` / ``RLIMIT_CPU`` set, killed after ``timeout_s``, means the worst such a file can do
is end its own process: the worker, and every other upload, carry on.

The child is forked, not spawned: the worker parent has torch imported already (``preload_engine``)
so a fork starts in milliseconds where a fresh interpreter would spend seconds importing torch. The
parent never initialises CUDA, so forking is safe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """What one child may use: memory beyond what it inherits (bytes), CPU seconds, wall-clock seconds."""

    memory_bytes: int
    cpu_s: int
    timeout_s: float


class LimitExceeded(Exception):
    """The child hit a limit or died; the message says which, in words for the uploader."""


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits) -> None:
    # RLIMIT_AS caps the whole address space, which already holds what the parent had mapped
    # (torch alone is ~3.5 GB of it), so the allowance is added on top of the current size.
    cap = _mapped_bytes() + limits.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_now = int(used.ru_utime + used.ru_stime)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_now + limits.cpu_s, cpu_now + limits.cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if "torch" in sys.modules:  # an OpenMP pool inherited through fork deadlocks: stay on one thread
        sys.modules["torch"].set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except MemoryError:
        result = ("memory", None)
    except BaseException as exc:
        result = ("error", f"{type(exc).__name__}: {exc}")
    try:
        conn.send(result)
    finally:
        conn.close()
        os._exit(0)  # no atexit handlers, no flushing of the parent's inherited buffers


def _mapped_bytes() -> int:
    for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115 - tiny procfs read
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_limited(fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits) -> Any:
    """``fn(*args)`` in a forked child under ``limits``; returns its (picklable) result.

    Raises :class:`LimitExceeded` when the child ran out of memory, CPU time or wall-clock time,
    or died, and ``RuntimeError`` with the child's exception when ``fn`` raised.
    """
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, limits), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(limits.timeout_s):
            raise LimitExceeded(
                f"validating the checkpoint took longer than {limits.timeout_s:g} s and was stopped"
            )
        try:
            status, value = recv.recv()
        except EOFError:  # died before sending: killed by a limit or a signal
            proc.join(5)
            raise LimitExceeded(_death(proc.exitcode, limits)) from None
    finally:
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        recv.close()
    if status == "memory":
        raise LimitExceeded(
            f"the checkpoint needs more memory to load than intake allows ({limits.memory_bytes // 2**20} MiB)"
        )
    if status == "error":
        raise RuntimeError(value)
    return value


def _death(exitcode: int | None, limits: Limits) -> str:
    if exitcode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"validating the checkpoint used more than {limits.cpu_s} s of CPU time and was stopped"
    if exitcode is not None and exitcode < 0:
        return f"the checkpoint validator died with signal {signal.Signals(-exitcode).name}"
    return f"the checkpoint validator exited unexpectedly (code {exitcode})"
