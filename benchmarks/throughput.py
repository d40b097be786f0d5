"""Images per second of fedir's local training step against a plain PyTorch loop.

Both train the same network (fedir.models.build_model), from the same initial weights, on
the same images (PneumoniaMNIST's training split, z-scored per image and resized as a
site would; random images with `--random-data`), with the same batch size, optimiser
(AdamW) and loss (cross-entropy), in the same process. fedir's side is
`fedir.models.train` with the supervised objective: exactly what a ClientApp runs each
round. The plain loop is what a researcher would write: shuffled indices, one forward,
loss, backward and optimiser step per batch.

The two alternate (fedir, plain, fedir, plain, ...) for `--repeats` rounds so that
a change in machine load hits both; the ratio reported is the median of the per-repeat
ratios, with every repeat's figures kept in the JSON. Goal (TARGETS.md): >= 0.95.
Two clocks: wall time (images/s as a user sees them) and, on CPU, this process's CPU
time (images per CPU-second, `time.process_time`, with one torch thread): on a shared
machine the wall-clock ratio swings with other jobs' load, the CPU-time one does not.

`--task segmentation` runs the same comparison for task.kind = "segmentation": MONAI's
BasicUNet with three output channels (fedir.models.build_model("basic_unet", n_outputs=3),
what the kind builds) on synthetic XA frames (simulations/synthetic.py, one frame per
image at `--image-size`, default 64, rendered in memory) with their exact label maps
(`vessel_labels`: 0 background, 1 vessel, 2 stenosis; random images and random label maps
with `--random-data`). fedir's side is the same `train` call with the kind's supervised
objective (fedir.client.segmentation_objectives, DiceCE), what a segmentation site's
ClientApp runs; the plain loop is the one above with MONAI's
`DiceCELoss(to_onehot_y=True, softmax=True)` built once, in place of the cross-entropy.

Device-aware: on CUDA both sides get the same treatment fedir's training uses (the
data moved once through pinned memory, batches indexed on the device, bfloat16
autocast, no host synchronisation per step; the clock stops after
`torch.cuda.synchronize()`), so the ratio compares loops, not set-ups.

    nice -n 5 .venv/bin/python benchmarks/throughput.py [--model resnet_small] [--image-size 28]
        [--batch-size 64] [--steps 60] [--repeats 5] [--threads 1]
    nice -n 5 .venv/bin/python benchmarks/throughput.py --task segmentation --image-size 64
        --batch-size 16 --images 256 --steps 10 --repeats 5 --out benchmarks/results/throughput_segmentation.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import describe  # benchmarks/ is on sys.path

from fedir.client.imaging import to_model_input
from fedir.client.objectives import build_objective
from fedir.client.training import TrainConfig, autocast, pick_device, to_device, train
from fedir.models import build_model
from fedir.simulations.synthetic import render_image_and_tree, vessel_labels
from fedir.tasks import segmentation

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DATA = Path(os.environ.get("FEDIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "medmnist"


def load_images(n: int, image_size: int, random_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, S, S) float32 images and (n,) labels, as a site's reader would give them."""
    if random_data:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(n, 1, image_size, image_size, generator=gen), torch.randint(2, (n,), generator=gen)
    data = np.load(DATA / "pneumoniamnist.npz")
    raw, labels = data["train_images"][:n], data["train_labels"][:n].reshape(-1)
    images = to_model_input(raw.astype(np.float32), image_size)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_frames_and_masks(n: int, image_size: int, random_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, S, S) float32 frames and (n, 1, S, S) int64 label maps: synthetic XA frames
    (sites 0-3 in turn, half with a stenosis) z-scored as a site's reader does, with the
    exact label map of the tree each was drawn from."""
    if random_data:
        gen = torch.Generator().manual_seed(0)
        shape = (n, 1, image_size, image_size)
        return torch.randn(shape, generator=gen), torch.randint(segmentation.n_outputs(0), shape, generator=gen)
    rng = np.random.default_rng(0)
    frames, masks = [], []
    for i in range(n):
        display, vessels = render_image_and_tree(rng, i % 4, (i // 4) % 2, 1, image_size)
        frames.append(display[0])
        masks.append(vessel_labels(vessels, image_size))
    images = to_model_input(np.stack(frames), image_size)
    return torch.from_numpy(images), torch.from_numpy(np.stack(masks)[:, None].astype(np.int64))


def plain_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int,
               lr: float, device: torch.device, loss_fn: Loss = F.cross_entropy) -> tuple[float, float]:
    """A plain PyTorch training loop with `loss_fn`; returns (wall, CPU) seconds for `steps` steps."""
    model.to(device).train()
    x, y = to_device(x, device), to_device(y, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    done = 0
    while done < steps:
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            idx = idx.to(device)
            with autocast(device):
                loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def fedir_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int,
               lr: float, device: torch.device, kind: str = "classification") -> tuple[float, float]:
    """fedir.models.train with the task kind's supervised objective; returns (wall, CPU)
    seconds for `steps` steps (the whole call: moving the data, the optimiser's set-up and
    the final loss read-back)."""
    config = TrainConfig(batch_size=batch, lr=lr, weight_decay=1e-4, steps=steps, seed=0)
    objective = build_objective("supervised", kind=kind)
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    result = train(model, x, y, objective, config, device)
    _sync(device)
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    assert result.steps == steps
    return elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=("classification", "segmentation"), default="classification")
    parser.add_argument("--model", default=None, help="default: resnet_small; basic_unet for segmentation")
    parser.add_argument("--image-size", type=int, default=None, help="default: 28; 64 for segmentation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-data", action="store_true", help="random images instead of PneumoniaMNIST")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device()
    segment = args.task == "segmentation"
    args.model = args.model or (segmentation.MODEL if segment else "resnet_small")
    args.image_size = args.image_size or (64 if segment else 28)
    if segment:
        from monai.losses import DiceCELoss

        x, y = load_frames_and_masks(args.images, args.image_size, args.random_data)
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        loops: dict[str, Callable[..., tuple[float, float]]] = {
            "fedir": partial(fedir_loop, kind="segmentation"), "plain": partial(plain_loop, loss_fn=dice_ce)}
        n_outputs = segmentation.n_outputs(0)
    else:
        x, y = load_images(args.images, args.image_size, args.random_data)
        loops = {"fedir": fedir_loop, "plain": plain_loop}
        n_outputs = 2
    # Same initial weights for both; each side keeps training its own copy across repeats.
    models = {name: build_model(args.model, seed=0, n_outputs=n_outputs).to(device) for name in loops}
    for name, loop in loops.items():
        loop(models[name], x, y, args.batch_size, args.warmup, 1e-3, device)
    load_start = os.getloadavg()
    repeats = []
    for r in range(args.repeats):
        order = list(loops) if r % 2 == 0 else list(reversed(loops))
        rates = {}
        for name in order:
            wall, cpu = loops[name](models[name], x, y, args.batch_size, args.steps, 1e-3, device)
            rates[name] = args.steps * args.batch_size / wall
            rates[f"{name}_per_cpu_s"] = args.steps * args.batch_size / cpu
        repeats.append({**rates, "ratio": rates["fedir"] / rates["plain"],
                        "cpu_ratio": rates["fedir_per_cpu_s"] / rates["plain_per_cpu_s"]})
        print(f"repeat {r}: fedir {rates['fedir']:.0f} img/s, plain {rates['plain']:.0f} img/s, "
              f"ratio {repeats[-1]['ratio']:.3f}; per CPU-second ratio {repeats[-1]['cpu_ratio']:.3f}", flush=True)
    ratios = [r["ratio"] for r in repeats]
    cpu_ratios = [r["cpu_ratio"] for r in repeats]
    result = {
        "machine": describe(torch_threads=args.threads, shared_machine=True),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "repeats": repeats,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios), "max_ratio": max(ratios),
        "median_images_per_s": {n: statistics.median(r[n] for r in repeats) for n in loops},
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "min_cpu_ratio": min(cpu_ratios), "max_cpu_ratio": max(cpu_ratios),
        "median_images_per_cpu_s": {n: statistics.median(r[f"{n}_per_cpu_s"] for r in repeats) for n in loops},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"median ratio fedir / plain: wall {result['median_ratio']:.3f} "
          f"(range {result['min_ratio']:.3f}-{result['max_ratio']:.3f}), per CPU-second "
          f"{result['median_cpu_ratio']:.3f} (range {result['min_cpu_ratio']:.3f}-"
          f"{result['max_cpu_ratio']:.3f}); wrote {args.out}")


if __name__ == "__main__":
    main()
