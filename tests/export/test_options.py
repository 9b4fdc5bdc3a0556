"""One spelling per option: ExportOptions, the TFLiteExport callback, export_tflite / export_from_loader
and `sparselite export` take the same names, with the same defaults and the same checks."""

from __future__ import annotations

import inspect

import pytest

from sparselite import SparseliteError, TFLiteExport
from sparselite.cli import _parser
from sparselite.export.options import ExportOptions


def test_the_callback_takes_exactly_the_options():
    parameters = inspect.signature(TFLiteExport).parameters
    assert [name for name in parameters if name != "path"] == list(ExportOptions.names())
    defaults = ExportOptions()
    assert all(parameters[name].default == getattr(defaults, name) for name in ExportOptions.names())


def test_the_cli_has_one_flag_per_option_with_the_same_default():
    export = next(a for a in _parser()._subparsers._group_actions[0].choices.items() if a[0] == "export")[1]
    flags = {action.dest: action for action in export._actions}
    for name in ExportOptions.names():
        assert f"--{name.replace('_', '-')}" in flags[name].option_strings
    parsed = _parser().parse_args(["export", "run.ckpt"])
    assert ExportOptions(**{name: getattr(parsed, name) for name in ExportOptions.names()}) == ExportOptions()


def test_cli_flags_parse_to_the_options():
    parsed = _parser().parse_args(["export", "run.ckpt", "--verify-batches", "none", "--min-agreement", "0.5",
                                   "--no-sparse", "--float-fallback", "xnnpack", "--io-dtype", "int8"])
    options = ExportOptions(**{name: getattr(parsed, name) for name in ExportOptions.names()})
    assert options == ExportOptions(verify_batches=None, min_agreement=0.5, sparse=False, float_fallback="xnnpack",
                                    io_dtype="int8")
    assert not options.verifies


def test_verify_batches_none_skips_the_check_in_the_callback():
    assert not TFLiteExport("m.tflite", verify_batches=None).options.verifies


def test_build_sets_keywords_on_top_and_refuses_unknown_names():
    base = ExportOptions(sparse=False)
    assert ExportOptions.build(base, {"min_agreement": 0.5}) == ExportOptions(sparse=False, min_agreement=0.5)
    with pytest.raises(SparseliteError, match=r"unknown export option\(s\) \['allow_float_ops'\]"):
        ExportOptions.build(None, {"allow_float_ops": True})


@pytest.mark.parametrize("kwargs, message", [
    (dict(io_dtype="uint8"), "io_dtype='uint8'"),
    (dict(sparse="yes"), "sparse='yes' must be true or false"),
    (dict(verify_batches=0), "verify_batches=0"),
    (dict(calibration_batches=-1), "calibration_batches=-1"),
    (dict(calibration_batches=True), "calibration_batches=True"),
    (dict(min_agreement=1.5), "min_agreement=1.5"),
    (dict(max_accuracy_drop=-1), "max_accuracy_drop=-1 must be a number of top-1 points"),
    (dict(precision="auto", verify_batches=None), "precision='auto' measures accuracy on the verification batches"),
    (dict(float_fallback=0), "float_fallback=0"),
])
def test_each_option_is_checked_once_with_one_line(kwargs, message):
    with pytest.raises(SparseliteError, match=message):
        ExportOptions(**kwargs)


def test_scheduled_callbacks_share_the_schedule_names():
    from sparselite import ChannelPruning, GradualPruning, QuantizationAwareTraining

    for callback in (GradualPruning, ChannelPruning, QuantizationAwareTraining):
        assert "begin_step" in inspect.signature(callback).parameters, callback
        assert "start_step" not in inspect.signature(callback).parameters, callback
    assert "end_step" in inspect.signature(GradualPruning).parameters
    assert "end_step" in inspect.signature(ChannelPruning).parameters
