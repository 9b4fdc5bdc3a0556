"""A seeded corpus of mutated training configs + recipes, for ``benchmarks/robustness.py --recipes``.

The base pair is a tiny real run (the bundled config with 3 steps on 256 images, no validation; a
GMP + QAT recipe over those steps), so what is accepted also trains. Mutations:

- ``value``: one leaf set to a hostile value (null, NaN, inf, negative, zero, huge, a string, a list);
- ``key``: a key deleted, an unknown key added, a value nested one level wrong;
- ``file``: not YAML, binary, empty, an alias bomb, a multi-MB file, a path with spaces and unicode
  (valid content: must run);
- ``duplicate``: a callback given twice.

``recipe_mutants(n, seed, root_dir)`` returns ``(name, config bytes, recipe bytes, file name)``.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_VALUES = [None, float("nan"), float("inf"), float("-inf"), -5, -1, 0, 10**12, -(10**12), 1e-30,
                  "abc", "", [], {}, [1, 2], True, "ünïcode value with spaces"]


def base_pair(root_dir: Path) -> tuple[dict, dict]:
    config = yaml.safe_load((ROOT / "configs" / "fmnist_mobilenet.yaml").read_text())
    config["trainer"].update(max_steps=3, limit_val_batches=0, val_check_interval=None, log_every_n_steps=1,
                             default_root_dir=str(root_dir), enable_checkpointing=False)
    config["data"]["init_args"].update(train_subset=256, batch_size=32)
    recipe = {"trainer": {"callbacks": [
        {"class_path": "sparselite.GradualPruning",
         "init_args": {"final_sparsity": 0.5, "begin_step": 0, "end_step": 2, "frequency": 1}},
        {"class_path": "sparselite.QuantizationAwareTraining", "init_args": {"begin_step": 1, "freeze_step": 2}},
    ]}}
    return config, recipe


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path


def _mappings(node, path=()):
    if isinstance(node, dict):
        yield path
        for key, value in node.items():
            yield from _mappings(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _mappings(value, (*path, i))


def _get(node, path):
    for key in path:
        node = node[key]
    return node


def _dump(doc) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode()


def recipe_mutants(n: int, seed: int, root_dir: Path) -> list[tuple[str, bytes, bytes, str]]:
    rng = random.Random(seed)
    kinds = ["value", "value", "key", "file", "duplicate"]
    out = []
    for i in range(n):
        config, recipe = base_pair(root_dir / f"run{i}")
        kind = kinds[i % len(kinds)]
        docs = [config, recipe]
        which = rng.randrange(2)
        doc = docs[which]
        file_name = "recipe.yaml"
        name = kind
        if kind == "value":
            path = rng.choice([p for p in _leaves(doc) if p and p[-1] != "class_path"])
            value = rng.choice(HOSTILE_VALUES)
            _get(doc, path[:-1])[path[-1]] = value
            name = f"value/{'.'.join(map(str, path))}={value!r}"
        elif kind == "key":
            action = rng.choice(["delete", "unknown", "nest"])
            if action == "delete":
                path = rng.choice([p for p in _leaves(doc) if p])
                del _get(doc, path[:-1])[path[-1]]
            elif action == "unknown":
                path = rng.choice([p for p in _mappings(doc) if isinstance(_get(doc, p), dict)])
                path = (*path, "no_such_key")
                _get(doc, path[:-1])["no_such_key"] = 1
            else:
                path = rng.choice([p for p in _leaves(doc) if p and p[-1] != "class_path"])
                parent = _get(doc, path[:-1])
                parent[path[-1]] = {"value": parent[path[-1]]}
            name = f"key/{action}:{'.'.join(map(str, path))}"
        elif kind == "duplicate":
            callbacks = recipe["trainer"]["callbacks"]
            callbacks.append(copy.deepcopy(rng.choice(callbacks)))
            name = f"duplicate/{callbacks[-1]['class_path']}"
        docs_bytes = [_dump(config), _dump(recipe)]
        if kind == "file":
            action = rng.choice(["not_yaml", "binary", "empty", "alias_bomb", "huge", "unicode_path"])
            name = f"file/{action}"
            if action == "not_yaml":
                docs_bytes[which] = b"trainer: [unclosed\n  callbacks: {a: b\n\t- tab"
            elif action == "binary":
                docs_bytes[which] = bytes(rng.getrandbits(8) for _ in range(512))
            elif action == "empty":
                docs_bytes[which] = b""
            elif action == "alias_bomb":
                bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
                    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
                docs_bytes[which] = bomb.encode()
            elif action == "huge":
                docs_bytes[which] += b"# padding\n" * 350_000
            else:
                file_name = "dir with space/ünïcode recipe.yaml"
        out.append((name, docs_bytes[0], docs_bytes[1], file_name))
    return out
