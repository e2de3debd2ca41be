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
import os
import pickle
import resource
import select
import signal
import sys
import time
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


def _child(write_fd: int, fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits) -> None:
    # RLIMIT_AS caps the whole address space, which already holds what the parent had mapped
    # (torch alone is ~3.5 GB of it), so the allowance is added on top of the current size.
    _lower(resource.RLIMIT_AS, _mapped_bytes() + limits.memory_bytes, 0)
    used = resource.getrusage(resource.RUSAGE_SELF)
    _lower(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime) + limits.cpu_s, 5)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if "torch" in sys.modules:  # an OpenMP pool inherited through fork deadlocks: stay on one thread
        sys.modules["torch"].set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except MemoryError:
        result = ("memory", None)
    except BaseException as exc:
        result = ("error", f"{type(exc).__name__}: {exc}")
    data = pickle.dumps(result)
    with os.fdopen(write_fd, "wb") as f:
        f.write(data)


def _lower(which: int, soft: int, slack: int) -> None:
    """Set a limit, never above a hard limit the process already has (a container may set one)."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        resource.setrlimit(which, (min(soft, hard), hard))
    else:
        resource.setrlimit(which, (soft, soft + slack))


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_limited(fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits) -> Any:
    """``fn(*args)`` in a forked child under ``limits``; returns its (picklable) result.

    Raises :class:`LimitExceeded` when the child ran out of memory, CPU time or wall-clock time,
    or died, and ``RuntimeError`` with the child's exception when ``fn`` raised. A bare
    ``os.fork`` rather than ``multiprocessing``: Celery's pool processes are daemonic, and
    multiprocessing refuses to start children from those.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            os.close(read_fd)
            _child(write_fd, fn, args, limits)
        except BaseException:
            code = 1
        finally:
            os._exit(code)  # no atexit handlers, no flushing of the parent's inherited buffers
    os.close(write_fd)
    data = bytearray()
    deadline = time.monotonic() + limits.timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise LimitExceeded(
                    f"validating the checkpoint took longer than {limits.timeout_s:g} s and was stopped"
                )
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if not data:  # died before reporting: killed by a limit or a signal
        raise LimitExceeded(_death(os.waitstatus_to_exitcode(status), limits))
    kind, value = pickle.loads(bytes(data))  # our own child's bytes, not the upload's
    if kind == "memory":
        raise LimitExceeded(
            f"the checkpoint needs more memory to load than intake allows ({limits.memory_bytes // 2**20} MiB)"
        )
    if kind == "error":
        raise RuntimeError(value)
    return value


def _death(exitcode: int | None, limits: Limits) -> str:
    if exitcode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"validating the checkpoint used more than {limits.cpu_s} s of CPU time and was stopped"
    if exitcode is not None and exitcode < 0:
        return f"the checkpoint validator died with signal {signal.Signals(-exitcode).name}"
    return f"the checkpoint validator exited unexpectedly (code {exitcode})"
