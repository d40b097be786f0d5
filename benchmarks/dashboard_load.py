"""How long the dashboard takes to show a large run: 100 sites x 50 rounds, in headless chromium.

Writes a finished fabricated run (tests/run_factory.py) into a temporary folder, serves the
dashboard, and times, over several fresh page loads, from navigation until the verdict and
the per-site table show every site, and until the per-site plot has drawn every site;
also the size and server time of the run's JSON. Prints a table and writes benchmarks/results/dashboard_load.json.

    .venv/bin/python benchmarks/dashboard_load.py [--sites 100] [--rounds 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dashboard_harness import chromium, served  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/ is on sys.path)
from run_factory import write_run  # noqa: E402

from fedir.server.dashboard_state import run_detail  # noqa: E402
from fedir.server.runstore import RunStore  # noqa: E402

TABLE_READY = "n => document.querySelectorAll('#site-table tbody tr').length === n + 1"
PLOTS_READY = "n => (document.getElementById('site-plot').data || []).length >= n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sites = [f"hospital-{i:03d}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        with RunStore(folder / "runs.sqlite") as store:
            write_run(store, "large", sites, args.rounds, alarm_from=args.rounds // 2, cards=True)
        write_s = time.perf_counter() - started
        api_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            body = json.dumps(run_detail(folder, ".", "large"))
            api_s.append(time.perf_counter() - t0)
        table_s, plots_s = [], []
        with served(folder, poll_seconds=60) as url, chromium() as browser:
            for _ in range(args.repeats):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_function(TABLE_READY, arg=args.sites, timeout=120_000, polling=20)
                table_s.append(time.perf_counter() - t0)
                page.wait_for_function(PLOTS_READY, arg=args.sites, timeout=120_000, polling=20)
                plots_s.append(time.perf_counter() - t0)
                page.close()
    result = {
        "sites": args.sites, "rounds": args.rounds, "repeats": args.repeats,
        "store_rows_written_s": round(write_s, 2),
        "run_json_bytes": len(body),
        "run_json_server_s_median": round(statistics.median(api_s), 3),
        "table_and_verdict_s_median": round(statistics.median(table_s), 3),
        "plots_drawn_s_median": round(statistics.median(plots_s), 3),
        "table_and_verdict_s_all": [round(s, 3) for s in table_s],
        "plots_drawn_s_all": [round(s, 3) for s in plots_s],
        "machine": describe(with_torch=False),
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),  # other work on a shared machine
    }
    out = ROOT / "benchmarks" / "results" / "dashboard_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
