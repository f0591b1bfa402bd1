"""ONNX fold: the functional copy (one copy of each weight), stable labels of unnamed nodes, and the
flush of denormals at write time."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.denormals import count_subnormal, flush_targets
from bnfold.onnx import fold_model
from bnfold.records import SkipReason
from models.onnx_graphs import G, check_fold, feeds_for, run


def _unnamed_chain() -> onnx.ModelProto:
    """Conv_0 -> BN_1 -> Relu_2 -> Conv_3 -> BN_4 -> BN_5, all nodes unnamed.

    BN_5 folds in the second pass, after BN_1 and BN_4 are gone: in that pass Conv_3 sits at index 2.
    """
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    g.node("Conv", [x, g.rand("w0", (4, 3, 3, 3))], ["t0"], pads=[1, 1, 1, 1])
    g.bn("t0", "u0", 4, "bn0")
    g.node("Relu", ["u0"], ["r"])
    g.node("Conv", ["r", g.rand("w1", (5, 4, 1, 1))], ["t1"])
    g.bn("t1", "u1", 5, "bn1")
    g.bn("u1", "y", 5, "bn2")
    g.output("y")
    m = g.model()
    for n in m.graph.node:
        n.name = ""
    return m


def test_unnamed_labels_name_the_nodes_of_the_given_graph() -> None:
    m = _unnamed_chain()
    out, rep = check_fold(m)
    pairs = {s.bn: s.target for s in rep.sites}
    assert pairs == {
        "BatchNormalization_1": "Conv_0",
        "BatchNormalization_4": "Conv_3",
        "BatchNormalization_5": "Conv_3",
    }
    for bn, target in pairs.items():  # each label is the op type and index of the node in the input
        for label in (bn, target):
            op, i = label.rsplit("_", 1)
            assert m.graph.node[int(i)].op_type == op


def test_exclude_by_stable_label_after_a_shift() -> None:
    m = _unnamed_chain()
    out, rep = fold_model(m, exclude={"BatchNormalization_5"})
    v = {x.bn: x for x in rep.verdicts}
    assert v["BatchNormalization_5"].reason is SkipReason.VERIFICATION  # type: ignore[union-attr]
    assert rep.folded == 2 and rep.bn_after == 1
    feeds = feeds_for(m)
    np.testing.assert_allclose(run(m, feeds)[0], run(out, feeds)[0], rtol=1e-5, atol=1e-5)


def _mixed_model() -> onnx.ModelProto:
    """Large folded weights, a large weight no BN touches, a shared weight, metadata."""
    g = G()
    x = g.input("x", [2, 8, 6, 6])
    g.node("Conv", [x, g.rand("w", (32, 8, 3, 3))], ["t"], name="conv", pads=[1, 1, 1, 1])
    g.bn("t", "u", 32, "bn")
    g.node("Conv", ["u", g.rand("w2", (32, 32, 1, 1))], ["v"], name="plain")  # 4 KiB, never folded
    g.node("Conv", ["v", "w2"], ["s"], name="shared")  # reads w2 too: the fold writes a new initializer
    g.bn("s", "y", 32, "bn2")
    g.output("y")
    m = g.model()
    m.doc_string = "a model"
    m.producer_name = "tests"
    helper.set_model_props(m, {"k": "v"})
    m.graph.doc_string = "its graph"
    return m


def test_functional_fold_equals_the_in_place_fold_and_leaves_the_input() -> None:
    m = _mixed_model()
    before = m.SerializeToString(deterministic=True)
    out, rep = check_fold(m)
    assert rep.folded == 2
    twin = onnx.ModelProto()
    twin.CopyFrom(m)
    in_place, _ = fold_model(twin, inplace=True)
    assert out.SerializeToString(deterministic=True) == in_place.SerializeToString(deterministic=True)
    assert m.SerializeToString(deterministic=True) == before
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(
        inits["w2"], numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w2"))
    )


def test_functional_fold_with_repeated_initializer_names_copies_the_whole_model() -> None:
    m = _mixed_model()
    dup = onnx.TensorProto()
    dup.CopyFrom(m.graph.initializer[0])
    m.graph.initializer.append(dup)  # same name twice: found by name, so no placeholders
    before = m.SerializeToString()
    out, rep = fold_model(m)
    assert rep.folded == 2 and m.SerializeToString() == before
    assert len(out.graph.initializer) >= 1


def _tiny_gamma_conv(dtype: int) -> onnx.ModelProto:
    g = G(dtype)
    x = g.input("x", [1, 4, 5, 5])
    g.node("Conv", [x, g.rand("w", (64, 4, 3, 3))], ["t"], name="conv")
    np_dt = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.5, 1.5, 64)
    gamma[:8] = 1e-39 if dtype != TensorProto.FLOAT16 else 1e-7  # folded weights turn subnormal
    g.init("bn.scale", gamma.astype(np_dt))
    g.init("bn.bias", rng.uniform(-0.5, 0.5, 64).astype(np_dt))
    g.init("bn.mean", rng.uniform(-0.5, 0.5, 64).astype(np_dt))
    g.init("bn.var", rng.uniform(0.5, 2.0, 64).astype(np_dt))
    g.node("BatchNormalization", ["t", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"], name="bn")
    g.output("y")
    return g.model()


def test_flush_at_write_time_equals_the_post_pass() -> None:
    m = _tiny_gamma_conv(TensorProto.FLOAT)
    exact, rep0 = fold_model(m)
    w_exact = numpy_helper.to_array(next(t for t in exact.graph.initializer if t.name == "w"))
    assert count_subnormal(w_exact) > 0 and rep0.flushed_denormals is None
    flushed, rep = fold_model(m, flush_denormals=True)
    post = onnx.ModelProto()
    post.CopyFrom(exact)
    n_post = flush_targets(post, rep0)
    assert rep.flushed_denormals == n_post == count_subnormal(w_exact)
    assert flushed.SerializeToString(deterministic=True) == post.SerializeToString(deterministic=True)
    w = numpy_helper.to_array(next(t for t in flushed.graph.initializer if t.name == "w"))
    assert count_subnormal(w) == 0
    feeds = feeds_for(m)
    np.testing.assert_allclose(run(m, feeds)[0], run(flushed, feeds)[0], rtol=1e-5, atol=1e-6)
    assert flush_targets(flushed, rep) == rep.flushed_denormals  # the fold did it: no second pass


def test_flush_at_write_time_leaves_float16() -> None:
    m = _tiny_gamma_conv(TensorProto.FLOAT16)
    exact, _ = fold_model(m)
    flushed, rep = fold_model(m, flush_denormals=True)
    assert rep.flushed_denormals == 0
    assert flushed.SerializeToString(deterministic=True) == exact.SerializeToString(deterministic=True)


def test_unnamed_if_keeps_its_label_after_the_bn_before_it_folds() -> None:
    # Conv_0 -> BN_1 -> If_2 (unnamed); BN_1 folds and is removed before the If's bodies are folded,
    # so the If sits at index 1 by then: its bodies' BNs are still named after If_2.
    g = G()
    x = g.input("x", [1, 3, 5, 5])
    cond = g.input("cond", [], TensorProto.BOOL)
    g.node("Conv", [x, g.rand("w", (3, 3, 1, 1))], ["t"])
    g.bn("t", "u", 3, "bn")
    w = g.rand("w2", (4, 3, 3, 3))
    branches = []
    for k in range(2):
        sub = G(seed=10 + k)
        sub.node("Conv", ["u", w], [f"t{k}"], name=f"conv{k}")
        sub.bn(f"t{k}", f"y{k}", 4, f"bn{k}")
        sub.output(f"y{k}")
        branches.append(helper.make_graph(sub.nodes, f"b{k}", [], sub.outputs, sub.inits))
    g.node("If", [cond], ["y"], then_branch=branches[0], else_branch=branches[1])
    g.output("y")
    m = g.model()
    for n in m.graph.node:
        n.name = ""
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert rep.bn_after == 0
    assert {v.bn for v in rep.verdicts} == {
        "BatchNormalization_1",
        "If_2/then_branch/bn0",
        "If_2/else_branch/bn1",
    }
    assert m.graph.node[2].op_type == "If"
    for c in (True, False):
        feeds = {"x": feeds_for(m)["x"], "cond": np.array(c)}
        np.testing.assert_allclose(run(m, feeds)[0], run(out, feeds)[0], rtol=1e-5, atol=2e-4)
