"""bench/speed.py's tables: a configuration that failed or ran out of memory is a row, not the end."""

from __future__ import annotations

import json

import pytest
import torch

from tests.bench.scripts import load_bench


@pytest.fixture(scope="module")
def speed():
    return load_bench("speed")


def _row(tree: str, s_per_it: float, **extra) -> dict:
    return {
        "tree": tree, "teacher": "resnet20_fmnist", "method": "gdfq", "bits": "W4A4", "batch": 128,
        "iters": 5, "s_per_it": s_per_it, "cpu_s_per_it": s_per_it * 1.5, "it_per_s": 1 / s_per_it,
        "img_per_s": 128 / s_per_it, "peak_mem_mb": 1400.0, "threads": 2, **extra,
    }  # fmt: skip


def test_failed_and_out_of_memory_rows_keep_their_place(speed):
    failed = {"tree": "this", "teacher": "resnet50@3x224x224", "method": "gdfq", "bits": "W4A4", "batch": 256}
    lines = speed.markdown([_row("this", 0.5), failed | {"error": "Traceback ..."}, failed | {"oom": "CUDA"}])
    body = lines.strip().splitlines()[2:]
    assert len(body) == 3
    assert "| 0.500 |" in body[0]
    assert "| failed |" in body[1] and "| out of memory |" in body[2]


def test_split_pairs_only_rows_that_measured(speed, tmp_path):
    rows = [_row("base", 1.0), _row("this", 0.5), {**_row("this", 0.1), "error": "boom"}]
    for r in rows[2:]:
        for k in ("s_per_it", "cpu_s_per_it", "it_per_s", "img_per_s", "peak_mem_mb"):
            r.pop(k)
    (tmp_path / "ab.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    speed.split(tmp_path, ["ab"])
    compare = (tmp_path / "speed-compare.md").read_text()
    assert "| 2.00x |" in compare  # base 1.0 s/it against this 0.5
    assert compare.count("| resnet20_fmnist |") == 1


def test_a_random_teacher_gets_measured_bn_statistics(speed):
    """The init's (0, 1) make every eval-mode BN the identity; the bench settles them on inputs first."""
    model, classes, shape = speed._teacher("resnet20@1x28x28/10")
    assert (classes, shape) == (10, (1, 28, 28))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not model.training
    assert all(not torch.equal(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)
    assert all(bn.num_batches_tracked.item() == 2 for bn in bns)
