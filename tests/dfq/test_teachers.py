"""The shipped teachers are what the manifest says they are."""

import pytest

from dfq.data import fashion_mnist
from dfq.evaluate import predict, top1
from dfq.models.teachers import load_bundled, read_manifest, sha256_file, teachers_dir

BUNDLED = sorted(read_manifest())


def test_all_three_teachers_are_bundled():
    assert BUNDLED == ["mobilenetv2_fmnist", "resnet18_fmnist", "resnet20_fmnist"]


@pytest.mark.parametrize("name", BUNDLED)
def test_teacher_file_matches_manifest_and_is_small(name):
    entry = read_manifest()[name]
    path = teachers_dir() / entry["file"]
    assert sha256_file(path) == entry["sha256"]
    assert path.stat().st_size < 25e6


@pytest.mark.parametrize("name", BUNDLED)
def test_teacher_accuracy_on_fixed_test_slice(name):
    model, info = load_bundled(name)
    test = fashion_mnist("test").subset(2000)
    acc = top1(predict(model, test.images, info.preprocess), test.labels)
    entry = read_manifest()[name]
    assert acc == pytest.approx(entry["fp_top1_test2000"], abs=0.1)
    assert acc > 88.0
