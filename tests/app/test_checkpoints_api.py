"""Checkpoint uploads: auth, streaming with size cap, SHA-256, field errors, owner scoping."""

from __future__ import annotations

import hashlib

from tests.app.conftest import MAX_UPLOAD, queued_messages


def test_every_api_call_needs_a_valid_token(client):
    assert client.get("/api/v1/checkpoints").status_code == 401
    r = client.get("/api/v1/jobs", headers={"Authorization": "Bearer dfq_not-a-token"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_upload_is_stored_hashed_and_queued_for_intake(client, settings, alice, random_checkpoint):
    data = random_checkpoint.read_bytes()
    r = client.post(
        "/api/v1/checkpoints",
        headers=alice,
        files={"file": ("mine.safetensors", data)},
        data={"arch": "resnet20", "name": "my teacher"},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "pending" and body["name"] == "my teacher" and body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    stored = settings.checkpoints_dir / body["id"] / "upload.bin"
    assert stored.read_bytes() == data
    assert queued_messages(settings) == 1
    got = client.get(f"/api/v1/checkpoints/{body['id']}", headers=alice).json()
    assert (got["id"], got["state"], got["error"]) == (body["id"], "pending", None)


def test_oversize_upload_gets_413_and_leaves_no_file(client, settings, alice):
    big = b"\0" * (MAX_UPLOAD + 10)  # just over the cap: caught while streaming, not by Content-Length
    r = client.post(
        "/api/v1/checkpoints", headers=alice, files={"file": ("big.bin", big)}, data={"arch": "resnet20"}
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    huge = b"\0" * (MAX_UPLOAD * 2)  # refused from the declared length alone
    assert (
        client.post(
            "/api/v1/checkpoints", headers=alice, files={"file": ("h.bin", huge)}, data={"arch": "resnet20"}
        ).status_code
        == 413
    )
    assert not any(settings.checkpoints_dir.rglob("*")) and queued_messages(settings) == 0
    assert client.get("/api/v1/checkpoints", headers=alice).json()["total"] == 0


def test_missing_fields_are_field_level_422(client, settings, alice, random_checkpoint):
    r = client.post("/api/v1/checkpoints", headers=alice, files={"file": random_checkpoint.read_bytes()})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "arch"]
    r = client.post("/api/v1/checkpoints", headers=alice, data={"arch": "resnet20"}, files={"other": b"x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    r = client.post(
        "/api/v1/checkpoints",
        headers=alice,
        files={"file": b"x"},
        data={"arch": "resnet20", "input_size": "big"},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "input_size"]
    r = client.post("/api/v1/checkpoints", headers=alice, json={"arch": "resnet20"})
    assert r.status_code == 415
    assert not any(settings.checkpoints_dir.rglob("*.bin"))


def test_checkpoints_are_owner_scoped_and_deletable(client, alice, bob, ready_checkpoint):
    assert client.get(f"/api/v1/checkpoints/{ready_checkpoint}", headers=bob).status_code == 404
    assert client.get("/api/v1/checkpoints", headers=bob).json()["items"] == []
    assert client.delete(f"/api/v1/checkpoints/{ready_checkpoint}", headers=bob).status_code == 404
    listed = client.get("/api/v1/checkpoints?state=ready", headers=alice).json()
    assert [c["id"] for c in listed["items"]] == [ready_checkpoint]
    assert client.delete(f"/api/v1/checkpoints/{ready_checkpoint}", headers=alice).status_code == 204
    assert client.get(f"/api/v1/checkpoints/{ready_checkpoint}", headers=alice).status_code == 404
