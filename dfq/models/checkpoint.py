"""Loading untrusted checkpoints: safetensors, or a zip-format state_dict through ``weights_only``.

Every failure is a :class:`CheckpointError` whose message says what was wrong in words a user can
act on, because these files arrive from uploads and pipelines, not from us.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own cap on the JSON header
ZIP_MAX_EXPANSION = 4  # declared uncompressed size / file size beyond which a zip is refused
ZIP_SLACK_BYTES = 1 << 20
BN_STATS = ("running_mean", "running_var")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is meant for the uploader."""


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) >= 8 and head[:2] == b"PK":
        return "zip"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and header_len > 0:
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a safetensors file or a zip-format ``torch.save`` file, never running code.

    Legacy (non-zip) pickles, TorchScript archives and full pickled modules are refused: they can
    only be read by executing code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty")
    kind = _sniff(path)
    if kind == "safetensors":
        header_len = int.from_bytes(path.open("rb").read(8), "little")
        if header_len > SAFETENSORS_MAX_HEADER or header_len + 8 > path.stat().st_size:
            raise CheckpointError("not a valid safetensors file: header length exceeds the file")
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"not a valid safetensors file: {exc}") from None
    elif kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                entries = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError):
            raise CheckpointError("corrupt zip archive: not a readable torch checkpoint") from None
        names = [e.filename for e in entries]
        _refuse_zip_bomb(entries, path.stat().st_size)
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(
                "TorchScript archives are not accepted; save the model's state_dict() instead"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                "checkpoint could not be loaded safely (only plain state_dicts of tensors are "
                f"accepted, never pickled code): {msg}"
            ) from None
    elif kind == "pickle":
        raise CheckpointError(
            "legacy pickle checkpoints are not accepted (loading them can run code); "
            "re-save with torch.save(model.state_dict(), path) or as safetensors"
        )
    else:
        raise CheckpointError("not a checkpoint: expected a safetensors file or a torch.save zip file")
    return _as_state_dict(state)


def _refuse_zip_bomb(entries: list[zipfile.ZipInfo], file_size: int) -> None:
    """torch.save stores its entries uncompressed, so a checkpoint never expands much beyond its
    own size; an archive that claims to is built to exhaust memory or disk when read."""
    declared = sum(e.file_size for e in entries)
    if declared > ZIP_MAX_EXPANSION * file_size + ZIP_SLACK_BYTES:
        raise CheckpointError(
            f"zip archive expands to {declared} bytes from a {file_size}-byte file (a zip bomb?); "
            "torch.save checkpoints are stored uncompressed"
        )


def _as_state_dict(obj: object) -> dict[str, torch.Tensor]:
    # Accept the common {"state_dict": {...}} / {"model": {...}} wrappers of training scripts.
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError("checkpoint does not hold a state_dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint holds non-tensor entries, e.g. {bad[0]!r}")
    # DataParallel / DDP checkpoints prefix every key with "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], arch: str = "model") -> nn.Module:
    """Load ``state`` strictly, listing missing/unexpected keys and shape mismatches in the error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs {arch} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if any(k.endswith(BN_STATS) for k in missing) and not any(k.endswith(BN_STATS) for k in state):
        raise CheckpointError(
            f"the checkpoint has no BatchNorm running statistics ({len(missing)} keys of {arch!r} "
            f"missing, e.g. {', '.join(missing[:2])}): generative data-free quantization needs a "
            "model trained with BatchNorm"
        )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(f"checkpoint does not match architecture {arch!r}: " + "; ".join(parts))
    converted = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(converted, strict=True)
    return model


def require_batchnorm(model: nn.Module) -> int:
    """Generative DFQ matches BN statistics; a model without BN layers has nothing to match."""
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n == 0:
        raise CheckpointError(
            "the model has no BatchNorm layers: generative data-free quantization needs the "
            "running statistics stored in BatchNorm layers"
        )
    return n


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
