"""The ONNX constant evaluator is bounded in bytes, in total: a tiny model cannot make it allocate gigabytes.

The hostile models compute a BN parameter through a chain of pure ops on a large float64/complex128
constant (each link kept), under the old element cap (2^28). The BN that needs such a value is left
with the reason; the other BNs of the model still fold; a model computing its weights from its own
data (float16 weights cast at run time) still folds.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bnfold
from bnfold.onnx import const
from bnfold.records import Skip, SkipReason
from models.testing import ATOL_F32, run_onnx


def _bn_params(rng: np.random.Generator, p: str, c: int) -> list[onnx.TensorProto]:
    return [
        nh.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), p + "g"),
        nh.from_array(rng.uniform(-0.5, 0.5, c).astype(np.float32), p + "b"),
        nh.from_array(rng.uniform(-0.8, 0.8, c).astype(np.float32), p + "m"),
        nh.from_array(rng.uniform(0.3, 2.5, c).astype(np.float32), p + "v"),
    ]


def _hostile(
    n: int, elem: int = T.DOUBLE, chain: tuple[str, ...] = ("Neg", "Abs", "Sqrt", "Neg")
) -> onnx.ModelProto:
    """Two branches: bn0 on an ordinary conv; bn1's scale computed from ConstantOfShape([n]) through ``chain``."""
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W0"),
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W1"),
        *_bn_params(rng, "a_", 4),
        *_bn_params(rng, "c_", 4),
    ]
    nodes = [
        h.make_node("Constant", [], ["n"], value=h.make_tensor("n", T.INT64, [1], [n])),
        h.make_node("ConstantOfShape", ["n"], ["k0"], value=h.make_tensor("v", T.DOUBLE, [1], [1.5])),
    ]
    prev = "k0"
    if elem != T.DOUBLE:
        nodes.append(h.make_node("Cast", [prev], ["kc"], to=elem))
        prev = "kc"
    for i, op in enumerate(chain):
        nodes.append(h.make_node(op, [prev], [f"k{i + 1}"], name=f"{op.lower()}{i}"))
        prev = f"k{i + 1}"
    if elem != T.DOUBLE:
        nodes.append(h.make_node("Abs", [prev], ["kr"]))  # complex -> its modulus, float64
        prev = "kr"
    nodes += [  # the BN takes 4 of them: a valid scale
        h.make_node("Constant", [], ["s0"], value=h.make_tensor("s0", T.INT64, [1], [0])),
        h.make_node("Constant", [], ["s1"], value=h.make_tensor("s1", T.INT64, [1], [4])),
        h.make_node("Slice", [prev, "s0", "s1"], ["k_s"]),
        h.make_node("Cast", ["k_s"], ["scale"], to=T.FLOAT),
    ]
    prev = "scale"
    nodes += [
        h.make_node("Conv", ["x", "W0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        h.make_node("BatchNormalization", ["c0", "a_g", "a_b", "a_m", "a_v"], ["y0"], name="bn0"),
        h.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        h.make_node("BatchNormalization", ["c1", prev, "c_b", "c_m", "c_v"], ["y1"], name="bn1"),
    ]
    g = h.make_graph(
        nodes,
        "hostile",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
        [
            h.make_tensor_value_info("y0", T.FLOAT, [1, 4, 8, 8]),
            h.make_tensor_value_info("y1", T.FLOAT, [1, 4, 8, 8]),
        ],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _peak(fn: object) -> tuple[object, int]:
    tracemalloc.start()
    try:
        out = fn()  # type: ignore[operator]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


@pytest.mark.parametrize(("n", "elem"), [(1 << 24, T.DOUBLE), (1 << 23, T.COMPLEX128)])
def test_tiny_model_cannot_allocate_gigabytes(n: int, elem: int) -> None:
    """128 MiB a link x 5 links: 640 MiB before the bound; now at most the budget, nothing folded wrong."""
    m = _hostile(n, elem)
    assert len(m.SerializeToString()) < 2000
    rep, peak = _peak(lambda: bnfold.inspect(m))
    assert peak < const.CONST_BUDGET_BYTES + (16 << 20), peak  # at most the budget, not 640 MiB
    verdicts = {v.bn: v for v in rep.verdicts}  # type: ignore[attr-defined]
    assert verdicts["bn0"].folded
    v = verdicts["bn1"]
    assert isinstance(v, Skip) and v.reason is SkipReason.NON_CONSTANT
    assert "budget" in v.detail and "MiB" in v.detail


def test_budget_is_shared_not_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small links, each under any per-tensor cap, are bounded together."""
    monkeypatch.setattr(const, "CONST_BUDGET_BYTES", 1 << 20)  # 1 MiB of computed bytes
    m = _hostile(1 << 15, chain=("Neg", "Abs") * 4)  # 256 KiB a link, 9 links: 2.25 MiB in total
    rep = bnfold.inspect(m)
    v = next(v for v in rep.verdicts if v.bn == "bn1")
    assert isinstance(v, Skip) and "budget" in v.detail
    m = _hostile(1 << 15, chain=("Neg",))  # 2 links, 512 KiB: within the budget, evaluated
    v = next(v for v in bnfold.inspect(m).verdicts if v.bn == "bn1")
    assert not (isinstance(v, Skip) and "budget" in v.detail)


def _cast_weights() -> onnx.ModelProto:
    """Conv weights stored as float16 and cast to float32 at run time (x -> Conv -> BN -> y)."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float16)  # 9 KiB stored, 18 KiB cast
    inits = [nh.from_array(w, "W16"), *_bn_params(rng, "p_", 32)]
    nodes = [
        h.make_node("Cast", ["W16"], ["W"], to=T.FLOAT, name="cast"),
        h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        h.make_node("BatchNormalization", ["c", "p_g", "p_b", "p_m", "p_v"], ["y"], name="bn"),
    ]
    g = h.make_graph(
        nodes,
        "cast",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 16, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 32, 8, 8])],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_weights_computed_from_the_model_own_data_still_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget scales with the model's data: a cast weight larger than the fixed part still folds."""
    monkeypatch.setattr(const, "CONST_BUDGET_BYTES", 1024)
    m = _cast_weights()
    folded = bnfold.fold(m)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(6).standard_normal((1, 16, 8, 8)).astype(np.float32)
    run = [run_onnx(mm, {"x": x})[0] for mm in (m, folded)]
    assert np.max(np.abs(run[0] - run[1])) <= ATOL_F32 * np.max(np.abs(run[0]))


def test_cli_inspect_of_the_tiny_model_stays_small(tmp_path: Path) -> None:
    """The whole CLI, in a process of its own: exit 0, bn1 left with the reason, peak RSS far below 1 GiB."""
    p = tmp_path / "tiny.onnx"
    onnx.save(_hostile(1 << 26), str(p))  # 512 MiB a link, 2.5 GiB before the bound
    code = (
        "import resource, sys\n"
        "from typer.testing import CliRunner\n"
        "from bnfold.cli import app\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"r = CliRunner().invoke(app, ['inspect', {str(p)!r}, '--json'])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(r.exit_code, (peak - base) // 1024, 'budget' in r.stdout)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    exit_code, grown_mib, said = out.stdout.split()
    assert exit_code == "0" and said == "True", out.stdout + out.stderr
    assert int(grown_mib) < 200, grown_mib


def test_freed_evaluators_give_their_bytes_back() -> None:
    """A fold builds one evaluator per pass: the budget bounds what is alive, not the sum over passes."""
    from bnfold.onnx.graph import GraphIndex

    m = _hostile(1 << 16, chain=("Neg",))  # 512 KiB + 512 KiB computed
    index = GraphIndex.build(m.graph, None, m.ir_version)
    budget = const.ConstBudget(3 << 19)  # 1.5 MiB: one evaluation fits, two alive at once do not
    for _ in range(5):
        ev = const.ConstEvaluator(index, 17, budget=budget)
        v, reason, detail = ev.resolve("k1")
        assert v is not None, detail
        assert budget.used == 1 << 20
        del ev, v
    assert budget.used == 0
    a = const.ConstEvaluator(index, 17, budget=budget)
    b = const.ConstEvaluator(index, 17, budget=budget)
    assert a.resolve("k1")[0] is not None
    v, reason, detail = b.resolve("k1")
    assert v is None and reason is SkipReason.NON_CONSTANT and "budget" in detail
