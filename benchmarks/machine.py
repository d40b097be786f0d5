"""The machine a benchmark ran on, described the same way in every result file.

A figure from this project's machines means little without its context: the cores, the
torch build and thread count, the device, and the load average when it was taken (the
2-core development machine is shared with tests and other work). Scripts in benchmarks/
import this as a sibling module (`python benchmarks/x.py` puts benchmarks/ on sys.path).
"""

from __future__ import annotations

import os
import platform


def describe(*, with_torch: bool = True, **extra: object) -> dict:
    """Platform, Python, cores, load average now, and (unless `with_torch` is False, for a
    benchmark that times imports) torch, flwr, torch's threads and the device; `extra`
    (a note on what else ran, a thread setting) is added as given."""
    info: dict[str, object] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if with_torch:
        import flwr
        import torch

        info.update({"torch": torch.__version__, "flwr": flwr.__version__, "torch_threads": torch.get_num_threads(),
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
    return {**info, **extra}
