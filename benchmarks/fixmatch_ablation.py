"""Why FixMatch costs AUC on the demo federation: its pieces taken out one at a time.

Issue 14: at a fifth of the training labels (`fedir data synth --sites 4 --patients 120
--unlabelled 0.8 --seed 0`), `fedir compare` on the demo's scenario found FixMatch 0.109
[0.038, 0.187] below the same study supervised on the same labels
(results/demo_compare_unlabelled80_seed0.json). Two suspects, each a variant here, run
through `fedir compare`'s federated and supervised arms (fedir.simulations.compare: fedir's
ServerApp logic and ClientApp in one process, paired per patient):

- ``nocutout`` (`train.strong-cutout = false`): the strong view without Cutout. Label 1 is
  a focal stenosis of a few pixels: a cut-out square can erase it, and the weak view's
  confident "stenosis" becomes the target of a strong view that no longer shows one.
- ``nocutout_splitbn`` (and `train.bn-views = "per-view"`): the labelled, weak and strong
  batches through the model in three forward passes instead of one, so that BatchNorm's
  batch statistics are each view's own (the reference implementation concatenates them;
  here the strong view's physics and noise shift them).

The federation is generated (`--unlabelled`, 0.8 by default, in a temporary folder) or an
existing one is read (`--federation`, e.g. `demo-data/federation`, the demo's 50%). One
seed per call: each variant is two studies of 8 rounds at 128 px (15-80 min on the 2-core
CPU, depending on its load).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fixmatch_ablation.py nocutout
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fixmatch_ablation.py nocutout_splitbn \
        --federation demo-data/federation --seed 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine import describe  # benchmarks/ is on sys.path

from fedir.simulations.compare import compare
from fedir.simulations.scenario import load_scenario
from fedir.simulations.synthetic import generate_federation

ROOT = Path(__file__).resolve().parents[1]
SITES = 4
VARIANTS = {  # the scenario overrides of each variant
    "nocutout": ["train.strong-cutout=false"],
    "nocutout_splitbn": ["train.strong-cutout=false", "train.bn-views=per-view"],
}


def run(variant: str, seed: int, federation: Path | None, unlabelled: float, work: Path) -> dict:
    """The variant's federated and supervised arms on `federation` (its site-0..site-3), or on a
    federation generated into `work` with `unlabelled` of each site's training patients unlabelled."""
    if federation is None:
        federation = work / "fed"
        generate_federation(federation, sites=SITES, patients=120, seed=0, unlabelled_fraction=unlabelled,
                            image_size=256, progress=False)
        described = f"fedir data synth --sites {SITES} --patients 120 --unlabelled {unlabelled} --seed 0"
    else:
        described = str(federation)
    sites = [federation.resolve() / f"site-{i}" for i in range(SITES)]
    settings = load_scenario(ROOT / "scenarios" / "demo.toml", [
        "federation.sites=" + json.dumps([str(s) for s in sites]), *VARIANTS[variant]])
    result = compare(settings, work / "compare", [seed], ["federated", "supervised"])
    result.update({"benchmark": "fixmatch_ablation", "variant": variant, "overrides": VARIANTS[variant],
                   "federation": described, "scenario": "scenarios/demo.toml (objective fixmatch)"})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federation", type=Path, default=None,
                        help="an existing federation folder (site-0..site-3), e.g. demo-data/federation")
    parser.add_argument("--unlabelled", type=float, default=0.8,
                        help="without --federation: share of each generated site's training patients unlabelled")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.federation is not None and not (args.federation / "site-0").is_dir():
        parser.error(f"--federation {args.federation}: no site-0 folder there (make demo writes demo-data/federation)")
    if not 0.0 <= args.unlabelled < 1.0:
        parser.error(f"--unlabelled {args.unlabelled}: a share in [0, 1)")
    # the committed 80% results keep their names; the demo's federation and other shares are tagged
    tag = ("_demo" if args.federation is not None
           else "" if args.unlabelled == 0.8 else f"_unlabelled{round(100 * args.unlabelled)}")
    out = args.out or ROOT / "benchmarks" / "results" / f"fixmatch_ablation_{args.variant}{tag}_seed{args.seed}.json"
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.variant, args.seed, args.federation, args.unlabelled, Path(tmp))
    result.update({"machine": describe(), "wall_s": round(time.time() - start, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(json.dumps(result["questions"], indent=1))


if __name__ == "__main__":
    main()
