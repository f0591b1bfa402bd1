"""The catalogue of fold patterns: one stable id per way a BatchNorm leaves a model, for both backends.

Every :class:`~bnfold.records.Site` names the pattern it was matched as (``Site.pattern``, ``pattern`` in
``--json``), the matchers cite these ids in their comments (``# conv-bn``), and the README's pattern table
is :func:`markdown_table` (a test keeps them equal). An id never changes meaning once released: a new
shape of fold gets a new entry. How to add one: CONTRIBUTING.md.

Notation of :attr:`Pattern.math`: eval-mode BN is ``y = s * x + t`` per channel, ``s = gamma /
sqrt(var + eps)``, ``t = beta - mean * s`` (float64, :func:`bnfold.fold_math.bn_affine`); ``W``, ``b``
are the layer's weight and bias.

This module imports nothing from bnfold (it sits beside :mod:`bnfold.records` in the layering), so
:attr:`Pattern.direction` is the value of a :class:`~bnfold.records.Direction`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Pattern", "CATALOGUE", "BACKENDS", "SCOPES", "ids", "get", "markdown_table"]

BACKENDS = ("onnx", "fx", "export")
"""The backends: ONNX graphs, PyTorch modules (``torch.fx``), torch.export programs (ATen graphs)."""


@dataclass(frozen=True, slots=True)
class Pattern:
    """One fold pattern.

    Attributes:
        id: stable short name (lower case, hyphens), the value of ``Site.pattern``.
        title: what the matcher looks for, in the words of the README table.
        direction: the ``Direction`` value its sites carry ("forward", "backward", "affine", ...).
        math: the rewrite in one line.
        onnx, fx, export: how the backend supports it: "yes", a short qualification, or "" (not matched).
        example: a real model or block where it occurs.
    """

    id: str
    title: str
    direction: str
    math: str
    onnx: str = ""
    fx: str = ""
    export: str = ""
    example: str = ""

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends that match it, in :data:`BACKENDS` order."""
        return tuple(b for b in BACKENDS if getattr(self, b))


CATALOGUE: tuple[Pattern, ...] = (
    Pattern(
        "conv-bn",
        "Conv / ConvTranspose (1-3d, any groups) → BN",
        "forward",
        "W' = s·W per output channel (grouped ConvTranspose: axis 1 per group), b' = s·b + t",
        onnx="yes",
        fx="yes",
        export="yes",
        example="ResNet conv1 → bn1",
    ),
    Pattern(
        "gemm-bn",
        "Gemm (any alpha, beta, transB, broadcast C) / MatMul / MatMul→Add / Linear → BN on (N, C)",
        "forward",
        "W' = W·diag(s) on the output features, b' = s·b + t (MatMul becomes Gemm; beta = 1)",
        onnx="yes",
        fx="Linear → BN on (N, C)",
        export="yes (`mm` / `bmm` linears too)",
        example="LeNet fc1 → BatchNorm1d",
    ),
    Pattern(
        "const-add-bn",
        "Conv / ConvTranspose / Gemm → Add(per-channel constant) → BN",
        "forward",
        "W' = s·W, b' = s·(b + k) + t; the Add goes",
        onnx="yes",
        example="exporters that write the conv bias as a separate Add",
    ),
    Pattern(
        "linear-norm",
        "LinearNorm: Linear / MatMul on (B, N, C) → flatten / Reshape to `[*, D, 1..]` / Transpose "
        "(up to 8, the output axis followed to the BN channel) → BN → back",
        "forward",
        "W' = W·diag(s) on the output axis, b' = s·b + t (no bias: the BN becomes one Add(x, t))",
        onnx="yes (shift into the bias, or one Add; shapes inferred when not declared)",
        fx="yes, when the token rank is proven (graph or `example_inputs`)",
        export="yes",
        example="LeViT's LinearNorm",
    ),
    Pattern(
        "frozen-bn",
        "per-channel Mul + Add with constant operands (a frozen BN) after Conv / ConvTranspose / Gemm",
        "forward",
        "W' = m·W, b' = m·b + a for Mul(m), Add(a); both nodes go",
        onnx="yes (PyTorch: a `FrozenBatchNorm` module folds as `conv-bn`)",
        example="detectron2 FrozenBatchNorm2d exported to ONNX",
    ),
    Pattern(
        "concat-split",
        "BN on a channel Concat of layer outputs",
        "forward",
        "the slice [c_i, c_i + C_i) of s and t folds into producer i as conv-bn",
        onnx="yes, split per slice",
        fx="yes, split per slice",
        export="yes",
        example="CSP blocks, mixed-kernel convs",
    ),
    Pattern(
        "branch-sum",
        "BN on a sum of layer branches, each read only by the sum",
        "forward",
        "s·(Σ z_i) + t = Σ (s·z_i) + t: every branch scaled, the shift into one bias",
        onnx="yes, shift into one bias",
        fx="yes, shift into one bias",
        export="yes",
        example="RepViT token mixer, conv branches summed before one BN",
    ),
    Pattern(
        "bn-conv",
        "BN → Conv that reads no padded zeros (pads 0, or `reflect` / `replicate` / `circular` padding)",
        "backward",
        "W' = W·s per input channel, b' = b + Σ W·t (the shift's image)",
        onnx="yes",
        fx="yes",
        export="yes",
        example="a BN normalising the input before the first conv",
    ),
    Pattern(
        "bn-gemm",
        "BN → Gemm / MatMul / Linear on (N, C)",
        "backward",
        "W' = W·diag(s) on the input features, b' = b + W·t",
        onnx="yes",
        fx="yes",
        export="yes",
        example="NormLinear heads (BN1d → Linear)",
    ),
    Pattern(
        "bn-flatten-gemm",
        "BN → Flatten (or a flattening Reshape) → Gemm / MatMul / Linear",
        "backward",
        "as bn-gemm with s and t repeated over the K/C flattened positions",
        onnx="yes",
        fx="yes",
        export="yes",
        example="LeNet BN2d → flatten → fc",
    ),
    Pattern(
        "qdq-bn",
        "QDQ: `DequantizeLinear` weight → Conv / ConvTranspose / Gemm / MatMul → BN",
        "forward",
        "scales s_q' = s_q·|s| (int weights kept, negated where s < 0), float bias b' = s·b + t",
        onnx="yes",
        example="a QDQ-quantized MobileNet exported before its BNs were folded",
    ),
    Pattern(
        "bn-qdq",
        "QDQ: BN → Conv (no padding) / Gemm / MatMul whose weight comes through `DequantizeLinear`",
        "backward",
        "scales s_q' = s_q·|s| where one BN scale serves every channel or the weight is quantized per input "
        "channel (int weights kept, negated where s < 0); bias b' = b + W·t (float64)",
        onnx="yes",
        example="a QDQ-quantized pre-activation block exported before its BNs were folded",
    ),
    Pattern(
        "branch-merge",
        "branch sums of one tensor (Conv, identity, BN, AvgPool, 1×1→k×k, constant-scaled) → one Conv",
        "forward",
        "K = Σ_i embed(K_i), bias = Σ_i b_i (float64, rounded once); a branch BN is the identity kernel scaled",
        onnx="yes, merged",
        fx="yes (nn.Module, torch.fx)",
        export="yes (one convolution op per merged sum)",
        example="RepVGG, MobileOne, RepViT",
    ),
    Pattern(
        "scale-propagation",
        "BN → ReLU / LeakyReLU / pooling / Flatten / zero padding → Conv / Gemm / MatMul",
        "propagated",
        "s moved through the exact identities (s > 0) into the next layer's input channels, t into its "
        "bias or one Add",
        onnx="yes, `propagated` (a Mul + Add only for channels that cannot move; an Add only where the shift cannot reach a bias)",
        fx="yes, `propagated` (Conv1d/2d/3d, Linear; a Mul + Add only for blocked channels; forks into several layers; the result a GraphModule; not with `inplace`)",
        example="pre-activation ResNet, DenseNet, CREPE",
    ),
    Pattern(
        "bn-instance",
        "batch-statistics BN → InstanceNorm, on request (`--batch-stats instance`)",
        "converted",
        "BN_batch(x) = InstanceNorm(x) with the same gamma, beta (exact at batch 1)",
        onnx="yes",
        fx="yes",
        example="`track_running_stats=False` BN in style-transfer nets",
    ),
    Pattern(
        "bn-constant",
        "batch-statistics BN on a constant input",
        "forward",
        "y = BN_batch(x) evaluated once in float64: the BN becomes a Constant (PyTorch: the standardised weight)",
        onnx="yes",
        fx="weight standardisation (`F.batch_norm` on a layer's weight)",
        example="NF-ResNet / timm `StdConv2d`, a training-mode BN on a constant embedding",
    ),
    Pattern(
        "bn-affine",
        "BN with nothing to fold into, on request (`--affine`)",
        "affine",
        "y = Mul(x, s) then Add(_, t), constants shaped [C, 1, ..., 1]",
        onnx="`--affine`: one Mul + one Add",
        example="BN right after the graph input",
    ),
    Pattern(
        "bn-freeze",
        "`bnfold freeze`: every BN → `FrozenBatchNorm` (scale and shift buffers)",
        "affine",
        "y = s·x + t with s, t computed once in float64 (loads the BN's checkpoints)",
        fx="`freeze`",
        example="fine-tuning a detector backbone with frozen BNs",
    ),
)
"""Every fold pattern, in README order."""

SCOPES: tuple[tuple[str, str, str], ...] = (
    ("Identity / inference Dropout between BN and its neighbour (NormLinear heads)", "yes (walked)", "yes"),
    (
        'BN subclass whose forward is "`F.batch_norm` with its own statistics, then ops on its output" '
        "(timm `BatchNormAct2d`)",
        "exported as BN → activation: yes",
        "BN part folded, activation/dropout kept (proved by tracing the subclass's own forward)",
    ),
    (
        "your own BN-like layer, declared with `bnfold.register_bn_like(cls, stats=..., tail=...)`",
        "-",
        "yes (and `freeze`)",
    ),
    (
        'Conv subclass that only pads its input at run time ("same" padding, timm `Conv2dSame`) → BN',
        "Pad → Conv → BN: yes",
        "forward fold (BN → it: refused, `padding`)",
    ),
    (
        "model that does not trace as a whole: inside the parts the parent calls whole (incl. "
        "`checkpoint_seq(self.stages, x)` under `if self.grad_checkpointing`)",
        "-",
        "yes",
    ),
    ("conv biases built at run time (dynamo exporter, `optimize=False`)", "evaluated once, folded", "-"),
    ("If / Loop / Scan bodies", "yes", "-"),
    (
        "torch.export programs (ATen graph; BNs named by module path; dynamic dims kept)",
        "-",
        "yes: the patterns of the `torch.export` column",
    ),
)
"""Where the patterns are found, beyond the plain graph: (place, ONNX, PyTorch), for the README."""

_BY_ID = {p.id: p for p in CATALOGUE}


def ids() -> tuple[str, ...]:
    """Every pattern id, in catalogue order."""
    return tuple(_BY_ID)


def get(pattern_id: str) -> Pattern:
    """The pattern with this id.

    Raises:
        KeyError: no pattern has it.
    """
    return _BY_ID[pattern_id]


def _cell(text: str) -> str:
    return (text or "-").replace("|", "\\|")


def markdown_table() -> str:
    """The README's pattern tables: one row per :data:`CATALOGUE` entry, then :data:`SCOPES`."""
    lines = [
        "| id | pattern | ONNX | PyTorch (fx) | torch.export | math |",
        "|---|---|---|---|---|---|",
    ]
    for p in CATALOGUE:
        title = f"{p.title} (e.g. {p.example})" if p.example else p.title
        cells = [f"`{p.id}`", title, p.onnx, p.fx, p.export, p.math]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "| where | ONNX | PyTorch |", "|---|---|---|"]
    for where, onnx, torch in SCOPES:
        lines.append("| " + " | ".join(_cell(c) for c in (where, onnx, torch)) + " |")
    return "\n".join(lines) + "\n"
