"""runtime/op_cost.py: ops cut out of a real file run alone and compute what they computed in it."""

from __future__ import annotations

import numpy as np
import torch
from ai_edge_litert.interpreter import Interpreter
from torch import nn

from sparselite.export.conversion import export_float_tflite
from sparselite.runtime.op_cost import latency_shares, ops_alone
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model


def run(content: bytes, inputs: list[np.ndarray], preserve: bool = False) -> tuple[Interpreter, list[np.ndarray]]:
    interpreter = Interpreter(model_content=content, experimental_preserve_all_tensors=preserve)
    interpreter.allocate_tensors()
    for detail, value in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return interpreter, [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def test_a_cut_out_op_computes_what_it_computed_inside_the_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    path = tmp_path / "float.tflite"
    export_float_tflite(model, torch.zeros(1, 1, 12, 12), path)
    whole = path.read_bytes()
    graph_model = read_model(whole)
    graph = graph_model.subgraphs[0]
    names = [builtin_name(builtin_code(graph_model, op)) for op in graph.operators]
    image = np.random.default_rng(0).standard_normal((1, 1, 12, 12)).astype(np.float32)
    interpreter, (logits,) = run(whole, [image], preserve=True)

    everything = ops_alone(graph_model, range(len(names)))
    assert np.array_equal(run(everything, [image])[1][0], logits)

    sigmoid = names.index("LOGISTIC")
    op = graph.operators[sigmoid]
    cut = ops_alone(graph_model, [sigmoid])
    assert len(read_model(cut).subgraphs[0].operators) == 1
    fed = interpreter.get_tensor(op.inputs[0])
    assert np.array_equal(run(cut, [fed])[1][0], interpreter.get_tensor(op.outputs[0]))

    shares = latency_shares(graph_model, whole, {"sigmoid": [sigmoid], "all": list(range(len(names)))}, rounds=2, runs_per_round=5)
    assert set(shares) == {"sigmoid", "all"} and all(share > 0 for share in shares.values())
