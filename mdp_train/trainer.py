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

from .data import PretrainData, StepSampler
from .datasets import build_dataset
from .labels import LabelSpace
from .model import MDPNet, MomentumEncoder, load_torchvision
from .transforms import mix_batch

LOSSES = ("mdp", "pixel", "ce")


def _down(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resampling of ``(B, H, W)`` labels to the feature size."""
    return F.interpolate(labels[:, None].double(), size, mode="nearest-exact")[:, 0].long()


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
        if lo["kind"] not in LOSSES:
            raise ValueError(f"loss.kind must be one of {LOSSES}, got {lo['kind']!r}")
        self.kind = lo["kind"]
        self._init_dist(t["device"])
        self.labelled = [build_dataset(s) for s in d["datasets"]]
        self.unlabelled = [build_dataset(s) for s in d["unlabelled"]]
        if not self.labelled:
            raise ValueError("data.datasets is empty: MDP needs at least one labelled dataset")
        if self.unlabelled and self.kind != "mdp":
            raise ValueError("unlabelled data (pseudo-labels) needs loss.kind=mdp")
        if self.kind == "pixel" and cfg["mix"]["mixup"] > 0:
            raise ValueError("the pixel-to-pixel baseline takes hard labels: set mix.mixup=0")
        self.space = LabelSpace(self.labelled + self.unlabelled,
                                [s.get("remap") for s in d["datasets"]] + [None] * len(self.unlabelled))
        self.data = PretrainData(self.labelled + self.unlabelled, self.space, d["crop_size"],
                                 d["crop_scale"])
        self.batch = t["batch_size"]
        if self.batch % self.world:
            raise ValueError(f"train.batch_size {self.batch} is not divisible by {self.world} ranks")
        probe = StepSampler(len(self.data), self.batch, world=self.world)
        self.total = t["steps"] or t["epochs"] * probe.steps_per_epoch

        torch.manual_seed(t["seed"])
        heads = {"mdp": ("proj", "con") if lo["alpha"] > 0 else ("proj",),
                 "pixel": ("proj",), "ce": ("cls",)}[self.kind]
        self.model = MDPNet(m["arch"], m["output_stride"], m["width"], m["channels"], m["dim"],
                            heads, self.space.num_classes).to(self.device)
        if m["pretrained"]:
            load_torchvision(self.model.net.backbone, m["pretrained"])
        self.key = (MomentumEncoder(self.model, m["momentum"]).to(self.device)
                    if self.kind != "ce" else None)
        n_lab = sum(len(x) for x in self.labelled)
        bank_images = max(self.batch, n_lab // 2) if lo["bank_images"] == "auto" else lo["bank_images"]
        self.criterion = mk.PrototypeContrastLoss(
            self.space.num_classes, m["dim"], tau=lo["tau"], bank_images=bank_images,
            batch_size=self.batch, alpha=lo["alpha"], tau_student=lo["tau_student"],
            tau_teacher=lo["tau_teacher"], ignore_index=LabelSpace.ignore_index,
            backend=lo["backend"]).to(self.device)
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
        self.out = Path(t["out"])
        self.history: list[dict] = []
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self._maybe_resume(t["resume"])

    # ----------------------------------------------------------------- setup
    def _init_dist(self, device: str) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if world > 1 and not dist.is_initialized():
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
                "criterion": self.criterion.state_dict(), "optim": self.opt.state_dict(),
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
        self.opt.load_state_dict(sd["optim"])
        self.sched.load_state_dict(sd["sched"])
        self.step = sd["step"]
        rng = sd["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save(self) -> Path:
        """Atomic checkpoint (temp file + ``os.replace``) by rank 0."""
        path = self.out / "checkpoint.pt"
        if self.rank == 0:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        return path

    def _maybe_resume(self, resume) -> None:
        if not resume:
            return
        path = self.out / "checkpoint.pt" if resume == "auto" else Path(resume)
        if not path.is_file():
            if resume != "auto":
                raise FileNotFoundError(f"no checkpoint at {path}")
            return
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))

    # ------------------------------------------------------------------ step
    def _autocast(self):
        return torch.autocast("cuda", torch.bfloat16, enabled=self.amp)

    def train_step(self, batch: dict) -> dict:
        """One optimisation step on a collated batch; returns its metrics."""
        dev, ign = self.device, LabelSpace.ignore_index
        v1, v2, tv = (batch[k].to(dev, non_blocking=True) for k in ("view1", "view2", "teacher"))
        y1, y2 = batch["label1"].to(dev), batch["label2"].to(dev)
        groups, unl = batch["dataset"], ~batch["labelled"].to(dev)
        b = v1.shape[0]
        g = torch.Generator().manual_seed(
            (self.cfg["train"]["seed"] * 1_000_003 + self.step) * 4096 + self.rank)
        metrics: dict = {}
        if self.key is not None:
            with self._autocast():
                kout = self.key(torch.cat([v1, v2] + ([tv] if "con" in self.model.heads else [])))
            k1, k2 = kout["proj"][:b], kout["proj"][b:2 * b]
            if bool(unl.any()):
                y1, y2, metrics["pseudo"] = self._pseudo(k1, k2, y1, y2, unl)
        mx = self.cfg["mix"]
        x1, ya, yb, lam = mix_batch(v1, y1, groups, g, cutmix=mx["cutmix"], mixup=mx["mixup"])
        lam = lam.to(dev)
        with self._autocast():
            out = self.ddp(torch.cat([x1, v2]))
        head = out["cls"] if self.kind == "ce" else out["proj"]
        size = tuple(head.shape[2:])
        s1a, s1b, s1, s2 = (_down(y, size) for y in (ya, yb, y1, y2))
        if self.kind == "mdp":
            mixing = bool((lam < 1).any())
            con = {}
            if "con" in out:
                con = {"con_student": out["con"][b:], "con_teacher": kout["con"][2 * b:]}
            loss = self.criterion(
                head, torch.cat([s1a, s2]), torch.cat([k1, k2]),
                key_labels=torch.cat([s1, s2]),
                labels_b=torch.cat([s1b, s2]) if mixing else None,
                lam=torch.cat([lam, torch.ones_like(lam)]) if mixing else None, **con)
            metrics.update({k: float(v) for k, v in self.criterion.last_terms.items()})
        elif self.kind == "pixel":
            q1, q2 = head[:b], head[b:]
            c = self.space.num_classes
            loss = 0.5 * (mk.pixel_contrast_loss(q1, s1a, k2, s2, ignore_index=ign, num_classes=c)
                          + mk.pixel_contrast_loss(q2, s2, k1, s1, ignore_index=ign,
                                                   num_classes=c))
        else:
            loss = _mixed_ce(head, torch.cat([s1a, s2]), torch.cat([s1b, s2]),
                             torch.cat([lam, torch.ones_like(lam)]), ign)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.key is not None:
            self.key.update(self.model)
        self.step += 1
        metrics.update(step=self.step, loss=float(loss.detach()), lr=self.opt.param_groups[0]["lr"])
        return metrics

    @torch.no_grad()
    def _pseudo(self, k1: Tensor, k2: Tensor, y1: Tensor, y2: Tensor, unl: Tensor):
        """Eq. 10: pseudo-labels of the unlabelled images from the key features and the bank
        prototypes (threshold on the raw similarity), upsampled to the view size."""
        protos, valid = self.criterion.bank.prototypes()
        if not bool(valid.any()):
            return y1, y2, 0.0
        ign, thr = LabelSpace.ignore_index, self.cfg["loss"]["threshold"]
        out, hits = [], []
        for k, y in ((k1, y1), (k2, y2)):
            pl, _ = mk.pseudo_label(k.float(), protos, threshold=thr, class_mask=valid,
                                    ignore_index=ign, backend=self.cfg["loss"]["backend"])
            up = F.interpolate(pl[:, None].double(), y.shape[1:], mode="nearest-exact")[:, 0]
            out.append(torch.where(unl.view(-1, 1, 1), up.long(), y))
            hits.append((pl[unl] != ign).float().mean())
        return out[0], out[1], float(sum(hits) / 2)

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
        start = time.time()
        for batch in self.loader():
            if self.step >= stop:
                break
            m = self.train_step(batch)
            m["time"] = round(time.time() - start, 3)
            self.history.append(m)
            if on_step is not None:
                on_step(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.3g}")
            if self.step % t["log_every"] == 0 or self.step == self.total:
                self.log(m)
            if self.step % t["save_every"] == 0 and self.step < self.total:
                self.save()
            if max_seconds is not None and time.time() - start > max_seconds:
                self.save()
                break
        bar.close()
        if self.step == self.total:
            self.save()
            self.log({"event": "end", "step": self.step, "digests": self.rank_digests()})
        return self.history

    def digest(self) -> str:
        """SHA-256 of the parameters and the prototype bank (ranks must agree)."""
        h = hashlib.sha256()
        for p in list(self.model.parameters()) + list(self.criterion.buffers()):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

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
