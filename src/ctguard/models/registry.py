"""The 2D image classifiers of the paper's study, built by name (``ctguard list-models``).

``paper-cnn`` is the seed paper's small Keras-style Sequential network; the other four are
torchvision's ImageNet models used for transfer learning: the backbone frozen (by default) and a new
head for our classes. Each model carries its input spec, so data loading follows the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ctguard.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: int
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    transfer: bool  # a torchvision ImageNet backbone with a new head
    torchvision_name: str | None = None
    blocks: Callable[[nn.Module], list[nn.Module]] | None = field(default=None, repr=False)


class PaperCNN(nn.Module):
    """The paper's Sequential CNN: Conv2D(32, 3x3, same, ReLU) x3, MaxPool(2, stride 2), Flatten,
    Dense(ReLU), Dense(softmax). The paper does not give the hidden width; 128 is the default."""

    def __init__(self, num_classes: int, input_size: int = 224, hidden: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for _ in range(3):
            layers += [nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(inplace=True)]
            c = 32
        self.features = nn.Sequential(*layers, nn.MaxPool2d(2, 2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (input_size // 2) ** 2, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_classes))
        for m in self.modules():  # Keras defaults: Glorot-uniform kernels, zero biases
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits; softmax is in the loss and in predict
        return self.head(self.features(x))


def _vgg_blocks(m):
    return [m.features[i : j] for i, j in ((0, 5), (5, 10), (10, 17), (17, 24), (24, 31))]


def _mobilenet_blocks(m):
    return list(m.features)


def _inception_blocks(m):
    return [m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.Conv2d_3b_1x1, m.Conv2d_4a_3x3, m.Mixed_5b, m.Mixed_5c,
            m.Mixed_5d, m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e, m.Mixed_7a, m.Mixed_7b, m.Mixed_7c]


def _resnet_blocks(m):
    return [nn.Sequential(m.conv1, m.bn1), m.layer1, m.layer2, m.layer3, m.layer4]


SPECS: dict[str, ModelSpec] = {
    "paper-cnn": ModelSpec("paper-cnn", 224, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                           "the seed paper's Sequential CNN (3x Conv2D 32, MaxPool, Dense ReLU, Dense softmax)", False),
    "vgg16": ModelSpec("vgg16", 224, 3, IMAGENET_MEAN, IMAGENET_STD, "VGG16, ImageNet transfer (torchvision)", True, "vgg16", _vgg_blocks),
    "mobilenet_v2": ModelSpec("mobilenet_v2", 224, 3, IMAGENET_MEAN, IMAGENET_STD, "MobileNetV2, ImageNet transfer (torchvision)", True,
                              "mobilenet_v2", _mobilenet_blocks),
    "inception_v3": ModelSpec("inception_v3", 299, 3, IMAGENET_MEAN, IMAGENET_STD, "InceptionV3, ImageNet transfer (torchvision)", True,
                              "inception_v3", _inception_blocks),
    "resnet50": ModelSpec("resnet50", 224, 3, IMAGENET_MEAN, IMAGENET_STD, "ResNet50, ImageNet transfer (torchvision)", True, "resnet50",
                          _resnet_blocks),
}


def spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise InputError(f"unknown model {name!r} (known: {', '.join(SPECS)})")
    return SPECS[name]


class TransferNet(nn.Module):
    """A torchvision backbone (its classifier removed) and a new linear head.

    ``backbone(x)`` gives the pooled feature vector, so a frozen backbone's features can be computed
    once and only ``head`` trained on them."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        # BatchNorm first: backbone features can be of any scale (a randomly initialised ResNet50's
        # reach thousands), and an unnormalised linear head then diverges.
        self.head = nn.Sequential(nn.BatchNorm1d(feature_dim), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _strip_classifier(name: str, m: nn.Module) -> tuple[nn.Module, int]:
    if name == "vgg16":
        dim = m.classifier[-1].in_features
        m.classifier = m.classifier[:-1]  # keep VGG's two 4096 ReLU layers (frozen), drop the 1000-way output
        return m, dim
    if name == "mobilenet_v2":
        dim = m.classifier[-1].in_features
        m.classifier = nn.Identity()
        return m, dim
    if name == "inception_v3":
        dim = m.fc.in_features
        m.fc = nn.Identity()
        m.aux_logits, m.AuxLogits = False, None
        return m, dim
    dim = m.fc.in_features  # resnet50
    m.fc = nn.Identity()
    return m, dim


def _imagenet_state(spec_: ModelSpec, weights: str | Path | None, pretrained: bool) -> dict | None:
    """ImageNet weights: from ``weights`` (a state-dict file), else torchvision's download/cache."""
    if weights:
        path = Path(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"cannot load weights ({e.__class__.__name__}: {e})", path) from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return state
    if not pretrained:
        return None
    import torchvision

    try:
        w = torchvision.models.get_model_weights(spec_.torchvision_name).DEFAULT
        return w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, blocked, or corrupt download
        log.warning("no ImageNet weights for %s (%s: %s); starting from random initialisation. "
                    "Pass --weights FILE with torchvision's state dict to transfer-learn offline.",
                    spec_.name, e.__class__.__name__, str(e).splitlines()[0][:120])
        return None


def build(name: str, num_classes: int, *, pretrained: bool = True, weights: str | Path | None = None, unfreeze: int = 0,
          input_size: int | None = None, hidden: int = 128) -> nn.Module:
    """Builds a registered model with ``num_classes`` outputs.

    Transfer models: ImageNet weights when available (``weights`` file, else torchvision's own);
    the backbone is frozen except its last ``unfreeze`` blocks (-1: all trainable).
    The returned module has ``.spec`` and ``.pretrained`` (whether ImageNet weights were loaded).
    """
    s = spec(name)
    if not s.transfer:
        model: nn.Module = PaperCNN(num_classes, input_size or s.input_size, hidden)
        model.spec, model.pretrained = s, False
        return model
    import torchvision

    kwargs = {"init_weights": False} if name in ("inception_v3",) else {}
    net = torchvision.models.get_model(s.torchvision_name, weights=None, **kwargs)
    state = _imagenet_state(s, weights, pretrained)
    if state is not None:
        missing, unexpected = net.load_state_dict(state, strict=False)
        core_missing = [k for k in missing if not k.startswith("AuxLogits")]
        if core_missing:
            raise InputError(f"weights do not fit {name}: missing {core_missing[:3]}...", weights or name)
    blocks = s.blocks(net)
    backbone, dim = _strip_classifier(name, net)
    for p in backbone.parameters():
        p.requires_grad = unfreeze < 0
    if unfreeze > 0:
        for block in blocks[-unfreeze:]:
            for p in block.parameters():
                p.requires_grad = True
    model = TransferNet(backbone, dim, num_classes)
    model.spec, model.pretrained = s, state is not None
    return model


def backbone_frozen(model: nn.Module) -> bool:
    return isinstance(model, TransferNet) and not any(p.requires_grad for p in model.backbone.parameters())
