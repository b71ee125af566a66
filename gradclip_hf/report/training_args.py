"""``max_grad_norm`` of a stock Trainer run, from its ``training_args.bin``, without running the pickle.

``training_args.bin`` is ``torch.save(TrainingArguments)``: a zip whose ``*/data.pkl`` is a pickle. Loading
it with ``torch.load(weights_only=False)`` would import transformers and accelerate and call whatever the
pickle names (a ``TrainingArguments`` pickle names ``accelerate.state.PartialState``, for one).
:class:`_InertUnpickler` maps every class and function the pickle names to :class:`_Inert`, a plain
record: nothing is imported and no code from the file runs; the arguments' plain fields
(``max_grad_norm`` is a float) come back as attributes. It is still only read from the run's own folder,
and only up to :data:`MAX_BYTES` (the file, and its pickle once inflated: a real one is about 10 kB), so a
zip bomb is refused before it inflates; whatever the file holds, a failure is a ``ValueError`` (the report
then says so in a warning and assumes the Trainer default).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from typing import Any, Optional

from .load import Run

__all__ = ["read_max_grad_norm", "stock_threshold", "ARGS_FILE", "TRAINER_DEFAULT_THRESHOLD", "MAX_BYTES"]

ARGS_FILE = "training_args.bin"
TRAINER_DEFAULT_THRESHOLD = 1.0  # TrainingArguments.max_grad_norm's default
MAX_BYTES = 4 * 1024 * 1024  # of training_args.bin and of its pickle once inflated (a real one: ~10 kB)


class _Inert:
    """Stands for any object of the pickle: keeps its constructor arguments and its state."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return _Inert  # never import what the file names

    def persistent_load(self, pid: Any) -> None:
        return None  # tensor storages (none in TrainingArguments)


def _pickle_bytes(path: str) -> bytes:
    """The ``data.pkl`` of a torch zip archive, read only up to :data:`MAX_BYTES` (ValueError beyond)."""
    if os.path.getsize(path) > MAX_BYTES:
        raise ValueError(f"it is {os.path.getsize(path):,} bytes, more than the {MAX_BYTES:,} read")
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
        if len(entries) != 1:
            raise ValueError(f"it holds {len(entries)} data.pkl files, not one")
        if entries[0].file_size > MAX_BYTES:
            raise ValueError(f"its pickle inflates to {entries[0].file_size:,} bytes, more than the {MAX_BYTES:,} read")
        data = bytearray()
        with archive.open(entries[0]) as f:  # in small reads, whatever the header says
            while len(data) <= MAX_BYTES and (chunk := f.read(64 * 1024)):
                data += chunk
    if len(data) > MAX_BYTES:
        raise ValueError(f"its pickle inflates to more than the {MAX_BYTES:,} bytes read")
    return bytes(data)


def read_max_grad_norm(path: str) -> Optional[float]:
    """``max_grad_norm`` recorded in a ``torch.save``d ``TrainingArguments`` (``None``: not recorded; 0.0 for
    ``None``, which turns clipping off).

    Raises ValueError when the file is not a torch zip archive with one pickle of at most :data:`MAX_BYTES`, or
    cannot be read (encrypted, an unknown compression, a broken pickle) or records a max_grad_norm that is no
    float (an integer of 400 digits)."""
    try:
        args = _InertUnpickler(io.BytesIO(_pickle_bytes(path))).load()
        value = getattr(args, "max_grad_norm", _Inert)
        if value is _Inert:
            return None
        if value is None:  # the Trainer does not clip
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)
    except Exception as e:  # noqa: BLE001  an untrusted file: whatever fails, it is unreadable (no code of it ran)
        raise ValueError(f"cannot read {path!r} as torch.save(TrainingArguments): {type(e).__name__}: "
                         f"{str(e)[:200]}") from None


def stock_threshold(run: Run) -> tuple[Optional[float], str]:
    """(``max_grad_norm``, where it came from) for a run that did not log ``gradclip/threshold``: the
    ``training_args.bin`` next to the state file, else in the ``output_dir``; else the Trainer default."""
    for folder in dict.fromkeys((os.path.dirname(run.state_path), run.output_dir)):
        path = os.path.join(folder, ARGS_FILE)
        if not os.path.isfile(path):
            continue
        try:
            value = read_max_grad_norm(path)
        except ValueError as e:
            run.warnings.append(str(e))
            continue
        if value is None:
            run.warnings.append(f"{path} records no max_grad_norm")
            continue
        return (value if math.isfinite(value) else 0.0), f"max_grad_norm from {path}"
    return TRAINER_DEFAULT_THRESHOLD, f"assumed: the Trainer default max_grad_norm (no readable {ARGS_FILE})"
