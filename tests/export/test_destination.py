"""Where an export goes: refused up front when it must not be written, written as one unit when it is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sparselite.errors import SparseliteError
from sparselite.export.destination import check_destination, report_matches, sha256_hex, write_model_and_report
from sparselite.tflite.flatbuffer import write_atomically

MODEL = b"\x1c\x00\x00\x00TFL3" + b"\x00" * 56  # starts like a flatbuffer: enough for the destination checks


def test_a_new_path_in_a_new_folder_is_fine(tmp_path):
    target = tmp_path / "out" / "model.tflite"
    assert check_destination(target, target.with_suffix(".json")) == target
    assert not list(target.parent.iterdir())  # the write probe leaves nothing behind


def test_an_existing_model_and_report_may_be_replaced(tmp_path):
    model, report = tmp_path / "model.tflite", tmp_path / "model.json"
    write_model_and_report(model, MODEL, json.dumps({"path": "x", "file_bytes": 1, "io_dtype": "int8"}).encode(), report)
    check_destination(model, report)


@pytest.mark.parametrize("name, setup, message", [
    ("out.json", None, "must end in .tflite"),
    ("model.tflite", "dir", "is a folder"),
    ("model.tflite", "text", "is not a .tflite model; refusing to overwrite"),
    ("model.tflite", "foreign_report", "is not a sparselite export report"),
    ("sub/model.tflite", "parent_is_file", "is a file, not a folder"),
])
def test_outputs_that_would_destroy_something_are_refused(tmp_path, name, setup, message):
    target = tmp_path / name
    if setup == "dir":
        target.mkdir()
    elif setup == "text":
        target.write_text("my notes\n")
    elif setup == "foreign_report":
        target.with_suffix(".json").write_text('{"learning_rate": 0.1}')
    elif setup == "parent_is_file":
        (tmp_path / "sub").write_text("a file")
    with pytest.raises(SparseliteError, match=message):
        check_destination(target, target.with_suffix(".json"))
    if setup == "text":
        assert target.read_text() == "my notes\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SparseliteError, match="cannot write"):
            check_destination(folder / "model.tflite")
    finally:
        folder.chmod(0o755)


def test_a_disk_without_room_for_the_file_is_refused_before_any_work(tmp_path):
    import shutil

    target = tmp_path / "out" / "model.tflite"
    more_than_free = shutil.disk_usage(tmp_path).free + (1 << 40)
    with pytest.raises(SparseliteError, match=r"not enough room for .*model.tflite: .* MiB free .* choose another folder"):
        check_destination(target, target.with_suffix(".json"), needed_bytes=more_than_free)
    assert not list(target.parent.iterdir())


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "model.tflite", MODEL)
    finally:
        os.umask(old)
    assert (tmp_path / "model.tflite").stat().st_mode & 0o777 == 0o640


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.tflite.{int(dead.stdout)}.abc123.tmp"
    live = tmp_path / f".model.tflite.{os.getppid()}.def456.tmp"
    unrelated = tmp_path / ".other.tflite.1.x.tmp"
    for path in (stale, live, unrelated):
        path.write_bytes(b"partial")
    write_atomically(tmp_path / "model.tflite", MODEL)
    assert not stale.exists() and live.exists() and unrelated.exists()


def test_report_holds_the_models_sha256(tmp_path):
    model, report = tmp_path / "model.tflite", tmp_path / "model.json"
    write_model_and_report(model, MODEL, json.dumps({"sha256": sha256_hex(MODEL)}).encode(), report)
    assert report_matches(model, report)
    model.write_bytes(MODEL[:-1] + b"\x01")  # one byte changed in place
    assert not report_matches(model, report)


WRITER = textwrap.dedent("""
    import json, sys
    from sparselite.export.destination import sha256_hex, write_model_and_report
    folder = sys.argv[1]
    i = 0
    while True:
        data = b"\\x1c\\x00\\x00\\x00TFL3" + bytes([i % 256]) * 200_000
        write_model_and_report(f"{folder}/model.tflite", data, json.dumps({"sha256": sha256_hex(data)}).encode(),
                               f"{folder}/model.json")
        i += 1
""")


def test_kill_9_at_any_moment_leaves_a_consistent_pair_and_no_litter_after_the_next_write(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "plugin"))
    model, report = tmp_path / "model.tflite", tmp_path / "model.json"
    for delay in (0.3, 0.45, 0.6, 0.75, 0.9, 1.05):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if report.exists():  # a report, when there is one, describes the model next to it
            assert model.exists() and report_matches(model, report)
    write_model_and_report(model, MODEL, b"{}", report)  # the next export
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
