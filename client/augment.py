"""Batched image augmentations for the semi-supervised objectives, X-ray physics included.

Every transform is a small class called as `t(x, generator)` on a batch x of shape
(B, 1, H, W) and returns a tensor of the same shape, dtype and device. Randomness comes
only from the `torch.Generator` passed in, which must live on x's device: the same seed
gives the same views, and on a GPU nothing is sampled on the host, so a training step
never waits for it. Each image of the batch draws its own strength.

Site images reach the model z-scored per image (fedir.client.imaging.to_model_input). The
intensity and physics transforms that need a non-negative signal (gamma, quantum noise,
scatter, bias field) map each image to [0, 1] by its own min and max, act there, and map
back with the same min and max, so the model still sees comparably scaled inputs.

MONAI's random transforms act on one channel-first image at a time and draw from a host
numpy RandomState, so they would loop over the batch and sync with the host; the ops here
are the few lines of tensor code each needs, with MONAI's `GaussianFilter` for blurs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # imported where a blur is built: a tabular site never loads MONAI
    from monai.networks.layers import GaussianFilter


class Transform(Protocol):
    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (B, 1, H, W) -> (B, 1, H, W); randomness from `generator` (on x's device)."""
        ...


def _uniform(x: torch.Tensor, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    """One value per image, (B, 1, 1, 1), uniform in [lo, hi)."""
    u = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype)
    return lo + (hi - lo) * u


def _to_unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image to [0, 1] by its own min and max: (x01, lo, span)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    return (x - lo) / span, lo, span


def _blur(x: torch.Tensor, gaussian: GaussianFilter) -> torch.Tensor:
    """Gaussian blur of a (B, 1, H, W) batch with MONAI's separable filter (zero padding),
    its kernel moved to x's device once. Under autocast the convolution runs in bfloat16;
    the result is cast back so every transform returns x's dtype."""
    return gaussian.to(x.device)(x).to(x.dtype)


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x


class RandomAffine:
    """Small rotation, scaling and translation per image (border padding).

    This is the weak view. No flip: an angiogram's left and right are not interchangeable
    (projection angles, the side of the catheter, situs), so a flipped image is a view no
    scanner produces; RandomFlip exists for data where anatomy allows it.
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.0625, scale: float = 0.1) -> None:
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        grid = F.affine_grid(self.theta(x, generator), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)

    def theta(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The (B, 2, 3) affine matrices of one call, drawn per image from `generator`."""
        angle = _uniform(x, -self.degrees, self.degrees, generator).view(-1) * (math.pi / 180)
        zoom = _uniform(x, 1 - self.scale, 1 + self.scale, generator).view(-1)
        shift = _uniform(x, -self.translate, self.translate, generator).view(-1, 1)
        shift = torch.cat([shift, _uniform(x, -self.translate, self.translate, generator).view(-1, 1)], 1)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        return torch.stack(
            [torch.stack([cos, -sin, 2 * shift[:, 0]], 1), torch.stack([sin, cos, 2 * shift[:, 1]], 1)], 1
        )


class RandomFlip:
    """Flip each image along `dim` with probability p (not in the default views; see RandomAffine)."""

    def __init__(self, p: float = 0.5, dim: int = -1) -> None:
        self.p, self.dim = p, dim

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = _uniform(x, 0.0, 1.0, generator) < self.p
        return torch.where(flip, x.flip(self.dim), x)


class GaussianNoise:
    """Additive white noise, std drawn per image in [0, max_std) (in z-score units)."""

    def __init__(self, max_std: float = 0.2) -> None:
        self.max_std = max_std

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + _uniform(x, 0.0, self.max_std, generator) * noise


class GaussianBlur:
    """Blur of random strength: a per-image blend between the image and its blur at `sigma`
    (one fixed kernel for the batch, so no per-image kernel and no host-side choice)."""

    def __init__(self, sigma: float = 1.5) -> None:
        from monai.networks.layers import GaussianFilter

        self.gaussian = GaussianFilter(spatial_dims=2, sigma=sigma)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.lerp(x, _blur(x, self.gaussian), _uniform(x, 0.0, 1.0, generator))


class Contrast:
    """Contrast and brightness: x * c + b per image, in z-score units."""

    def __init__(self, contrast: float = 0.3, brightness: float = 0.3) -> None:
        self.contrast, self.brightness = contrast, brightness

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = _uniform(x, 1 - self.contrast, 1 + self.contrast, generator)
        return x * c + _uniform(x, -self.brightness, self.brightness, generator)


class BiasField:
    """A smooth multiplicative field exp(quadratic in (u, v)) per image, as uneven exposure
    or heel effect shades an image; coefficients uniform in [-max_coef, max_coef)."""

    def __init__(self, max_coef: float = 0.3) -> None:
        self.max_coef = max_coef

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        v = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
        u = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
        basis = (u, v, u * u, v * v, u * v)
        log_field = sum(_uniform(x, -self.max_coef, self.max_coef, generator) * b for b in basis)
        x01, lo, span = _to_unit(x)
        return lo + span * (x01 * torch.exp(log_field))


class Cutout:
    """One square per image, side `size` x the image side, set to 0 (the image mean after
    z-scoring); its centre is uniform over the image."""

    def __init__(self, size: float = 0.25) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        cy, cx = _uniform(x, 0, h, generator), _uniform(x, 0, w, generator)
        rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
        box = ((rows - cy).abs() < self.size * h / 2) & ((cols - cx).abs() < self.size * w / 2)
        return x.masked_fill(box, 0.0)


class QuantumNoise:
    """Dose-dependent quantum (Poisson) noise of an X-ray detector.

    The image in [0, 1] is read as the fraction of `max_photons` quanta reaching each pixel
    (display brightness taken as proportional to detected signal: an approximation that
    ignores the log transform some systems apply); the dose per image is drawn
    log-uniformly in [min_photons, max_photons). Poisson counts / dose give a noise variance
    of x / dose: larger in brighter regions, and larger overall at lower dose.
    """

    def __init__(self, min_photons: float = 50.0, max_photons: float = 2000.0) -> None:
        self.min_photons, self.max_photons = min_photons, max_photons

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x01, lo, span = _to_unit(x)
        log_dose = _uniform(x, math.log(self.min_photons), math.log(self.max_photons), generator)
        dose = torch.exp(log_dose)
        counts = torch.poisson((x01 * dose).float(), generator=generator).to(x.dtype)
        return lo + span * (counts / dose)


class Scatter:
    """Scattered radiation: a low-frequency haze added to the image, a fraction (drawn per
    image in [0, max_fraction)) of the image blurred at a wide `sigma` (in pixels), which
    lowers local contrast as scatter does without an anti-scatter grid."""

    def __init__(self, max_fraction: float = 0.4, sigma: float = 8.0) -> None:
        self.max_fraction = max_fraction
        from monai.networks.layers import GaussianFilter

        self.gaussian = GaussianFilter(spatial_dims=2, sigma=sigma)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x01, lo, span = _to_unit(x)
        haze = _blur(x01, self.gaussian)
        return lo + span * (x01 + _uniform(x, 0.0, self.max_fraction, generator) * haze)


class DetectorResponse:
    """Detector gain and gamma: gain * x ** gamma on the image in [0, 1], gain and gamma
    drawn per image, as detectors and their look-up curves differ between scanners."""

    def __init__(self, gain: float = 0.2, gamma: float = 0.3) -> None:
        self.gain, self.gamma = gain, gamma

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x01, lo, span = _to_unit(x)
        g = _uniform(x, 1 - self.gain, 1 + self.gain, generator)
        gamma = _uniform(x, 1 - self.gamma, 1 + self.gamma, generator)
        return lo + span * (g * x01.clamp_min(0) ** gamma)


def weak_view() -> Transform:
    """FixMatch's weak view: a small affine only."""
    return RandomAffine()


def strong_view(cutout: bool = True) -> Transform:
    """FixMatch's strong view: geometry, X-ray physics, intensity, blur, noise and cutout,
    each at a random strength per image.

    Args:
        cutout: end with Cutout (`train.strong-cutout`). A cut-out square can erase a focal
            finding of a few pixels (the synthetic stenosis), so a confident weak view's
            label becomes the target of a strong view that no longer shows it; without it
            every other transform is the same and draws the same random numbers.
    """
    return Compose(
        [
            RandomAffine(degrees=15.0, translate=0.1, scale=0.15),
            DetectorResponse(),
            Scatter(),
            QuantumNoise(),
            BiasField(),
            Contrast(),
            GaussianBlur(),
            GaussianNoise(),
            *([Cutout()] if cutout else []),
        ]
    )


# ---------------------------------------------------------------------------------------
# Paired views for segmentation: image and mask move together


def _warp_mask(mask: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A mask through the image's affine: integer labels nearest-neighbour (exact labels),
    float maps (a teacher's probabilities) bilinear; outside the image is background (0)."""
    labels = not mask.is_floating_point()
    source = mask.float() if labels else mask
    grid = F.affine_grid(theta.to(source.dtype), list(source.shape), align_corners=False)
    out = F.grid_sample(source, grid, mode="nearest" if labels else "bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.to(mask.dtype)


class PairedView:
    """A view of an image batch and its masks: the geometric transform (RandomAffine) with
    the same random parameters for both, then intensity transforms on the image only.

    For the segmentation objectives of issue 16 (FixMatch-style consistency and mean
    teacher on masks, the training path built on this data layer): the strong view of an
    unlabelled frame must be compared with the weak view's prediction moved the same way,
    and a labelled frame's mask must stay on its vessels. Batched on x's device with
    randomness from the generator, like the classification views (the module docstring
    says why not MONAI's per-image dictionary transforms).
    """

    def __init__(self, affine: RandomAffine, intensity: Sequence[Transform] = ()) -> None:
        self.affine, self.intensity = affine, Compose(intensity)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 1, H, W) float; mask: (B, C, H, W), integer labels or float maps."""
        theta = self.affine.theta(x, generator)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        image = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        return self.intensity(image, generator), _warp_mask(mask, theta)


def paired_weak_view() -> PairedView:
    """The segmentation weak view: weak_view's affine on image and mask alike."""
    return PairedView(RandomAffine())


def paired_strong_view(cutout: bool = True) -> PairedView:
    """The segmentation strong view: strong_view's affine on image and mask, its physics,
    intensity, blur, noise and, under `cutout` (`train.strong-cutout`), cutout on the image
    only (a cut-out vessel is still vessel)."""
    return PairedView(
        RandomAffine(degrees=15.0, translate=0.1, scale=0.15),
        [DetectorResponse(), Scatter(), QuantumNoise(), BiasField(), Contrast(), GaussianBlur(), GaussianNoise(),
         *([Cutout()] if cutout else [])],
    )
