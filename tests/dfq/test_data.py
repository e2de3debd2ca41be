"""Where Fashion-MNIST is read from: Debian's path, or a copy named by DFQ_FASHION_MNIST_DIR."""

from __future__ import annotations

import pytest

from dfq.data import FASHION_MNIST_DIR, DataError, fashion_mnist, fashion_mnist_dir


def test_env_names_a_copy(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(FASHION_MNIST_DIR / name)
    monkeypatch.setenv("DFQ_FASHION_MNIST_DIR", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path
    test = fashion_mnist("test")
    assert len(test) == 10_000 and test.images.shape[1:] == (1, 28, 28)
    with pytest.raises(DataError, match=str(tmp_path)):  # the copy lacks the training split
        fashion_mnist("train")


def test_default_is_debians_path(monkeypatch):
    monkeypatch.delenv("DFQ_FASHION_MNIST_DIR", raising=False)
    assert fashion_mnist_dir() == FASHION_MNIST_DIR
