"""The op list of a model: what each operator is, in graph order (for reports that name ops)."""

from __future__ import annotations

from dataclasses import dataclass

from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import builtin_code, builtin_name, tensor_name


@dataclass(frozen=True)
class OpEntry:
    index: int
    op: str  # builtin name ("CONV_2D"), or the custom code of a CUSTOM op
    version: int
    outputs: tuple[str, ...]  # output tensor names (litert-torch's carry the torch module path)


def op_list(model: schema.ModelT, subgraph: int = 0) -> list[OpEntry]:
    """Every operator of one subgraph, in execution order."""
    graph = model.subgraphs[subgraph]
    entries = []
    for index, op in enumerate(graph.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        name = builtin_name(builtin_code(model, op))
        if name == "CUSTOM" and code.customCode:
            name = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
        outputs = tuple(tensor_name(graph.tensors[int(t)]) for t in (op.outputs if op.outputs is not None else []) if t >= 0)
        entries.append(OpEntry(index, name, int(code.version), outputs))
    return entries
