"""``validate_model``'s required-input table: an input a kernel reads unconditionally may not be absent
(-1) and an op may not have fewer inputs than its kernel reads; optional inputs (a conv's bias) may be -1."""

from __future__ import annotations

import pytest
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model, write_model
from tflite_mutants import seed_model


@pytest.fixture(scope="module")
def seed() -> bytes:
    return seed_model()


def _with_inputs(seed: bytes, op_name: str, edit) -> bytes:
    model = read_model(seed)
    op = next(op for op in model.subgraphs[0].operators if builtin_name(builtin_code(model, op)) == op_name)
    op.inputs = edit([int(i) for i in op.inputs])
    return write_model(model)


def _absent(slot):
    def edit(inputs):
        inputs[slot] = -1
        return inputs
    return edit


@pytest.mark.parametrize("op_name, slot", [("CONV_2D", 1), ("DEPTHWISE_CONV_2D", 1), ("FULLY_CONNECTED", 1),
                                           ("CONV_2D", 0), ("MEAN", 1), ("RESHAPE", 1), ("PAD", 1)])
def test_an_absent_required_input_is_refused_by_name(seed, op_name, slot):
    with pytest.raises(SparseliteError, match=rf"\({op_name}\) has no tensor at input {slot} \(-1, absent\)"):
        read_model(_with_inputs(seed, op_name, _absent(slot)))


@pytest.mark.parametrize("op_name", ["CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"])
def test_an_absent_bias_is_allowed(seed, op_name):
    read_model(_with_inputs(seed, op_name, _absent(2)))


def test_too_few_inputs_are_refused(seed):
    with pytest.raises(SparseliteError, match=r"\(CONV_2D\) has 1 input\(s\); its kernel needs at least 2"):
        read_model(_with_inputs(seed, "CONV_2D", lambda inputs: inputs[:1]))


def test_every_seed_op_passes_and_custom_ops_are_not_judged(seed):
    model = read_model(seed)
    assert {builtin_name(builtin_code(model, op)) for op in model.subgraphs[0].operators} >= {"CONV_2D", "FULLY_CONNECTED"}
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = b"MyOp"
    code.version = 1
    model.operatorCodes.append(code)
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = len(model.operatorCodes) - 1, [-1, 0], [0]
    model.subgraphs[0].operators.append(op)
    read_model(write_model(model))  # a custom kernel's optional inputs are its own business
