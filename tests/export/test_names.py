"""Tensor names folded back to torch module paths."""

from __future__ import annotations

from sparselite.export.names import module_path, readable_name

CONVERTER_NAME = ("pkg.Model/torch.nn.modules.container.Sequential_features/"
                  "torch.nn.modules.container.Sequential_12/torch.nn.modules.conv.Conv2d_0")


def test_module_path_from_the_converter_type_path():
    assert module_path(CONVERTER_NAME) == "features.12.0"
    assert module_path("pkg.Model/torch.nn.modules.linear.Linear_classifier") == "classifier"


def test_text_that_is_not_a_type_path_is_left_alone():
    assert module_path("serving_default_x:0") is None
    assert module_path("Model/NoUnderscore") is None
    assert readable_name("densified_12") == "densified_12"


def test_fused_names_and_converter_suffixes_are_kept():
    fused = f"{CONVERTER_NAME};pkg.Model/torch.nn.modules.activation.ReLU6_relu;1"
    assert readable_name(fused) == "features.12.0;relu;1"
