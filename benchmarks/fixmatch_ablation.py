"""Why FixMatch costs AUC on the demo federation: its pieces taken out one at a time.

Issue 14: at a fifth of the training labels (`fedir data synth --sites 4 --patients 120
--unlabelled 0.8 --seed 0`), `fedir compare` on the demo's scenario found FixMatch 0.109
[0.038, 0.187] below the same study supervised on the same labels
(results/demo_compare_unlabelled80_seed0.json). Two suspects, each a variant here, run
through `fedir compare`'s federated and supervised arms (fedir.simulations.compare: fedir's
ServerApp logic and ClientApp in one process, paired per patient):

- ``nocutout``: the strong view without Cutout. Label 1 is a focal stenosis of a few
  pixels: a cut-out square can erase it, and the weak view's confident "stenosis" becomes
  the target of a strong view that no longer shows one.
- ``nocutout_splitbn``: that, and the labelled, weak and strong batches through the model
  in three forward passes instead of one, so that BatchNorm's batch statistics are each
  view's own (the reference implementation concatenates them; here the strong view's
  physics and noise shift them).

The variant is applied by replacing, in this process only, the strong view that
fedir.client.objectives builds FixMatch with (and, for splitbn, FixMatch.terms): a
diagnosis, not a setting. One seed: each variant is two studies of 8 rounds at 128 px
(15-30 min on the 2-core CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fixmatch_ablation.py nocutout
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe  # benchmarks/ is on sys.path

import fedir.client.augment as augment
import fedir.client.objectives as objectives
from fedir.simulations.compare import compare
from fedir.simulations.scenario import load_scenario
from fedir.simulations.synthetic import generate_federation

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("nocutout", "nocutout_splitbn")


def strong_view_without_cutout() -> augment.Transform:
    """fedir's strong view with its Cutout left out (every other transform as it is)."""
    view = augment.strong_view()
    assert isinstance(view, augment.Compose)
    return augment.Compose([t for t in view.transforms if not isinstance(t, augment.Cutout)])


def terms_per_view(self: objectives.FixMatch, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   x_unlabelled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch.terms with one forward pass per view (BatchNorm statistics per view)."""
    g = self.generator(x.device)
    x_in, y_a, y_b, lam = self.labelled_batch(x, y)
    weak, strong = self.weak(x_unlabelled, g), self.strong(x_unlabelled, g)
    logits_x, logits_w, logits_s = model(x_in), model(weak), model(strong)
    confidence, pseudo = torch.softmax(logits_w.detach().float(), dim=1).max(dim=1)
    mask = confidence >= self.params.threshold
    unlabelled = (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
    return objectives.mixed_cross_entropy(logits_x, y_a, y_b, lam), unlabelled, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    objectives.strong_view = strong_view_without_cutout  # type: ignore[assignment]
    if args.variant == "nocutout_splitbn":
        objectives.FixMatch.terms = terms_per_view  # type: ignore[method-assign]
    out = args.out or ROOT / "benchmarks" / "results" / f"fixmatch_ablation_{args.variant}_seed{args.seed}.json"
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Path(tmp) / "fed"
        generate_federation(fed, sites=4, patients=120, seed=0, unlabelled_fraction=0.8, image_size=256,
                            progress=False)
        settings = load_scenario(ROOT / "scenarios" / "demo.toml", [
            "federation.sites=" + json.dumps([str(fed / f"site-{i}") for i in range(4)])])
        result = compare(settings, Path(tmp) / "compare", [args.seed], ["federated", "supervised"])
    result.update({"benchmark": "fixmatch_ablation", "variant": args.variant, "machine": describe(),
                   "federation": "fedir data synth --sites 4 --patients 120 --unlabelled 0.8 --seed 0",
                   "scenario": "scenarios/demo.toml (objective fixmatch)", "wall_s": round(time.time() - start, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(json.dumps(result["questions"], indent=1))


if __name__ == "__main__":
    main()
