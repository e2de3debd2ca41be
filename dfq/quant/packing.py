"""Packing k-bit integer codes (1 <= k <= 16) densely into bytes.

A k-bit weight stored in an int8 still costs 8 bits; the size a deployment pays is k bits per weight,
so the packed file stores exactly ``ceil(n * k / 8)`` bytes per tensor. Layout: a little-endian
bit stream; code ``i`` occupies stream bits ``[i*k, (i+1)*k)``, least significant bit first, and
stream bit ``j`` is bit ``j % 8`` (LSB = 0) of byte ``j // 8``. Equivalently the bytes are the
little-endian encoding of the integer ``sum_i code_i << (i*k)``: three 3-bit codes 5, 3, 7 pack to
``5 | 3 << 3 | 7 << 6 = 477`` = bytes ``[221, 1]``. Codes are unsigned: callers offset signed
codes by ``2^(k-1)`` first.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_PACK_BITS = 16


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy once packed."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_PACK_BITS:
        raise ValueError(f"can pack 1..{MAX_PACK_BITS}-bit codes, got {bits}")


def pack_codes(codes: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """Unsigned codes in ``[0, 2^bits)`` (any shape, flattened in C order) -> packed ``uint8`` bytes."""
    _check_bits(bits)
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    c = c.reshape(-1).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    shifts = np.arange(bits, dtype=np.int64)
    stream = ((c[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)  # LSB first, code by code
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_codes(packed: torch.Tensor | np.ndarray, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as ``int64``."""
    _check_bits(bits)
    p = packed.detach().cpu().numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)
    p = p.reshape(-1).astype(np.uint8)
    if p.size != packed_nbytes(count, bits):
        raise ValueError(f"{p.size} bytes cannot hold exactly {count} codes of {bits} bits")
    stream = np.unpackbits(p, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy(stream @ (1 << np.arange(bits, dtype=np.int64)))
