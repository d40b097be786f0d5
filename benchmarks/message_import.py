"""What a deployed ClientApp pays before it handles a message: the imports.

In a deployment Flower starts a fresh ClientApp process for every message (DEPLOY.md), so
every train, evaluate and query message first imports fedir's ClientApp. A round over TLS on
loopback took 42-87 s for a logistic model while each site handled each message in under a
second (issue 15): the rest was processes importing torch and MONAI. This measures, each in
fresh interpreters, the import of the ClientApp module against the floor fedir cannot avoid
(torch and Flower, which every ClientApp needs) and against MONAI alone (what an imaging
site adds), and records whether the ClientApp's import pulled MONAI in.

    .venv/bin/python benchmarks/message_import.py [--repeats 7]

Results: benchmarks/results/message_import.json (medians in seconds, the ratio of the
ClientApp's import to the floor's). Run it alone on the machine: import times are disk- and
CPU-bound and every other job inflates them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe  # benchmarks/ is on sys.path

RESULTS = Path(__file__).parent / "results" / "message_import.json"
CASES = {
    "floor: torch + flwr": "import torch, flwr.clientapp",
    "monai alone": "import monai",
    "fedir ClientApp": "import fedir.client.client_app",
}
PROBE = "import sys, fedir.client.client_app; print(int('monai' in sys.modules))"


def timed(code: str) -> float:
    """Wall time of a fresh interpreter that runs `code` (the interpreter's own start included)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    timed("pass")  # warm the page cache once
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved, so that a load spike hits every case alike
        for name, code in CASES.items():
            samples[name].append(timed(code))
    bare = statistics.median(timed("pass") for _ in range(args.repeats))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    loads_monai = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout.strip()
    result = {
        "machine": describe(with_torch=False),
        "repeats": args.repeats,
        "bare_interpreter_s": round(bare, 3),
        "median_s": {name: round(value, 3) for name, value in medians.items()},
        "samples_s": {name: [round(v, 3) for v in values] for name, values in samples.items()},
        "clientapp_over_floor": round(medians["fedir ClientApp"] / medians["floor: torch + flwr"], 2),
        "clientapp_imports_monai": loads_monai == "1",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "clientapp_over_floor", "clientapp_imports_monai")}, indent=1))


if __name__ == "__main__":
    main()
