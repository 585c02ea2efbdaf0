"""ResNet (torchvision parameter names) + DeepLab-v3+ + MDP projection heads."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, dilation, dilation, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False)
        self.bn2 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = _bn(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
         "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


class ResNet(nn.Module):
    """ResNet without the classifier, with torchvision's parameter names (``conv1``, ``bn1``,
    ``layer1..4``, ``downsample.0/1``) so torchvision checkpoints load. ``output_stride`` 8
    or 16 replaces the last strides with dilation; ``width`` scales the channels (64 is the
    standard network; smaller is for tests). ``forward`` returns the stride-4 ``layer1`` map
    and the last map."""

    def __init__(self, arch: str = "resnet50", output_stride: int = 16, width: int = 64):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, depths = ARCHS[arch]
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False,) * 3}[output_stride]
        self.cin, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, width, depths[0], 1, False)
        self.layer2 = self._layer(block, width * 2, depths[1], 2, dilate[0])
        self.layer3 = self._layer(block, width * 4, depths[2], 2, dilate[1])
        self.layer4 = self._layer(block, width * 8, depths[3], 2, dilate[2])
        self.low_channels, self.out_channels = width * block.expansion, width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, block, width: int, n: int, stride: int, dilate: bool) -> nn.Sequential:
        prev = self.dilation
        if dilate:
            self.dilation, stride = self.dilation * stride, 1
        down = None
        if stride != 1 or self.cin != width * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.cin, width * block.expansion, 1, stride,
                                           bias=False), _bn(width * block.expansion))
        layers = [block(self.cin, width, stride, prev, down)]
        self.cin = width * block.expansion
        layers += [block(self.cin, width, 1, self.dilation) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


def load_torchvision(backbone: ResNet, path: str) -> None:
    """Load a torchvision-format ResNet state dict (optionally under ``state_dict``; ``fc.*``
    and a ``module.``/``backbone.`` prefix are dropped). Missing or extra keys are errors."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    out = {}
    for k, v in sd.items():
        for p in ("module.", "backbone."):
            k = k[len(p):] if k.startswith(p) else k
        if not k.startswith("fc."):
            out[k] = v
    res = backbone.load_state_dict(out, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ValueError(f"{path} does not match the backbone: missing {res.missing_keys[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")


def _cbr(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation,
                                   bias=False), _bn(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, image pooling, projection."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int]):
        super().__init__()
        self.branches = nn.ModuleList([_cbr(cin, cout)] + [_cbr(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _cbr(cin, cout))
        self.project = _cbr(cout * 5, cout)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    """DeepLab-v3+ (Chen et al., 2018): ResNet, ASPP (rates 6/12/18 at output stride 16,
    doubled at 8) and a decoder fusing the stride-4 features. Output ``(B, channels, H/4,
    W/4)``."""

    def __init__(self, arch: str = "resnet50", output_stride: int = 16, width: int = 64,
                 channels: int = 256):
        super().__init__()
        self.backbone = ResNet(arch, output_stride, width)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(self.backbone.out_channels, channels, rates)
        low = max(8, channels * 48 // 256)
        self.reduce = _cbr(self.backbone.low_channels, low)
        self.fuse = nn.Sequential(_cbr(channels + low, channels, 3), _cbr(channels, channels, 3))
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        low, high = self.backbone(x)
        y = F.interpolate(self.aspp(high), low.shape[2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([y, self.reduce(low)], 1))


def projection_head(cin: int, hidden: int, dim: int) -> nn.Sequential:
    """3-layer 1x1 projection head (conv-BN-ReLU, conv-BN-ReLU, conv)."""
    return nn.Sequential(_cbr(cin, hidden), _cbr(hidden, hidden), nn.Conv2d(hidden, dim, 1))


class MDPNet(nn.Module):
    """DeepLab-v3+ with the heads one pretraining loss needs.

    ``heads``: ``"proj"`` (contrastive embedding), ``"con"`` (consistency embedding), both
    ``dim``-d and L2-normalised per pixel, and/or ``"cls"`` (a linear classifier over
    ``num_classes`` concatenated classes, for the cross-entropy baseline). ``forward``
    returns a dict of ``(B, *, H/4, W/4)`` maps.
    """

    def __init__(self, arch: str = "resnet50", output_stride: int = 16, width: int = 64,
                 channels: int = 256, dim: int = 256, heads: tuple[str, ...] = ("proj", "con"),
                 num_classes: int | None = None):
        super().__init__()
        self.net = DeepLabV3Plus(arch, output_stride, width, channels)
        self.heads = nn.ModuleDict()
        for h in heads:
            if h in ("proj", "con"):
                self.heads[h] = projection_head(channels, channels, dim)
            elif h == "cls":
                if not num_classes:
                    raise ValueError("the cls head needs num_classes")
                self.heads[h] = nn.Conv2d(channels, num_classes, 1)
            else:
                raise ValueError(f"unknown head {h!r}")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.net(x)
        out = {}
        for name, head in self.heads.items():
            z = head(y)
            out[name] = z if name == "cls" else F.normalize(z, dim=1)
        return out


class MomentumEncoder(nn.Module):
    """EMA copy of a model (the key encoder): ``p_k <- m p_k + (1 - m) p_q`` for parameters.
    Buffers (BN running statistics) are the key's own, as in MoCo: its forward passes in
    train mode update them, and the query's statistics would not match the EMA weights (in
    eval mode such a key encoder is at chance). No gradients."""

    def __init__(self, model: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.model = copy.deepcopy(model)
        self.momentum = momentum
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for pk, pq in zip(self.model.parameters(), model.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.model(x)
