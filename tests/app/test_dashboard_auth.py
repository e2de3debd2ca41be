"""Browser login, sessions and CSRF, and escaping on the pages (in-process app, real SQLite)."""

from __future__ import annotations

import re

from sqlalchemy import update

from app import sessions
from worker.db import session_scope
from worker.models import ApiToken

from .conftest import _token, login


def page_csrf(client, path: str = "/jobs/new") -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).text)[1]


def test_session_cookies_are_signed_expire_and_name_no_token():
    key = b"k" * 32
    value = sessions.issue(key, token_id=7, user_id=3, max_age_s=60)
    s = sessions.read(key, value)
    assert (s.token_id, s.user_id) == (7, 3)
    assert sessions.read(b"other-key", value) is None
    body, sig = value.split(".")
    assert sessions.read(key, body[:-2] + "AA." + sig) is None
    assert sessions.read(key, sessions.issue(key, 7, 3, max_age_s=-1)) is None
    other = sessions.read(key, sessions.issue(key, 7, 3, 60))
    assert sessions.csrf_token(key, s) != sessions.csrf_token(key, other)  # per login
    assert sessions.csrf_ok(key, s, sessions.csrf_token(key, s))
    assert not sessions.csrf_ok(key, s, sessions.csrf_token(key, other)) and not sessions.csrf_ok(key, s, "")


def test_secret_key_is_created_once_and_kept(tmp_path):
    first = sessions.load_secret_key(None, tmp_path)
    assert first == sessions.load_secret_key(None, tmp_path) and len(first) > 40
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    assert sessions.load_secret_key("configured", tmp_path) == b"configured"


def test_pages_redirect_to_login_and_back(client, alice_token):
    r = client.get("/jobs?state=done", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/jobs%3Fstate%3Ddone"
    r = login(client, alice_token, "/jobs?state=done")
    assert r.status_code == 303 and r.headers["location"] == "/jobs?state=done"
    assert alice_token not in r.headers["set-cookie"] and "httponly" in r.headers["set-cookie"].lower()
    assert client.get("/jobs").status_code == 200


def test_login_needs_its_form_token_and_never_redirects_off_site(client, alice_token):
    assert client.post("/login", data={"token": alice_token}).status_code == 403
    assert login(client, "dfq_wrong").status_code == 401
    r = login(client, alice_token, "//evil.example/x")
    assert r.headers["location"] == "/"


def test_forms_and_cookie_authenticated_api_posts_need_the_csrf_token(
    client, alice_token, alice, ready_checkpoint
):
    job = client.post(
        "/api/v1/jobs", headers=alice, json={"checkpoint_id": ready_checkpoint, "spec": {"budget": "smoke"}}
    ).json()
    login(client, alice_token)
    csrf = page_csrf(client)
    assert client.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": "nope"}).status_code == 403
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 403
    assert client.get(f"/api/v1/jobs/{job['id']}").status_code == 200  # reading needs no token
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    client.cookies.clear()
    assert client.post(f"/api/v1/jobs/{job['id']}/clone", headers=alice, json={}).status_code == 201  # bearer


def test_revoking_the_token_ends_its_browser_sessions(client, settings, alice_token):
    login(client, alice_token)
    assert client.get("/jobs").status_code == 200
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(ApiToken).values(revoked=True))
    client.app.state.verifier._cache.clear()  # skip the few seconds a verified token is trusted
    assert client.get("/jobs", follow_redirects=False).status_code == 303
    assert client.get("/api/v1/jobs").status_code == 401


def test_logout_needs_the_csrf_token_and_clears_the_session(client, alice_token):
    login(client, alice_token)
    assert client.post("/logout", data={"csrf_token": "x"}).status_code == 403
    r = client.post("/logout", data={"csrf_token": page_csrf(client)}, follow_redirects=False)
    assert r.status_code == 303 and 'dfq_session=""' in r.headers["set-cookie"]


def test_what_users_typed_is_escaped_everywhere(client, settings, alice, alice_token, random_checkpoint):
    evil = "<script>alert(1)</script>"
    with random_checkpoint.open("rb") as f:
        r = client.post(
            "/api/v1/checkpoints", headers=alice, files={"file": f}, data={"arch": "resnet20", "name": evil}
        )
    assert r.status_code == 202
    login(client, alice_token)
    for path in ("/teachers", "/jobs/new"):
        html = client.get(path).text
        assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    csrf = page_csrf(client)
    html = client.post("/ui/jobs", data={"csrf_token": csrf, "bits": evil, "checkpoint_id": "x"}).text
    assert evil not in html and "&lt;script&gt;" in html


def test_the_new_job_form_shows_errors_and_keeps_what_was_typed(client, alice_token, ready_checkpoint):
    login(client, alice_token)
    csrf = page_csrf(client)
    r = client.post(
        "/ui/jobs",
        data={
            "csrf_token": csrf,
            "checkpoint_id": ready_checkpoint,
            "bits": "W4A4",
            "seed": "-1",
            "budget.preset": "smoke",
        },
    )
    assert r.status_code == 422
    assert re.search(r'data-error-for="seed">[^<]*greater than or equal to 0', r.text)
    assert 'name="seed" value="-1"' in r.text
    r = client.post(  # a preset name the select does not offer: a hand-made POST
        "/ui/jobs",
        data={"csrf_token": csrf, "checkpoint_id": ready_checkpoint, "bits": "W4A4", "quant.preset": "brecq"},
    )
    assert r.status_code == 422
    assert re.search(r'data-error-for="quant.preset">[^<]*unknown quant preset &#39;brecq&#39;', r.text)
    r = client.post(
        "/ui/jobs",
        data={
            "csrf_token": csrf,
            "checkpoint_id": ready_checkpoint,
            "bits": "W4A4",
            "budget.preset": "smoke",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and re.match(r"^/jobs/[0-9a-f]{32}$", r.headers["location"])
    page = client.get(r.headers["location"]).text
    assert "queued" in page and "/static/vendor/uplot/uPlot.iife.min.js" in page


def test_other_users_jobs_are_404_on_pages_too(client, settings, alice, alice_token, ready_checkpoint):
    job = client.post(
        "/api/v1/jobs", headers=alice, json={"checkpoint_id": ready_checkpoint, "spec": {"budget": "smoke"}}
    ).json()
    login(client, _token(settings, "bob"))
    assert client.get(f"/jobs/{job['id']}").status_code == 404
    assert client.get(f"/compare?ids={job['id']}").status_code == 404
    assert client.get(f"/jobs/new?clone={job['id']}").status_code == 404
    assert job["id"] not in client.get("/jobs").text


def test_the_jobs_list_filters(client, alice, alice_token, ready_checkpoint):
    for spec in ({"budget": "smoke", "bits": "W4A4"}, {"budget": "smoke", "bits": "W3A3", "method": "dsg"}):
        assert (
            client.post(
                "/api/v1/jobs", headers=alice, json={"checkpoint_id": ready_checkpoint, "spec": spec}
            ).status_code
            == 201
        )
    login(client, alice_token)

    def ids(query: str) -> int:
        return len(re.findall(r'<tr data-job-id="', client.get(f"/jobs?fragment=rows&{query}").text))

    assert ids("") == 2 and ids("method=dsg") == 1 and ids("bits=w3") == 1 and ids("state=running") == 0
    assert ids("state=queued&method=gdfq") == 1
