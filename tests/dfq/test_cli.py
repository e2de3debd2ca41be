"""`dfq quantize` as a real process: output, bad input, and a SIGKILL followed by a resume."""

import json
import os
import signal
import subprocess
import sys
import time

SPEC = {
    "budget": {"preset": "smoke", "epochs": 4, "iters_per_epoch": 4, "batch_size": 16, "checkpoint_every": 1},
    "device": "cpu",
}


def _dfq(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dfq.cli", *args], capture_output=True, text=True, **kw)


def test_invalid_spec_exits_2_with_the_field():
    proc = _dfq("quantize", "--teacher", "resnet20_fmnist", "--bits", "W0A4", "--out", "/tmp/never")
    assert proc.returncode == 2 and "quant.w_bits" in proc.stderr


def test_unknown_teacher_exits_2():
    proc = _dfq("quantize", "--teacher", "nope", "--budget", "smoke", "--out", "/tmp/never")
    assert proc.returncode == 2 and "neither a bundled teacher" in proc.stderr


def test_sigkill_then_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    args = [
        "quantize",
        "--teacher",
        "resnet20_fmnist",
        "--bits",
        "W4A4",
        "--spec",
        json.dumps(SPEC),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfq.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "state.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()

    done = _dfq(*args, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] >= 5
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 17))  # each step exactly once: lines past the checkpoint were replaced
    # and a third run finds the finished report instead of training again
    again = _dfq(*args, timeout=120)
    assert again.returncode == 0 and "already holds a finished run" in again.stderr


def test_spec_is_json_text_or_a_file_even_when_longer_than_a_file_name(tmp_path):
    # JSON text over 255 bytes once crashed the path check (OSError: File name too long)
    from dfq.cli import _read_spec_text

    long = json.dumps({"quant": {"act_clip": "bn-mse"}, "budget": {"lr_milestones": list(range(80))}})
    assert len(long) > 255 and _read_spec_text(long) == long
    f = tmp_path / "spec.json"
    f.write_text(long)
    assert _read_spec_text(str(f)) == long


def test_the_quant_flag_names_a_preset_alone_or_over_a_spec():
    from dfq.cli import _spec_from_args, build_parser

    def spec(*argv):
        return _spec_from_args(build_parser().parse_args(["quantize", "--teacher", "t", "--out", "x", *argv]))

    assert spec("--bits", "W3A3", "--quant", "recon").quant.round_act == "lsq"
    over = spec("--spec", json.dumps({"quant": {"act_mse_weight": "uniform"}}), "--quant", "recon")
    assert over.quant.preset == "recon" and over.quant.act_mse_weight == "uniform"  # the spec's field stays
    assert spec("--bits", "W3A3").quant.preset is None
