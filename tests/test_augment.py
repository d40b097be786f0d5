"""Each augmentation: shape kept, finite, reproducible from its seed, changes the image,
and does what it claims (the physics ones by their physical property)."""

import pytest
import torch

from fedir.client.augment import (
    BiasField,
    Contrast,
    Cutout,
    DetectorResponse,
    GaussianBlur,
    GaussianNoise,
    PairedView,
    QuantumNoise,
    RandomAffine,
    RandomFlip,
    Scatter,
    paired_strong_view,
    paired_weak_view,
    strong_view,
    weak_view,
)

TRANSFORMS = {
    "affine": RandomAffine(),
    "flip": RandomFlip(p=0.5),
    "noise": GaussianNoise(),
    "blur": GaussianBlur(),
    "contrast": Contrast(),
    "bias-field": BiasField(),
    "cutout": Cutout(),
    "quantum-noise": QuantumNoise(),
    "scatter": Scatter(),
    "detector": DetectorResponse(),
    "weak-view": weak_view(),
    "strong-view": strong_view(),
}


def _images(b: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    """z-scored images with structure (a bright bar) so geometry changes show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, size, size, generator=g) * 0.3
    x[:, :, 4:10, 3:20] += 2.0
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_keeps_shape_is_finite_reproducible_and_changes_the_image(name):
    t, x = TRANSFORMS[name], _images()
    a, b, c = t(x, _gen(1)), t(x, _gen(1)), t(x, _gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, x)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_keeps_the_dtype_under_autocast(name):
    """The training loop runs objectives under bf16 autocast on a GPU; CPU autocast mimics it."""
    x = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TRANSFORMS[name](x, _gen(0))
    assert out.dtype == x.dtype and torch.isfinite(out).all()


def test_affine_with_no_range_is_the_identity_and_flip_flips():
    x = _images()
    assert torch.allclose(RandomAffine(degrees=0, translate=0, scale=0)(x, _gen(0)), x, atol=1e-5)
    assert torch.equal(RandomFlip(p=1.0)(x, _gen(0)), x.flip(-1))


def test_noise_is_zero_mean_and_blur_smooths():
    x = _images(b=16, size=32)
    diff = GaussianNoise(max_std=0.5)(x, _gen(0)) - x
    assert abs(float(diff.mean())) < 0.02 and 0.05 < float(diff.std()) < 0.5

    def roughness(t):
        return float((t[..., 1:, :] - t[..., :-1, :]).abs().mean())

    assert roughness(GaussianBlur()(x, _gen(0))) < roughness(x)


def test_contrast_is_affine_per_image_and_cutout_zeroes_a_square():
    x = _images()
    y = Contrast()(x, _gen(0))
    for xi, yi in zip(x, y):  # y = c * x + b: perfectly correlated
        assert torch.corrcoef(torch.stack([xi.flatten(), yi.flatten()]))[0, 1] > 0.9999
    out = Cutout(size=0.25)(x + 10.0, _gen(0))  # no pixel is 0 before the cut
    zeros = (out == 0).flatten(1).sum(1)
    assert bool(((zeros >= 4) & (zeros <= 36)).all())  # at most a 6 x 6 box at 24 px


def test_bias_field_is_a_bounded_multiplicative_field():
    x = _images()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
    x01, out01 = (x - lo) / span, (BiasField(max_coef=0.3)(x, _gen(0)) - lo) / span
    field = out01[x01 > 0.2] / x01[x01 > 0.2]
    bound = torch.exp(torch.tensor(5 * 0.3))  # five basis terms, each |coef| < 0.3
    assert bool((field > 1 / bound).all() and (field < bound).all())
    assert float(field.std()) > 0.01


def _two_level_image(b: int = 32, size: int = 32) -> torch.Tensor:
    """Left half at 0.25, right half at 1.0, one pixel at 0: in [0, 1] already."""
    x = torch.full((b, 1, size, size), 0.25)
    x[..., size // 2 :] = 1.0
    x[..., 0, 0] = 0.0
    return x


def test_quantum_noise_variance_grows_with_intensity_and_falls_with_dose():
    x = _two_level_image()
    half = x.shape[-1] // 2

    def variances(photons: float) -> tuple[float, float]:
        out = QuantumNoise(min_photons=photons, max_photons=photons * (1 + 1e-6))(x, _gen(0))
        return float(out[..., 1:, 1:half].var()), float(out[..., half:].var())

    dim_low, bright_low = variances(100.0)
    dim_high, bright_high = variances(1000.0)
    assert bright_low > 2 * dim_low  # Poisson: variance = x / dose, 1.0 vs 0.25
    assert bright_low == pytest.approx(1.0 / 100, rel=0.15)
    assert dim_low > 5 * dim_high and bright_low > 5 * bright_high  # 10x the dose


def test_scatter_adds_a_low_frequency_haze():
    x = _two_level_image(b=4)
    out = Scatter(max_fraction=0.4, sigma=4.0)(x, _gen(0))
    haze = out - x
    assert bool((haze >= 0).all()) and float(haze.mean()) > 0.01

    def steepest_step(t):
        return float((t[..., 1:] - t[..., :-1]).abs().max())

    assert steepest_step(haze) < 0.1 * steepest_step(x)  # the haze has no edge of its own


def test_detector_response_keeps_the_order_of_grey_levels():
    x = _images()
    out = DetectorResponse()(x, _gen(0))
    for xi, oi in zip(x.flatten(1), out.flatten(1)):
        order = xi.argsort()
        assert bool((oi[order][1:] >= oi[order][:-1] - 1e-6).all())


def _bars(b: int = 4, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a bright bar and, as the mask, exactly that bar (label 1, its end 2)."""
    mask = torch.zeros(b, 1, size, size, dtype=torch.uint8)
    mask[:, :, 4:10, 3:20] = 1
    mask[:, :, 4:10, 3:6] = 2
    x = torch.randn(b, 1, size, size, generator=_gen(0)) * 0.1 + 2.0 * (mask > 0)
    return x, mask


@pytest.mark.parametrize("view", [paired_weak_view(), paired_strong_view()])
def test_paired_views_keep_image_and_mask_aligned(view) -> None:
    """The warped image's bright pixels are the warped mask's vessel pixels; labels stay
    labels; the same seed gives the same pair; the classification views are unchanged."""
    x, mask = _bars()
    image, warped = view(x, mask, _gen(3))
    again = view(x, mask, _gen(3))
    assert torch.equal(image, again[0]) and torch.equal(warped, again[1])
    assert warped.dtype == torch.uint8 and set(warped.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(warped, mask)
    geometric, _ = PairedView(view.affine)(x, mask, _gen(3))  # the geometry alone, no intensity
    vessel = warped > 0
    assert vessel.any()
    assert (geometric[vessel] > 1.0).float().mean() > 0.95 and (geometric[~vessel] < 1.0).float().mean() > 0.95


def test_paired_affine_equals_the_classification_affine_on_the_image() -> None:
    x, mask = _bars()
    image, _ = PairedView(RandomAffine())(x, mask, _gen(5))
    assert torch.equal(image, RandomAffine()(x, _gen(5)))


def test_paired_view_warps_float_maps_bilinearly() -> None:
    x, mask = _bars()
    probs = mask.float() / 2
    _, warped = paired_weak_view()(x, probs, _gen(1))
    assert warped.dtype == torch.float32 and ((warped > 0) & (warped < 0.5)).any()


def _types(transforms) -> list[type]:
    return [type(t) for t in transforms]


def test_the_strong_view_without_cutout_is_the_strong_view_less_its_cutout() -> None:
    """train.strong-cutout = false: no Cutout, every other transform the same and drawing the
    same random numbers, so the image differs from the full view's exactly where its cut-out
    square set pixels to 0."""
    full, bare = strong_view(), strong_view(cutout=False)
    assert Cutout in _types(full.transforms) and Cutout not in _types(bare.transforms)
    assert _types(bare.transforms) == [t for t in _types(full.transforms) if t is not Cutout]
    x = _images() + 10.0  # no pixel is 0 before a cut
    with_cut, without = full(x, _gen(4)), bare(x, _gen(4))
    assert not (without == 0).any()
    differ = with_cut != without
    assert bool(differ.flatten(1).any(1).all())  # every image lost a square
    assert bool((with_cut[differ] == 0).all())
    assert torch.equal(with_cut, without.masked_fill(differ, 0.0))
    paired, paired_bare = paired_strong_view(), paired_strong_view(cutout=False)
    assert _types(paired_bare.intensity.transforms) == [
        t for t in _types(paired.intensity.transforms) if t is not Cutout]
    assert Cutout not in _types(paired_bare.intensity.transforms)
