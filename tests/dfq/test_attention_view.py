"""The teacher-vs-student attention figure: right maps, right picture, no side effects on the run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dfq.attention import default_stage
from dfq.attention_view import attention_figure, attention_pair, heat, map_stats, save_attention
from dfq.quant import quantize, set_calibration
from dfq.quant.modules import ActQuant
from dfq.spec import QuantSpec

MEAN, STD = (0.5,), (0.25,)


@pytest.fixture
def pair(tiny_teacher):
    student = quantize(tiny_teacher, QuantSpec(w_bits=4, a_bits=4)).eval()
    set_calibration(student, True)
    with torch.no_grad():
        student(torch.randn(16, 1, 28, 28))  # ranges exist, and calibration stays on (mid-run)
    return tiny_teacher, student


def _quant_state(model):
    return [
        (m.calibrating, m.raw_min.clone(), m.raw_max.clone(), m.updates.clone())
        for m in model.modules()
        if isinstance(m, ActQuant)
    ]


def test_maps_are_distributions_and_leave_both_models_as_they_were(pair):
    teacher, student = pair
    stage = default_stage(teacher, (1, 28, 28))
    before = _quant_state(student)
    student.train()
    images = torch.randn(6, 1, 28, 28)
    t_maps, s_maps = attention_pair(teacher, student, images, stage)
    assert t_maps.shape == s_maps.shape == (6, 7, 7)  # ResNet-20's last stage on 28x28 inputs
    assert torch.allclose(t_maps.flatten(1).sum(1), torch.ones(6), atol=1e-5)
    assert torch.allclose(s_maps.flatten(1).sum(1), torch.ones(6), atol=1e-5)
    assert not torch.allclose(t_maps, s_maps)  # 4-bit activations do move the maps
    after = _quant_state(student)
    assert all(
        a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
        for a, b in zip(before, after, strict=True)
    )
    assert student.training and not teacher.training


def test_stats_are_zero_for_identical_maps_and_one_for_disjoint_ones():
    a = torch.zeros(2, 4, 4)
    a[:, 0, 0] = 1.0
    b = torch.zeros(2, 4, 4)
    b[:, 3, 3] = 1.0
    same, apart = map_stats(a, a), map_stats(a, b)
    assert same == {"tv": [0.0, 0.0], "center_shift": [0.0, 0.0]}
    assert apart["tv"] == [1.0, 1.0]
    assert apart["center_shift"][0] == pytest.approx((2 * 0.75**2) ** 0.5, abs=1e-4)


def test_heat_runs_dark_to_bright():
    maps = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    rgb = heat(maps, (2, 2), torch.tensor([1.0]))
    brightness = rgb.sum(1)[0]
    assert brightness[0, 0] < brightness[1, 1] < brightness[0, 1] < brightness[1, 0]
    assert rgb.min() >= 0 and rgb.max() <= 1


def test_figure_layout_is_image_teacher_student_per_sample(pair, tmp_path):
    teacher, student = pair
    images = torch.randn(10 * 2, 1, 28, 28)  # 10 classes x 2 samples, grouped by class
    stage = default_stage(teacher, (1, 28, 28))
    summary = save_attention(teacher, student, images, stage, tmp_path / "attention.png", MEAN, STD, 2)
    with Image.open(tmp_path / "attention.png") as im:
        # tiles upscaled to 56 px; a triple is 3 * (56 + 1) + 1 wide, rows are 56 + 2 high plus 6 px gaps
        assert im.size == (2 * (172 + 6) + 6, 10 * (58 + 6) + 6) and im.mode == "RGB"
    on_disk = json.loads((tmp_path / "attention.json").read_text())
    assert on_disk == summary and summary["stage"] == stage and len(summary["tv"]) == 20
    assert 0 < summary["tv_mean"] < 1 and summary["columns"] == ["image", "teacher", "student"]


def test_the_first_tile_of_a_triple_is_the_image_itself():
    images = torch.full((2, 1, 64, 64), 0.0)  # normalised 0 -> display 0.5 grey
    maps = torch.rand(2, 8, 8)
    fig = attention_figure(images, maps, maps, MEAN, STD, 2)
    tile = fig[:, 7 : 7 + 64, 7 : 7 + 64]  # outer padding 6, inner padding 1
    assert torch.allclose(tile, torch.full_like(tile, 0.5))
    teacher_tile = fig[:, 7 : 7 + 64, 7 + 65 : 7 + 65 + 64]
    student_tile = fig[:, 7 : 7 + 64, 7 + 130 : 7 + 130 + 64]
    assert torch.equal(teacher_tile, student_tile) and not torch.allclose(teacher_tile, tile)


def test_nan_maps_draw_as_cold_instead_of_crashing():
    maps = torch.rand(2, 4, 4)
    maps[0] = float("nan")
    rgb = heat(maps, (8, 8), torch.tensor([float("nan"), 1.0]))
    assert rgb.shape == (2, 3, 8, 8) and torch.isfinite(rgb).all()
    assert torch.equal(rgb[0], heat(torch.zeros(1, 4, 4), (8, 8), torch.ones(1))[0])
