"""``runtime.load_probe``: a file LiteRT would crash on is loaded in a child process first, so the crash
becomes one SparseliteError line; the verdict is cached per file version, and a sound file still loads."""

from __future__ import annotations

import os
import subprocess

import pytest

from sparselite.errors import SparseliteError
from sparselite.runtime import load_probe
from sparselite.tflite.flatbuffer import WEIGHT_INPUT, builtin_code, read_model, write_model
from tflite_mutants import seed_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The fuzz seed (a real sparse int8 export) and a copy whose CONV_2D weight input is -1 (absent),
    written without validation: XNNPACK segfaults on it at allocate_tensors."""
    folder = tmp_path_factory.mktemp("probe")
    seed = seed_model()
    model = read_model(seed)
    op = next(op for op in model.subgraphs[0].operators if builtin_code(model, op) in WEIGHT_INPUT)
    inputs = [int(i) for i in op.inputs]
    inputs[1] = -1
    op.inputs = inputs
    (folder / "seed.tflite").write_bytes(seed)
    (folder / "crash.tflite").write_bytes(write_model(model))
    return folder / "seed.tflite", folder / "crash.tflite"


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(load_probe, "_verdicts", {})


def test_a_native_crash_in_the_child_is_one_error_line(files):
    _, crash = files
    with pytest.raises(SparseliteError) as err:
        load_probe.check_loads(crash)
    message = str(err.value)
    assert "\n" not in message and str(crash) in message and "crashed" in message and "SIGSEGV" in message


def test_a_sound_file_passes_and_the_verdict_is_cached(files, monkeypatch):
    seed, crash = files
    load_probe.check_loads(seed)
    with pytest.raises(SparseliteError):
        load_probe.check_loads(crash)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("probed twice")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    load_probe.check_loads(seed)  # cached: no child process
    with pytest.raises(SparseliteError, match="crashed"):
        load_probe.check_loads(crash)


def test_a_changed_file_is_probed_again_and_written_files_are_trusted(files, tmp_path, monkeypatch):
    seed, crash = files
    path = tmp_path / "model.tflite"
    path.write_bytes(seed.read_bytes())
    load_probe.check_loads(path)
    path.write_bytes(crash.read_bytes())  # another size and mtime: a new verdict
    os.utime(path, ns=(1, 1))
    with pytest.raises(SparseliteError, match="crashed"):
        load_probe.check_loads(path)
    path.write_bytes(seed.read_bytes())
    load_probe.mark_written(path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    load_probe.check_loads(path)


def test_litert_model_and_inspect_survive_a_file_validation_does_not_catch(files, monkeypatch):
    """With validation switched off (a crash nobody has met yet), the probe still keeps this process alive."""
    from sparselite.inspect import inspect_tflite
    from sparselite.runtime.litert import LiteRTModel
    from sparselite.tflite import flatbuffer

    _, crash = files
    monkeypatch.setattr(flatbuffer, "validate_model", lambda *args: None)
    with pytest.raises(SparseliteError, match="crashed"):
        LiteRTModel(crash)
    with pytest.raises(SparseliteError, match="crashed"):
        inspect_tflite(crash)


def test_validation_refuses_the_absent_weight_by_name(files):
    _, crash = files
    with pytest.raises(SparseliteError, match=r"CONV_2D\) has no tensor at input 1 \(-1, absent\)"):
        read_model(crash)
