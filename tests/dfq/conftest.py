import pytest
import torch

from dfq.models.registry import build_model
from dfq.quant import set_calibration
from dfq.spec import JobSpec


def calibrate(student: torch.nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """Give every activation quantizer a range: ``steps`` forwards of ``x`` with calibration on, then off."""
    set_calibration(student, True)
    with torch.no_grad():
        for _ in range(steps):
            student(x)
    set_calibration(student, False)


@pytest.fixture
def tiny_teacher():
    """A ResNet-20 with non-trivial BN running statistics (random weights; no training needed)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28) * 0.5 + 0.2)
    return model.eval()


@pytest.fixture
def tiny_spec():
    return JobSpec.model_validate(
        {
            "bits": "W4A4",
            "budget": {
                "preset": "smoke",
                "epochs": 3,
                "iters_per_epoch": 3,
                "batch_size": 8,
                "warmup_epochs": 1,
                "sample_every": 2,
                "checkpoint_every": 1,
            },
            "quant": {"calibration_epochs": 2},
            "device": "cpu",
        }
    )
