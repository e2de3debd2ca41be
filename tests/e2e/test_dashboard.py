"""The dashboard in a real browser (Debian's Chromium, headless) against a real server and worker
(`dfq serve`: SQLite, filesystem broker, forked job processes).

The tests run in order on one logged-in browser context, as a person would: log in, upload the
bundled teacher by drag and drop, get field errors from the new-job form, start a job and watch it
run to ``done`` (progress, curves, sample grids and attention maps whose pixel sizes are checked),
see the list refresh by itself, cancel a second job, compare the two. Each page is saved as a
screenshot under ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import base64
import re

import httpx
import pytest

from tests.e2e.browser import launch, screenshot_dir
from tests.e2e.stack import REPO, start_embedded

pytestmark = pytest.mark.slow
BUNDLED = REPO / "teachers" / "resnet20_fmnist.safetensors"
TIMEOUT_MS = 240_000
# The watched job: 20 iterations, a sample grid (and attention figure) every 5, evaluated at the end.
WATCHED = {
    "budget.eval_every": "2",
    "budget.epochs": "4",
    "budget.iters_per_epoch": "5",
    "budget.batch_size": "8",
    "budget.sample_every": "5",
}
# The cancelled job: long enough to be caught running.
LONG = {
    "budget.epochs": "60",
    "budget.iters_per_epoch": "10",
    "budget.batch_size": "8",
    "budget.sample_every": "50",
}
# ResNet-20 on 28x28: tiles upscaled 2x to 56 px. Samples: 4 per class, padding 2. Attention: 2 per
# class as (image, teacher, student) with 1 px inside a triple and 6 px between triples.
SAMPLES_PX = (4 * 58 + 2, 10 * 58 + 2)
ATTENTION_PX = (2 * (3 * 57 + 1 + 6) + 6, 10 * (58 + 6) + 6)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_embedded(tmp_path_factory.mktemp("dashboard"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def token(stack):
    return stack.token("alice")["Authorization"].split()[1]


@pytest.fixture(scope="module")
def shots():
    return screenshot_dir()


@pytest.fixture(scope="module")
def page(stack):
    with launch() as browser:
        context = browser.new_context(base_url=stack.base_url, viewport={"width": 1360, "height": 900})
        context.set_default_timeout(30_000)
        p = context.new_page()
        p.errors = []
        p.on("pageerror", lambda exc: p.errors.append(str(exc)))
        yield p
        context.close()


@pytest.fixture(scope="module")
def state():
    """What one test leaves for the next (ids of the teacher and the jobs)."""
    return {}


def shoot(page, shots, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def natural_size(page, selector: str) -> tuple[int, int]:
    """The image's decoded pixel size (0x0 until it has really loaded)."""
    return tuple(
        page.eval_on_selector(selector, "img => [img.complete ? img.naturalWidth : 0, img.naturalHeight]")
    )


def fill_fields(page, values: dict[str, str]) -> None:
    for name, value in values.items():
        field = page.locator(f'[name="{name}"]')
        field.evaluate("el => { const d = el.closest('details'); if (d) d.open = true; }")
        field.fill(value)


def test_login_refuses_a_wrong_token_then_lands_on_the_jobs_list(page, token, shots):
    page.goto("/jobs")
    assert re.search(r"/login\?next=/jobs$", page.url)
    page.fill('input[name="token"]', "dfq_not-a-token")
    page.click('button[type="submit"]')
    assert "unknown or revoked token" in page.locator('[role="alert"]').inner_text()
    shoot(page, shots, "01-login-error")
    page.fill('input[name="token"]', token)
    page.click('button[type="submit"]')
    page.wait_for_url("**/jobs")
    assert page.locator("h1").inner_text() == "Jobs"
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["dfq_session"]["httpOnly"] and token not in cookies["dfq_session"]["value"]
    shoot(page, shots, "02-jobs-empty")


def test_upload_by_drag_and_drop_shows_progress_and_intake_status(page, shots, state):
    page.goto("/teachers")
    archs = page.locator("#arch option").evaluate_all("os => os.map(o => o.value)")
    assert {"resnet20", "resnet18", "mobilenet_v2"} <= set(archs)
    b64 = base64.b64encode(BUNDLED.read_bytes()).decode()
    drop = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name));
            return dt;
        }""",
        [b64, BUNDLED.name],
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": drop})
    assert BUNDLED.name in page.locator("#file-name").inner_text()
    page.select_option("#arch", "resnet20")
    page.fill('input[name="name"]', "<b>my</b> teacher")  # shown as text, never as markup
    page.click("#upload-button")
    page.wait_for_function(
        "document.getElementById('upload-text').textContent.includes('is ready')", timeout=TIMEOUT_MS
    )
    assert page.eval_on_selector("#upload-bar", "b => b.value") == 100
    row = page.locator("#checkpoints tbody tr").first
    assert row.locator("td").first.inner_text() == "<b>my</b> teacher"
    assert row.locator("td b").count() == 0
    assert row.locator(".badge").inner_text() == "ready"
    state["checkpoint"] = row.get_attribute("data-checkpoint-id")

    # a file that is not a checkpoint: uploaded, then rejected by intake with its reason
    page.set_input_files(
        "#file",
        files=[
            {"name": "junk.pt", "mimeType": "application/octet-stream", "buffer": b"not a checkpoint" * 64}
        ],
    )
    page.click("#upload-button")
    page.wait_for_function(
        "document.getElementById('upload-text').textContent.includes('rejected')", timeout=TIMEOUT_MS
    )
    junk = page.locator("#checkpoints tbody tr").first
    assert junk.locator(".badge").inner_text() == "rejected"
    assert junk.locator(".field-error").inner_text().strip()
    shoot(page, shots, "03-teachers-upload")


def test_new_job_form_puts_validation_errors_next_to_their_fields(page, shots, state):
    page.goto(f"/jobs/new?checkpoint={state['checkpoint']}")
    page.fill('input[name="bits"]', "W1A1")
    page.fill('input[name="seed"]', "seven")
    fill_fields(page, {"budget.epochs": "2", "budget.warmup_epochs": "5"})
    page.click("#start-job")
    page.wait_for_load_state()
    for name, words in (("bits", "bit-width"), ("seed", "integer"), ("budget", "warmup_epochs")):
        error = page.locator(f'[data-error-for="{name}"]').first
        assert words in error.inner_text(), name
    # each error sits in the field (or fieldset) it is about
    assert page.locator('.field.invalid:has(input[name="bits"]) [data-error-for="bits"]').count() == 1
    assert page.locator('.field.invalid:has(input[name="seed"]) [data-error-for="seed"]').count() == 1
    assert (
        page.locator('details[open]:has(input[name="budget.epochs"]) [data-error-for="budget"]').count() == 1
    )
    assert page.locator('input[name="seed"]').input_value() == "seven"  # what was typed is kept
    shoot(page, shots, "04-new-job-errors")


def test_a_smoke_job_runs_to_done_with_live_progress_curves_samples_and_attention(page, shots, state):
    page.goto(f"/jobs/new?checkpoint={state['checkpoint']}")
    # the quantization preset's values show as the empty fields' placeholders, as the budget's do
    first = 'select[name="quant.weight_round"] option >> nth=0'
    assert page.locator(first).text_content() == "preset (nearest)"
    page.select_option("#quant-preset", "recon")
    assert page.locator(first).text_content() == "preset (adaround)"
    assert page.get_attribute('input[name="quant.round_act_lr"]', "placeholder") == "0.002"
    # nearest rounding picked over the preset: the fields that only serve its rounding show their defaults
    unit = 'select[name="quant.round_unit"] option >> nth=0'
    assert page.locator(unit).text_content() == "preset (block)"
    rounding = page.locator('select[name="quant.weight_round"]')
    rounding.evaluate("el => { el.closest('details').open = true; }")
    rounding.select_option("nearest")
    assert page.locator(unit).text_content() == "preset (layer)"
    assert page.get_attribute('input[name="quant.round_drop"]', "placeholder") == "0"
    assert page.get_attribute('input[name="quant.round_act_lr"]', "placeholder") == "0.00004"
    rounding.select_option("")
    assert page.locator(unit).text_content() == "preset (block)"
    page.select_option("#quant-preset", "")  # this job keeps the reference quantizer
    assert page.locator(first).text_content() == "preset (nearest)"
    page.fill('input[name="bits"]', "W4A4")
    page.select_option("#budget-preset", "smoke")
    page.fill('input[name="seed"]', "0")
    page.fill('input[name="eval"]', "fashion-mnist")
    page.fill('input[name="eval_limit"]', "300")
    page.select_option('select[name="device"]', "cpu")
    fill_fields(page, WATCHED)
    shoot(page, shots, "05-new-job-form")
    page.click("#start-job")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    state["done_job"] = page.url.rsplit("/", 1)[1]
    page.evaluate(
        "() => { window.__steps = []; const bar = document.getElementById('bar');"
        " setInterval(() => window.__steps.push([bar.value, bar.max]), 20); }"
    )
    page.wait_for_function("window.__steps.some(([v, m]) => v > 0 && v < m)", timeout=TIMEOUT_MS)
    shoot(page, shots, "06-job-running")
    page.wait_for_selector("#state .badge.state-done", timeout=TIMEOUT_MS)
    seen = page.evaluate("window.__steps")
    assert seen[-1][0] == seen[-1][1] == 20  # the bar reached the end ...
    assert len({v for v, _ in seen if 0 < v < 20}) >= 1  # ... after showing it in between
    assert page.locator("#transport").inner_text() in ("finished", "live (SSE)", "polling")

    # curves: one chart per logged metric, with data
    page.wait_for_selector('.chart[data-metric="g_loss"] canvas')
    metrics = set(page.locator(".chart").evaluate_all("cs => cs.map(c => c.dataset.metric)"))
    assert {"g_loss", "g_bns", "g_ce", "s_loss", "s_kd", "diag_corr", "lr_s", "eval:q_top1"} <= metrics
    assert page.eval_on_selector('.chart[data-metric="g_loss"] canvas', "c => c.width") > 100

    # sample grid and attention maps: images really decoded, at the engine's pixel sizes
    page.wait_for_function("document.getElementById('samples-img').naturalWidth > 0")
    page.wait_for_function("document.getElementById('attention-img').naturalWidth > 0")
    assert natural_size(page, "#samples-img") == SAMPLES_PX
    assert natural_size(page, "#attention-img") == ATTENTION_PX
    assert page.locator("#slider-count").inner_text() == "4 snapshots"
    assert page.locator("#class-labels li").all_inner_texts()[:2] == ["T-shirt/top", "Trouser"]
    page.locator("#step-slider").fill("0")
    page.wait_for_function("document.getElementById('samples-img').src.includes('step_000005')")
    page.wait_for_function("document.getElementById('attention-img').src.includes('step_000005')")
    page.wait_for_function("document.getElementById('samples-img').naturalWidth > 0")
    assert natural_size(page, "#samples-img") == SAMPLES_PX
    assert "5 / 20" in page.locator("#slider-step").inner_text()
    page.wait_for_function("document.getElementById('attention-stats').textContent.startsWith('Step 5')")
    page.locator("#step-slider").fill("3")

    # results rendered by the server once done: accuracy, per-layer error, artifacts, log
    page.wait_for_selector("#accuracy-table")
    table = page.locator("#accuracy-table").inner_text()
    assert "teacher (full precision) top-1 %" in table and "student (W4A4) top-1 %" in table
    assert page.locator("#layer-table tr").count() == 1 + 22
    links = page.locator("#artifacts a").evaluate_all("as => as.map(a => a.textContent)")
    assert {"quantized.safetensors", "report.json", "samples.png", "attention.png"} <= set(links)
    status = page.evaluate(
        "fetch(document.querySelector('#artifacts a[href$=\"quantized.safetensors\"]').href).then(r => r.status)"
    )
    assert status == 200
    assert "job done" in page.locator("#log").inner_text()
    assert page.locator("#cancel-button").count() == 0
    assert not page.errors, page.errors
    shoot(page, shots, "07-job-done")


def test_the_jobs_list_refreshes_itself_and_a_running_job_can_be_cancelled(page, shots, state):
    page.goto(f"/jobs/new?checkpoint={state['checkpoint']}")
    page.select_option("#budget-preset", "smoke")
    page.select_option('select[name="device"]', "cpu")
    page.fill('input[name="eval"]', "")
    fill_fields(page, LONG)
    page.click("#start-job")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    job = page.url.rsplit("/", 1)[1]
    state["cancelled_job"] = job

    page.goto("/jobs")
    row = page.locator(f'tr[data-job-id="{job}"]')
    first = row.locator(".progress-cell").inner_text()
    # no reload: the script swaps in fresh rows while the job runs
    page.wait_for_function(
        "([id, first]) => { const r = document.querySelector(`tr[data-job-id='${id}'] .progress-cell`);"
        " return r && r.textContent.trim() !== first.trim() && !r.textContent.trim().startsWith('0/'); }",
        arg=[job, first],
        timeout=TIMEOUT_MS,
    )
    assert row.locator(".badge").inner_text() == "running"
    assert page.locator(f'tr[data-job-id="{state["done_job"]}"] .badge').inner_text() == "done"
    assert re.match(r"\d+\.\d\d%", page.locator(f'tr[data-job-id="{state["done_job"]}"] td.num').inner_text())
    shoot(page, shots, "08-jobs-list")

    # the job page without EventSource (a proxy that breaks SSE looks the same): it polls instead
    polling = page.context.new_page()
    polling.add_init_script("delete window.EventSource")
    polling.goto(f"/jobs/{job}")
    polling.wait_for_function("document.getElementById('transport').textContent === 'polling'")
    start = int(polling.locator("#step").inner_text())
    polling.wait_for_function(
        f"Number(document.getElementById('step').textContent) >= {max(start + 2, 5)}", timeout=TIMEOUT_MS
    )
    assert polling.eval_on_selector("#bar", "b => b.value") >= start + 2
    polling.close()

    page.goto(f"/jobs/{job}")
    page.wait_for_function("Number(document.getElementById('step').textContent) >= 5", timeout=TIMEOUT_MS)
    page.click("#cancel-button")
    page.wait_for_selector("#state .badge.state-cancelled", timeout=TIMEOUT_MS)
    assert (
        "cancel requested" in page.locator("#log").inner_text()
        or "job cancelled" in page.locator("#log").inner_text()
    )
    shoot(page, shots, "09-job-cancelled")

    page.goto("/jobs?state=cancelled")
    assert page.locator("#jobs-rows tr[data-job-id]").count() == 1
    assert page.locator(f'tr[data-job-id="{job}"]').count() == 1


def test_compare_overlays_curves_and_shows_grids_side_by_side(page, shots, state):
    page.goto("/jobs")
    for job in (state["done_job"], state["cancelled_job"]):
        page.check(f'input[name="ids"][value="{job}"]')
    page.click("#compare-button")
    page.wait_for_url("**/compare?*")
    assert page.locator("#compare-table tbody tr").count() == 2
    page.wait_for_selector('.chart[data-metric="g_loss"] canvas')
    legend = page.locator('.chart[data-metric="g_loss"] .u-legend .u-series').all_inner_texts()
    assert sum(state["done_job"][:8] in t for t in legend) == 1
    assert sum(state["cancelled_job"][:8] in t for t in legend) == 1
    page.wait_for_function(
        "[...document.querySelectorAll('img.compare-samples')].every(i => i.naturalWidth > 0)"
    )
    assert natural_size(page, f'figure[data-job-id="{state["done_job"]}"] img.compare-samples') == SAMPLES_PX
    assert (
        natural_size(page, f'figure[data-job-id="{state["done_job"]}"] img.compare-attention') == ATTENTION_PX
    )
    assert not page.errors, page.errors
    shoot(page, shots, "10-compare")


def test_the_readmes_two_clicks_bundled_teacher_then_start(page, shots, state):
    page.goto("/jobs/new")
    page.click("#bundled-form button")
    page.wait_for_url(re.compile(r"/jobs/new\?checkpoint=[0-9a-f]{32}$"))
    new_id = page.url.rsplit("=", 1)[1]
    # picked at once, enabled as soon as intake has validated it (no reload)
    page.wait_for_function(
        "id => { const o = document.querySelector('#checkpoint option:checked');"
        " return o && o.value === id && !o.disabled; }",
        arg=new_id,
        timeout=TIMEOUT_MS,
    )
    assert "resnet20_fmnist" in page.locator("#checkpoint option:checked").inner_text()
    shoot(page, shots, "12-new-job-bundled")


def test_clone_fills_the_form_with_the_jobs_spec(page, shots, state):
    page.goto(f"/jobs/{state['done_job']}")
    page.click("#clone-button")
    page.wait_for_url(f"**/jobs/new?clone={state['done_job']}")
    assert page.locator('input[name="bits"]').input_value() == "W4A4"
    assert page.locator('input[name="budget.epochs"]').input_value() == "4"
    assert page.locator('input[name="cloned_from"]').input_value() == state["done_job"]
    shoot(page, shots, "11-clone-form")


def test_pages_need_a_session_and_api_posts_from_it_need_the_csrf_header(stack, page, state):
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    with httpx.Client(base_url=stack.base_url, cookies=cookies, timeout=30) as client:
        assert client.get(f"/api/v1/jobs/{state['done_job']}").status_code == 200
        assert client.post(f"/api/v1/jobs/{state['done_job']}/clone", json={}).status_code == 403
    with httpx.Client(base_url=stack.base_url, timeout=30) as anonymous:
        assert anonymous.get(f"/jobs/{state['done_job']}").status_code == 303
