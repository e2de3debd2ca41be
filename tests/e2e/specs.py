"""Job specs and the teacher file the end-to-end tests and the service benchmarks submit."""

from __future__ import annotations

from tests.e2e.stack import REPO

BUNDLED = REPO / "teachers" / "resnet20_fmnist.safetensors"
TINY = {"preset": "smoke", "epochs": 2, "iters_per_epoch": 2, "batch_size": 8}
SMOKE = {"bits": "W4A4", "budget": TINY, "device": "cpu"}
# Long enough to be caught mid-run (60 iterations), state saved every 2 iterations.
LONG = {
    "bits": "W4A4",
    "budget": {
        "preset": "smoke",
        "epochs": 6,
        "iters_per_epoch": 10,
        "batch_size": 8,
        "warmup_epochs": 1,
        "checkpoint_every": 2,
        "sample_every": 100,
    },
    "device": "cpu",
}
# Long enough to be caught mid-run by an injected fault (30 iterations), short enough for CI.
FAULT_SPEC = {**LONG, "budget": {**LONG["budget"], "epochs": 3}}
