"""The MDP pretraining loop (paper sections 3-4): views, cross-dataset mixing, momentum key
encoder, prototype bank, pseudo-labels, SGD + cosine, AMP, checkpoints with exact resume and
``torchrun`` DDP."""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import mdp_kernels as mk

from . import files
from .data import HiddenLabels, PretrainData, StepSampler, held_out
from .datasets import build_dataset
from .labels import LabelSpace
from .model import MDPNet, MomentumEncoder, load_torchvision
from .probe import Probe
from .transforms import mix_batch

LOSSES = ("mdp", "pixel", "ce")
CON_SPACES = ("proj", "bank")
CONFIDENCES = ("cosine", "softmax", "margin")
SUPPORT = 16  # training images per dataset behind the probe's support prototypes


def _down(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resampling of ``(B, H, W)`` labels to the feature size."""
    return F.interpolate(labels[:, None].double(), size, mode="nearest-exact")[:, 0].long()


def confidence(feats: Tensor, protos: Tensor, valid: Tensor, kind: str, tau: float,
               backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Nearest valid prototype of each pixel of ``feats`` ``(B, D, h, w)`` and its score:
    ``cosine`` the raw similarity (the paper's Eq. 10), ``softmax`` the top probability of
    ``softmax(f . P / tau)``, ``margin`` the cosine gap between the two nearest prototypes
    (1 + top cosine when one class is valid). Returns ``(labels, scores)`` ``(B, h, w)``."""
    if kind == "cosine":
        return mk.pseudo_label(feats, protos, threshold=-2.0, class_mask=valid,
                               ignore_index=LabelSpace.ignore_index, backend=backend)
    sims = torch.einsum("bdhw,cd->bchw", feats.float(), protos.float())
    sims = sims.masked_fill(~valid.view(1, -1, 1, 1), float("-inf"))
    if kind == "softmax":
        prob = torch.softmax(sims / tau, dim=1)
        score, lbl = prob.max(1)
        return lbl, score
    top, idx = sims.topk(min(2, sims.shape[1]), dim=1)
    second = top[:, 1] if top.shape[1] > 1 else torch.full_like(top[:, 0], float("-inf"))
    second = torch.where(torch.isinf(second), torch.full_like(second, -1.0), second)
    return idx[:, 0], top[:, 0] - second


def proto_stats(protos: Tensor, valid: Tensor) -> dict:
    """Mean off-diagonal cosine between valid prototypes, raw and centred (``P`` minus the
    mean of the valid prototypes: a shared offset makes raw cosines look collapsed)."""
    p = protos[valid].float()
    if p.shape[0] < 2:
        return {}
    off = ~torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
    c = F.normalize(p - p.mean(0), dim=1)
    return {"proto_cos": float((p @ p.t())[off].mean()),
            "proto_cos_centred": float((c @ c.t())[off].mean())}


def sync_batchnorm(model: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """``model.sync_bn``: the model with its BatchNorm layers as SyncBatchNorm when ``world``
    ranks train it (unchanged for one process). Raises ``ValueError`` off CUDA, where torch's
    SyncBatchNorm does not run."""
    if world == 1:
        return model
    if device.type != "cuda":
        raise ValueError(f"model.sync_bn needs CUDA (torch's SyncBatchNorm does not run on "
                         f"{device.type}); set model.sync_bn=false for {world} CPU ranks")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _flat(rec: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def _mixed_ce(logits: Tensor, la: Tensor, lb: Tensor, lam: Tensor, ignore: int) -> Tensor:
    """``mean_valid_a(lam CE(a)) + mean_valid_b((1 - lam) CE(b))`` (the mixing rule of the
    prototype loss, for the concatenated-label cross-entropy baseline)."""
    logits = logits.float()
    lam = lam.view(-1, 1, 1)
    out = logits.new_zeros(())
    for lbl, w in ((la, lam), (lb, 1 - lam)):
        ce = F.cross_entropy(logits, lbl, ignore_index=ignore, reduction="none")
        out = out + (w * ce).sum() / (lbl != ignore).sum().clamp(min=1)
    return out


class Trainer:
    """Builds everything from a config dict (see :mod:`mdp_train.config`) and trains.

    ``fit(max_steps)`` runs until the configured number of steps (or ``max_steps``, e.g. to
    simulate an interruption); checkpoints go to ``<out>/checkpoint.pt`` every
    ``save_every`` steps and at the end, metrics to ``<out>/metrics.jsonl``.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        d, m, lo, t = cfg["data"], cfg["model"], cfg["loss"], cfg["train"]
        self._check(cfg)
        self.kind = lo["kind"]
        self._init_dist(t["device"])
        self.labelled = [build_dataset(s) for s in d["datasets"]]
        if not self.labelled:
            raise ValueError("data.datasets is empty: MDP needs at least one labelled dataset")
        self.unlabelled = [self._unlabelled(s) for s in d["unlabelled"]]
        if self.unlabelled and self.kind != "mdp":
            raise ValueError("unlabelled data (pseudo-labels) needs loss.kind=mdp")
        self.space = LabelSpace(self.labelled + self.unlabelled,
                                [s.get("remap") for s in d["datasets"]] + [None] * len(self.unlabelled))
        # (datasets, C): each labelled dataset's classes; unlabelled images may be any class
        self.dataset_masks = self.space.class_masks()
        self.dataset_masks[len(self.labelled):] = True
        held = ({i: held_out(len(x), t["probe_fraction"]) for i, x in enumerate(self.labelled)}
                if t["probe_every"] else {})
        self.data = PretrainData(self.labelled + self.unlabelled, self.space, d["crop_size"],
                                 d["crop_scale"], exclude=held)
        self.probe_set = None
        if held:
            support = {}
            for i, x in enumerate(self.labelled):
                rest = [j for j in range(len(x)) if j not in set(held[i])]
                support[i] = rest[::max(1, len(rest) // SUPPORT)][:SUPPORT]
            self.probe_set = Probe(self.labelled, self.space, held, support, d["crop_size"])
        self.batch = t["batch_size"]
        if self.batch % self.world:
            raise ValueError(f"train.batch_size {self.batch} is not divisible by {self.world} ranks")
        probe = StepSampler(len(self.data), self.batch, world=self.world)
        self.total = t["steps"] or t["epochs"] * probe.steps_per_epoch

        torch.manual_seed(t["seed"])
        # Consistency (alpha > 0) compares the query's view-2 features with the key's
        # teacher view: in the proj space against the bank's prototypes, or on the con head
        # against a second bank of key con features (con_space=bank).
        self.con = self.kind == "mdp" and lo["alpha"] > 0
        heads = {"mdp": ("proj", "con") if self.con and lo["con_space"] == "bank" else ("proj",),
                 "pixel": ("proj",), "ce": ("cls",)}[self.kind]
        self.model = MDPNet(m["arch"], m["output_stride"], m["width"], m["channels"], m["dim"],
                            heads, self.space.num_classes).to(self.device)
        if m["pretrained"]:
            load_torchvision(self.model.net.backbone, m["pretrained"])
        if m["sync_bn"]:  # before the key encoder is copied from it, so the key gets it too
            self.model = sync_batchnorm(self.model, self.world, self.device)
        self.key = (MomentumEncoder(self.model, m["momentum"]).to(self.device)
                    if self.kind != "ce" else None)
        n_lab = len(self.data.index) - sum(len(x) for x in self.unlabelled)
        bank_images = max(self.batch, n_lab // 2) if lo["bank_images"] == "auto" else lo["bank_images"]
        # alpha = 0: the consistency term is computed in train_step, in con_space.
        self.criterion = mk.PrototypeContrastLoss(
            self.space.num_classes, m["dim"], tau=lo["tau"], bank_images=bank_images,
            batch_size=self.batch, alpha=0.0, ignore_index=LabelSpace.ignore_index,
            backend=lo["backend"]).to(self.device)
        slots = self.criterion.bank.num_slots
        self.con_bank = (mk.PrototypeBank(self.space.num_classes, m["dim"], slots,
                                          ignore_index=LabelSpace.ignore_index,
                                          backend=lo["backend"], device=self.device)
                         if "con" in heads else None)
        w = cfg["semi"]["warmup_steps"]
        self.warmup = slots if w == "auto" else w
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
                    if self.world > 1 else self.model)
        o = cfg["optim"]
        self.lr = o["lr"] * self.batch / o["ref_batch"]
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=o["momentum"],
                                   weight_decay=o["weight_decay"])
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, self.total, 0.0)
        self.amp = bool(t["amp"]) and self.device.type == "cuda"
        self.step = 0
        self.tb = None
        self.out = Path(t["out"])
        self.history: list[dict] = []
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self._maybe_resume(t["resume"])

    # ----------------------------------------------------------------- setup
    @staticmethod
    def _check(cfg: dict) -> None:
        lo, s, mx, t = cfg["loss"], cfg["semi"], cfg["mix"], cfg["train"]
        for key, value, allowed in (("loss.kind", lo["kind"], LOSSES),
                                    ("loss.con_space", lo["con_space"], CON_SPACES),
                                    ("semi.confidence", s["confidence"], CONFIDENCES)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        w = s["warmup_steps"]
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"semi.warmup_steps must be auto or an int >= 0, got {w!r}")
        if not 0 <= mx["prob"] <= 1 or mx["cutmix"] < 0 or mx["mixup"] < 0:
            raise ValueError(f"mix.prob must be in [0, 1] and mix.cutmix/mixup >= 0, got "
                             f"{mx['prob']}, {mx['cutmix']}, {mx['mixup']}")
        if lo["kind"] == "pixel" and mx["prob"] > 0 and mx["mixup"] > 0:
            raise ValueError("the pixel-to-pixel baseline takes hard labels: set mix.mixup=0")
        if not isinstance(t["probe_every"], int) or t["probe_every"] < 0:
            raise ValueError(f"train.probe_every must be an int >= 0, got {t['probe_every']!r}")
        if t["probe_every"] and lo["kind"] == "ce":
            raise ValueError("train.probe_every: the ce baseline has no embedding to probe")

    def _unlabelled(self, spec: dict):
        """An unlabelled reader; ``hidden: <labelled dataset name>`` reads a labelled set
        (same classes as that dataset) whose labels only score the pseudo-labels."""
        spec = dict(spec)
        hidden = spec.pop("hidden", None)
        ds = build_dataset(spec)
        if hidden is None:
            if ds.labelled:
                raise ValueError(f"data.unlabelled holds the labelled dataset {ds.name!r}: add "
                                 f"hidden: <labelled dataset name> to score pseudo-labels "
                                 f"with its labels, or use type: images")
            return ds
        names = [x.name for x in self.labelled]
        if hidden not in names:
            raise ValueError(f"hidden: {hidden!r} is not a labelled dataset ({names})")
        t = names.index(hidden)
        if not ds.labelled or list(ds.classes) != list(self.labelled[t].classes):
            raise ValueError(f"hidden labels of {ds.name!r} must have the classes of {hidden!r}")
        return HiddenLabels(ds, t)

    def _init_dist(self, device: str) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        self._owns_group = world > 1 and not dist.is_initialized()
        if self._owns_group:
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if cuda:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu" if device == "auto" else device)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        spe = len(self.data) // self.batch
        return {"step": self.step, "data": {"epoch": self.step // spe, "batch": self.step % spe},
                "model": self.model.state_dict(),
                "key": None if self.key is None else self.key.state_dict(),
                "criterion": self.criterion.state_dict(),
                "con_bank": None if self.con_bank is None else self.con_bank.state_dict(),
                "optim": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "config": self.cfg,
                "classes": self.space.names,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def load_state_dict(self, sd: dict) -> None:
        if sd["classes"] != self.space.names:
            raise ValueError("the checkpoint was trained on another label space")
        self.model.load_state_dict(sd["model"])
        if self.key is not None:
            self.key.load_state_dict(sd["key"])
        self.criterion.load_state_dict(sd["criterion"])
        if self.con_bank is not None:
            self.con_bank.load_state_dict(sd["con_bank"])
        self.opt.load_state_dict(sd["optim"])
        self.sched.load_state_dict(sd["sched"])
        self.step = sd["step"]
        rng = sd["rng"]
        # set_rng_state takes CPU ByteTensors whatever device the checkpoint was loaded to
        torch.set_rng_state(rng["torch"].to("cpu", torch.uint8))
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([r.to("cpu", torch.uint8) for r in rng["cuda"]])

    def save(self) -> Path:
        """Atomic checkpoint (``files.save``) by rank 0."""
        path = self.out / "checkpoint.pt"
        if self.rank == 0:
            files.save(self.state_dict(), path)
        return path

    def _maybe_resume(self, resume) -> None:
        if not resume:
            return
        path = self.out / "checkpoint.pt" if resume == "auto" else Path(resume)
        if not path.is_file():
            if resume != "auto":
                raise FileNotFoundError(f"no checkpoint at {path}")
            return
        # CPU first: the RNG states must stay CPU tensors; load_state_dict copies the rest
        # to the model's device.
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    # ------------------------------------------------------------------ step
    def _autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp)

    def _amp(self, feats: Tensor) -> Tensor:
        """Loss features in bf16 under amp: the losses run outside autocast, and
        ``F.normalize`` returns fp32 even inside it (fp32 would take the slower tf32x3 path)."""
        return feats.to(torch.bfloat16) if self.amp else feats

    def train_step(self, batch: dict) -> dict:
        """One optimisation step on a collated batch; returns its metrics."""
        dev, ign = self.device, LabelSpace.ignore_index
        lo = self.cfg["loss"]
        v1, v2, tv = (batch[k].to(dev, non_blocking=True) for k in ("view1", "view2", "teacher"))
        y1, y2 = batch["label1"].to(dev), batch["label2"].to(dev)
        groups, unl = batch["dataset"], ~batch["labelled"].to(dev)
        b = v1.shape[0]
        g = torch.Generator().manual_seed(
            (self.cfg["train"]["seed"] * 1_000_003 + self.step) * 4096 + self.rank)
        metrics: dict = {}
        if self.key is not None:
            with self._autocast():
                kout = self.key(torch.cat([v1, v2] + ([tv] if self.con else [])))
            k1, k2 = kout["proj"][:b], kout["proj"][b:2 * b]
            if bool(unl.any()):
                y1, y2, metrics["pseudo"] = self._pseudo(k1, k2, y1, y2, unl, batch)
        mx = self.cfg["mix"]
        x1, ya, yb, lam, mixed, partner = mix_batch(v1, y1, groups, g, prob=mx["prob"],
                                                    cutmix=mx["cutmix"], mixup=mx["mixup"])
        lam, mixed = lam.to(dev), mixed.to(dev)
        metrics["mixed"] = float(mixed.float().mean())
        # Query views: [view 1 (or its mixed version), view 2, extra mixed view-1 samples]
        # loss.dataset_aware: each query image's classes (its dataset's, or the union of both
        # datasets' for a mixed image; every class for an unlabelled one)
        own = self.dataset_masks[groups].to(dev)
        both = torch.where(mixed[:, None], own | own[partner.to(dev)], own)
        if mx["replace_view"]:
            views, la, lb, lams = [x1, v2], [ya, y2], [yb, y2], [lam, torch.ones_like(lam)]
            masks = [both, own]
        else:
            views, la, lb = [v1, v2, x1[mixed]], [y1, y2, ya[mixed]], [y1, y2, yb[mixed]]
            lams = [torch.ones_like(lam), torch.ones_like(lam), lam[mixed]]
            masks = [own, own, both[mixed]]
        with self._autocast():
            out = self.ddp(torch.cat(views))
        head = out["cls"] if self.kind == "ce" else self._amp(out["proj"])
        size = tuple(head.shape[2:])
        la, lb = (_down(torch.cat(x), size) for x in (la, lb))
        lams = torch.cat(lams)
        s1, s2 = _down(y1, size), _down(y2, size)
        if self.kind == "mdp":
            soft = bool((lams < 1).any())
            aware = lo["dataset_aware"]
            loss = self.criterion(head, la, torch.cat([k1, k2]), key_labels=torch.cat([s1, s2]),
                                  labels_b=lb if soft else None, lam=lams if soft else None,
                                  class_mask=torch.cat(masks) if aware else None)
            metrics.update({k: float(v) for k, v in self.criterion.last_terms.items()})
            if self.con:
                l_con = self._consistency(out, kout, b, torch.cat([s1, s2]),
                                          own if aware else None)
                metrics["con"] = float(l_con.detach())
                loss = loss + lo["alpha"] * l_con
            bank = self.criterion.bank
            metrics["filled_slots"] = min(int(bank.num_updates), bank.num_slots)
            metrics.update(proto_stats(*bank.prototypes()))
            metrics["mean_f"] = float(head.detach().float().mean((0, 2, 3)).norm())
        elif self.kind == "pixel":
            c = self.space.num_classes
            # each query view against the other view's key (the mixed view: view 2's)
            extra = len(views) == 3
            k = torch.cat([k2, k1] + ([k2[mixed]] if extra else []))
            sk = torch.cat([s2, s1] + ([s2[mixed]] if extra else []))
            loss = mk.pixel_contrast_loss(head, la, k.to(head.dtype), sk, ignore_index=ign,
                                          num_classes=c)
        else:
            loss = _mixed_ce(head, la, lb, lams, ign)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.key is not None:
            self.key.update(self.model)
        self.step += 1
        metrics.update(step=self.step, loss=float(loss.detach()), lr=self.opt.param_groups[0]["lr"])
        return metrics

    def _consistency(self, out: dict, kout: dict, b: int, key_labels: Tensor,
                     class_mask: Tensor | None) -> Tensor:
        """Eqs. 7-8 between the query's view 2 (student) and the key's colour-only copy of
        it (teacher), in ``loss.con_space``: ``proj`` features against the class bank's
        prototypes, or ``bank``: con-head features against a bank of the key's con features
        of views 1 and 2 with the same labels as the class bank. ``class_mask``: the view-2
        images' classes (``loss.dataset_aware``), combined with the bank's."""
        lo = self.cfg["loss"]
        if lo["con_space"] == "proj":
            student, teacher = out["proj"][b:2 * b], kout["proj"][2 * b:]
            protos, valid = self.criterion.bank.prototypes()
        else:
            student, teacher = out["con"][b:2 * b], kout["con"][2 * b:]
            self.con_bank.update(kout["con"][:2 * b], key_labels)
            protos, valid = self.con_bank.prototypes()
        student = self._amp(student)
        return mk.prototype_consistency_loss(
            student, teacher.to(student.dtype), protos.to(student.dtype),
            tau_student=lo["tau_student"], tau_teacher=lo["tau_teacher"],
            class_mask=valid if class_mask is None else class_mask & valid,
            backend=lo["backend"])

    @torch.no_grad()
    def _pseudo(self, k1: Tensor, k2: Tensor, y1: Tensor, y2: Tensor, unl: Tensor,
                batch: dict):
        """Eq. 10: pseudo-labels of the unlabelled images from the key features and the bank
        prototypes (none before ``semi.warmup_steps``), upsampled to the view size. Returns
        the labels and their statistics: coverage (kept share of unlabelled pixels), score
        quantiles and, with hidden labels, the accuracy of the kept (``acc``) and of all
        (``acc_all``) pseudo-labels."""
        protos, valid = self.criterion.bank.prototypes()
        if self.step < self.warmup or not bool(valid.any()):
            return y1, y2, {"coverage": 0.0}
        s, ign = self.cfg["semi"], LabelSpace.ignore_index
        out, scores = [], []
        kept = total = right = right_all = n_hid = n_all = 0
        for v, (k, y) in enumerate(((k1, y1), (k2, y2)), 1):
            pl, score = confidence(k[unl].float(), protos, valid, s["confidence"], s["tau"],
                                   self.cfg["loss"]["backend"])
            keep = score >= s["threshold"]
            scores.append(score.flatten())
            kept += int(keep.sum())
            total += keep.numel()
            if f"hidden{v}" in batch:
                h = _down(batch[f"hidden{v}"].to(k.device)[unl], tuple(pl.shape[1:]))
                has = h != ign
                n_hid += int((has & keep).sum())
                right += int(((pl == h) & has & keep).sum())
                right_all += int(((pl == h) & has).sum())
                n_all += int(has.sum())
            pl = torch.where(keep, pl, torch.full_like(pl, ign))
            full = torch.full((k.shape[0],) + tuple(pl.shape[1:]), ign, dtype=torch.int64,
                              device=k.device)
            full[unl] = pl
            up = F.interpolate(full[:, None].double(), y.shape[1:], mode="nearest-exact")[:, 0]
            out.append(torch.where(unl.view(-1, 1, 1), up.long(), y))
        q = torch.quantile(torch.cat(scores).float(), torch.tensor([0.1, 0.5, 0.9],
                                                                    device=k1.device))
        st = {"coverage": kept / max(1, total), "score_q10": float(q[0]),
              "score_q50": float(q[1]), "score_q90": float(q[2])}
        if "hidden1" in batch:
            st["acc"] = right / n_hid if n_hid else None
            st["acc_all"] = right_all / n_all if n_all else None
        return out[0], out[1], st

    # ------------------------------------------------------------------ loop
    def loader(self) -> DataLoader:
        t = self.cfg["train"]
        sampler = StepSampler(len(self.data), self.batch, seed=t["seed"], rank=self.rank,
                              world=self.world, start=self.step, total=self.total)
        w = self.cfg["data"]["workers"]
        return DataLoader(self.data, batch_sampler=sampler, num_workers=w,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if w else None)

    def log(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                for k, v in _flat(rec).items():
                    if k != "step":
                        self.tb.add_scalar(k, v, rec["step"])

    def _open_tb(self) -> None:
        if self.tb is not None or not self.cfg["train"]["tensorboard"] or self.rank:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("train.tensorboard=true needs the tensorboard package "
                              "(pip install tensorboard)") from e
        self.tb = SummaryWriter(str(self.out / "tb"))

    @torch.no_grad()
    def probe(self) -> dict:
        """Held-out nearest-prototype balanced accuracy per labelled dataset (see
        :mod:`mdp_train.probe`), all in eval mode: ``support`` the query's proj features
        against class means of its own features on training images (defined at any step,
        so also at initialisation), ``bank`` the query and ``key`` the key encoder against
        the bank's prototypes, ``con`` the query's con head against the con bank."""
        ps = self.probe_set
        feats = ps.features(self.model, "proj")
        res = {"support": ps.score(feats, *ps.class_means(self.model, "proj"))}
        protos, valid = self.criterion.bank.prototypes()
        if bool(valid.any()):
            res["bank"] = ps.score(feats, protos, valid)
            if self.key is not None:
                res["key"] = ps.score(ps.features(self.key.model, "proj"), protos, valid)
        if self.con_bank is not None and int(self.con_bank.num_updates):
            res["con"] = ps.score(ps.features(self.model, "con"), *self.con_bank.prototypes())
        out = {}
        for d, name in enumerate(self.space.dataset_names):
            row = {k: v[d]["acc"] for k, v in res.items() if d in v}
            if row:
                out[name] = dict(row, chance=res["support"][d]["chance"])
        return out

    def fit(self, max_steps: int | None = None, max_seconds: float | None = None,
            on_step=None) -> list[dict]:
        """Train until step ``max_steps`` (default: the configured total) or for at most
        ``max_seconds`` (then a checkpoint is saved); ``on_step(metrics)`` is called after
        each step. Returns the per-step metrics of all calls."""
        t = self.cfg["train"]
        stop = self.total if max_steps is None else min(max_steps, self.total)
        bar = tqdm(total=self.total, initial=self.step, disable=not t["progress"] or self.rank,
                   desc="mdp-pretrain", dynamic_ncols=True)
        self.model.train()
        if self.key is not None:
            self.key.train()
        self._open_tb()
        every = t["probe_every"] if self.probe_set is not None else 0
        if every and self.step == 0:
            m = {"step": 0, "probe": self.probe()}
            self.history.append(m)
            self.log(m)
        start = time.time()
        for batch in self.loader():
            if self.step >= stop:
                break
            m = self.train_step(batch)
            if every and (self.step % every == 0 or self.step == self.total):
                m["probe"] = self.probe()
            m["time"] = round(time.time() - start, 3)
            self.history.append(m)
            if on_step is not None:
                on_step(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.3g}")
            if self.step % t["log_every"] == 0 or self.step == self.total or "probe" in m:
                self.log(m)
            if self.step % t["save_every"] == 0 and self.step < self.total:
                self.save()
            if max_seconds is not None and time.time() - start > max_seconds:
                self.save()
                break
        bar.close()
        if self.tb is not None:
            self.tb.flush()
        if self.step == self.total:
            self.save()
            self.log({"event": "end", "step": self.step, "digests": self.rank_digests()})
        return self.history

    def digest(self) -> str:
        """SHA-256 of the parameters and the prototype bank (ranks must agree)."""
        h = hashlib.sha256()
        banks = [self.criterion] + ([self.con_bank] if self.con_bank is not None else [])
        for p in list(self.model.parameters()) + [x for m in banks for x in m.buffers()]:
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def close(self, wait: bool = True) -> None:
        """Tear down the process group this trainer created. With ``wait`` every rank first
        waits for the others (a rank that exits while a peer still talks to it aborts that
        peer); after a failure pass ``wait=False``, since the peers may never arrive."""
        if self._owns_group and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
            self._owns_group = False

    def rank_digests(self) -> list[str]:
        d = self.digest()
        if self.world == 1:
            return [d]
        out: list = [None] * self.world
        dist.all_gather_object(out, d)
        return out

    def summary(self, top: int = 3) -> str:
        """What the bank holds: valid classes per dataset and each one's nearest other
        prototypes (cosine similarity)."""
        bank = self.criterion.bank
        protos, valid = bank.prototypes()
        names = self.space.names
        lines = [f"bank: {bank.num_slots} slots x {self.batch} images, "
                 f"{int(bank.num_updates)} updates, {int(valid.sum())}/{len(names)} classes seen"]
        idx = valid.nonzero().flatten().tolist()
        sim = (protos @ protos.t()).cpu()
        for i in idx:
            others = sorted((j for j in idx if j != i), key=lambda j: -float(sim[i, j]))[:top]
            near = ", ".join(f"{names[j]} {float(sim[i, j]):+.2f}" for j in others)
            lines.append(f"  {names[i]:<28} nearest: {near}")
        return "\n".join(lines)
