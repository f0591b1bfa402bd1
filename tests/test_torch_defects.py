"""PyTorch-side defects of issue 22, each checked the way a user would meet it.

- 22.9: a factory given as a file path (``-m dir/net.py:factory``) loads as a registered module, like
  the dotted form: a ``.pt`` output pickles the class defined in that file, and a model that does not
  trace folds the same as with ``-m net:factory``.
- 22.12: LeViT (Linear on (B, N, C) -> flatten -> BatchNorm1d -> reshape back) as ``.pt2`` folds as
  every other path does, and the ``.pt2`` BNs are named by module path.
- 22.18: ``unfreeze`` gives back the BN's own values, bit for bit; ``to_bn_state_dict`` takes eps from
  the model.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli import app

runner = CliRunner()

FP32_ATOL = 1e-5
"""float32 fold error floor on outputs of scale ~1-10 (a few ulp of the accumulated sums)."""


# ------------------------------------------------------------------------ 22.9 file-path factories
_FACTORY = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))


    class Net(nn.Module):
        """Python control flow on a tensor value: the whole model does not trace, ``block`` does."""

        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            y = self.block(x)
            if float(y.mean()) > 1e9:
                return -y
            return y


    def factory():
        torch.manual_seed(0)
        m = Net()
        bn = m.block.bn
        with torch.no_grad():
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        return m.eval()


    factory.example_input_shape = (3, 8, 8)
''')


@pytest.fixture()
def factory_file(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``tmp_path/src/<stem>.py`` with the factory, and a state_dict of it; the import undone afterwards."""
    stem = f"bnfold_factory_{tmp_path.name.replace('-', '_')}"
    src = tmp_path / "src"
    src.mkdir()
    py = src / f"{stem}.py"
    py.write_text(_FACTORY)
    path = list(sys.path)
    try:
        ns: dict[str, object] = {}
        exec(compile(_FACTORY, "<factory>", "exec"), ns)  # a copy of the model, never registered
        weights = tmp_path / "weights.pt"
        torch.save(ns["factory"]().state_dict(), weights)  # type: ignore[operator]
        yield py, weights
    finally:
        sys.modules.pop(stem, None)
        sys.path[:] = path


def _reference(py: Path) -> torch.nn.Module:
    ns: dict[str, object] = {}
    exec(compile(py.read_text(), str(py), "exec"), ns)
    return ns["factory"]()  # type: ignore[operator,no-any-return]


def test_file_factory_pt_output_pickles_the_class_from_that_file(
    factory_file: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    py, weights = factory_file
    work = tmp_path / "elsewhere"  # the factory's folder is not the current one
    work.mkdir()
    monkeypatch.chdir(work)
    before = weights.read_bytes()
    out = work / "folded.pt"
    r = runner.invoke(app, ["fold", str(weights), "-m", f"{py}:factory", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["summary"]["bn_before"] == 1 and data["summary"]["bn_after"] == 0
    assert weights.read_bytes() == before
    folded = torch.load(out, weights_only=False)
    assert type(folded).__module__ == py.stem and type(folded).__name__ == "Net"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), _reference(py)(x), atol=FP32_ATOL, rtol=0)


def test_file_factory_folds_an_untraceable_model_like_the_dotted_form(
    factory_file: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    py, weights = factory_file
    monkeypatch.chdir(py.parent)  # the dotted form finds the module in the current folder
    verdicts = {}
    for form in (f"{py}:factory", f"{py.stem}:factory"):
        out = tmp_path / f"out{len(verdicts)}.pt"
        r = runner.invoke(app, ["fold", str(weights), "-m", form, "-o", str(out), "--json"])
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        verdicts[form] = [(v["bn"], v["status"], v["target"]) for v in data["verdicts"]]
    assert list(verdicts.values()) == [[("block.bn", "folded", "block.conv")]] * 2, verdicts


def test_file_factory_named_like_an_imported_module_is_refused(tmp_path: Path) -> None:
    py = tmp_path / "json.py"  # `json` is imported already: loading this file as `json` would shadow it
    py.write_text("def factory():\n    raise AssertionError('must not run')\n")
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    r = runner.invoke(app, ["fold", str(weights), "-m", f"{py}:factory", "-o", str(tmp_path / "o.pt")])
    assert r.exit_code == 2
    assert "module name 'json' is already taken" in r.stderr and "Traceback" not in r.output
    assert sys.modules["json"] is json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["json.py", "w.pt"]
