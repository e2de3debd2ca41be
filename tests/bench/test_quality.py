"""bench/quality.py's aggregation: pure logic on report dicts shaped like ``dfq quantize``'s report.json."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.bench.scripts import load_bench


@pytest.fixture(scope="module")
def quality():
    return load_bench("quality")


def _report(seed: int, q: float, agreement: float, best: float | None = None) -> dict:
    report = {
        "teacher": {"name": "resnet20_fmnist"},
        "label": "gdfq",
        "bits": "W3A3",
        "layers": "F3L3",
        "kd_reduction": "mean",
        "act_range": "debiased",
        "seed": seed,
        "fp_top1": 92.4,
        "q_top1": q,
        "agreement": agreement,
        "wall_s": 600.0 + seed,
        "it_per_s": 0.5,
        "peak_mem_mb": 1400.0 + seed,
        "iterations": 400,
        "n_eval": 10000,
        "device": "cpu",
        "threads": 1,
    }
    if best is not None:  # a run without per-epoch evaluations has no best_epoch key (dfq/job.py)
        report["best_epoch"] = {"q_top1": best, "n_eval": 2000}
    return report


def test_rows_keep_every_seed_beside_the_mean(quality):
    reports = [_report(0, 70.35, 72.0, 71.0), _report(1, 86.07, 88.0, 86.5)]
    (row,) = quality.aggregate(reports)
    assert row["seeds"] == [0, 1]
    assert [p["q_top1"] for p in row["per_seed"]] == [70.35, 86.07]
    assert [p["q_top1_best_epoch"] for p in row["per_seed"]] == [71.0, 86.5]
    assert row["q_top1"] == {"mean": 78.21, "std": 11.12, "n": 2}  # (70.35 + 86.07) / 2, |d| / sqrt(2)
    assert row["peak_mem_mb"] == 1401.0
    table = quality.markdown([row], "cpu")
    assert "| 78.21 ± 11.12 | s0 70.35, s1 86.07 |" in table
    header, rule, line = table.splitlines()[:3]
    assert header.count("|") == rule.count("|") == line.count("|")


def test_a_run_without_best_epoch_has_no_best_epoch_mean(quality):
    (row,) = quality.aggregate([_report(0, 80.0, 81.0, 82.0), _report(1, 84.0, 85.0)])
    assert row["q_top1_best_epoch"] is None
    assert row["per_seed"][1]["q_top1_best_epoch"] is None


def test_a_failed_run_is_its_own_row_with_the_same_columns(quality):
    failed = {"failed": True, "error": "error: student diverged", "tag": "t", "label": "fdda"}
    failed |= {"teacher": "resnet20_fmnist", "bits": "W3A3", "seed": 0}
    rows = quality.aggregate([failed, _report(0, 80.0, 81.0)])
    assert rows[0]["failed"] == "error: student diverged"
    lines = quality.markdown(rows, "cpu").splitlines()
    assert lines[2].count("|") == lines[0].count("|") == lines[3].count("|")


def test_rows_record_the_budget_as_it_resolved(quality):
    report = _report(0, 88.0, 90.0)
    report["spec"] = {"budget": {"preset": "cpu", "warmup_epochs": 8}, "quant": {"calibration_epochs": 8}}
    (row,) = quality.aggregate([report])
    assert row["schedule"] == {"budget": {"preset": "cpu", "warmup_epochs": 8}, "calibration_epochs": 8}
    (old,) = quality.aggregate([_report(0, 88.0, 90.0)])  # a report without its spec
    assert old["schedule"] is None


def test_provenance_names_the_commit_and_the_machine(quality):
    code = quality.provenance()
    assert len(code["commit"]) == 40
    assert isinstance(code["dirty_engine"], bool)
    assert code["cores"] >= 1 and code["cpu"]


def test_cpu_model_reads_family_model_and_stepping_of_the_first_core(quality):
    lines = ["processor\t: 0", "cpu family\t: 25", "model\t\t: 17", "model name\t: AMD EPYC", "stepping\t: 1"]
    lines += ["processor\t: 1", "cpu family\t: 6", "model\t\t: 143"]
    assert quality.cpu_model(quality.cpuinfo_fields(lines)) == "family 25 model 17 stepping 1"
    assert quality.cpu_model(quality.cpuinfo_fields([])) == ""


def test_isa_cap_sets_all_three_libraries_and_native_inherits(quality):
    base = {"PATH": "/bin", "MKL_CBWR": "COMPATIBLE"}
    capped = quality.child_env("avx2", base)
    assert capped["ATEN_CPU_CAPABILITY"] == "avx2"
    assert capped["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert capped["MKL_CBWR"] == "AVX2"  # a cap overrides what the caller exported
    assert quality.child_env("native", base) == base
    assert base == {"PATH": "/bin", "MKL_CBWR": "COMPATIBLE"}  # the caller's dict is not edited
    with pytest.raises(ValueError, match="unknown --isa"):
        quality.child_env("avx9", base)


def test_isa_cap_reaches_pytorch_in_the_child_process(quality):
    """The cap is read when torch starts: a real child process reports the capped capability (on an
    AVX-512 machine this is where it would differ from the parent's own)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    capped = quality.child_env("avx2")
    out = subprocess.run(
        [sys.executable, "-c", probe], env=capped, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "AVX2"
    env = quality.child_env("native")
    env["ATEN_CPU_CAPABILITY"] = "default"  # the probe can tell capabilities apart at all
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DEFAULT"


def test_provenance_records_the_isa_cap(quality):
    code = quality.provenance("avx2")
    assert code["isa"] == "avx2"
    assert code["isa_env"] == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2",
    }
    assert code["cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "NO AVX", "ZVECTOR", "VSX"}


def test_a_failure_names_its_cause_not_pydantics_docs_link(quality):
    rejected = (
        "invalid job spec:\n1 validation error for JobSpec\nbudget.calibration_epochs\n"
        "  Extra inputs are not permitted [type=extra_forbidden, input_value=8, input_type=int]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/extra_forbidden\n"
    )
    reason = quality.failure_reason(rejected, 2)
    assert "budget.calibration_epochs" in reason and "Extra inputs are not permitted" in reason
    assert "errors.pydantic.dev" not in reason
    assert quality.failure_reason("Traceback ...\nerror: student diverged at step 3\n", 1) == (
        "error: student diverged at step 3"
    )
    assert quality.failure_reason("", 137) == "exit status 137"
