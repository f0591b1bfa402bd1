"""The copies the PyTorch fold makes: the caller's model stays as it was, the result owns its tensors,
and a dry run predicts the figures of the fold it did not make."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnfold.fx import fold_module
from bnfold.fx.copying import copy_model
from models.snapshot import assert_unchanged, snapshot
from models.stats import randomize_bn


def prep(m: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    randomize_bn(m, seed)
    return m.eval()


def storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()] if t.numel()}


class Block(nn.Module):
    """Conv -> BN twice, a Python list of modules and a cached tensor in plain attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.order = [self.conv1, self.conv2]  # not registered: deepcopy keeps it pointing at the copies
        self.scale = torch.full((1,), 0.5)
        self.flags = {"mode": "x", "sizes": (1, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(y.mean((2, 3))) * self.scale


def test_result_owns_its_tensors_and_training_it_leaves_the_original() -> None:
    m = prep(Block())
    x = torch.randn(2, 3, 8, 8)
    ref = m(x).detach()
    before = snapshot(m)
    out, rep = fold_module(m)
    assert rep.folded == 2
    assert not storages(out) & storages(m)  # no tensor of the result lives in the caller's storage
    assert_unchanged(before, m)
    # Train the result for a few steps: the caller's model must not move.
    out.train()
    for _ in range(3):  # plain SGD steps, in place as an optimiser takes them
        out.zero_grad()
        out(x).square().mean().backward()
        with torch.no_grad():
            for p in out.parameters():
                p.sub_(0.1 * p.grad)
    with torch.no_grad():
        out.scale.mul_(3.0)
        for b in out.buffers():
            b.add_(1)
    assert_unchanged(before, m)
    assert torch.equal(m(x), ref)


def test_result_python_state_points_at_its_own_modules() -> None:
    m = prep(Block())
    out, _ = fold_module(m)
    assert out.order[0] is out.conv1 and out.order[1] is out.conv2
    assert out.order[0] is not m.conv1
    assert out.scale is not m.scale and torch.equal(out.scale, m.scale)
    assert out.flags == m.flags and out.flags is not m.flags


class Cached(nn.Module):
    """A weight also held by a plain attribute: the fold replaces the registered one only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.alias = [self.conv.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_weight_held_by_a_python_attribute_is_copied_not_shared() -> None:
    m = prep(Cached())
    x = torch.randn(1, 3, 6, 6)
    out, rep = fold_module(m)
    assert rep.folded == 1
    assert torch.allclose(out(x), m(x), atol=1e-5)
    assert out.alias[0] is not m.conv.weight
    assert out.alias[0].untyped_storage().data_ptr() != m.conv.weight.untyped_storage().data_ptr()
    assert torch.equal(out.alias[0], m.conv.weight)  # deepcopy's value: the weight before the fold


class OwnCopy(nn.Module):
    """A class with its own ``__deepcopy__``: copied by deepcopy itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.copies = 0

    def __deepcopy__(self, memo: dict[int, object]) -> OwnCopy:
        new = OwnCopy()
        new.conv.load_state_dict(self.conv.state_dict())
        new.copies = self.copies + 1
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_copy_model_matches_deepcopy() -> None:
    m = nn.Sequential(prep(Block()), OwnCopy())
    m[0].register_forward_hook(lambda mod, i, o: o)
    ours, ref = copy_model(m), copy.deepcopy(m)
    assert [type(a) for a in ours.modules()] == [type(b) for b in ref.modules()]
    for (ka, a), (kb, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    assert ours[1].copies == ref[1].copies == 1  # the class's own __deepcopy__ ran
    assert len(ours[0]._forward_hooks) == 1
    assert not storages(ours) & storages(m)
    shared = copy_model(m, share_tensors=True)
    assert shared[0].conv1.weight is m[0].conv1.weight and shared[0] is not m[0]


# ---- dry run: predicted figures against the fold itself ----------------------------------------
class NoBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.lin = nn.Linear(5, 3, bias=False)
        self.bn1d = nn.BatchNorm1d(3)
        self.bn_left = nn.BatchNorm2d(5)  # after a residual tap: stays

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        z = self.bn_left(y + 1)
        return self.bn1d(self.lin(z.mean((2, 3))))


class Shared(nn.Module):
    """One conv called twice: the fold needs a GraphModule (clones per call site)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class Untraceable(nn.Module):
    """Control flow on a tensor value: the fallback folds inside the part that traces."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y if y.sum() > 0 else -y


def _resnet() -> nn.Module:
    from models.resnet import resnet18

    return resnet18(num_classes=10)


@pytest.mark.parametrize(
    "make,example",
    [
        (NoBias, (torch.randn(2, 3, 6, 6),)),
        (Shared, None),
        (Untraceable, None),
        (_resnet, None),
    ],
    ids=["no-bias", "graph-module", "fallback", "resnet18"],
)
def test_dry_run_predicts_the_fold(make: object, example: tuple[torch.Tensor, ...] | None) -> None:
    m = prep(make())  # type: ignore[operator]
    before = snapshot(m)
    same, dry = fold_module(m, dry_run=True, example_inputs=example)
    assert same is m and dry.dry_run
    assert_unchanged(before, m)
    out, real = fold_module(m, example_inputs=example)
    assert real.folded > 0 and dry.folded == real.folded
    assert (dry.bn_after, dry.nodes_after, dry.params_after) == (
        real.bn_after,
        real.nodes_after,
        real.params_after,
    )
    assert dry.bn_before == real.bn_before and dry.bn_after < dry.bn_before


def _same_shape(a: object, b: object, depth: int = 0) -> None:
    """``b`` has the structure and values of ``a`` (tensors equal, never the same storage)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b) and a.requires_grad == b.requires_grad
        assert a.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    elif isinstance(a, dict) and depth < 4:
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _same_shape(a[k], b[k], depth + 1)
    elif isinstance(a, (list, tuple)) and depth < 4:
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            _same_shape(x, y, depth + 1)


@pytest.mark.parametrize(
    "name", ["timm_resnet", "efficientnet_same", "levit", "csp_mixconv", "checkpoint_net"]
)
def test_copy_model_equals_deepcopy_on_reference_nets(name: str) -> None:
    from models.realworld import REALWORLD

    make, shape = REALWORLD[name]
    m = prep(make())
    with torch.no_grad():
        m(torch.randn(shape))  # eval-mode caches (LeViT's attention biases) are filled
    ours, ref = copy_model(m), copy.deepcopy(m)
    names = [n for n, _ in ref.named_modules(remove_duplicate=False)]
    assert [n for n, _ in ours.named_modules(remove_duplicate=False)] == names
    for (_, a), (_, b), (_, o) in zip(
        ref.named_modules(remove_duplicate=False),
        ours.named_modules(remove_duplicate=False),
        m.named_modules(remove_duplicate=False),
    ):
        assert type(a) is type(b) and b is not o
        assert list(vars(a)) == list(vars(b))
        for k in vars(a):
            if k != "_modules":
                _same_shape(vars(a)[k], vars(b)[k])  # what deepcopy makes
                _same_shape(vars(o)[k], vars(b)[k])  # the caller's values, in storage of its own
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(ours(x), m(x))
