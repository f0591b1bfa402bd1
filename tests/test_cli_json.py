"""Every command's ``--json`` output, success and failure, validates against the shipped schema.

A pipeline reads one document shape: the common head (schema, version, command, ok, exit_code) and one
body per command, or an ``error`` object; ``ok`` and ``exit_code`` agree with the process exit code.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_cli import ROOT, tiny_onnx
from typer.testing import CliRunner

from bnfold.cli import app

jsonschema = pytest.importorskip("jsonschema")  # a test-only dependency: bnfold itself does not need it

runner = CliRunner()


def _schema() -> dict[str, Any]:
    text = resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8")
    return json.loads(text)


def _doc(args: list[str], code: int) -> dict[str, Any]:
    r = runner.invoke(app, args)
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    doc = json.loads(r.stdout)  # stdout holds one JSON document, whatever happened
    jsonschema.validate(doc, _schema())
    assert doc["exit_code"] == code and doc["ok"] is (code == 0)
    assert doc["schema"] == "bnfold.report" and doc["schema_version"] == 1
    return doc


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(p))
    return p


def test_schema_is_shipped_and_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(_schema())
    text = (ROOT / "pyproject.toml").read_text()
    assert "schemas/*.json" in text  # installed with the package, not only present in the repo


def test_fold_inspect_verify_documents(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    doc = _doc(["fold", str(model_path), str(out), "--json"], 0)
    assert doc["command"] == "fold" and doc["output"]["written"] is True
    assert doc["model"]["path"] == str(model_path) and doc["output"]["path"] == str(out)
    assert doc["model"]["size_bytes"] == model_path.stat().st_size
    assert doc["output"]["size_bytes"] == out.stat().st_size
    assert doc["summary"]["bn_before"] == 2 and doc["summary"]["bn_after"] == 1
    assert doc["summary"]["by_target_kind"] == {"Conv": 1} and doc["summary"]["by_reason"] == {
        "no_producer": 1
    }
    assert doc["verification"]["passed"] is True and doc["verification"]["inputs"] == {"x": [2, 3, 8, 8]}
    assert doc["signature"]["inputs"][0]["shape"] == ["N", 3, 8, 8]

    doc = _doc(["inspect", str(model_path), "--json"], 0)
    assert doc["dry_run"] is True and doc["summary"]["predicted"] is True and doc["output"] is None

    doc = _doc(["verify", str(model_path), str(out), "--json"], 0)
    assert doc["reference"]["path"] == str(model_path) and doc["candidate"]["path"] == str(out)


def test_failure_documents(model_path: Path, tmp_path: Path) -> None:
    # Not equivalent: the verify body, exit 1.
    bad = onnx.load(str(model_path))
    for t in bad.graph.initializer:
        if t.name == "bn2_bias":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + np.float32(0.5), t.name))
    bad_path = tmp_path / "bad.onnx"
    onnx.save(bad, str(bad_path))
    doc = _doc(["verify", str(model_path), str(bad_path), "--json"], 1)
    assert doc["verification"]["passed"] is False

    # A file that is no model: the head and an error object, exit 2; nothing else on stdout.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    doc = _doc(["inspect", str(junk), "--json"], 2)
    assert doc["error"]["exit_code"] == 2 and "junk.onnx" in doc["error"]["message"]

    # A usage error (unknown option) under --json is a document too.
    doc = _doc(["fold", str(model_path), str(tmp_path / "o.onnx"), "--json", "--bogus"], 2)
    assert doc["error"]["type"] == "UsageError" and "--bogus" in doc["error"]["message"]

    # --fail-if-left: the inspect body with exit 1.
    doc = _doc(["inspect", str(model_path), "--json", "--fail-if-left"], 1)
    assert doc["summary"]["bn_after"] == 1


def test_freeze_and_bench_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "lenet.pt"
    torch.save(randomize_bn(lenet5(), seed=3).eval().state_dict(), ckpt)
    doc = _doc(["freeze", str(ckpt), str(tmp_path / "frozen.pt"), "-m", "models.lenet:lenet5", "--json"], 0)
    assert len(doc["frozen"]) == 4 and all(f["kind"].startswith("FrozenBatchNorm") for f in doc["frozen"])
    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(onnx_path))
    doc = _doc(["bench", str(onnx_path), "--runs", "1", "--warmup", "0", "--json"], 0)
    assert {t["setting"] for t in doc["timings"]} == {
        "onnxruntime ORT_DISABLE_ALL",
        "onnxruntime ORT_ENABLE_ALL",
    }


def test_legacy_keys_are_aliases_of_the_summary(model_path: Path, tmp_path: Path) -> None:
    """Scripts written for 0.1.0 read top-level counts; schema 1 keeps them equal to ``summary``."""
    doc = _doc(["fold", str(model_path), str(tmp_path / "o.onnx"), "--json"], 0)
    for key in (
        "bn_before",
        "bn_after",
        "folded",
        "nodes_before",
        "nodes_after",
        "params_before",
        "params_after",
    ):
        assert doc[key] == doc["summary"][key]
    doc = _doc(["verify", str(model_path), str(tmp_path / "o.onnx"), "--json"], 0)
    assert doc["passed"] is doc["verification"]["passed"] is True


def test_propagated_bns_are_counted_apart_in_the_summary(tmp_path: Path) -> None:
    """A user reading the summary sees how many BNs went by scale propagation (also in ``folded``):
    the count equals the verdicts whose status is ``propagated``, and ``--no-propagate`` leaves them."""
    src = ROOT / "models" / "samples" / "preact_net.onnx"
    doc = _doc(["--json", "inspect", str(src)], 0)
    summary, verdicts = doc["summary"], doc["verdicts"]
    propagated = [v for v in verdicts if v["status"] == "propagated"]
    assert propagated and summary["propagated"] == len(propagated)
    assert summary["folded"] == sum(v["status"] in ("folded", "propagated") for v in verdicts)
    off = _doc(["--json", "inspect", str(src), "--no-propagate"], 0)["summary"]
    assert off["propagated"] == 0 and off["left"] == len(propagated)
    human = CliRunner().invoke(app, ["inspect", str(src)])
    assert f"{len(propagated)} of them by scale propagation" in " ".join(human.output.split())  # wrapped


def test_the_python_report_and_the_cli_document_are_one_serialisation(
    model_path: Path, tmp_path: Path
) -> None:
    """``FoldReport.to_dict()`` of the file job is the ``--json`` document without its head and aliases."""
    from bnfold.cli.jsonout import finite_json
    from bnfold.files import FoldSettings, InspectSettings, fold_file, inspect_file

    head = {"schema", "schema_version", "command", "ok", "exit_code", "bnfold_version"}
    legacy = {
        "bn_before",
        "bn_after",
        "folded",
        "nodes_before",
        "nodes_after",
        "params_before",
        "params_after",
    }
    for args, job in (
        (["inspect", str(model_path), "--json"], lambda: inspect_file(model_path, InspectSettings())),
        (
            ["fold", str(model_path), str(tmp_path / "a.onnx"), "--json"],
            lambda: fold_file(model_path, tmp_path / "b.onnx", FoldSettings()),
        ),
    ):
        doc = _doc(args, 0)
        body = json.loads(json.dumps(finite_json(job().to_dict())))
        jsonschema.validate({**{k: doc[k] for k in head | legacy}, **body}, _schema())
        for k in ("seconds",):  # timings differ between two runs
            body.pop(k), doc.pop(k)
        for d in (body, doc):
            for side in ("model", "output"):
                if d.get(side):
                    d[side].pop("path"), d[side].pop("size_bytes")
        assert {k: v for k, v in doc.items() if k not in head | legacy} == body
