"""`model.init`: the study's first global model from a user-supplied checkpoint (transfer learning).

The coordinator reads the file before round 1 and sends the loaded model as round 0's
global model, so every site starts from it; nothing is fetched at run time. A checkpoint
is read as tensors only (`torch.load(weights_only=True)`: no object in the file is
unpickled, so a file from the internet cannot run code), or with the safetensors package
when it is installed. MONAI bundles and training scripts nest the state dict
(`{"state_dict": ...}`, `{"model": ...}`) and data-parallel training prefixes every key
(`module.`): both are undone. Entries are then matched to fedir's model by name and shape:

- loaded: same name and shape, copied in;
- new: entries of fedir's model the checkpoint does not supply (a new two-class head),
  left at their seeded initial values;
- dropped: checkpoint entries with no counterpart (unexpected) or another shape.

A checkpoint that supplies under MIN_LOADED_SHARE of the model's parameters (counted in
scalars, so a replaced head, a few hundred of 0.3 M, does not matter) is the wrong network
and is refused before round 1 with one line (fedir.errors.UserError), as is a missing or
unreadable file. The report of what loaded goes into the run store (summary.json
`model_init`, the report's "Starting model").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedir.errors import UserError

MIN_LOADED_SHARE = 0.5  # of the model's parameter scalars the checkpoint must supply
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "network")  # where checkpoints keep the state dict
SHOWN_KEYS = 50  # the report lists at most this many keys of each kind (the counts are complete)


class ModelInitError(UserError, ValueError):
    """`model.init` names no usable checkpoint: missing, unreadable, or matching too little."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pt`/`.pth` state dict (possibly nested under NESTED_KEYS) or of a
    `.safetensors` file; a ModelInitError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ModelInitError(f"model.init = {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        raise ModelInitError(f"model.init = {str(path)!r}: not a readable PyTorch state dict "
                             f"({_first_line(exc)})") from None
    state = _unnested(content)
    if state is None:
        raise ModelInitError(f"model.init = {str(path)!r}: holds no state dict (a mapping of names to tensors, "
                             f"possibly under one of {', '.join(NESTED_KEYS)})")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelInitError(f"model.init = {str(path)!r}: reading .safetensors needs the safetensors package "
                             "(pip install safetensors), or save the state dict with torch.save") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # noqa: BLE001
        raise ModelInitError(f"model.init = {str(path)!r}: not a readable safetensors file "
                             f"({_first_line(exc)})") from None


def _unnested(content: Any) -> dict[str, torch.Tensor] | None:
    """The state dict inside what torch.load returned: the mapping itself when it holds
    tensors, else the first of NESTED_KEYS that does (one level, then two)."""
    if not isinstance(content, Mapping):
        return None
    tensors = {str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors
    for key in NESTED_KEYS:
        if key in content:
            inner = _unnested(content[key])
            if inner:
                return inner
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _prefixes(keys: list[str]) -> list[str]:
    """Candidate prefixes to strip: none, and every key's first one or two dotted parts."""
    found = {""}
    for key in keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                found.add(".".join(parts[:depth]) + ".")
    return sorted(found, key=lambda p: (len(p), p))


def match(model_state: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor],
          parameters: Mapping[str, int]) -> dict[str, Any]:
    """Match checkpoint entries to the model's by name (after stripping the prefix that
    matches most entries) and shape.

    Args:
        model_state: the model's state dict.
        checkpoint: the checkpoint's tensors.
        parameters: the model's parameter names and sizes (scalars), for the loaded share.

    Returns:
        {"prefix", "loaded": {model key: checkpoint key}, "new": [model keys],
        "dropped": [{"key", "reason"}], "loaded_share"}.
    """
    def attempt(prefix: str) -> dict[str, str]:
        pairs = {}
        for key, value in checkpoint.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name in model_state and tuple(model_state[name].shape) == tuple(value.shape):
                pairs[name] = key
        return pairs

    prefix, loaded = max(((p, attempt(p)) for p in _prefixes(list(checkpoint))), key=lambda pl: len(pl[1]))
    used = set(loaded.values())
    dropped = []
    for key, value in checkpoint.items():
        if key in used:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in model_state:
            reason = f"shape {tuple(value.shape)}, the model's is {tuple(model_state[name].shape)}"
        else:
            reason = "no such entry in the model"
        dropped.append({"key": key, "reason": reason})
    total = sum(parameters.values())
    share = sum(n for name, n in parameters.items() if name in loaded) / total if total else 0.0
    return {"prefix": prefix, "loaded": loaded, "new": [k for k in model_state if k not in loaded],
            "dropped": dropped, "loaded_share": share}


def initialise(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the checkpoint at `path` into `model` in place and return the report the run
    store keeps; a ModelInitError, with nothing loaded, when it supplies under
    MIN_LOADED_SHARE of the model's parameters."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    state = model.state_dict()
    parameters = {name: p.numel() for name, p in model.named_parameters()}
    found = match(state, checkpoint, parameters)
    report = {
        "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "prefix_stripped": found["prefix"], "min_loaded_share": MIN_LOADED_SHARE,
        "loaded_share": found["loaded_share"], "checkpoint_entries": len(checkpoint),
        "n_loaded": len(found["loaded"]), "n_new": len(found["new"]), "n_dropped": len(found["dropped"]),
        "loaded": sorted(found["loaded"])[:SHOWN_KEYS], "new": found["new"][:SHOWN_KEYS],
        "dropped": found["dropped"][:SHOWN_KEYS], "shown_at_most": SHOWN_KEYS,
    }
    if found["loaded_share"] < MIN_LOADED_SHARE:
        examples = "; ".join(f"{d['key']}: {d['reason']}" for d in found["dropped"][:3]) or "none"
        raise ModelInitError(
            f"model.init = {str(path)!r} supplies {found['loaded_share']:.0%} of the model's parameters "
            f"({len(found['loaded'])} of {len(state)} entries; at least {MIN_LOADED_SHARE:.0%} needed): "
            f"is it a checkpoint of this model.name? Dropped, e.g.: {examples}")
    merged = dict(state)
    for name, key in found["loaded"].items():
        merged[name] = checkpoint[key].to(dtype=state[name].dtype)
    model.load_state_dict(merged)
    return report
