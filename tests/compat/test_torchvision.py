"""torchvision (in the test extra) next to torch's CPU build: importable, and Lightning with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparselite.compat.torchvision import torchvision_ops_load

pytestmark = pytest.mark.skipif(torchvision_ops_load() is None, reason="torchvision is not installed")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_upstream_torchvision_wheel_cannot_load_its_ops_next_to_cpu_torch():
    """The registry's torchvision 0.28 is a CUDA build: without sparselite, ``import torchvision`` raises
    (docs/upstream/torchvision_cpu_import.md). When this test fails, the workaround can go."""
    assert torchvision_ops_load() is False
    result = run("import torchvision")
    assert result.returncode != 0 and "torchvision::nms does not exist" in result.stderr


def test_lightning_and_torchvision_models_work_after_importing_sparselite():
    result = run(
        "import sparselite, lightning.pytorch, torchmetrics, torchvision.models as m\n"
        "net = m.resnet18(weights=None, num_classes=10)\n"
        "print(sum(p.numel() for p in net.parameters()))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 11_000_000


def test_sparselite_cli_runs_with_torchvision_installed():
    result = subprocess.run([sys.executable, "-m", "sparselite.cli", "fit", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
