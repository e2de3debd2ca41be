"""Checkpoint loading: the happy paths and every refusal, with messages a user can act on."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfq.models.checkpoint import CheckpointError, load_state_dict, require_batchnorm
from dfq.models.registry import UnknownArchitecture, build_model
from dfq.models.teachers import load_checkpoint_model, resolve_teacher


@pytest.fixture
def r20_state():
    return build_model("resnet20", 7, 1).state_dict()


def test_safetensors_and_zip_state_dicts_load(tmp_path, r20_state):
    save_file(r20_state, tmp_path / "a.safetensors")
    torch.save(r20_state, tmp_path / "b.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in r20_state.items()}}, tmp_path / "c.pt")
    for name in ("a.safetensors", "b.pt", "c.pt"):
        model, info = load_checkpoint_model(tmp_path / name, "resnet20", (28, 28))
        assert (info.num_classes, info.input_shape) == (7, (1, 28, 28))  # read off the checkpoint
        assert torch.equal(model.state_dict()["fc.weight"], r20_state["fc.weight"])


def test_unknown_architecture(tmp_path, r20_state):
    save_file(r20_state, tmp_path / "a.safetensors")
    with pytest.raises(UnknownArchitecture, match="unknown architecture 'resnet21'"):
        load_checkpoint_model(tmp_path / "a.safetensors", "resnet21")


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path, r20_state):
    save_file(r20_state, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match architecture 'resnet32'.*missing keys"):
        load_checkpoint_model(tmp_path / "a.safetensors", "resnet32")
    with pytest.raises(CheckpointError, match="does not match architecture 'resnet18'"):
        load_checkpoint_model(tmp_path / "a.safetensors", "resnet18")


def test_shape_mismatch_is_named(tmp_path, r20_state):
    r20_state["layer1.0.conv2.weight"] = torch.zeros(16, 16, 5, 5)
    save_file(r20_state, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e.g. layer1.0.conv2.weight"):
        load_checkpoint_model(tmp_path / "a.safetensors", "resnet20")


def test_model_without_batchnorm_is_refused():
    with pytest.raises(CheckpointError, match="no BatchNorm layers"):
        require_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)))
    assert require_batchnorm(build_model("resnet20")) == 21


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['DFQ_TEST_MARKER']}",))


def test_pickled_code_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DFQ_TEST_MARKER", str(marker))
    torch.save({"weight": torch.zeros(1), "evil": _RunsCode()}, tmp_path / "zip.pt")
    (tmp_path / "legacy.pkl").write_bytes(pickle.dumps(_RunsCode()))
    torch.save({"w": torch.zeros(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_state_dict(tmp_path / "zip.pt")
    with pytest.raises(CheckpointError, match="legacy pickle"):
        load_state_dict(tmp_path / "legacy.pkl")
    with pytest.raises(CheckpointError, match="legacy pickle"):
        load_state_dict(tmp_path / "legacy.pt")
    assert not marker.exists()


def test_full_module_pickle_and_torchscript_are_refused(tmp_path):
    model = build_model("resnet20")
    torch.save(model, tmp_path / "module.pt")
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_state_dict(tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_state_dict(tmp_path / "scripted.pt")


def test_garbage_files(tmp_path, r20_state):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "random").write_bytes(os.urandom(4096))
    save_file(r20_state, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    forged = (10**12).to_bytes(8, "little") + b'{"a":' + b" " * 64
    (tmp_path / "forged.safetensors").write_bytes(forged)
    torch.save(r20_state, tmp_path / "ok.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:5000])
    (tmp_path / "tensors_only.pt").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    cases = {
        "empty": "empty",
        "random": "not a checkpoint",
        "truncated.safetensors": "not a valid safetensors",
        "forged.safetensors": "header length exceeds",
        "truncated.pt": "corrupt zip|could not be loaded",
        "list.pt": "does not hold a state_dict",
        "missing.pt": "not found",
    }
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern):
            load_state_dict(tmp_path / name)


def test_resolve_teacher_needs_arch_for_files(tmp_path, r20_state):
    save_file(r20_state, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="needs --arch"):
        resolve_teacher(str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="neither a bundled teacher"):
        resolve_teacher("no_such_teacher")
