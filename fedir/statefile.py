"""State kept on disk between runs of an app, as one `.npz` file and never as a pickle.

The coordinator's checkpoint and a site's own state (FedBN layers, the local arm's
weights) are read back by a later process. A pickle would run whatever code a tampered
file names; here arrays are stored in an `.npz` that numpy reads with
`allow_pickle=False` (numeric arrays only), and everything else as one JSON document,
stored in the same archive as UTF-8 bytes so the file is replaced in one atomic rename.

The JSON tags what JSON has no word for: arrays and numpy scalars (by their key in the
archive), Flower ArrayRecords, tuples, bytes, and dicts (as key-value pairs, so integer
keys such as class labels come back as integers).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

_DOCUMENT = "__document__"


class StateFileError(ValueError):
    """A state file that cannot be read as one (damaged, tampered with, or another format)."""


def write_state(path: Path, value: Any) -> None:
    """Write `value` to `path` atomically: a reader sees the previous file or this one.
    The file is readable by its owner only (mode 0600).

    Raises TypeError for a value the format cannot hold (an object, a function...).
    """
    arrays: dict[str, np.ndarray] = {}
    document = json.dumps(_encode(value, arrays)).encode("utf-8")
    arrays[_DOCUMENT] = np.frombuffer(document, dtype=np.uint8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a crashed write's leftover
    # owner-only from the start: a checkpoint holds the study's model, a site's state its own
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy types **kwds as bool (allow_pickle)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_state(path: Path) -> Any:
    """The value `write_state` wrote to `path`; StateFileError if the file is not one."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        document = json.loads(arrays.pop(_DOCUMENT).tobytes().decode("utf-8"))
        return _decode(document, arrays)
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError, IndexError) as exc:
        # ValueError covers numpy's refusal of pickled object arrays and bad JSON
        raise StateFileError(f"{path} is not a fedir state file ({type(exc).__name__}: {exc})") from None


def encodable(value: Any) -> bool:
    """Whether `write_state` can store `value`."""
    try:
        _encode(value, {})
    except TypeError:
        return False
    return True


def _array_key(arrays: dict[str, np.ndarray], value: np.ndarray) -> str:
    if value.dtype.hasobject:
        raise TypeError("object arrays are not stored (they would need pickle)")
    key = f"a{len(arrays)}"
    arrays[key] = value
    return key


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return {"ndarray": _array_key(arrays, value)}
    if isinstance(value, np.generic):
        return {"scalar": _array_key(arrays, np.asarray(value))}
    if isinstance(value, ArrayRecord):
        return {"arrayrecord": [[name, _array_key(arrays, a.numpy())] for name, a in value.items()]}
    if isinstance(value, bytes):
        return {"bytes": _array_key(arrays, np.frombuffer(value, dtype=np.uint8))}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, arrays) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
        return {"dict": [[k, _encode(v, arrays)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a state file")


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "ndarray":
        return arrays[body]
    if tag == "scalar":
        return arrays[body][()]
    if tag == "arrayrecord":
        return ArrayRecord({name: Array(arrays[key]) for name, key in body})
    if tag == "bytes":
        return arrays[body].tobytes()
    if tag == "tuple":
        return tuple(_decode(v, arrays) for v in body)
    if tag == "dict":
        return {k: _decode(v, arrays) for k, v in body}
    raise KeyError(f"unknown tag {tag!r}")
