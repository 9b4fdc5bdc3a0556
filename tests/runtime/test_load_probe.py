"""``runtime.load_probe``: a file LiteRT would crash on is loaded in a child process first, so the crash
becomes one SparseliteError line; the verdict is cached per file version, and a sound file still loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from sparselite.errors import SparseliteError
from sparselite.runtime import load_probe
from sparselite.tflite.flatbuffer import WEIGHT_INPUT, builtin_code, read_model, write_model
from tflite_mutants import csr_levels, seed_model, set_vector


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The fuzz seed (a real sparse int8 export) and a copy whose first CSR level's last segment end is
    1000 past its index vector, written without validation: the reference DENSIFY kernel reads and
    writes far out of bounds and segfaults, on every heap layout tried (40 of 40 paths and environments).

    (The absent-weight file of ``test_validation_refuses_the_absent_weight_by_name`` is no good here:
    XNNPACK reads ``tensors[-1]``, whatever lies before the array, and 1 in 8 heap layouts survive it.)"""
    folder = tmp_path_factory.mktemp("probe")
    seed = seed_model()
    model = read_model(seed)
    level = csr_levels(model)[0]
    segments = [int(v) for v in level.arraySegments.values]
    segments[-1] += 1000
    set_vector(level.arraySegments, segments)
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
    assert "\n" not in message and str(crash) in message and "crashed" in message
    assert re.search(r"\(SIG[A-Z]+ in the (xnnpack|reference) load\)", message), message


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


# Run in a child of its own: if the probe ever let the file through, the crash would end that child,
# and fail this test, instead of ending pytest.
_SURVIVE = textwrap.dedent("""
    import sys
    from sparselite.errors import SparseliteError
    from sparselite.inspect import inspect_tflite
    from sparselite.runtime.litert import LiteRTModel
    from sparselite.tflite import flatbuffer
    flatbuffer.validate_model = lambda *args: None  # a file validation has no rule for yet
    for load in (LiteRTModel, inspect_tflite):
        try:
            load(sys.argv[1])
        except SparseliteError as err:
            print(load.__name__, err)
""")


def test_litert_model_and_inspect_survive_a_file_validation_does_not_catch(files):
    """With validation switched off (a crash nobody has met yet), the probe still keeps the process alive."""
    _, crash = files
    done = subprocess.run([sys.executable, "-c", _SURVIVE, str(crash)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["LiteRTModel", "inspect_tflite"], done.stdout
    assert all("crashed" in line for line in lines), done.stdout


def test_validation_refuses_the_absent_weight_by_name(tmp_path):
    model = read_model(seed_model())
    op = next(op for op in model.subgraphs[0].operators if builtin_code(model, op) in WEIGHT_INPUT)
    op.inputs = [int(i) if n != 1 else -1 for n, i in enumerate(op.inputs)]
    path = tmp_path / "absent.tflite"
    path.write_bytes(write_model(model))
    with pytest.raises(SparseliteError, match=r"CONV_2D\) has no tensor at input 1 \(-1, absent\)"):
        read_model(path)
