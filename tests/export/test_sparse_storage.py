"""The sparse-encoding pass: exact outputs on every runtime, exact round trip, bytes near the minimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from torch import nn

from conftest import pt2e_int8_tflite
from sparselite.errors import SparseliteError
from sparselite.export.sparse_storage import encode_sparse
from sparselite.export.sparse_encoding import candidate_layouts, encode_tensor
from sparselite.tflite.flatbuffer import builtin_code, read_model, write_model
from sparselite.tflite.constant_values import decode_tensor, sparse_payload_bytes, tensor_values, weight_sparsity, weight_tensors

PATTERNS = ["unstructured", "1x4", "1x16", "2:4"]
RESOLVERS = {
    "xnnpack": None,
    "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    "reference": OpResolverType.BUILTIN_REF,
}
# File bytes one sparse tensor costs beyond its payload (SparsityParameters, DENSIFY, its tensor).
OVERHEAD_BOUND = 400


def prune_array(weights: np.ndarray, pattern: str, sparsity: float = 0.8) -> np.ndarray:
    """Zero int8 weights (TFLite layout, input channels last) by magnitude, in ``pattern``."""
    if pattern == "2:4":
        if weights.shape[-1] % 4:
            return weights
        groups = weights.reshape(-1, 4).copy()
        smallest = np.argsort(np.abs(groups.astype(np.int32)), axis=1, kind="stable")[:, :2]
        np.put_along_axis(groups, smallest, 0, axis=1)
        return groups.reshape(weights.shape)
    block = {"unstructured": 1, "1x4": 4, "1x16": 16}[pattern]
    if weights.shape[-1] % block:
        block = 1
    blocks = weights.reshape(-1, block).copy()
    score = np.abs(blocks.astype(np.int32)).sum(axis=1)
    blocks[np.argsort(score, kind="stable")[: int(round(len(score) * sparsity))]] = 0
    return blocks.reshape(weights.shape)


def prune_tflite(data: bytes, pattern: str, sparsity: float = 0.8) -> bytes:
    """The same int8 file with its conv/depthwise/FC weights pruned (zeros stay exact in int8)."""
    model = read_model(data)
    for graph in model.subgraphs:
        for tensor_index, _ in list(weight_tensors(model, graph)):
            tensor = graph.tensors[tensor_index]
            weights = tensor_values(model, tensor)
            if weights is not None and weights.dtype == np.int8:
                model.buffers[tensor.buffer].data = prune_array(weights, pattern, sparsity).reshape(-1).view(np.uint8)
    return write_model(model)


def run(data: bytes, inputs: np.ndarray, resolver) -> np.ndarray:
    kwargs = {} if resolver is None else {"experimental_op_resolver_type": resolver}
    interpreter = Interpreter(model_content=data, num_threads=1, **kwargs)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    outputs = []
    for sample in inputs:
        interpreter.set_tensor(detail["index"], sample[None].astype(detail["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
    return np.concatenate(outputs)


class MobileNetish(nn.Module):
    """Stem conv, depthwise + pointwise blocks up to 128 channels, average pool, classifier."""

    def __init__(self):
        super().__init__()
        layers = [nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU6()]
        for cin, cout in [(32, 64), (64, 128), (128, 128)]:
            layers += [nn.Conv2d(cin, cin, 3, 1, 1, groups=cin), nn.ReLU6(), nn.Conv2d(cin, cout, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(128, 16)

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.fixture(scope="module")
def dense_int8() -> bytes:
    torch.manual_seed(0)
    return pt2e_int8_tflite(MobileNetish(), torch.randn(1, 3, 16, 16))


@pytest.fixture(scope="module")
def inputs(dense_int8) -> np.ndarray:
    shape = Interpreter(model_content=dense_int8).get_input_details()[0]["shape"]
    return np.random.default_rng(0).integers(-128, 128, size=(3, *shape[1:]))


@pytest.fixture(scope="module", params=PATTERNS)
def case(request, dense_int8):
    pruned = prune_tflite(dense_int8, request.param)
    encoded, encodings = encode_sparse(pruned)
    return request.param, pruned, encoded, encodings


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_sparse_file_runs_bit_identical_to_dense(case, inputs, resolver):
    _, pruned, encoded, _ = case
    expected = run(pruned, inputs, RESOLVERS[resolver])
    np.testing.assert_array_equal(run(encoded, inputs, RESOLVERS[resolver]), expected)


def test_encoding_round_trips_exactly(case):
    pattern, pruned, encoded, encodings = case
    before, after = read_model(pruned), read_model(encoded)
    for graph_before, graph_after in zip(before.subgraphs, after.subgraphs):
        names = {t.name: t for t in graph_after.tensors}
        for tensor in graph_before.tensors:
            original = tensor_values(before, tensor)
            if original is not None:
                np.testing.assert_array_equal(tensor_values(after, names[tensor.name]), original)
    assert weight_sparsity(encoded) == weight_sparsity(pruned)
    # 2:4 is only 50% zeros: CSR's one index byte per value makes it as big as dense.
    assert any(e.encoding != "dense" for e in encodings) == (pattern != "2:4")


def test_stored_bytes_near_format_minimum_and_never_bigger(case):
    pattern, pruned, encoded, encodings = case
    assert len(encoded) <= len(pruned)
    model = read_model(encoded)
    tensors = {t.name.decode(): t for t in model.subgraphs[0].tensors}
    for e in encodings:
        measured = sparse_payload_bytes(model, tensors[e.name])
        assert measured == e.stored_bytes <= e.dense_bytes
        if e.encoding != "dense":
            assert measured <= 1.03 * e.min_bytes, e
        elif "FULLY_CONNECTED" not in e.op:  # kept dense only when sparse wasn't worth its metadata
            assert e.min_bytes + OVERHEAD_BOUND >= e.dense_bytes, e
    if pattern in ("1x4", "1x16"):
        blocked = [e for e in encodings if e.encoding == f"block_csr {pattern}"]
        assert blocked, [e.encoding for e in encodings]
        assert all(e.index_dtype in ("uint8", "uint16/uint8", "uint8/uint16", "uint16") for e in blocked)


def test_int8_classifier_stays_dense_and_every_sparse_weight_is_densified(case):
    _, _, encoded, encodings = case
    model = read_model(encoded)
    graph = model.subgraphs[0]
    fc = [e for e in encodings if e.op == "FULLY_CONNECTED"]
    assert fc and all(e.encoding == "dense" and not e.densify for e in fc)
    densify_outputs = {}
    for op in graph.operators:
        if builtin_code(model, op) == schema.BuiltinOperator.DENSIFY:
            densify_outputs[int(op.outputs[0])] = int(op.inputs[0])
    assert len(densify_outputs) == sum(e.encoding != "dense" for e in encodings)
    produced = set()
    for op in graph.operators:  # every DENSIFY runs before its consumer, consumers only see dense tensors
        for t in op.inputs:
            t = int(t)
            if t >= 0 and graph.tensors[t].sparsity is not None:
                assert builtin_code(model, op) == schema.BuiltinOperator.DENSIFY
            if t in densify_outputs:
                assert t in produced
                assert builtin_code(model, op) != schema.BuiltinOperator.FULLY_CONNECTED
        produced.update(int(t) for t in op.outputs)
    for dense_index, sparse_index in densify_outputs.items():
        q_dense, q_sparse = graph.tensors[dense_index].quantization, graph.tensors[sparse_index].quantization
        np.testing.assert_array_equal(q_dense.scale, q_sparse.scale)
        np.testing.assert_array_equal(q_dense.zeroPoint, q_sparse.zeroPoint)
        assert q_dense.quantizedDimension == q_sparse.quantizedDimension
        assert list(graph.tensors[dense_index].shape) == list(graph.tensors[sparse_index].shape)


def test_signature_still_runs(case, inputs):
    _, pruned, encoded, _ = case
    outputs = []
    for data in (pruned, encoded):
        runner = Interpreter(model_content=data).get_signature_runner()
        (name,) = runner.get_input_details()
        result = runner(**{name: inputs[:1].astype(np.int8)})
        outputs.append(next(iter(result.values())))
    np.testing.assert_array_equal(*outputs)


def test_unpruned_weights_stay_dense(dense_int8, inputs):
    encoded, encodings = encode_sparse(dense_int8)
    assert all(e.encoding == "dense" for e in encodings)
    np.testing.assert_array_equal(run(encoded, inputs, None), run(dense_int8, inputs, None))


def test_an_all_zero_weight_stays_dense_and_the_file_runs(dense_int8, inputs):
    """A zero-initialized residual branch's last conv (timm's resnets zero its BN's gamma, and export folds
    it) has no nonzero to store: sparse, it would be a tensor LiteRT reads as having no data."""
    pruned = prune_tflite(dense_int8, "unstructured", sparsity=1.0)
    encoded, encodings = encode_sparse(pruned)
    assert encodings and all(e.encoding == "dense" and "all zeros" in e.reason for e in encodings if e.sparsity == 1.0)
    np.testing.assert_array_equal(run(encoded, inputs, None), run(pruned, inputs, None))


def test_min_sparsity_keeps_sparser_layers_only(dense_int8):
    pruned = prune_tflite(dense_int8, "unstructured", sparsity=0.6)
    _, encodings = encode_sparse(pruned, min_sparsity=0.7)
    assert all(e.encoding == "dense" and "min_sparsity" in e.reason for e in encodings if e.sparsity < 0.7)
    with pytest.raises(SparseliteError, match="min_sparsity"):
        encode_sparse(pruned, min_sparsity=1.5)


def test_corrupt_input_raises():
    with pytest.raises(SparseliteError):
        encode_sparse(b"not a tflite file at all")


@pytest.mark.parametrize("shape", [(8, 3, 3, 16), (1, 3, 3, 32), (12, 64), (4, 1, 1, 512)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_candidate_layout_decodes_exactly(shape, pattern):
    rng = np.random.default_rng(1)
    weights = prune_array(rng.integers(-127, 128, size=shape).astype(np.int8), pattern)
    weights[0] = 0  # an all-zero output channel exercises empty CSR segments
    for layout in candidate_layouts(shape):
        values, params, _ = encode_tensor(weights, layout)
        np.testing.assert_array_equal(decode_tensor(values, shape, params), weights, err_msg=str(layout))


def test_decoder_reads_permuted_traversal_and_2d_blocks():
    """Files from other tools may use another traversal order and 2-D blocks (schema example)."""
    dense = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 3], [0, 0, 4, 5]], dtype=np.int8)
    params = schema.SparsityParametersT()
    params.traversalOrder, params.blockMap = [0, 1, 2, 3], [0, 1]
    dims = []
    for fmt, size, segments, indices in [(0, 2, None, None), (1, 0, [0, 1, 2], [0, 1]), (0, 2, None, None), (0, 2, None, None)]:
        dim = schema.DimensionMetadataT()
        dim.format, dim.denseSize = fmt, size
        if segments is not None:
            dim.arraySegments, dim.arrayIndices = schema.Int32VectorT(), schema.Uint8VectorT()
            dim.arraySegments.values, dim.arrayIndices.values = np.array(segments), np.array(indices)
        dims.append(dim)
    params.dimMetadata = dims
    values = np.array([1, 0, 0, 0, 2, 3, 4, 5], dtype=np.int8)
    np.testing.assert_array_equal(decode_tensor(values, dense.shape, params), dense)
    # Column-major traversal of the same matrix, no blocks.
    params = schema.SparsityParametersT()
    params.traversalOrder = [1, 0]
    outer, inner = schema.DimensionMetadataT(), schema.DimensionMetadataT()
    outer.format, outer.denseSize = schema.DimensionType.DENSE, 4
    inner.format = schema.DimensionType.SPARSE_CSR
    inner.arraySegments, inner.arrayIndices = schema.Int32VectorT(), schema.Int32VectorT()
    columns = [np.flatnonzero(dense[:, c]) for c in range(4)]
    inner.arraySegments.values = np.concatenate([[0], np.cumsum([len(c) for c in columns])])
    inner.arrayIndices.values = np.concatenate(columns)
    params.dimMetadata = [outer, inner]
    values = np.concatenate([dense[c, i] for i, c in enumerate(columns)])
    np.testing.assert_array_equal(decode_tensor(values, dense.shape, params), dense)


def test_xnnpack_misreads_1x16_sparse_int8_fc(dense_int8, inputs):
    """Why SPARSE_INT8_FC is off: XNNPACK takes the sparse int8 FC and computes garbage, while the
    builtin kernels get it right. If this starts failing, the runtime was fixed: revisit the policy."""
    pruned = prune_tflite(dense_int8, "1x16")
    encoded, encodings = encode_sparse(pruned, sparse_int8_fc=True)
    assert [e.encoding for e in encodings if e.op == "FULLY_CONNECTED"] == ["block_csr 1x16"]
    builtin = RESOLVERS["builtin"]
    np.testing.assert_array_equal(run(encoded, inputs, builtin), run(pruned, inputs, builtin))
    assert not np.array_equal(run(encoded, inputs, None), run(pruned, inputs, None))


def test_index_vectors_use_narrowest_type(case):
    _, _, encoded, _ = case
    model = read_model(encoded)
    for tensor in model.subgraphs[0].tensors:
        if tensor.sparsity is None:
            continue
        for dim in tensor.sparsity.dimMetadata:
            for vector in (dim.arraySegments, dim.arrayIndices):
                if vector is None:
                    continue
                values = np.asarray(vector.values)
                narrowest = next(t for t in (np.uint8, np.uint16, np.int32) if values.max(initial=0) <= np.iinfo(t).max)
                assert values.dtype == narrowest


def test_candidate_layouts_cover_blocks_that_divide_the_input_dim():
    layouts = candidate_layouts((8, 3, 3, 48))
    assert {layout.block for layout in layouts} == {1, 2, 4, 8, 16}
    assert all(not layout.csr[-1] for layout in layouts if layout.block > 1)  # block dims stay DENSE
    assert len({(l.block, l.csr) for l in layouts}) == len(layouts)
    assert not list(itertools.filterfalse(lambda l: any(l.csr), layouts))


def test_quantization_sharing_is_lossless(case, inputs):
    _, pruned, encoded, _ = case
    unshared, _ = encode_sparse(pruned, share_quantization=False)
    assert len(encoded) < len(unshared)
    np.testing.assert_array_equal(run(unshared, inputs, None), run(encoded, inputs, None))
    for a, b in zip(read_model(unshared).subgraphs[0].tensors, read_model(encoded).subgraphs[0].tensors):
        if a.quantization is not None and a.quantization.scale is not None:
            np.testing.assert_array_equal(a.quantization.scale, b.quantization.scale)
            np.testing.assert_array_equal(a.quantization.zeroPoint, b.quantization.zeroPoint)
            assert a.quantization.quantizedDimension == b.quantization.quantizedDimension


def test_upstream_xnnpack_refuses_a_dynamic_range_conv_fed_by_densify(tmp_path):
    """Why dynamic-range weights stay dense (docs/upstream/xnnpack_hybrid_conv_densify.md): XNNPACK
    delegates a fully int8 CONV_2D whose weights come through a DENSIFY, but not a dynamic-range one.
    If this starts failing, the runtime was fixed: let the precision files store sparse conv weights."""
    from sparselite import LiteRTModel, export_tflite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.8)  # 80% zeros: CSR saves bytes
    dense = tmp_path / "dynamic.tflite"
    export_tflite(model, torch.randn(1, 16, 8, 8), dense, precision="dynamic_int8")
    kept, encodings = encode_sparse(dense.read_bytes())  # what the export does: the weight stays dense
    assert [e.reason for e in encodings if e.op == "CONV_2D"] == [
        "dynamic-range CONV_2D stays dense (XNNPACK does not delegate it fed by DENSIFY, "
        "docs/upstream/xnnpack_hybrid_conv_densify.md)"]
    (tmp_path / "kept.tflite").write_bytes(kept)
    LiteRTModel(tmp_path / "kept.tflite")  # loads: XNNPACK takes the dense dynamic-range conv
    encoded, encodings = encode_sparse(dense.read_bytes(), sparse_dynamic_range=True)
    assert [e.encoding for e in encodings if e.op == "CONV_2D"] == ["csr"]
    sparse = tmp_path / "sparse.tflite"
    sparse.write_bytes(encoded)
    with pytest.raises(SparseliteError, match="failed to delegate CONV_2D"):
        LiteRTModel(sparse)
