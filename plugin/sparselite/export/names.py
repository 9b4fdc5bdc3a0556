"""Readable tensor names: litert-torch names tensors by the chain of module *types* that produced them
(``pkg.Model/torch.nn.modules.container.Sequential_features/.../torch.nn.modules.conv.Conv2d_0;1``).
Each type carries the attribute name after its first underscore, so the path folds back to the torch
module name (``features.12.0;1``) that users know from ``named_modules()``, and the file gets smaller.
"""

from __future__ import annotations

from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import WEIGHT_INPUT, builtin_code


def module_path(type_path: str) -> str | None:
    """``Root/pkg.Type_attr/pkg.Type_0`` -> ``attr.0``; None when the text is not such a path."""
    components = type_path.split("/")
    if len(components) < 2:
        return None
    attrs = []
    for component in components[1:]:
        class_name = component.rsplit(".", 1)[-1]
        if "_" not in class_name:
            return None
        attrs.append(class_name.split("_", 1)[1])
    return ".".join(attrs)


def readable_name(name: str) -> str:
    # Fused ops join several producers' names with ';'; converter suffixes (';1') stay as they are.
    return ";".join(module_path(part) or part for part in name.split(";"))


def use_module_names(model: schema.ModelT) -> dict[str, str]:
    """Rename every tensor in place; returns {old name: new name} for names that changed.

    A weight whose own name is not a module path takes its layer's name from the op's bias. That is
    the model's last layer: the converter names its weight after torch.export's wrapper
    (``..._aot_export_non_strict.<locals>.Wrapper;1``), while its bias keeps ``model.classifier;``.
    """
    renamed = {}
    for subgraph in model.subgraphs:
        folded = set()
        for index, tensor in enumerate(subgraph.tensors):
            old = (tensor.name or b"").decode(errors="replace")
            new = readable_name(old)
            if new != old:
                tensor.name = new.encode()
                renamed[old] = new
                folded.add(index)
        for op in subgraph.operators:
            slot = WEIGHT_INPUT.get(builtin_code(model, op))
            inputs = [] if op.inputs is None else [int(i) for i in op.inputs]
            if slot is None or len(inputs) < slot + 2 or min(inputs[slot : slot + 2]) < 0:
                continue
            weight, bias = inputs[slot], inputs[slot + 1]
            if weight in folded or bias not in folded:
                continue
            old = subgraph.tensors[weight].name.decode(errors="replace")
            new = subgraph.tensors[bias].name.decode().split(";")[0] + ";1"  # the converter's weight suffix
            subgraph.tensors[weight].name = new.encode()
            renamed[old] = new
            folded.add(weight)
    return renamed
