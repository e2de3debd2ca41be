"""Jobs through the API in-process: validation before queuing, listing, cancel, clone, isolation."""

from __future__ import annotations

from tests.app.conftest import queued_messages

SMOKE = {"bits": "W4A4", "budget": "smoke", "device": "cpu"}


def _create(client, headers, ckpt, spec=SMOKE):
    return client.post("/api/v1/jobs", headers=headers, json={"checkpoint_id": ckpt, "spec": spec})


def test_create_returns_201_queued_and_sends_one_task(client, settings, alice, ready_checkpoint):
    before = queued_messages(settings)
    r = _create(client, alice, ready_checkpoint)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["step"] == 0 and job["total"] == 6 and job["error"] is None
    assert job["spec"]["quant"]["w_bits"] == 4 and job["spec"]["budget"]["preset"] == "smoke"
    assert queued_messages(settings) == before + 1
    got = client.get(f"/api/v1/jobs/{job['id']}", headers=alice).json()
    assert {k: got[k] for k in ("id", "state", "phase", "step", "total", "metrics", "error")} == {
        "id": job["id"], "state": "queued", "phase": None, "step": 0, "total": 6, "metrics": {}, "error": None,
    }  # fmt: skip
    logs = client.get(f"/api/v1/jobs/{job['id']}/logs", headers=alice).json()
    assert logs[0]["message"].startswith("queued: gdfq W4A4")


def test_invalid_spec_is_a_field_level_422_and_queues_nothing(client, settings, alice, ready_checkpoint):
    before = queued_messages(settings)
    r = _create(client, alice, ready_checkpoint, {"bits": "W4A4", "budget": {"preset": "smoke", "epochs": 0}})
    assert r.status_code == 422
    locs = [e["loc"] for e in r.json()["detail"]]
    assert ["body", "spec", "budget", "epochs"] in locs
    r = _create(client, alice, ready_checkpoint, {"bits": "W1A4"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "spec"]
    assert "bit" in r.json()["detail"][0]["msg"]
    r = _create(client, alice, ready_checkpoint, {"method": "no-such-method"})
    assert r.status_code == 422 and "unknown method preset" in r.json()["detail"][0]["msg"]
    r = _create(client, alice, "nope")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "checkpoint_id"]
    assert queued_messages(settings) == before
    assert client.get("/api/v1/jobs", headers=alice).json()["total"] == 0


def test_a_pending_checkpoint_cannot_be_used_yet(client, alice, random_checkpoint):
    r = client.post(
        "/api/v1/checkpoints",
        headers=alice,
        files={"file": random_checkpoint.read_bytes()},
        data={"arch": "resnet20"},
    )
    r = _create(client, alice, r.json()["id"])
    assert r.status_code == 422 and "pending" in r.json()["detail"][0]["msg"]


def test_list_filters_and_pages(client, alice, ready_checkpoint):
    ids = [_create(client, alice, ready_checkpoint).json()["id"] for _ in range(3)]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=alice)
    page = client.get("/api/v1/jobs?limit=2&offset=0", headers=alice).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and page["limit"] == 2
    rest = client.get("/api/v1/jobs?limit=2&offset=2", headers=alice).json()
    assert {j["id"] for j in page["items"] + rest["items"]} == set(ids)
    queued = client.get("/api/v1/jobs?state=queued", headers=alice).json()
    assert queued["total"] == 2 and ids[0] not in {j["id"] for j in queued["items"]}
    both = client.get("/api/v1/jobs?state=queued&state=cancelled", headers=alice).json()
    assert both["total"] == 3
    assert client.get("/api/v1/jobs?state=bogus", headers=alice).status_code == 422
    assert client.get(f"/api/v1/jobs?checkpoint_id={ready_checkpoint}", headers=alice).json()["total"] == 3


def test_cancel_a_queued_job_at_once_and_conflict_after(client, alice, ready_checkpoint):
    job_id = _create(client, alice, ready_checkpoint).json()["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=alice)
    assert r.status_code == 202 and r.json()["state"] == "cancelled" and r.json()["cancel_requested"]
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=alice).status_code == 409
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=alice).status_code == 204
    assert client.get(f"/api/v1/jobs/{job_id}", headers=alice).status_code == 404


def test_clone_with_overrides(client, alice, ready_checkpoint):
    original = _create(
        client, alice, ready_checkpoint, {"bits": "W4A4-F8L8", "budget": "smoke", "seed": 3}
    ).json()
    r = client.post(
        f"/api/v1/jobs/{original['id']}/clone", headers=alice, json={"overrides": {"bits": "W3A3", "seed": 4}}
    )
    assert r.status_code == 201, r.text
    clone = r.json()
    assert clone["cloned_from"] == original["id"] and clone["state"] == "queued"
    q = clone["spec"]["quant"]
    assert (q["w_bits"], q["a_bits"], q["first_layer_bits"], q["last_layer_bits"]) == (3, 3, None, None)
    assert clone["spec"]["seed"] == 4 and clone["spec"]["budget"] == original["spec"]["budget"]
    bad = client.post(
        f"/api/v1/jobs/{original['id']}/clone", headers=alice, json={"overrides": {"budget": {"epochs": -1}}}
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:3] == ["body", "overrides", "budget"]


def test_another_user_cannot_see_or_touch_a_job(client, alice, bob, ready_checkpoint):
    job_id = _create(client, alice, ready_checkpoint).json()["id"]
    assert client.get("/api/v1/jobs", headers=bob).json() == {
        "items": [],
        "total": 0,
        "limit": 50,
        "offset": 0,
    }
    for method, path in [
        ("get", f"/api/v1/jobs/{job_id}"),
        ("post", f"/api/v1/jobs/{job_id}/cancel"),
        ("post", f"/api/v1/jobs/{job_id}/clone"),
        ("get", f"/api/v1/jobs/{job_id}/logs"),
        ("get", f"/api/v1/jobs/{job_id}/metrics"),
        ("get", f"/api/v1/jobs/{job_id}/artifacts"),
        ("get", f"/api/v1/jobs/{job_id}/artifacts/report.json"),
        ("get", f"/api/v1/jobs/{job_id}/events"),
        ("delete", f"/api/v1/jobs/{job_id}"),
    ]:
        kwargs = {"json": {}} if path.endswith("clone") else {}
        assert getattr(client, method)(path, headers=bob, **kwargs).status_code == 404, path
    assert _create(client, bob, ready_checkpoint).status_code == 422  # alice's checkpoint is not bob's
    assert client.get(f"/api/v1/jobs/{job_id}", headers=alice).json()["state"] == "queued"


def test_openapi_has_the_contract():
    from app.main import create_app

    paths = create_app().openapi()["paths"]
    for path, method in [
        ("/api/v1/checkpoints", "post"), ("/api/v1/checkpoints/{checkpoint_id}", "get"), ("/api/v1/jobs", "post"),
        ("/api/v1/jobs/{job_id}", "get"), ("/api/v1/jobs/{job_id}/cancel", "post"),
        ("/api/v1/jobs/{job_id}/artifacts", "get"), ("/api/v1/jobs/{job_id}/events", "get"),
        ("/api/v1/jobs/{job_id}/clone", "post"), ("/api/v1/jobs/{job_id}/metrics", "get"),
        ("/api/v1/jobs/{job_id}/logs", "get"),
    ]:  # fmt: skip
        assert method in paths[path], (path, method)
