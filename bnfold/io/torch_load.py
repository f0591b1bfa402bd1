"""PyTorch files: factory import, state_dict loading, trusted pickles, torch.export archives.

Rules: unpickling runs arbitrary code, so a pickled module is loaded only with ``trust_pickle=True``
(``--trust-pickle``); a state_dict is loaded with ``weights_only=True`` and needs a factory that builds
the architecture (``--model module.path:factory``), loaded with ``strict=True`` (a ``module.`` prefix
from DataParallel is dropped); a ``.pt2`` is checked by :mod:`bnfold.pt2_guard` before and after
``torch.export.load`` unless trusted; the current folder is *appended* to ``sys.path`` for factories
and trusted pickles, never put first.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bnfold.errors import ModelFormatError, OptionError
from bnfold.hints import MODEL_FACTORY, TRUST_PICKLE

from .sniff import format_error

__all__ = ["resolve_factory", "load_torch", "factory_examples"]


def _add_cwd_as_fallback() -> None:
    """Let modules in the current folder be found, after every installed package (never first)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


def _import_file(spec: str, mod_name: str) -> Any:
    """``dir/name.py`` imported as the module ``name``, registered in ``sys.modules`` like any import.

    A module only executed from its file (not registered) breaks what needs ``sys.modules`` to find
    its classes: pickling (``torch.save`` of the folded model: "not the same object as name.Net")
    and reading a class's source (:mod:`bnfold.fx.safety`, for models that do not trace). So the file
    is imported under its stem, as ``import name`` would with its folder on ``sys.path`` (appended,
    as a fallback, so that the file's own sibling imports resolve), and the pickled classes say
    ``name.Net``, which loads again wherever ``name`` imports. The same file twice is one module; a
    different module already imported under that name is refused rather than shadowed.
    """
    file = os.path.realpath(os.path.abspath(mod_name))
    if not os.path.isfile(file):
        raise OptionError(f"bad model factory {spec!r}: {mod_name} does not exist")
    name = Path(file).stem
    if not name.isidentifier():
        raise OptionError(
            f"bad model factory {spec!r}: {Path(file).name} is not an importable module name "
            "(rename the file to a Python identifier)"
        )
    known = sys.modules.get(name)
    if known is not None:
        known_file = getattr(known, "__file__", None)
        if known_file and os.path.realpath(known_file) == file:
            return known
        if not getattr(known, _FROM_FILE, False):
            raise OptionError(
                f"bad model factory {spec!r}: the module name {name!r} is already taken by "
                f"{known_file or 'a built-in module'}; rename {Path(file).name}"
            )
    folder = os.path.dirname(file)
    if folder not in sys.path:
        sys.path.append(folder)
    mspec = importlib.util.spec_from_file_location(name, file)
    assert mspec is not None and mspec.loader is not None
    module = importlib.util.module_from_spec(mspec)
    setattr(module, _FROM_FILE, True)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)  # as a failed import leaves nothing behind
        raise
    return module


#: Marks a module bnfold imported from a file path: a later factory file with the same stem replaces it.
_FROM_FILE = "__bnfold_factory_file__"


def resolve_factory(spec: str | Callable[[], Any]) -> Callable[[], Any]:
    """``"module.path:factory"`` (or ``"file.py:factory"``) -> the callable; a callable is returned as is.

    The current working directory is *appended* to ``sys.path`` (a fallback, as for the trusted
    pickle path): a ``./onnxruntime.py`` or ``./numpy.py`` in the folder bnfold runs in never shadows
    an installed package.

    Raises:
        OptionError: bad syntax, module or attribute not found, not callable.
    """
    if callable(spec):
        return spec
    mod_name, sep, attr = str(spec).partition(":")
    if not sep or not mod_name or not attr:
        raise OptionError(
            f"bad model factory {spec!r}: expected module.path:factory (e.g. models.lenet:lenet5)"
        )
    try:
        if mod_name.endswith(".py"):
            module = _import_file(spec, mod_name)
        else:
            _add_cwd_as_fallback()
            module = importlib.import_module(mod_name)
    except OptionError:
        raise
    except Exception as e:
        raise OptionError(
            f"bad model factory {spec!r}: cannot import {mod_name} ({type(e).__name__}: {e})"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"bad model factory {spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OptionError(f"bad model factory {spec!r}: {attr} is not callable")
    return obj  # type: ignore[no-any-return]


def _state_dict_of(path: str, obj: Any) -> Mapping[str, Any]:
    import torch

    def is_sd(d: Any) -> bool:
        return (
            isinstance(d, Mapping)
            and bool(d)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
        )

    if is_sd(obj):
        return obj  # type: ignore[no-any-return]
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "module", "net"):
            if is_sd(obj.get(key)):
                return obj[key]  # type: ignore[no-any-return]
    raise format_error(
        path,
        "a torch.save checkpoint without a state_dict (a dict of tensors, or one under "
        "'state_dict' / 'model_state_dict' / 'model')",
    )


def _check_pt2_members(path: str) -> None:
    """A torch.export archive needs ``archive_version`` (torch otherwise logs a traceback and guesses)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as e:
        raise format_error(path, f"a truncated or corrupt zip archive ({e})") from e
    if not any(n == "archive_version" or n.endswith("/archive_version") for n in names):
        raise format_error(
            path,
            "a torch.export archive without archive_version: truncated or not written by "
            "torch.export.save; export the model again",
        )


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Keep a library's warning-level tracebacks off stderr: the failure becomes bnfold's one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _label(factory: str | Callable[[], Any]) -> str:
    """A factory as the user names it (``'models.lenet:lenet5'``), never ``<function lenet5 at 0x...>``."""
    if isinstance(factory, str):
        return repr(factory)
    mod, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    return repr(f"{mod}:{name}") if mod and name else type(factory).__name__


def load_torch(p: str, fmt: str, model_factory: str | Callable[[], Any] | None, trust_pickle: bool) -> Any:
    """A PyTorch file of format ``fmt`` ("pt2", "pickled_module" or "state_dict"), with the right trust."""
    import torch

    if fmt == "pt2":
        from bnfold import pt2_guard

        _check_pt2_members(p)
        if not trust_pickle:
            pt2_guard.check_pt2(p)
        try:
            with _quiet_logger("torch.export"):
                program = torch.export.load(p)
        except Exception as e:
            raise format_error(
                p,
                f"cannot load the torch.export archive ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            ) from e
        if not trust_pickle:
            pt2_guard.check_program(p, program)
        return program
    if fmt == "pickled_module":
        if not trust_pickle:
            raise format_error(
                p,
                "a pickle of Python objects beyond tensors: a whole module (torch.save(model)), or a training "
                "checkpoint that pickles other objects beside its weights (Lightning's hyper-parameters, "
                "callbacks); loading it unpickles, which runs arbitrary code from the file. Save the weights "
                "alone (torch.save(model.state_dict()) or torch.save(ckpt['state_dict']))",
                hints=[MODEL_FACTORY, TRUST_PICKLE],
            )
        try:
            # Unpickling imports the classes by module name: like `python` itself, find them in the
            # current folder too.
            _add_cwd_as_fallback()
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:
            raise format_error(
                p, f"cannot unpickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        if isinstance(obj, Mapping):
            obj = next((v for v in obj.values() if isinstance(v, torch.nn.Module)), obj)
        if isinstance(obj, Mapping) and model_factory is not None:
            # A training checkpoint (Lightning): trusted, its weights go into the factory's module.
            return _into_factory(p, _state_dict_of(p, obj), model_factory)
        if not isinstance(obj, torch.nn.Module):
            raise format_error(
                p,
                f"the pickle holds a {type(obj).__name__}, not a torch.nn.Module"
                + (" (a training checkpoint?)" if isinstance(obj, Mapping) else ""),
                [MODEL_FACTORY] if isinstance(obj, Mapping) else [],
            )
        return obj
    # state_dict
    try:
        with open(p, "rb") as f:
            head = f.read(16)
        from .safetensors import looks_like_safetensors, read_safetensors

        if looks_like_safetensors(head, os.path.getsize(p)):
            obj = read_safetensors(p)  # no pickle: a header and raw bytes
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except ModelFormatError:
        raise
    except Exception as e:
        raise format_error(
            p, f"cannot load the checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    sd = _state_dict_of(p, obj)
    if model_factory is None:
        raise format_error(p, "a state_dict checkpoint (weights only)", [MODEL_FACTORY])
    return _into_factory(p, sd, model_factory)


def _into_factory(p: str, sd: Mapping[str, Any], model_factory: str | Callable[[], Any]) -> Any:
    """The factory's module with the weights ``sd`` loaded (strict; a wrapper's key prefix dropped)."""
    import torch

    factory = resolve_factory(model_factory)
    try:
        model = factory()
    except Exception as e:
        raise OptionError(f"model factory {_label(model_factory)} failed ({type(e).__name__}: {e})") from e
    if not isinstance(model, torch.nn.Module):
        raise OptionError(
            f"model factory {_label(model_factory)} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    own = set(model.state_dict())
    prefixes = {k.split(".", 1)[0] for k in sd}
    if not (set(sd) & own) and len(prefixes) == 1 and all("." in k for k in sd):
        # Saved from a wrapper: DataParallel / DDP ("module."), a LightningModule's attribute ("model.").
        stripped = {k.split(".", 1)[1]: v for k, v in sd.items()}
        if set(stripped) & own:
            sd = stripped
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
            )
        raise format_error(
            p, f"does not fit the architecture built by {_label(model_factory)}: {'; '.join(parts)}"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise format_error(
            p,
            f"does not fit the architecture built by {_label(model_factory)}: "
            f"{' '.join(str(e).split())[:300]}",
        ) from e
    return model.eval()


def factory_examples(model_factory: str | Callable[[], Any] | None) -> tuple[Any, ...] | None:
    """The example inputs a factory describes, or None.

    A factory's ``example_input_shape`` tells what one input looks like (no batch dimension): a seeded
    batch of 2, so that jobs needing inputs (export, verification, bench) run without --input-shape.
    They go into :attr:`bnfold.io.Loaded.example_inputs`, never onto the model.
    """
    if model_factory is None:
        return None
    factory = resolve_factory(model_factory) if isinstance(model_factory, str) else model_factory
    shape = getattr(factory, "example_input_shape", None)
    if shape is None:
        return None
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, *shape, generator=g),)
