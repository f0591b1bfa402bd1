"""User callbacks (``register_bn_like``, ``register_checkpoint_runner``) fail with typed bnfold errors,
one line naming the class and the callback, never a raw KeyError/ValueError from inside the fold."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import BnfoldError, OptionError, UnsupportedModelError
from bnfold.fx import custom


class _BnAct(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.g = nn.Parameter(torch.rand(c, generator=g) + 0.5)
        self.b = nn.Parameter(torch.rand(c, generator=g) - 0.5)
        self.register_buffer("mu", torch.rand(c, generator=g) - 0.5)
        self.register_buffer("sigma2", torch.rand(c, generator=g) + 0.5)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (1, -1, 1, 1)
        return self.act(
            (x - self.mu.view(s)) / torch.sqrt(self.sigma2.view(s) + 1e-3) * self.g.view(s) + self.b.view(s)
        )


@pytest.fixture
def model() -> Iterator[nn.Module]:
    yield nn.Sequential(nn.Conv2d(3, 4, 3), _BnAct(4)).eval()
    custom._REGISTRY.pop(_BnAct, None)


def _good_stats(m: Any) -> tuple[Any, ...]:
    return (m.g, m.b, m.mu, m.sigma2, 1e-3)


@pytest.mark.parametrize(
    ("stats", "tail", "words"),
    [
        (lambda m: (m.gamma, m.b, m.mu, m.sigma2, 1e-3), None, "stats function registered for _BnAct"),
        (
            lambda m: (m.g, m.b, m.mu),
            None,
            "must return (weight, bias, running_mean, running_var, eps), got tuple of 3",
        ),
        (lambda m: (m.g, m.b, m.mu, "var", 1e-3), None, "running_var must be a tensor"),
        (lambda m: (m.g, m.b, m.mu, m.sigma2, float("nan")), None, "eps must be a finite number"),
        (_good_stats, lambda m: m.activation, "tail function registered for _BnAct"),
        (_good_stats, lambda m: "relu", "must return an nn.Module or None, got str"),
    ],
)
def test_failing_callbacks_are_typed_one_line(model: nn.Module, stats: Any, tail: Any, words: str) -> None:
    bnfold.register_bn_like(_BnAct, stats=stats, tail=tail)
    x = torch.randn(2, 3, 6, 6)
    for call in (lambda: bnfold.fold(model, example_inputs=(x,)), lambda: bnfold.freeze(model)):
        with pytest.raises(UnsupportedModelError) as ei:
            call()
        msg = str(ei.value)
        assert words in msg and "\n" not in msg, msg
        assert ei.value.exit_code == 2
    assert isinstance(model[1], _BnAct)  # the model given is untouched


def test_good_callbacks_still_fold(model: nn.Module) -> None:
    bnfold.register_bn_like(_BnAct, stats=_good_stats, tail=lambda m: m.act)
    x = torch.randn(2, 3, 6, 6)
    folded = bnfold.fold(model, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, _BnAct) for m in folded.modules())


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: bnfold.register_bn_like(42), "expects an nn.Module class, got int"),  # type: ignore[arg-type]
        (lambda: bnfold.register_bn_like(_BnAct, stats="m.g"), "stats must be callable"),  # type: ignore[arg-type]
        (lambda: bnfold.register_checkpoint_runner(print, "sometimes"), "runs must be 'call' or 'children'"),
        (lambda: bnfold.register_checkpoint_runner(42), "expects a function"),  # type: ignore[arg-type]
    ],
)
def test_bad_registrations_are_option_errors(call: Any, words: str) -> None:
    with pytest.raises(OptionError, match=words):
        call()
    assert _BnAct not in custom._REGISTRY


def test_a_bnfold_error_from_a_callback_passes_through(model: nn.Module) -> None:
    def stats(m: Any) -> Any:
        raise OptionError("my own refusal")

    bnfold.register_bn_like(_BnAct, stats=stats)
    with pytest.raises(BnfoldError, match="^my own refusal$"):
        bnfold.freeze(model)
