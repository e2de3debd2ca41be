"""The embedded broker's message files appear whole: written under a '.part' name, then renamed."""

from __future__ import annotations

import os
import uuid

from kombu import Connection
from kombu.transport import filesystem

from worker import fs_broker


def test_messages_round_trip_and_no_partial_file_is_ever_visible_under_a_queue_name(tmp_path, monkeypatch):
    fs_broker.install()
    assert filesystem.Channel._put is fs_broker._atomic_put
    seen: list[list[str]] = []
    real_replace = os.replace

    def spying_replace(src, dst):  # what a polling reader could see just before the rename
        seen.append(sorted(os.listdir(tmp_path)))
        real_replace(src, dst)

    monkeypatch.setattr(fs_broker.os, "replace", spying_replace)
    control = tmp_path.parent / f"{tmp_path.name}-control"  # kombu's default is ./control
    options = {
        "data_folder_in": str(tmp_path),
        "data_folder_out": str(tmp_path),
        "control_folder": str(control),
    }
    with Connection("filesystem://", transport_options=options) as conn:
        channel = conn.default_channel  # the transport's own put/get, no exchange routing involved
        name = f"gpu-{uuid.uuid4().hex[:8]}"
        channel._put(name, {"job": "abc", "n": 1})
        assert seen and all(f.endswith(f".{name}.msg.part") for f in seen[0])  # not a '.msg' yet
        assert [f for f in os.listdir(tmp_path) if f.endswith(f".{name}.msg")]
        assert channel._get(name) == {"job": "abc", "n": 1}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]
