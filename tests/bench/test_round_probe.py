"""bench/round_probe.py: the rounding steps of a finished ``calibrate`` job, redone on its generator."""

from __future__ import annotations

import pytest
import torch

from dfq.job import run_job
from dfq.spec import JobSpec
from tests.bench.scripts import load_bench


def _spec(**quant) -> JobSpec:
    return JobSpec.model_validate(
        {
            "bits": "W3A3",
            "budget": {
                "preset": "calibrate",
                "epochs": 2,
                "warmup_epochs": 2,
                "iters_per_epoch": 2,
                "batch_size": 8,
            },
            "eval": "fashion-mnist",
            "eval_limit": 300,
            "device": "cpu",
            "quant": {
                "act_clip": "bn-mse",
                "weight_round": "adaround",
                "round_iters": 20,
                "round_images": 64,
                **quant,
            },
        }
    )


@pytest.fixture
def one_thread():
    """The probe runs at the job's thread count (``--threads``): float sums, and so W3A3 results, depend on
    it; here every job and probe runs at 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_probe_repeats_the_job_and_a_variant_is_the_job_with_that_switch(tmp_path, one_thread):
    """With nothing changed the probe is the job's own computation (same top-1 to the digit); a variant
    equals a job run with that switch from the start, so its figures are what such a job would give."""
    probe = load_bench("round_probe")
    job = run_job(_spec(bias_correct=True), "resnet20_fmnist", tmp_path / "job")
    same = probe.probe(tmp_path / "job", {}, threads=1)
    assert same["q_top1"] == same["job_q_top1"] == job["q_top1"]
    other = run_job(_spec(bias_correct=True, round_drop=0.5), "resnet20_fmnist", tmp_path / "other")
    variant = probe.probe(tmp_path / "job", {"round_drop": 0.5}, threads=1)
    assert variant["q_top1"] == other["q_top1"]
    assert variant["quant"] == {"round_drop": 0.5}


def test_the_probe_refuses_a_job_whose_student_was_trained(tmp_path, one_thread):
    probe = load_bench("round_probe")
    data = _spec().canonical()
    data["budget"] = {
        "preset": "smoke",
        "epochs": 2,
        "warmup_epochs": 1,
        "iters_per_epoch": 2,
        "batch_size": 8,
    }
    run_job(JobSpec.model_validate(data), "resnet20_fmnist", tmp_path)
    with pytest.raises(SystemExit, match="its student was trained"):
        probe.probe(tmp_path, {}, threads=1)


def test_the_probe_tries_learnt_steps_but_refuses_a_job_that_learnt_them(tmp_path, one_thread):
    """A job that learnt its activation steps (``quant.round_act: lsq``) ended on other ranges than
    training's, so the probe cannot start from them; learning them as a variant of a job that held them
    is what the probe is for."""
    probe = load_bench("round_probe")
    block = {"round_unit": "block", "round_act": "lsq"}
    run_job(_spec(), "resnet20_fmnist", tmp_path / "held")
    variant = probe.probe(tmp_path / "held", block, threads=1)
    assert variant["quant"] == block and 0 <= variant["q_top1"] <= 100
    run_job(_spec(**block), "resnet20_fmnist", tmp_path / "learnt")
    with pytest.raises(SystemExit, match="learnt the activation ranges"):
        probe.probe(tmp_path / "learnt", {}, threads=1)
