"""k-bit packing math (hand-computed bytes) and the packed safetensors round trip."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dfq.models.checkpoint import CheckpointError
from dfq.models.registry import build_model
from dfq.quant import QuantLayer, quantize
from dfq.quant.packed import FrozenWeight, load_packed, load_packed_into, save_packed
from dfq.quant.packing import pack_codes, packed_nbytes, unpack_codes
from dfq.spec import JobSpec, QuantSpec
from tests.dfq.conftest import calibrate


def test_three_bit_codes_pack_little_endian_by_hand():
    # 5 | 3 << 3 | 7 << 6 = 477 = 0b1_1101_1101 -> bytes 0b11011101 = 221, then 1
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [221, 1]
    # a fourth code fills bits 9..11: 2 << 9 = 1024 -> second byte 1 + 4 = 5
    assert pack_codes(torch.tensor([5, 3, 7, 2]), 3).tolist() == [221, 5]


def test_two_and_four_bit_codes_by_hand():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([0xA, 0x3, 0xF]), 4).tolist() == [0x3A, 0x0F]
    assert pack_codes(torch.tensor([200, 7]), 8).tolist() == [200, 7]


def test_sizes_are_ceil_of_bits():
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(10, 2) == 3
    assert pack_codes(torch.zeros(1000, dtype=torch.long), 5).numel() == packed_nbytes(1000, 5) == 625


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip(bits):
    codes = torch.from_numpy(np.random.default_rng(bits).integers(0, 2**bits, size=1001))
    codes[0], codes[1] = 0, 2**bits - 1  # both ends of the range
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 1001), codes)


def test_rejects_codes_that_do_not_fit_and_wrong_lengths():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 3)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([1]), 17)


def _student(bits, arch="resnet20", in_ch=1, size=16, per_channel=True):
    torch.manual_seed(bits)
    model = build_model(arch, 10, in_ch).train()
    with torch.no_grad():
        model(torch.randn(8, in_ch, size, size))  # non-trivial BN statistics
    student = quantize(model.eval(), QuantSpec(w_bits=bits, a_bits=bits, per_channel=per_channel))
    calibrate(student, torch.randn(8, in_ch, size, size), steps=1)
    return student.eval()


@pytest.mark.parametrize("bits", range(2, 9))
def test_packed_round_trip_is_bit_exact(tmp_path, bits):
    student = _student(bits)
    summary = save_packed(student, tmp_path / "p.safetensors")
    assert summary["bit_exact"]
    fresh = quantize(build_model("resnet20", 10, 1), QuantSpec(w_bits=bits, a_bits=bits))
    loaded = load_packed_into(fresh, tmp_path / "p.safetensors")
    for (name, a), b in zip(
        ((n, m) for n, m in student.named_modules() if isinstance(m, QuantLayer)),
        (m for m in loaded.modules() if isinstance(m, QuantLayer)),
        strict=True,
    ):
        assert isinstance(b, FrozenWeight), name
        assert torch.equal(a.quantized_weight(), b.quantized_weight()), name
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(student(x), loaded(x))
    # k bits per weight, not 8 or 32
    n_weights = sum(m.weight.numel() for m in student.modules() if isinstance(m, QuantLayer))
    n_layers = sum(isinstance(m, QuantLayer) for m in student.modules())
    assert n_weights * bits / 8 <= summary["weight_bytes_packed"] <= n_weights * bits / 8 + n_layers


def test_per_tensor_and_mixed_bits_round_trip(tmp_path):
    student = _student(3, per_channel=False)
    save_packed(student, tmp_path / "p.safetensors")
    loaded = load_packed_into(
        quantize(build_model("resnet20", 10, 1), QuantSpec(w_bits=3, a_bits=3, per_channel=False)),
        tmp_path / "p.safetensors",
    )
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(student(x), loaded(x))


def test_load_packed_rebuilds_from_metadata_alone(tmp_path):
    student = _student(4)
    spec = JobSpec.model_validate({"bits": "W4A4"})
    info = {
        "name": "t",
        "arch": "resnet20",
        "num_classes": 10,
        "input_shape": [1, 16, 16],
        "mean": [0.0],
        "std": [1.0],
    }
    meta = {"spec": json.dumps(spec.canonical()), "teacher": json.dumps(info)}
    save_packed(student, tmp_path / "p.safetensors", meta)
    loaded, spec2, info2 = load_packed(tmp_path / "p.safetensors")
    assert spec2 == spec and info2.arch == "resnet20"
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(student(x), loaded(x))
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert f.get_tensor("conv1.weight.packed").dtype == torch.uint8
        keys = set(f.keys())
        assert "conv1.weight" not in keys  # no float copy of quantized weights


def test_mismatched_model_is_refused(tmp_path):
    save_packed(_student(4), tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="does not match"):
        load_packed_into(
            quantize(build_model("resnet20", 10, 1), QuantSpec(w_bits=3, a_bits=3)),
            tmp_path / "p.safetensors",
        )
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a dfq packed"):
        load_packed(tmp_path / "other.safetensors")
