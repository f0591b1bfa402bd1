"""Model files: format detection from the content, loading, atomic saving (a package, one job a module).

Modules, in the order they depend on each other:
    * :mod:`.datafiles`: the protobuf field-header walker (which external-data files an ONNX file or
      model reads; every tensor, nested graphs included, no payload read), sizes on disk;
    * :mod:`.atomic`: temporary paths next to the destination, deferred signals, the folder lock;
    * :mod:`.paths`: the files a model reads, output-path checks that protect them;
    * :mod:`.sniff`: format detection from a bounded read (pickle scanning, the ONNX wire check);
    * :mod:`.stream`: the protobuf wire-format writer (one initializer at a time);
    * :mod:`.checks`: consistency of ONNX model data (sizes, unique names, BN parameter shapes);
    * :mod:`.torch_load`: factories, state_dicts, trusted pickles, ``.pt2`` archives;
    * :mod:`.loader`: :func:`load_file` -> :class:`Loaded` (one sniff, one parse);
    * :mod:`.saver`: :func:`staged_save` -> :class:`Staged` (write, check, commit), :func:`save`.

Rules (details in each module):
    * unpickling runs arbitrary code: a pickled module is loaded only with ``trust_pickle=True``; a
      state_dict is loaded with ``weights_only=True`` and a factory; TorchScript is refused;
    * only regular files are read, and the format is decided from a bounded read; every unusable file
      raises :class:`~bnfold.errors.ModelFormatError` with one line naming the file;
    * outputs are staged in the destination folder and renamed into place; a failed or interrupted
      write leaves no partial file and no temporary; an ONNX model is never paired with another
      write's data;
    * the input is never modified: the output may not be the input model nor any file it reads, and
      never a directory, a FIFO or a device;
    * bnfold removes only files it created, and a data file it proves it wrote for the output it
      replaces (a record in the model: name, size, SHA-256; see :mod:`.paths`); the same model
      saved to the same path gives the same bytes (the data file is named after its SHA-256);
    * nothing here serialises a whole model or calls ``ByteSize()`` (protobuf stops at 2 GiB);
    * torch is imported only for PyTorch files, never for an ONNX file.
"""

from __future__ import annotations

from .atomic import atomic_path
from .checks import check_model_data
from .loader import Loaded, load, load_file, load_with_format
from .paths import check_output_path, file_size_with_data, files_read_by
from .saver import EXTERNAL_DATA_THRESHOLD, Staged, save, staged_save
from .sniff import FORMATS, detect_format
from .torch_load import resolve_factory

__all__ = [
    "FORMATS",
    "EXTERNAL_DATA_THRESHOLD",
    "Loaded",
    "Staged",
    "atomic_path",
    "check_model_data",
    "check_output_path",
    "detect_format",
    "file_size_with_data",
    "files_read_by",
    "load",
    "load_file",
    "load_with_format",
    "resolve_factory",
    "save",
    "staged_save",
]
