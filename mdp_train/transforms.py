"""MoCo-v2 style views and cross-dataset mixing, in torch (no torchvision).

All randomness comes from an explicit ``torch.Generator``, so a sample's views depend only on
its seed (reproducible across data-loader workers and on resume).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def crop_params(h: int, w: int, g: torch.Generator, scale=(0.2, 1.0),
                ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Random resized crop box ``(top, left, height, width)``: area fraction in ``scale``,
    log-uniform aspect ratio in ``ratio``; falls back to the largest centred crop of
    allowed ratio after 10 tries."""
    area = h * w
    for _ in range(10):
        a = area * _u(g, *scale)
        r = math.exp(_u(g, math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(a * r)), round(math.sqrt(a / r))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(h - ch + 1, (), generator=g))
            left = int(torch.randint(w - cw + 1, (), generator=g))
            return top, left, ch, cw
    r = w / h
    if r < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif r > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def geometric(img: Tensor, label: Tensor, size: int, g: torch.Generator,
              scale=(0.2, 1.0)) -> tuple[Tensor, Tensor]:
    """Random resized crop to ``size x size`` and horizontal flip (p = 0.5), applied jointly:
    ``img`` ``(3, H, W)`` float (bilinear) and ``label`` ``(H, W)`` int64 (nearest)."""
    top, left, ch, cw = crop_params(img.shape[1], img.shape[2], g, scale)
    im = img[:, top:top + ch, left:left + cw].unsqueeze(0)
    lb = label[top:top + ch, left:left + cw][None, None].to(torch.float64)
    im = F.interpolate(im, (size, size), mode="bilinear", align_corners=False,
                       antialias=True)[0]
    lb = F.interpolate(lb, (size, size), mode="nearest-exact")[0, 0].to(torch.int64)
    if _u(g) < 0.5:
        im, lb = im.flip(-1), lb.flip(-1)
    return im, lb


def rgb_to_hsv(x: Tensor) -> Tensor:
    """``(3, H, W)`` RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, gr, b = x
    mx, _ = x.max(0)
    mn, _ = x.min(0)
    d = mx - mn
    safe = torch.where(d > 0, d, torch.ones_like(d))
    h = torch.where(mx == r, (gr - b) / safe % 6,
                    torch.where(mx == gr, (b - r) / safe + 2, (r - gr) / safe + 4))
    h = torch.where(d > 0, h / 6, torch.zeros_like(h)) % 1.0
    s = torch.where(mx > 0, d / torch.where(mx > 0, mx, torch.ones_like(mx)),
                    torch.zeros_like(mx))
    return torch.stack([h, s, mx])


def hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6])
    return v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(3, H, W)``, radius ``3 sigma``, reflect padding."""
    r = max(1, min(math.ceil(3 * sigma), min(x.shape[1:]) - 1))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x.unsqueeze(0), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return y[0]


def photometric(x: Tensor, g: torch.Generator) -> Tensor:
    """MoCo-v2 colour part on ``(3, H, W)`` in [0, 1]: colour jitter (0.4, 0.4, 0.4, 0.1,
    random order) with p = 0.8, grayscale p = 0.2, Gaussian blur sigma in [0.1, 2] p = 0.5."""
    if _u(g) < 0.8:
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0:
                x = (x * _u(g, 0.6, 1.4)).clamp(0, 1)
            elif op == 1:
                m = _gray(x).mean()
                x = ((x - m) * _u(g, 0.6, 1.4) + m).clamp(0, 1)
            elif op == 2:
                gy = _gray(x)
                x = ((x - gy) * _u(g, 0.6, 1.4) + gy).clamp(0, 1)
            else:
                hsv = rgb_to_hsv(x)
                hsv[0] = (hsv[0] + _u(g, -0.1, 0.1)) % 1.0
                x = hsv_to_rgb(hsv).clamp(0, 1)
    if _u(g) < 0.2:
        x = _gray(x).expand(3, -1, -1).contiguous()
    if _u(g) < 0.5:
        x = gaussian_blur(x, _u(g, 0.1, 2.0))
    return x


def normalize(x: Tensor) -> Tensor:
    return (x - MEAN) / STD


def make_views(img: Tensor, label: Tensor, size: int, g: torch.Generator,
               scale=(0.2, 1.0)) -> dict[str, Tensor]:
    """Two augmented views of one image plus the teacher view.

    Args:
        img: ``(3, H, W)`` uint8; label: ``(H, W)`` int64 (any ids, kept by nearest
            resampling).

    Returns:
        ``view1``, ``view2``, ``teacher`` ``(3, size, size)`` float32 (ImageNet-normalised)
        and ``label1``, ``label2`` ``(size, size)``. ``teacher`` is the second view's crop
        and flip with independent colour transforms, so its pixels match ``view2``'s 1:1.
    """
    x = img.to(torch.float32) / 255
    g1, y1 = geometric(x, label, size, g, scale)
    g2, y2 = geometric(x, label, size, g, scale)
    return {"view1": normalize(photometric(g1, g)), "label1": y1,
            "view2": normalize(photometric(g2, g)), "label2": y2,
            "teacher": normalize(photometric(g2, g))}


def cutmix_box(lam: float, h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """CutMix box ``(y0, y1, x0, x1)`` (rebuttal): start ``r_x ~ U(0, W)``, ``r_y ~ U(0, H)``,
    size ``r_w = W sqrt(1 - lam)``, ``r_h = H sqrt(1 - lam)``, clipped to the image; the
    unclipped area is ``(1 - lam) H W``, but after clipping the mean pasted area over
    ``lam ~ U(0, 1)`` is 11/60 = 0.183 of the image (:func:`mean_box_area`)."""
    rw, rh = w * math.sqrt(1 - lam), h * math.sqrt(1 - lam)
    x0, y0 = int(_u(g) * w), int(_u(g) * h)
    return y0, min(h, y0 + round(rh)), x0, min(w, x0 + round(rw))


def partners(groups: Tensor, g: torch.Generator) -> Tensor:
    """For each sample a random partner from another dataset (``groups`` ``(B,)`` dataset
    ids), falling back to another sample, or itself when ``B = 1``."""
    b = groups.numel()
    out = torch.empty(b, dtype=torch.int64)
    idx = torch.arange(b)
    for i in range(b):
        cand = idx[groups != groups[i]]
        if cand.numel() == 0:
            cand = idx[idx != i] if b > 1 else idx
        out[i] = cand[int(torch.randint(cand.numel(), (), generator=g))]
    return out


def mix_batch(imgs: Tensor, labels: Tensor, groups: Tensor, g: torch.Generator, *,
              prob: float = 1.0, cutmix: float = 0.5, mixup: float = 0.5
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cross-dataset CutMix (Eq. 4) or Mixup (Eq. 5) per sample with a partner from another
    dataset. Each sample is mixed with probability ``prob``; a mixed sample gets CutMix
    (a box of the partner pasted, hard labels) or Mixup (images blended with
    ``lam ~ U(0, 1)``, label pair + lam) in the ratio ``cutmix : mixup`` (both 0: no
    mixing). Unmixed samples keep ``lam = 1``.

    Args:
        imgs: ``(B, 3, H, W)``; labels: ``(B, H, W)``; groups: ``(B,)`` dataset ids.

    Returns:
        ``(mixed (B, 3, H, W), labels_a, labels_b, lam (B,), was_mixed (B,) bool,
        partner (B,) int64)`` for ``lam * L(labels_a) + (1 - lam) * L(labels_b)``; a mixed
        sample holds content of its partner's image.
    """
    if not 0 <= prob <= 1 or cutmix < 0 or mixup < 0:
        raise ValueError(f"mix.prob must be in [0, 1] and the cutmix/mixup weights >= 0, got "
                         f"{prob}, {cutmix}, {mixup}")
    b, _, h, w = imgs.shape
    part = partners(groups, g)
    out, la, lb = imgs.clone(), labels.clone(), labels.clone()
    lam = torch.ones(b)
    mixed = torch.zeros(b, dtype=torch.bool)
    share = cutmix / (cutmix + mixup) if cutmix + mixup > 0 else 0.0
    for i in range(b):
        j, u, v = int(part[i]), _u(g), _u(g)
        if u >= prob or cutmix + mixup == 0:
            continue
        mixed[i] = True
        if v < share:
            y0, y1, x0, x1 = cutmix_box(_u(g), h, w, g)
            out[i, :, y0:y1, x0:x1] = imgs[j, :, y0:y1, x0:x1]
            la[i, y0:y1, x0:x1] = labels[j, y0:y1, x0:x1]
            lb[i] = la[i]
        else:
            lam[i] = _u(g)
            out[i] = lam[i] * imgs[i] + (1 - lam[i]) * imgs[j]
            lb[i] = labels[j]
    return out, la, lb, lam, mixed, part


def mean_box_area(h: int, w: int) -> float:
    """Exact mean pasted area fraction of :func:`cutmix_box` on an ``h x w`` image with
    ``lam ~ U(0, 1)``.

    The start is uniform over the whole image, so the box is clipped at the border. With
    ``s = sqrt(1 - lam)`` and no pixel rounding, a side covers ``E[min(s, 1 - r)] = s - s^2/2``
    of the image (``r ~ U(0, 1)``), so the mean area is ``E[(s - s^2/2)^2] = 1/2 - 2/5 + 1/12
    = 11/60 = 0.183``, not ``E[1 - lam] = 0.5``. Pixel rounding adds a little at small sizes
    (0.186 at 96 px, 0.185 at 224 px): here the sides ``round(h s)``, ``round(w s)`` are
    constant between rounding breakpoints of ``s``, and ``1 - lam = s^2`` is uniform."""
    def side(r: int, n: int) -> float:  # E[min(r, n - x0)] / n over x0 uniform in 0..n-1
        return (r * (r + 1) / 2 + r * (n - r)) / n ** 2

    cuts = sorted({0.0, 1.0} | {(r + 0.5) / n for n in (h, w) for r in range(n)})
    return sum((b * b - a * a) * side(round(h * (a + b) / 2), h) * side(round(w * (a + b) / 2), w)
               for a, b in zip(cuts, cuts[1:]))
