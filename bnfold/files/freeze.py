"""``bnfold freeze`` on a file: every BatchNorm of a PyTorch model becomes a frozen affine layer.

Rules:
    * the output is saved in the source's kind: a state_dict checkpoint as the frozen model's
      state_dict, a pickled module as a pickled module; ONNX and torch.export programs are refused
      (freeze needs an ``nn.Module``);
    * a partial freeze is written, and every BN left is reported with its reason;
    * frozen layers are found by type (:class:`bnfold.nn.frozen.FrozenBatchNorm`), not by class name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bnfold.errors import OptionError, UnsupportedModelError
from bnfold.io.datafiles import model_size
from bnfold.records import FileInfo, FreezeReport

from .load import ProgressFn, load, noop
from .output import check_output, save
from .settings import OUTPUT_FORMATS, FreezeSettings

__all__ = ["freeze_file"]

_FORMAT_NAMES = {
    "onnx": "an ONNX model",
    "pt2": "a torch.export program (.pt2)",
    "torchscript": "a TorchScript archive",
}


def freeze_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    settings: FreezeSettings | None = None,
    progress: ProgressFn | None = None,
) -> FreezeReport:
    """Turn every BatchNorm of a PyTorch model into a frozen affine layer; save in the same format.

    Returns:
        A :class:`~bnfold.records.FreezeReport`: the layers frozen ``(name, class)``, the BNs left
        (``Skip`` with the reason), the files and the time.

    Raises:
        UnsupportedModelError: the file is an ONNX model or a torch.export program.
    """
    t0 = time.perf_counter()
    s = settings or FreezeSettings()
    prog = progress or noop
    src_p, dst_p = Path(src), Path(dst)
    check_output(src_p, dst_p, in_place=s.in_place)
    if OUTPUT_FORMATS.get(dst_p.suffix.lower()) != "torch":
        raise OptionError(f"{dst_p}: a frozen PyTorch model is saved as .pt/.pth/.ckpt/.bin, like its source")
    from bnfold import io as bio

    fmt = bio.detect_format(src_p)  # a sniff reads no pickle: refuse before loading
    if fmt not in ("state_dict", "pickled_module"):
        raise UnsupportedModelError(
            f"{src_p}: freeze works on PyTorch checkpoints (state_dict with --model, or a pickled module), "
            f"not on {_FORMAT_NAMES.get(fmt, fmt)}"
        )
    loaded = load(src_p, s.load, prog)

    from bnfold.freezing import freeze_with_report
    from bnfold.nn.frozen import FrozenBatchNorm

    prog("freeze", 0, 1)
    frozen, report = freeze_with_report(loaded.model, learnable=s.learnable, strict=False)
    prog("freeze", 1, 1)
    names = tuple((n, type(m).__name__) for n, m in frozen.named_modules() if isinstance(m, FrozenBatchNorm))
    save(frozen, dst_p, prog, fmt="state_dict" if loaded.format == "state_dict" else "module")
    files = FileInfo(
        source=str(src_p),
        source_format=loaded.format,
        size_before=loaded.size,
        output=str(dst_p),
        output_format=loaded.format,
        size_after=model_size(dst_p, loaded.format),
        written=True,
        total_seconds=time.perf_counter() - t0,
    )
    return FreezeReport(
        files=files,
        learnable=s.learnable,
        frozen=names,
        left=tuple(report.skips),
        seconds=time.perf_counter() - t0,
    )
