"""One line for every kind of bad input: the error helpers every command shares."""

from __future__ import annotations

import sys

from sparselite.errors import SparseliteError

# Recipe keys that were renamed (one name per option across the callbacks): old -> new.
RENAMED_KEYS = {"start_step": "begin_step"}


def _fail(message: str) -> None:
    print(f"sparselite: error: {message}", file=sys.stderr)
    sys.exit(2)


def _causes(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _sparselite_cause(err: BaseException) -> SparseliteError | None:
    return next((e for e in _causes(err) if isinstance(e, SparseliteError)), None)


def _explain(err: BaseException) -> str:
    """One line that says what is wrong: our own message if a SparseliteError is behind ``err``, else the
    innermost jsonargparse message that still names the key or class (e.g. 'Parser key "final_sparsity":
    Expected a <class 'float'>. Got value: abc'), joined onto one line."""
    if (cause := _sparselite_cause(err)) is not None:
        return str(cause)
    for old, new in RENAMED_KEYS.items():
        if f'"{old}"' in str(err) or f"'{old}'" in str(err):
            return f"{old} is now named {new} (every scheduled callback takes begin_step/end_step); rename it in the recipe"
    for inner in reversed(_causes(err)):
        text = str(inner)
        if text.startswith(("Problem with given class_path", "Parser key")) and "Does not validate against any" not in text:
            line = " ".join(line.strip() for line in text.splitlines() if line.strip())[:400]
            if "No module named" in text:  # a class the config names from a package this Python cannot import
                line += "; install that package, put its folder on PYTHONPATH, or drop the class from the config"
            return line
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    """jsonargparse nests the real cause under a multi-line preamble; keep the most specific line."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")]
    specific = [line for line in lines if any(k in line for k in ("SparseliteError", "not expected", "Key ", "does not", "must", "is not", "unrecognized"))]
    return (specific[-1] if specific else lines[0] if lines else type(err).__name__)[:400]

