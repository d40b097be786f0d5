"""The precision of the weights a site sends back: float32, or float16 to halve the bytes.

`train.update-dtype = "float16"` makes the ClientApp cast its floating-point tensors to
float16 just before they leave the site (integer buffers such as BatchNorm's counters
are untouched); the server casts them back to float32 before any strategy aggregates
(fedir.strategies.per_site), so averaging and server optimisers (FedAdam...) never run
in half precision. Only the upload is compressed; the global model the server sends stays
float32. `payload_bytes` is what Flower actually serialises per array (data + header).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedir.privacy import dp_arrays

UPDATE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_wire(state_dict: dict[str, torch.Tensor], dtype: str, dp: bool = False) -> ArrayRecord:
    """A site's weights as the ArrayRecord it sends, floats cast to `dtype`; under
    differential privacy every array a float with at least one dimension (fedir.privacy)."""
    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"train.update-dtype = {dtype!r}: choose {' or '.join(UPDATE_DTYPES)}")
    if dp:
        state_dict = dp_arrays(state_dict)
    target = UPDATE_DTYPES[dtype]
    return ArrayRecord({k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()})


def from_wire(record: ArrayRecord) -> ArrayRecord:
    """The same record with every float16 array widened to float32 (others unchanged)."""
    if not any(arr.dtype == "float16" for arr in record.values()):
        return record
    return ArrayRecord(
        {k: Array(arr.numpy().astype(np.float32)) if arr.dtype == "float16" else arr
         for k, arr in record.items()}
    )


def payload_bytes(record: ArrayRecord) -> int:
    """Serialised size of the record's arrays, as Flower sends them."""
    return sum(len(arr.data) for arr in record.values())
