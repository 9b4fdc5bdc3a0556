"""`sparselite report`: anything that is not a saved export report is one line on stderr and exit 2.
(In process, for speed; tests/export/test_html_report.py runs the command as a user does.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sparselite.cli import main

GOOD = {"path": "gone.tflite", "file_bytes": 1000, "io_dtype": "float32", "ranges_learned": 3, "ranges_calibrated": 0}

# name -> (file content or None for no file, extra args, fragments of the error line)
CASES = {
    "missing_file": (None, [], ["does not exist"]),
    "not_json": (b"model: 1\n", [], ["is not a sparselite export report", "not JSON"]),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", [], ["is not a sparselite export report"]),
    "a_json_list": (b"[1, 2, 3]", [], ["is not a sparselite export report", "no path, file_bytes and io_dtype"]),
    "other_json": (json.dumps({"accuracy": 0.9}).encode(), [], ["no path, file_bytes and io_dtype"]),
    "wrong_types": (json.dumps({**GOOD, "file_bytes": "big"}).encode(), [], ["wrong types"]),
    "mangled_fields": (json.dumps({**GOOD, "layers": "abc", "parity": [1], "sparse_encoding": {"a": 1}}).encode(), [], []),
    "output_not_html": (json.dumps(GOOD).encode(), ["-o", "{tmp}/page.txt"], ["must end in .html"]),
    "output_is_a_folder": (json.dumps(GOOD).encode(), ["-o", "{tmp}/folder.html"], ["is a folder"]),
    "output_is_a_users_file": (json.dumps(GOOD).encode(), ["-o", "{tmp}/mine.html"], ["is not a sparselite report page"]),
    "metrics_missing": (json.dumps(GOOD).encode(), ["--metrics", "{tmp}/nothing.csv"], ["--metrics", "does not exist"]),
}


def run_in_process(args: list[str], capsys) -> SimpleNamespace:
    """`sparselite report ...` in this process (-v: pytest, not the CLI, owns stderr here)."""
    try:
        main(["-v", *args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def assert_one_line_error(result: SimpleNamespace, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparselite: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_cli")
    (tmp / "folder.html").mkdir()
    (tmp / "mine.html").write_text("<html>mine</html>")
    commands = {}
    for name, (content, extra, _) in CASES.items():
        path = tmp / name / "model.json"
        path.parent.mkdir()
        if content is not None:
            path.write_bytes(content)
        commands[name] = ["report", str(path), *[arg.format(tmp=tmp) for arg in extra]]
    return commands, tmp


@pytest.mark.parametrize("name", [n for n in CASES if n != "mangled_fields"])
def test_bad_input_is_one_line_and_exit_2(cases, name, capsys):
    assert_one_line_error(run_in_process(cases[0][name], capsys), *CASES[name][2])
    assert (cases[1] / "mine.html").read_text() == "<html>mine</html>"


def test_a_report_with_odd_fields_still_gets_a_page(cases, capsys):
    """Fields of the wrong shape (a hand-edited report) are left out of the page, not a traceback."""
    result = run_in_process(cases[0]["mangled_fields"], capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (cases[1] / "mangled_fields" / "model.html").is_file()
