"""A channel-pruned int8 file on LiteRT's GPU accelerator (software Vulkan unless REQUIRE_HW_GPU=1):
fully delegated, and its predictions agree with XNNPACK's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_mobilenet
from sparselite.export.tflite import export_tflite
from sparselite.pruning.channels import ChannelPruner
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.runtime.litert import LiteRTModel
from runtime.test_gpu import vulkan_adapter  # noqa: F401 - the same adapter checks (fail, not skip, without a driver)

pytestmark = pytest.mark.gpu


def test_channel_pruned_int8_file_runs_on_the_gpu_with_xnnpack_parity(tmp_path, fmnist_train):
    torch.manual_seed(0)
    model = tiny_mobilenet()
    pruner = ChannelPruner(PolynomialDecay(final_sparsity=0.5, begin_step=0, end_step=1, frequency=1))
    pruner.prepare(model, torch.zeros(1, 1, 28, 28))
    pruner.step(1)
    pruner.shrink()
    images = fmnist_train[0]
    path = tmp_path / "channels_int8.tflite"
    export_tflite(model, images[:1], path, calibration_data=[images[:64]], sparse=False, min_agreement=0.0)

    x = images[64:164].numpy()  # 100 images: lavapipe is slow
    on_gpu = LiteRTModel(path, accelerator="gpu", gpu_precision="fp32")
    assert on_gpu.backend.fully_accelerated
    agreement = float((on_gpu(x).argmax(1) == LiteRTModel(path)(x).argmax(1)).mean())
    assert agreement >= 0.99, agreement
