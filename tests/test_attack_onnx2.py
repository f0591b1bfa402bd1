"""Second round of attacks on the ONNX backend: hand-built graphs where a fold could silently go wrong.

Each test runs the original and the folded model in onnxruntime with graph optimisations off (the
oracle, :func:`models.testing.run_onnx`) on the same inputs, checks the folded model with
``onnx.checker.check_model(full_check=True)``, checks that the input model is unchanged, and names
the verdict a user reads for each BN left.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.records import SkipReason
from models.stats import bn_stats
from models.testing import ATOL_F32_DEEP, run_onnx

F = TensorProto.FLOAT
VI = helper.make_tensor_value_info


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _bn_params(prefix: str, c: int, rng: np.random.Generator) -> tuple[list[onnx.TensorProto], list[str]]:
    names = [f"{prefix}.{k}" for k in ("gamma", "beta", "mean", "var")]
    return [_init(n, v) for n, v in zip(names, bn_stats(c, rng))], names


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[str],
    inits: list[onnx.TensorProto],
    opset: int = 17,
) -> onnx.ModelProto:
    outs = [VI(o, F, None) for o in outputs]
    m = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outs, inits), opset_imports=[helper.make_opsetid("", opset)]
    )
    m.ir_version = min(m.ir_version, 10)
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:
        o.type.CopyFrom(inferred[o.name].type)
    onnx.checker.check_model(m, full_check=True)
    return m


def _fold_and_compare(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], full_check: bool = True, **options: object
) -> bnfold.FoldReport:
    before = model.SerializeToString()
    out, rep = bnfold.fold_with_report(model, **options)  # type: ignore[arg-type]
    assert model.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(out, full_check=full_check)
    for f in feeds:
        ref, got = run_onnx(model, f), run_onnx(out, f)
        assert len(ref) == len(got)
        for a, b in zip(ref, got):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape and a.dtype == b.dtype
            scale = max(1.0, float(np.abs(a).max()))
            err = float(np.abs(a.astype(np.float64) - b).max())
            assert err <= ATOL_F32_DEEP * scale, f"max error {err:.3g} (output scale {scale:.3g})"
    return rep


def _reason(rep: bnfold.FoldReport, bn: str) -> SkipReason:
    found = [v.reason for v in rep.skips if v.bn == bn]
    assert found, f"no skip verdict for {bn}: {rep.verdicts}"
    return found[0]


# ---- names of a subgraph that shadow names of the enclosing graph ----------------------------------
def _branch(name: str, bn: str, rng: np.random.Generator, own_w: np.ndarray | None = None) -> onnx.GraphProto:
    params, names = _bn_params(bn, 4, rng)
    inits = params + ([_init("w", own_w)] if own_w is not None else [])
    nodes = [
        helper.make_node("Conv", ["x", "w"], [f"t_{name}"], name=f"conv_{name}"),
        helper.make_node("BatchNormalization", [f"t_{name}", *names], [f"y_{name}"], name=bn),
    ]
    return helper.make_graph(nodes, name, [], [VI(f"y_{name}", F, None)], inits)


def _if_feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [
        {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32), "c": np.array(c)} for c in (True, False)
    ]


def test_subgraph_initializer_shadowing_the_outer_weight_is_not_folded() -> None:
    # The then-branch holds its own initializer 'w' under the name of the outer weight: onnxruntime
    # reads the outer one there, a fold of the branch's own would change nothing it computes.
    rng = np.random.default_rng(0)
    w_outer, w_inner = rng.standard_normal((2, 4, 3, 3, 3)).astype(np.float32) * 0.5
    then = _branch("then", "bn_then", rng, own_w=w_inner)
    other = _branch("else", "bn_else", rng)
    node = helper.make_node("If", ["c"], ["z"], name="if", then_branch=then, else_branch=other)
    m = _model(
        [node], [VI("x", F, [1, 3, 5, 5]), VI("c", TensorProto.BOOL, [])], ["z"], [_init("w", w_outer)]
    )
    rep = _fold_and_compare(m, _if_feeds())
    # Folding the else branch (which reads the outer 'w') into a copy of 'w' changed which 'w' the
    # then-branch reads in onnxruntime: no BN reading a shadowed name is folded.
    assert _reason(rep, "if/then_branch/bn_then") is SkipReason.IN_SUBGRAPH
    assert _reason(rep, "if/else_branch/bn_else") is SkipReason.IN_SUBGRAPH
    assert rep.folded == 0


def test_subgraph_bn_parameters_shadowing_outer_ones_are_not_folded() -> None:
    # The else-branch BN's statistics carry the names of the outer BN's: which tensor a reader gets is
    # not fixed (onnxruntime reads the branch's own, onnx's reference evaluator the outer ones).
    rng = np.random.default_rng(1)
    params, names = _bn_params("bn", 4, rng)
    outer = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("BatchNormalization", ["t", *names], ["y"], name="bn"),
    ]
    then, other = _branch("then", "bn_then", rng), _branch("else", "bn", rng)
    node = helper.make_node("If", ["c"], ["z"], name="if", then_branch=then, else_branch=other)
    w = _init("w", rng.standard_normal((4, 3, 3, 3)) * 0.5)
    m = _model(
        [*outer, node], [VI("x", F, [1, 3, 5, 5]), VI("c", TensorProto.BOOL, [])], ["y", "z"], [w, *params]
    )
    rep = _fold_and_compare(m, _if_feeds())
    assert _reason(rep, "if/else_branch/bn") is SkipReason.IN_SUBGRAPH
    assert _reason(rep, "bn") is SkipReason.IN_SUBGRAPH  # the outer BN reads those names too
    assert rep.folded == 1


# ---- recalibration: a statistic that is also the BN's own scale or shift ---------------------------
def test_recalibrate_refuses_a_mean_that_is_also_the_scale() -> None:
    # BatchNormalization(x, scale=m, B=b, mean=m, var=v): writing new statistics into 'm' would change
    # the BN's scale too, a change no recalibration asked for.
    from bnfold.errors import UnsupportedModelError
    from bnfold.onnx.recalibrate import recalibrate_model

    rng = np.random.default_rng(2)
    params, (_, beta, mean, var) = _bn_params("bn", 4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("BatchNormalization", ["t", mean, beta, mean, var], ["y"], name="bn"),
    ]
    w = _init("w", rng.standard_normal((4, 3, 3, 3)) * 0.5)
    m = _model(nodes, [VI("x", F, [2, 3, 5, 5])], ["y"], [w, *params[1:]])
    before = m.SerializeToString()
    batches = [{"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)} for _ in range(2)]
    with pytest.raises(UnsupportedModelError, match="'bn.mean'"):
        recalibrate_model(m, batches)
    assert m.SerializeToString() == before


# ---- malformed nodes: one typed error, no traceback out of the fold ---------------------------------
def _conv_bn_model(rng: np.random.Generator, bn_outputs: list[str]) -> onnx.ModelProto:
    params, names = _bn_params("bn", 4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("BatchNormalization", ["t", *names], bn_outputs, name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [VI("x", F, [1, 3, 5, 5])],
        [VI(o, F, [1, 4, 3, 3]) for o in (bn_outputs or ["t"])],
        [_init("w", rng.standard_normal((4, 3, 3, 3))), *params],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 10)
    return m


@pytest.mark.parametrize(
    ("node", "attribute"),
    [
        (1, helper.make_attribute("epsilon", "1e-5")),  # a string: float() raised ValueError
        (1, helper.make_attribute("epsilon", [1e-5, 1e-3])),  # a list: TypeError
        (1, helper.make_attribute("epsilon", 1)),  # an INT: folded with eps = 1, a model no runtime loads
        (0, helper.make_attribute("group", 1.0)),  # a FLOAT group
    ],
    ids=["epsilon-string", "epsilon-list", "epsilon-int", "group-float"],
)
def test_attribute_of_the_wrong_type_is_a_model_format_error(
    node: int, attribute: onnx.AttributeProto
) -> None:
    from bnfold.errors import ModelFormatError

    m = _conv_bn_model(np.random.default_rng(3), ["y"])
    m.graph.node[node].attribute.append(attribute)
    before = m.SerializeToString()
    with pytest.raises(ModelFormatError, match=f"attribute '{attribute.name}' is of type"):
        bnfold.fold_with_report(m)
    assert m.SerializeToString() == before


def test_bn_without_outputs_is_a_model_format_error() -> None:
    from bnfold.errors import ModelFormatError

    m = _conv_bn_model(np.random.default_rng(4), [])
    with pytest.raises(ModelFormatError, match="'bn' has no output"):
        bnfold.fold_with_report(m)  # was an IndexError


def test_recalibrate_refuses_branch_statistics_named_like_an_outer_initializer() -> None:
    # The then-branch BN's mean and variance are its own initializers; the main graph holds unused
    # initializers of the same names. onnxruntime reads the branch's; the recalibration wrote the
    # outer ones: the model came back "recalibrated" and computing exactly what it computed before.
    from bnfold.errors import UnsupportedModelError
    from bnfold.onnx.recalibrate import recalibrate_model

    rng = np.random.default_rng(5)
    params, names = _bn_params("bnt", 4, rng)
    then = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["tt"], name="ct"),
            helper.make_node("BatchNormalization", ["tt", *names], ["yt"], name="bnt"),
        ],
        "then",
        [],
        [VI("yt", F, None)],
        params,
    )
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["ye"])], "else", [], [VI("ye", F, None)])
    outer_copies = [_init(t.name, np.full(4, 7.0)) for t in params[2:]]
    node = helper.make_node("If", ["c"], ["z"], name="if", then_branch=then, else_branch=other)
    w = _init("w", rng.standard_normal((4, 3, 3, 3)) * 0.5)
    m = _model([node], [VI("x", F, [2, 3, 5, 5]), VI("c", TensorProto.BOOL, [])], ["z"], [w, *outer_copies])
    before = m.SerializeToString()
    batches = [
        {"x": (rng.standard_normal((2, 3, 5, 5)) * 2 + 1).astype(np.float32), "c": np.array(True)}
        for _ in range(2)
    ]
    with pytest.raises(UnsupportedModelError, match="'bnt.mean' is defined in two graphs"):
        recalibrate_model(m, batches)
    assert m.SerializeToString() == before


# ---- a rank declared by value_info only ------------------------------------------------------------
def test_matmul_add_bn_rank_declared_only_by_value_info_is_not_folded() -> None:
    # The MatMul reads a Reshape to a shape fed at run time (its rank is unknown to shape inference);
    # value_info says the product is [N, 4]. onnxruntime does not check value_info and runs the model
    # with a rank-3 product, where the BN channel (axis 1) is the product's rows. The MatMul+Add stays
    # a MatMul (any rank): a fold into W's columns was silently wrong.
    rng = np.random.default_rng(6)
    params, names = _bn_params("bn", 4, rng)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["a"], name="reshape"),
        helper.make_node("MatMul", ["a", "W"], ["p"], name="mm"),
        helper.make_node("Add", ["p", "bias"], ["t"], name="add"),
        helper.make_node("BatchNormalization", ["t", *names], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [VI("x", F, ["N", 16]), VI("shape", TensorProto.INT64, ["K"])],
        [VI("y", F, ["N", 4])],
        [_init("W", rng.standard_normal((4, 4))), _init("bias", rng.standard_normal(4)), *params],
        value_info=[VI("p", F, ["N", 4]), VI("t", F, ["N", 4])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 10)
    onnx.checker.check_model(m)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    feeds = [{"x": x, "shape": np.array(s, np.int64)} for s in ((2, 4, 4), (8, 4))]
    rep = _fold_and_compare(m, feeds, full_check=False)  # its declarations contradict the run
    assert _reason(rep, "bn") is SkipReason.LAYOUT


def test_propagation_into_matmul_needs_an_enforced_rank() -> None:
    # BN -> Relu -> MatMul on a Reshape to a shape fed at run time, value_info saying rank 2: at rank 3
    # the MatMul contracts the last axis, not the BN channel (axis 1); scaling its rows was silently wrong.
    rng = np.random.default_rng(7)
    params, names = _bn_params("bn", 4, rng)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["a"], name="reshape"),
        helper.make_node("BatchNormalization", ["a", *names], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [VI("x", F, ["N", 16]), VI("shape", TensorProto.INT64, ["K"])],
        [VI("y", F, ["N", 4])],
        [_init("W", rng.standard_normal((4, 4))), *params],
        value_info=[VI(v, F, ["N", 4]) for v in ("a", "b", "r")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 10)
    onnx.checker.check_model(m)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    feeds = [{"x": x, "shape": np.array(s, np.int64)} for s in ((2, 4, 4), (8, 4))]
    rep = _fold_and_compare(m, feeds, full_check=False)  # its declarations contradict the run
    assert rep.folded == 0 and [v.bn for v in rep.skips] == ["bn"]
