"""The segmentation verdict on a clean and a confounded synthetic federation (issue 16, item 6).

Two federations from `fedir data synth` with masks (one outlined frame per cine run), the same
seed and size, differing only in `confound`: 0 (every site's stenosis prevalence the same) and
1 (site-0's patients carry the stenoses, the others' almost none). Each runs the same small
segmentation study in process (fedir.simulations.inprocess: the ServerApp logic and the
ClientApp, messages serialised, no Ray) and the result file keeps, per federation, the
verdict (alarm, signals, reasons, warnings), each signal's key numbers and the
leave-one-site-out flags. Nothing is tuned; one seed, so the numbers show the mechanism, not
its error rates. With `--cross-site` the studies run with `bias.cross-site = true` and the
result (results/segmentation_cross_site.json) adds the Dice matrix, its gap with CI, and at
which gap thresholds the signal would fire (the AUC's 0.1, the Dice default 0.2, 0.3).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/segmentation_bias.py [--patients 20] [--rounds 2] [--cross-site]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.scenario import load_scenario
from fedir.simulations.synthetic import generate_federation

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402  (benchmarks/ is on sys.path)

OUT = Path(__file__).parent / "results" / "segmentation_bias.json"
CROSS_SITE_OUT = Path(__file__).parent / "results" / "segmentation_cross_site.json"
KEYS = {"foreground_by_site": ("p_value", "cramers_v", "patients", "filled_cells"),
        "dice_heterogeneity": ("q", "p_value", "i2", "site_dice"),
        "site_separability": ("site_accuracy", "class_accuracy", "most_identifiable"),
        "cross_site": ("matrix", "matrix_ci", "diagonal", "off_diagonal", "gap", "gap_ci", "site_gap", "thresholds")}
GAP_THRESHOLDS = (0.1, 0.2, 0.3)  # the AUC's default, the Dice default, one above


def scenario(sites: list[Path], args: argparse.Namespace) -> str:
    names = ", ".join(f'"{s}"' for s in sites)
    return ('[task]\nkind = "segmentation"\n'
            f"[federation]\nsites = [{names}]\n"
            f"[train]\nrounds = {args.rounds}\nlocal-epochs = {args.local_epochs}\nlr = 0.01\nbatch-size = 8\n"
            f"seed = {args.seed}\n[model]\nimage-size = {args.image_size}\n"
            '[data]\nframe-policy = "all"\ntest-fraction = 0.3\nval-fraction = 0.2\n[eval]\nbootstrap = 100\n'
            + ("[bias]\ncross-site = true\n" if args.cross_site else ""))


def run(root: Path, confound: float, args: argparse.Namespace) -> dict:
    fed = root / f"confound-{confound:g}"
    generate_federation(fed, sites=args.sites, patients=args.patients, seed=args.seed, confound=confound,
                        image_size=args.image_size, progress=False, mask_fraction=0.0)
    toml = root / f"confound-{confound:g}.toml"
    toml.write_text(scenario([fed / f"site-{s}" for s in range(args.sites)], args))
    start = time.perf_counter()
    summary = run_inprocess(load_scenario(toml), root / f"run-{confound:g}")
    bias = summary["bias"]
    return {
        "confound": confound,
        "seconds": round(time.perf_counter() - start, 1),
        "pooled_dice": summary["global"]["dice"], "pooled_dice_ci": summary["global"]["dice_ci"],
        "site_dice": {s: e["dice"] for s, e in summary["per_site"].items()},
        "alarm": bias["alarm"], "signals": bias["signals"], "reasons": bias["reasons"], "warnings": bias["warnings"],
        "tests": {name: {"alarm": t["alarm"], "reason": t["reason"], **{k: t.get(k) for k in KEYS[name]}}
                  for name, t in bias["tests"].items()},
        "stenosis_table": bias["tests"]["foreground_by_site"]["per_class"]["stenosis"]["table"],
        "sensitivity_flags": bias["sensitivity"]["flags"],
        **({"cross_site_fires_at": _fires_at(bias["tests"]["cross_site"])} if "cross_site" in bias["tests"] else {}),
    }


def _fires_at(test: dict) -> dict[str, bool | None]:
    """Whether the cross-site signal would fire at each of GAP_THRESHOLDS (gap over it, CI above 0)."""
    if not test["computable"]:
        return {f"{t:g}": None for t in GAP_THRESHOLDS}
    return {f"{t:g}": bool(test["gap"] > t and test["gap_ci"][0] > 0) for t in GAP_THRESHOLDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=20, help="per site")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--cross-site", action="store_true", help="run with bias.cross-site = true")
    parser.add_argument("--out", type=Path, default=None, help=f"default {OUT.name} ({CROSS_SITE_OUT.name} with --cross-site)")
    args = parser.parse_args()
    args.out = args.out or (CROSS_SITE_OUT if args.cross_site else OUT)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(Path(tmp), confound, args) for confound in (0.0, 1.0)]
    result = {"benchmark": "segmentation_bias", "args": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()},
              "machine": describe(), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"confound {r['confound']:g}: alarm {r['alarm']}, signals {r['signals']}, "
              f"pooled Dice {r['pooled_dice']:.3f}"
              + (f", cross-site Dice gap {r['tests']['cross_site']['gap']}" if "cross_site" in r["tests"] else ""))


if __name__ == "__main__":
    main()
