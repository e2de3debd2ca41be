"""Atomic message files for kombu's filesystem broker (the embedded default's queue).

kombu writes a message by opening ``<ts>_<uuid>.<queue>.msg`` and then writing it; a worker polling
the folder can move and read that file in between, read zero bytes, and die of a JSONDecodeError
("Unrecoverable error"), leaving the job queued for ever (seen in the dashboard's browser test).
Writing under a name the reader ignores and renaming it into place makes each message appear whole.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


def _atomic_put(self: filesystem.Channel, queue: str, payload: dict, **kwargs: object) -> None:
    name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
    final = os.path.join(self.data_folder_out, name)
    staging = final + ".part"  # '.<queue>.msg.part' never matches the reader's '.<queue>.msg'
    try:
        with open(staging, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, final)
    except OSError as exc:
        raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc


def install() -> None:
    """Make every filesystem-broker write in this process atomic (idempotent)."""
    filesystem.Channel._put = _atomic_put
