"""`fedir simulate`: run a scenario on Flower's simulation engine, one virtual node per site.

The ServerApp and ClientApp are the same ones a deployment runs; here they are built
with the scenario's settings and handed to Flower's simulation runtime (Ray), which
starts one actor per CPU core and routes each site's messages to them.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod

from fedir.client.client_app import build_client_app
from fedir.config import Settings
from fedir.server.server_app import build_server_app
from fedir.simulations.companion import run_companion
from fedir.simulations.overlays import add_overlays


def backend_config(settings: Settings) -> dict[str, Any]:
    """Ray resources: one actor per core (at most one per site), a GPU shared when present."""
    import torch

    cpus = max(1, min(os.cpu_count() or 1, len(settings.sites)))
    gpu = 1.0 / cpus if torch.cuda.is_available() else 0.0
    return {
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if gpu else 0, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": False},
        "client_resources": {"num_cpus": 1, "num_gpus": gpu},
    }


def simulate(settings: Settings, out_dir: Path, scenario: str, verbose: bool = False,
             client_mods: Sequence[Mod] = ()) -> dict[str, Any]:
    """Run the study; return summary.json's content (also written to out_dir).
    `client_mods` wrap every site's ClientApp handlers (Flower client mods)."""
    from flwr.simulation import run_simulation

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_run_config({**settings.to_run_config(), "output.dir": str(out_dir)})
    if not verbose:
        # Flower logs every round at INFO, warns that run_simulation is deprecated, and
        # logs a page of Ray traceback for every message a failing site answers; the
        # progress bar, the final table and the run's notes (each site's reason) say what
        # a user needs, and a study no site can take part in stops with one line.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    # the clinical-only companion first, so the imaging report can show both
    run_companion(settings, out_dir, lambda s, d: simulate(s, d, f"{scenario} [{s.data_inputs} baseline]",
                                                           verbose, client_mods))
    server_app = build_server_app(settings, out_dir, scenario)
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(settings, client_mods),
        num_supernodes=len(settings.sites),
        backend_config=backend_config(settings),
        verbose_logging=verbose,
    )
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    # a segmentation study on a synthetic federation: example overlays of its test frames,
    # drawn here (the server never reads a site's pixels) and embedded in report.html
    add_overlays(settings, out_dir, summary)
    return summary
