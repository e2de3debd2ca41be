import pytest
import torch
from torch import nn

from dfq.models.registry import build_model
from dfq.quant import ActQuant, QuantLayer, activation_ranges, quantize
from dfq.spec import QuantSpec
from tests.dfq.conftest import calibrate


def test_teacher_is_never_mutated():
    teacher = build_model("resnet20", 10, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = quantize(teacher, QuantSpec(w_bits=4, a_bits=4))
    calibrate(student, torch.randn(4, 1, 28, 28))
    assert not any(isinstance(m, QuantLayer | ActQuant) for m in teacher.modules())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resnet20_layers_and_quantizers():
    student = quantize(build_model("resnet20", 10, 1), QuantSpec(w_bits=4, a_bits=4))
    layers = [m for m in student.modules() if isinstance(m, QuantLayer)]
    assert len(layers) == 22  # stem + 9 blocks x 2 + 2 projection shortcuts + fc
    assert all(m.w_bits == 4 for m in layers)
    assert sum(isinstance(m, ActQuant) for m in student.modules()) == 19  # stem + 9 blocks x 2 ReLUs


def test_f8l8_switch_sets_first_and_last_layer_bits():
    student = quantize(
        build_model("resnet20", 10, 1), QuantSpec(w_bits=4, a_bits=4, first_layer_bits=8, last_layer_bits=8)
    )
    layers = [m for m in student.modules() if isinstance(m, QuantLayer)]
    assert [layers[0].w_bits, layers[-1].w_bits] == [8, 8]
    assert {m.w_bits for m in layers[1:-1]} == {4}


def test_shared_relu_module_gets_one_quantizer_per_call_site():
    # torchvision's BasicBlock calls self.relu twice; each site must get its own range
    teacher = build_model("resnet18", 10, 3)
    student = quantize(teacher, QuantSpec(w_bits=8, a_bits=8))
    assert sum(isinstance(m, ActQuant) for m in student.modules()) == 1 + 8 * 2
    calibrate(student, torch.randn(2, 3, 32, 32))
    ranges = activation_ranges(student)
    block = {k: v for k, v in ranges.items() if k.startswith("layer1.0.")}
    assert len(block) == 2 and len(set(block.values())) == 2
    # the module tree and parameter names are unchanged, so teacher checkpoints still line up
    assert set(teacher.state_dict()) <= set(student.state_dict())


def test_mobilenet_v2_relu6_sites():
    teacher = build_model("mobilenet_v2", 10, 3)
    n_relu6 = sum(isinstance(m, nn.ReLU6) for m in teacher.modules())
    student = quantize(teacher, QuantSpec(w_bits=4, a_bits=4))
    assert sum(isinstance(m, ActQuant) for m in student.modules()) == n_relu6 == 35


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.nn.functional.relu(x.mean((2, 3))))


def test_functional_relu_sites_are_quantized():
    student = quantize(FunctionalRelu().eval(), QuantSpec(w_bits=8, a_bits=8))
    assert sum(isinstance(m, ActQuant) for m in student.modules()) == 2


@pytest.mark.parametrize(
    "arch,shape", [("resnet20", (1, 28, 28)), ("resnet18", (3, 32, 32)), ("mobilenet_v2", (3, 32, 32))]
)
def test_float_bits_reproduce_the_teacher_exactly(arch, shape):
    """With 32 (float) bits everywhere the rewritten graph must compute exactly what the teacher does."""
    teacher = build_model(arch, 10, shape[0])
    student = quantize(teacher, QuantSpec(w_bits=32, a_bits=32))
    x = torch.randn(3, *shape)
    calibrate(student, x, 1)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


def test_8bit_student_is_close_and_4bit_further():
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, 1)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref = teacher(x)
    errs = {}
    for bits in (8, 4):
        s = quantize(teacher, QuantSpec(w_bits=bits, a_bits=bits))
        calibrate(s, x)
        with torch.no_grad():
            errs[bits] = (s(x) - ref).abs().mean().item() / ref.abs().mean().item()
    assert errs[8] < 0.05 < errs[4]
