"""Intake of an uploaded checkpoint: validate it against the named architecture, store safetensors.

Uploads are untrusted: they are read only through ``dfq.models.checkpoint.load_state_dict``
(safetensors, or ``torch.load(weights_only=True)``), never unpickled. A checkpoint becomes
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


def intake_checkpoint(checkpoint_id: str, settings: WorkerSettings) -> str:
    """Validate and convert one pending checkpoint; returns its new state."""
    from dfq.models.checkpoint import save_state_dict
    from dfq.models.registry import get_arch
    from dfq.models.teachers import load_checkpoint_model

    url = settings.resolved_database_url
    with session_scope(url) as s:
        ckpt = s.execute(select(Checkpoint).where(Checkpoint.id == checkpoint_id)).scalar_one_or_none()
        if ckpt is None or ckpt.state != "pending":
            return ckpt.state if ckpt else "missing"
        s.expunge(ckpt)
    try:
        model, info = load_checkpoint_model(ckpt.upload_path, ckpt.arch)
        default_size = tuple(get_arch(ckpt.arch).default_input[1:])
        details = teacher_info(ckpt, info.num_classes, info.input_shape[0], default_size)
        out = settings.checkpoints_dir / ckpt.id / MODEL_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        save_state_dict(
            {k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp, {"arch": ckpt.arch}
        )
        tmp.replace(out)
    except Exception as exc:  # CheckpointError / UnknownArchitecture carry the message for the uploader
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
