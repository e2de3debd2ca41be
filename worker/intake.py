"""Intake of an uploaded checkpoint: validate it against the named architecture, store safetensors.

Uploads are untrusted: they are read only through ``dfq.models.checkpoint.load_state_dict``
(safetensors, or ``torch.load(weights_only=True)``), never unpickled, and only in a forked child
with memory, CPU and wall-clock limits (``worker.sandbox``), so a file built to exhaust the parser
ends that process, not the worker. A checkpoint becomes
``ready`` only once a validated copy exists as safetensors; otherwise it is ``rejected`` with the
engine's message, which says what was wrong in words the uploader can act on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select

from worker.config import WorkerSettings
from worker.db import session_scope
from worker.models import Checkpoint, utcnow
from worker.sandbox import LimitExceeded, Limits, run_limited

log = logging.getLogger(__name__)
MODEL_FILE = "model.safetensors"


def bundled_match(sha256: str, arch: str) -> dict[str, Any] | None:
    """The manifest entry of a bundled teacher with this exact file and architecture, if any: its
    input size and normalisation are then known without the uploader repeating them."""
    from dfq.models.teachers import read_manifest

    for name, entry in read_manifest().items():
        if entry.get("sha256") == sha256 and entry.get("arch") == arch:
            return {"bundled": name, **entry}
    return None


def teacher_info(
    checkpoint: Checkpoint, num_classes: int, in_channels: int, default_size: tuple[int, int]
) -> dict[str, Any]:
    """Input shape, normalisation and labels of an accepted checkpoint (client options win)."""
    opts = checkpoint.options or {}
    entry = bundled_match(checkpoint.sha256, checkpoint.arch) or {}
    size = opts.get("input_size") or (entry.get("input_shape") or [None, *default_size])[1:]
    return {
        "num_classes": num_classes,
        "input_shape": [in_channels, *size],
        "mean": opts.get("mean") or entry.get("mean") or [0.0] * in_channels,
        "std": opts.get("std") or entry.get("std") or [1.0] * in_channels,
        "classes": entry.get("classes", []),
        "fp_top1": entry.get("fp_top1"),
        "dataset": entry.get("dataset"),
        "bundled": entry.get("bundled"),
    }


def validate_upload(upload: str, arch: str, out: str) -> dict[str, Any]:
    """Runs in the limited child: read the upload only through the engine's safe loader, validate
    it against ``arch`` and write the accepted weights as safetensors to ``out``. Touches no
    database (the parent owns every state change); a refusal is returned, not raised."""
    from dfq.models.checkpoint import save_state_dict
    from dfq.models.registry import get_arch
    from dfq.models.teachers import load_checkpoint_model

    try:
        model, info = load_checkpoint_model(upload, arch)
        save_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, out, {"arch": arch})
    except ValueError as exc:  # CheckpointError / UnknownArchitecture: written for the uploader
        return {"ok": False, "error": str(exc)}
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "can't allocate memory" in msg or "out of memory" in msg.lower():
            raise MemoryError(msg) from None
        return {"ok": False, "error": f"could not read the checkpoint: {msg}"}
    return {
        "ok": True,
        "num_classes": info.num_classes,
        "in_channels": info.input_shape[0],
        "default_input": list(get_arch(arch).default_input),
    }


def validate_in_sandbox(upload: str, arch: str, out: Path, settings: WorkerSettings) -> dict[str, Any]:
    """:func:`validate_upload` in a forked child under the intake limits (``worker.sandbox``).

    Returns the child's description of the accepted model; raises ``ValueError`` with the reason
    for the uploader when the file is refused, or the child hit a limit or died.
    """
    limits = Limits(settings.intake_memory_mb * 2**20, settings.intake_cpu_s, settings.intake_timeout_s)
    try:
        outcome = run_limited(validate_upload, (upload, arch, str(out)), limits)
    except LimitExceeded as exc:
        raise ValueError(str(exc)) from None
    except RuntimeError as exc:
        raise ValueError(f"could not read the checkpoint: {exc}") from None
    if not outcome.get("ok"):
        raise ValueError(outcome.get("error") or "checkpoint refused")
    return outcome


def intake_checkpoint(checkpoint_id: str, settings: WorkerSettings) -> str:
    """Validate and convert one pending checkpoint; returns its new state."""
    url = settings.resolved_database_url
    with session_scope(url) as s:
        ckpt = s.execute(select(Checkpoint).where(Checkpoint.id == checkpoint_id)).scalar_one_or_none()
        if ckpt is None or ckpt.state != "pending":
            return ckpt.state if ckpt else "missing"
        s.expunge(ckpt)
    out = settings.checkpoints_dir / ckpt.id / MODEL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    try:
        found = validate_in_sandbox(ckpt.upload_path, ckpt.arch, tmp, settings)
        default_size = tuple(found["default_input"][1:])
        details = teacher_info(ckpt, found["num_classes"], found["in_channels"], default_size)
        tmp.replace(out)
    except Exception as exc:  # ValueError carries the message for the uploader
        tmp.unlink(missing_ok=True)
        error = str(exc) if isinstance(exc, ValueError) else f"could not read the checkpoint: {exc}"
        with session_scope(url) as s:
            row = s.get(Checkpoint, checkpoint_id)
            row.state, row.error, row.updated_at = "rejected", error, utcnow()
        log.info("checkpoint %s rejected: %s", checkpoint_id, error)
        return "rejected"
    with session_scope(url) as s:
        row = s.get(Checkpoint, checkpoint_id)
        row.state, row.path, row.info, row.error = "ready", str(out), details, None
        upload, row.upload_path = row.upload_path, None
    if upload:
        Path(upload).unlink(missing_ok=True)
    return "ready"
