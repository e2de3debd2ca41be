"""The SSE stream's merge of a polled job row with what pub/sub already relayed (pure logic)."""

from app.api.events import _with_relayed

ROW = {"state": "running", "phase": "warmup", "step": 1, "error": None}


def test_a_row_behind_the_relayed_step_does_not_move_progress_back():
    assert _with_relayed(ROW, {"step": 2, "phase": "finetune"}) == {
        **ROW,
        "step": 2,
        "phase": "finetune",
    }


def test_a_row_at_or_ahead_of_the_relayed_step_is_sent_as_it_is():
    assert _with_relayed(ROW, {"step": 1, "phase": "warmup"}) is ROW
    assert _with_relayed({**ROW, "step": 3}, {"step": 2})["step"] == 3
    assert _with_relayed(ROW, {}) is ROW


def test_a_job_that_is_no_longer_running_is_the_row_s_truth():
    done = {**ROW, "state": "done", "step": 1}
    assert _with_relayed(done, {"step": 4}) is done
    queued = {**ROW, "state": "queued", "step": 0}  # e.g. requeued after its worker died
    assert _with_relayed(queued, {"step": 3}) is queued
