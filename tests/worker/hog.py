"""Misbehaving functions for the sandbox tests (module level, so a forked child can run them)."""

import time


def memory() -> None:
    blocks = [bytearray(2**30) for _ in range(64)]  # 64 GiB: far past any limit the tests set
    print(len(blocks))


def cpu() -> None:
    while True:
        pass


def sleep() -> None:
    time.sleep(600)


def ok(x: int) -> dict:
    return {"ok": True, "x": x}


def fail() -> None:
    raise KeyError("boom")
