"""Model construction, shared by both sides: the networks and which of their entries a site keeps.

The server builds the network to create the initial weights and the template its update
validation checks replies against; a site builds the same network to train it
(fedir.client.training). Which state-dict entries never leave a site (FedBN's
normalisation layers, a personal intercept) is decided here, once, because both sides
must agree on it: the site withholds them and the server must expect replies without them.
The weights themselves cross as numpy arrays through fedir.protocol's codec; the torch side
of that conversion is here too.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedir.config import ImageModel, Settings, SettingsError, TabularModel, allowed

NUM_CLASSES = 2
IMAGE_MODELS = allowed(ImageModel)
TABULAR_MODELS = allowed(TabularModel)
MODEL_NAMES = IMAGE_MODELS + TABULAR_MODELS
# BasicUNet's channels per level (MONAI's default halved: 0.5 M parameters, CPU-trainable at 64 px)
UNET_FEATURES = (16, 16, 32, 64, 128, 16)
AUTO_MODEL = {True: "logreg", False: "resnet_small"}  # model.name = auto, by tabular or not


def resolve_model(name: str, tabular: bool, kind: str = "classification") -> str:
    """The network `model.name` asks for on this federation's data: `auto` follows the data
    (logistic regression for tabular sites, as the heart benchmarks use; resnet_small for
    images; a BasicUNet for `kind` = segmentation). An image network on tabular rows, or a tabular one on images, cannot train at
    all, so it is refused before round 1 (server) or on the first message (site)."""
    if name == "auto":
        return "basic_unet" if kind == "segmentation" else AUTO_MODEL[tabular]
    if tabular and name not in TABULAR_MODELS:
        raise SettingsError(f"model.name = {name!r} is an image model, but the sites hold tabular rows; "
                            f"choose auto or one of {', '.join(TABULAR_MODELS)}")
    if not tabular and name in TABULAR_MODELS:
        raise SettingsError(f"model.name = {name!r} is a tabular model, but the sites hold images; "
                            f"choose auto or one of {', '.join(IMAGE_MODELS)}")
    return name


def build_model(name: str = "resnet_small", seed: int = 0, n_features: int = 0,
                spatial_dims: int = 2, n_outputs: int = NUM_CLASSES, fused_image_size: int = 0,
                projection: int = 0) -> nn.Module:
    """A classifier with `n_outputs` outputs (two by default; one, a risk score, for a
    survival task: fedir.tasks' `n_outputs`): a MONAI 2D (or, with spatial_dims=3, 3D) network for
    one-channel images, or, for a tabular site (`logreg`, `mlp`), a small torch model over
    `n_features` columns. The 3D networks are the same MONAI classes with 3D convolutions
    (VesselMNIST3D volumes; `data.frame-policy = "volume"` selects them).

    `resnet_small` (MONAI ResNet, basic blocks, one block per stage, 16-128 channels,
    0.3 M parameters) trains at about 240 images/s at 128x128 on one CPU core, which is
    what keeps the CPU demo within minutes; the larger ones are for GPUs. `auto` is
    `resolve_model`'s choice, tabular when there are features.

    `fused_image_size` > 0 (`data.inputs = "image+clinical"`): the image network `name` with
    its head replaced by a FusionNet head over its embedding and the `n_features` clinical
    columns, for square (or cubic) images of that side. `projection` > 0 (a
    `train.objective = simclr` study: projection_dim) adds the projection head
    (add_projection_head) after the network is built, so every other weight is the one the
    same seed gives without it.
    """
    if fused_image_size > 0:
        encoder = _network(AUTO_MODEL[False] if name == "auto" else name, seed, 0, spatial_dims, n_outputs)
        model: nn.Module = FusionNet(encoder, n_features, (1,) + (fused_image_size,) * spatial_dims, n_outputs)
    else:
        model = _network(name, seed, n_features, spatial_dims, n_outputs)
    return add_projection_head(model, projection) if projection else model


def _network(name: str, seed: int, n_features: int, spatial_dims: int, n_outputs: int) -> nn.Module:
    _seed(seed)
    name = AUTO_MODEL[n_features > 0] if name == "auto" else name
    if name in TABULAR_MODELS:
        return build_tabular_model(name, n_features, n_outputs)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    # MONAI only for an imaging model: importing it costs seconds, and a deployed ClientApp
    # imports everything afresh for every message (a tabular site never needs it)
    from monai.networks.nets import BasicUNet, DenseNet121, ResNet, resnet10, resnet18

    if name == "basic_unet":  # task.kind = segmentation: one logit map per class
        return BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=n_outputs,
                         features=UNET_FEATURES)

    if name == "resnet_small":
        return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128],
                      spatial_dims=spatial_dims, n_input_channels=1, num_classes=n_outputs)
    if name in ("resnet10", "resnet18"):
        factory = resnet10 if name == "resnet10" else resnet18
        return factory(spatial_dims=spatial_dims, n_input_channels=1, num_classes=n_outputs)
    if name == "densenet121":
        return DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=n_outputs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


class FusionNet(nn.Module):
    """Late fusion: an image network's embedding concatenated with clinical covariates, then
    one linear head (`data.inputs = "image+clinical"`).

    The input is one row per image, (B, P + F): the image's P pixels (flattened from
    `image_shape`, (1, S, S) or (1, S, S, S)) then its patient's F standardised clin_* values,
    so the site's training loop, batching and scoring treat it as they treat any tensor.
    `encoder` is a MONAI classifier (fedir.models.build_model) whose head (its last
    nn.Linear, head_name) is replaced by nn.Identity: its output is the embedding, (B, D).
    `head` (nn.Linear(D + F, n_outputs)) is then the model's last Linear, so head_name,
    train.freeze's encoder, the embedding moments (fedir.client.embedding: the fused vector)
    and the intercept all find it.
    """

    def __init__(self, encoder: nn.Module, n_clinical: int, image_shape: tuple[int, ...],
                 n_outputs: int = NUM_CLASSES) -> None:
        super().__init__()
        if n_clinical <= 0:
            raise ValueError(f"a fused model needs clinical columns (got {n_clinical})")
        old_head = head_name(encoder)
        linear = encoder.get_submodule(old_head)
        assert isinstance(linear, nn.Linear)
        width = linear.in_features
        encoder.set_submodule(old_head, nn.Identity())
        self.image = encoder
        self.image_shape = tuple(int(d) for d in image_shape)
        self.n_pixels = int(np.prod(self.image_shape))
        self.n_clinical = int(n_clinical)
        self.head = nn.Linear(width + self.n_clinical, n_outputs)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, *image_shape), clinical (B, F)) of fused rows (B, P + F)."""
        if x.dim() != 2 or x.shape[1] != self.n_pixels + self.n_clinical:
            raise ValueError(f"fused rows must be (B, {self.n_pixels} + {self.n_clinical}), got {tuple(x.shape)}")
        return x[:, : self.n_pixels].reshape(-1, *self.image_shape), x[:, self.n_pixels :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, clinical = self.split(x)
        embedding = self.image(images).flatten(1)
        return self.head(torch.cat([embedding, clinical.to(embedding.dtype)], dim=1))


def fuse(images: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
    """FusionNet's input rows: images (N, 1, *spatial) and clinical (N, F) -> (N, P + F) float32."""
    return torch.cat([images.flatten(1).float(), clinical.float()], dim=1)


def _seed(seed: int) -> None:
    """Seed the weight initialisation. Without CUDA only the CPU generator: there
    `torch.manual_seed` also queues a lazy CUDA seeding with a formatted stack trace, which
    took 16 ms per model in a Ray worker's deep stack, and a site builds a model per message."""
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def build_tabular_model(name: str, n_features: int, n_outputs: int = NUM_CLASSES) -> nn.Module:
    """Logistic regression (one linear layer, two logits: softmax regression, which is the
    same model class as a sigmoid output) or an MLP with one hidden layer of 32 units. With
    one output, `logreg` is the linear Cox model (its bias cancels in the partial likelihood)."""
    if n_features <= 0:
        raise ValueError(f"a tabular model needs the number of features (got {n_features})")
    if name == "logreg":
        return nn.Linear(n_features, n_outputs)
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_outputs))


# ---- the projection head of contrastive pretraining (train.objective = simclr) ---------------

PROJECTION = "projection"  # the module name of the projection head: its state-dict keys start "projection."


def projection_dim(settings: Settings) -> int:
    """The projection head's width for this study's model: `train.projection-dim` under
    `train.objective = simclr`, else 0 (no head). Server and sites both build with it."""
    return settings.train_projection_dim if settings.train_objective == "simclr" else 0


def add_projection_head(model: nn.Module, dim: int) -> nn.Module:
    """SimCLR's projection head (Chen et al. 2020): Linear(D, D), ReLU, Linear(D, dim) on the
    embedding, the D features the classifier layer (head_name) receives, registered as the
    submodule `projection` (keys `projection.0.*`, `projection.2.*`).

    The network's own forward never calls it, so the model still maps an image to its class
    logits; the contrastive objective (fedir.client.objectives.SimCLR) feeds it the
    embedding. It is federated like every other weight during pretraining and saved in
    model.pt; a fine-tuning study built without it (any other objective) drops those keys
    when model.pt is its model.init (fedir.server.model_init reports them as dropped: "no
    such entry in the model"), so the projection head never reaches the fine-tuned model.
    """
    width = _embedding_width(model)
    model.add_module(PROJECTION, nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim)))
    return model


def _embedding_width(model: nn.Module) -> int:
    head = dict(model.named_modules())[head_name(model)]
    assert isinstance(head, nn.Linear)
    return head.in_features


def _in_projection(name: str) -> bool:
    return name == PROJECTION or name.startswith(PROJECTION + ".")


# ---- the encoder and the head (train.freeze) -----------------------------------------------

def head_name(model: nn.Module) -> str:
    """The module name of the final classifier layer: the last `nn.Linear` (`fc` of MONAI's
    ResNet, `class_layers.out` of its DenseNet121, `2` of the MLP, `""` for logistic
    regression, which is all head), never one of the projection head's (add_projection_head).
    Its input is the embedding fedir.client.embedding hooks."""
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _in_projection(name)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no Linear classifier layer")
    return heads[-1]


def _in_head(name: str, head: str) -> bool:
    return not head or name == head or name.startswith(head + ".")


def encoder_names(model: nn.Module) -> set[str]:
    """The parameter names of the encoder: every parameter but the head's (head_name), i.e.
    everything that feeds the embedding (not a projection head, which the embedding feeds).
    What `train.freeze = "encoder"` freezes."""
    head = head_name(model)
    return {name for name, _ in model.named_parameters() if not _in_head(name, head) and not _in_projection(name)}


def encoder_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder's normalisation layers (NORM_LAYERS outside the head): under a frozen
    encoder they stay in eval mode, so their running statistics are the checkpoint's too."""
    head = head_name(model)
    return [m for name, m in model.named_modules() if isinstance(m, NORM_LAYERS) and not _in_head(name, head)]


# ---- what stays at a site (FedBN, a personal intercept) ----------------------------------

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
)


def norm_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's normalisation layers (weights, biases, running
    statistics, num_batches_tracked)."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys |= {f"{prefix}.{k}" if prefix else k for k in module.state_dict()}
    return keys


def intercept_key(model: nn.Module) -> str:
    """The state-dict key of the output layer's bias: the last Linear layer's bias."""
    heads = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.bias is not None and not _in_projection(name)]
    if not heads:
        raise ValueError("train.personalise = intercept: the model has no Linear output layer with a bias")
    return f"{heads[-1]}.bias" if heads[-1] else "bias"


def kept_keys(model: nn.Module, settings: Settings) -> set[str]:
    """State-dict entries that stay at the site: FedBN's normalisation layers, under
    `personalise = intercept` the output bias, and under secure aggregation the integer
    counters (BatchNorm's `num_batches_tracked`): SecAgg+ sums values within its clipping
    range, and a step count is no weight to average."""
    keys = norm_keys(model) if settings.train_fedbn else set()
    if settings.train_personalise == "intercept":
        keys.add(intercept_key(model))
    if settings.secure_aggregation:
        keys |= {name for name, value in model.state_dict().items() if not value.is_floating_point()}
    return keys


# ---- the torch side of the weights codec (fedir.protocol knows numpy only) -----------------

def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays, for fedir.protocol.encode_weights."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each state-dict entry's shape, for fedir.protocol.decode_weights to undo DP's shapes."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def as_tensors(arrays: Mapping[str, np.ndarray], like: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Decoded weights (fedir.protocol.decode_weights) as a state dict to load or save.

    Args:
        arrays: name -> array, as decoded.
        like: when given, each entry takes this model's dtype for it, so that a saved state
            dict holds what the model holds: FedAvg's weighted mean turns BatchNorm's integer
            `num_batches_tracked` into float64 (rounded back here). Loading casts anyway;
            saving (model.pt) does not.
    """
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    if like is None:
        return tensors
    dtypes = {k: v.dtype for k, v in like.state_dict().items()}
    for k, t in tensors.items():
        dtype = dtypes.get(k, t.dtype)
        if dtype != t.dtype:
            tensors[k] = (t.round() if t.is_floating_point() and not dtype.is_floating_point else t).to(dtype)
    return tensors
