"""The torch-free architecture list is exactly the registry's (the upload page shows it)."""

import subprocess
import sys

from dfq.models import names, registry


def test_names_match_the_registry():
    assert names.arch_names() == registry.arch_names()
    assert all(names.arch_family(n) == registry.get_arch(n).family for n in registry.arch_names())
    assert names.arch_family("vgg16") is None


def test_names_import_without_torch():
    code = "import sys, dfq.models.names as n; n.arch_names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
