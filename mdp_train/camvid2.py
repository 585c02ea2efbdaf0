"""CamVid reproduction, second round (issue 17, ``make experiment2``): with the method wired
as the paper means it, does MDP beat its baselines?

Pretraining sets (``experiment.DATA``): A = drive 0016E5 (11 classes), B = drive 0006R0
relabelled to 7 coarse classes; for the semi-supervised pair A is split by frame (time
order) into A1 (first half, labelled) and A2 (second half, read as plain images: its labels
are never opened), so the unlabelled images are not in any labelled set. Downstream: as in
round 1 (``experiment.finetune_opts``): DeepLab-v3+ fine-tuned on 0001TP ``train_*``, 11-class
mIoU on its ``test_*`` frames, the same fine-tuning for every arm.

A unit is one (arm, seed k): pretraining seed k (in ``--out``, git-ignored; an interrupted
pretraining resumes from its checkpoint) and every protocol of the arm fine-tuned from it
with fine-tuning seed k. Each finished unit writes ONE JSON,
``<results>/camvid2/<arm>-seed<k>.json`` (committed; ``camvid2-quick/`` for ``--quick``),
and the driver skips units whose JSON exists, so a run can stop and continue in another
session or on another machine from the committed JSONs. Units run seed-major (every arm's
seed 0 first) with the most informative arms first, so a partial run gives the most useful
partial table. After each unit, and with ``--report-only`` without training, the report
(``<results>/camvid2.md`` + ``.png``) is regenerated from whatever JSONs exist; while units
are missing its title says PARTIAL, and it lists them with the command that finishes the run.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from . import config, files
from .experiment import (BUDGETS, DATA, DEFAULT_DATA, FRAMES, REPO, _dotted, extrapolate,
                         finetune_opts, measure, pretrain, run_parser, run_seconds)
from .trainer import CON_SPACES

DEFAULT_CON = config.DEFAULTS["loss"]["con_space"]
OTHER_CON = next(c for c in CON_SPACES if c != DEFAULT_CON)
CON_WHAT = {"proj": "consistency on the proj features against the class prototypes",
            "bank": "consistency on the con head against its own bank of key con features"}
AB = ("A", "B")
OTHER_ARM = f"mdp_con{OTHER_CON}"

# name: (label, pretraining overrides of the defaults or None for scratch, pretraining sets).
# The order is the run order within a seed: the arms the main claims need first.
ARMS = {
    "scratch": ("scratch (random init)", None, ()),
    "mdp": (f"MDP, A+B (defaults, con_space={DEFAULT_CON})", {}, AB),
    "mdp_a": ("MDP, A only", {}, ("A",)),
    "ce": ("concatenated-label CE, A+B", {"loss": {"kind": "ce"}}, AB),
    "mdp_nomix": ("MDP w/o mixing, A+B", {"mix": {"prob": 0}}, AB),
    "mdp_nocon": ("MDP w/o consistency, A+B", {"loss": {"alpha": 0}}, AB),
    "pixel": ("pixel-to-pixel w/o mixing, A+B", {"loss": {"kind": "pixel"}, "mix": {"prob": 0}},
              AB),
    "mdp_aware": ("MDP dataset-aware softmax, A+B", {"loss": {"dataset_aware": True}}, AB),
    OTHER_ARM: (f"MDP, A+B, con_space={OTHER_CON}", {"loss": {"con_space": OTHER_CON}}, AB),
    "mdp_semi": ("MDP semi-supervised, A1+B+A2 unlabelled", {}, ("A1", "B", "A2")),
    "mdp_a1b": ("MDP, A1+B (no unlabelled)", {}, ("A1", "B")),
}
SHORT = {"scratch": "scratch", "mdp": "MDP A+B", "mdp_a": "MDP A", "ce": "CE A+B",
         "mdp_nomix": "MDP w/o mixing", "mdp_nocon": "MDP w/o consistency",
         "pixel": "pixel-to-pixel w/o mixing", "mdp_aware": "MDP dataset-aware",
         OTHER_ARM: f"MDP con_space={OTHER_CON}", "mdp_semi": "MDP A1+B+A2 (semi)",
         "mdp_a1b": "MDP A1+B"}

# name: (what it is, the fine-tuning flags, FinetuneConfig fields)
PROTOCOLS = {
    "backbone": ("full fine-tuning, backbone transferred", "--scope backbone",
                 {"scope": "backbone"}),
    "probe": ("fixed backbone: ASPP, decoder and classifier trained (paper Table 6)",
              "--scope backbone --freeze-backbone", {"scope": "backbone", "freeze_backbone": True}),
    "all": ("full fine-tuning, whole DeepLab-v3+ transferred (secondary)", "--scope all",
            {"scope": "all"}),
}
PRIMARY = "backbone"
SIDE_ARMS = ("scratch", "mdp", "mdp_a", "ce")  # also get the probe and --scope all

# (question, source, a, b): "a > b" (mIoU) is what the source expects.
CLAIMS = [
    ("pretraining beats scratch", "paper", "mdp", "scratch"),
    ("multi-dataset > single-dataset", "paper", "mdp", "mdp_a"),
    ("prototype > pixel-to-pixel (both w/o mixing)", "paper", "mdp_nomix", "pixel"),
    ("prototype > concatenated-label CE", "paper", "mdp", "ce"),
    ("mixing adds", "paper", "mdp", "mdp_nomix"),
    ("consistency adds", "paper", "mdp", "mdp_nocon"),
    ("unlabelled data adds (A1+B+A2 > A1+B)", "paper", "mdp_semi", "mdp_a1b"),
    ("dataset-aware softmax: A+B > A", "issue 17", "mdp_aware", "mdp_a"),
    ("dataset-aware > shared softmax (A+B)", "issue 17", "mdp_aware", "mdp"),
    (f"con_space {DEFAULT_CON} (default) > {OTHER_CON}", "issue 16", "mdp", OTHER_ARM),
]

# Round 2: the 600-step pretraining budget for every arm (round 1's "full" has 150), three
# pretraining seeds, fine-tuning seed k from pretraining seed k.
BUDGETS2 = {"full": dict(BUDGETS["full"], pretrain=dict(BUDGETS["full"]["pretrain"], steps=600)),
            "quick": BUDGETS["quick"]}

QUICK_NOTE = ("This is a smoke run of the round-2 driver: every arm and protocol runs end to "
              "end on the real data with a few steps of a width-8 network, so every number "
              "here is noise and supports or refutes nothing. The measurement is "
              "`python -m mdp_train.camvid2` (full budget).")

# Quiet 2-core figures measured for round 1 (benchmarks/results/camvid*.md, README):
# 0.6 s per pretraining step, 0.1 s per fine-tuning step, 2 s per evaluation.
QUIET_RATES = {"pretrain_s_per_step": 0.6, "finetune_s_per_step": 0.1, "eval_s": 2.0}


def protocols(arm: str) -> tuple[str, ...]:
    return tuple(PROTOCOLS) if arm in SIDE_ARMS else (PRIMARY,)


# ------------------------------------------------------------------------- statistics
# Two-sided 95% quantiles of Student's t, t_{0.975}(dof), dof = 1..30.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
    if dof < 1:
        raise ValueError(f"a t interval needs dof >= 1, got {dof}")
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964  # past 30 dof: the Cornish-Fisher expansion around the normal quantile
    return (z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * dof ** 3))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (ddof 1; nan for fewer than 2 values; both nan for none)."""
    v = np.asarray(list(values), float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def paired(a: dict, b: dict) -> dict:
    """Paired difference ``a - b`` over the seeds both have (``{seed: value}``): ``n``, mean,
    sample std and the 95% t-interval over seeds (n - 1 dof; nan for n < 2); ``resolved``:
    the interval excludes 0 (None for n < 2)."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], float)
    out = {"n": len(seeds), "seeds": seeds, "mean": math.nan, "std": math.nan,
           "lo": math.nan, "hi": math.nan, "resolved": None}
    if not seeds:
        return out
    out["mean"] = float(d.mean())
    if len(seeds) > 1:
        sd = float(d.std(ddof=1))
        half = t975(len(seeds) - 1) * sd / math.sqrt(len(seeds))
        out.update(std=sd, lo=out["mean"] - half, hi=out["mean"] + half)
        out["resolved"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def verdict(p: dict) -> str:
    """``a > b`` from a :func:`paired` result: holds (interval above 0), does not hold (below
    0), unresolved (contains 0, or one seed: no interval), no data."""
    if p["n"] == 0:
        return "no data"
    if p["resolved"] is None:
        return "unresolved (1 seed, no interval)"
    if not p["resolved"]:
        return "unresolved"
    return "holds" if p["mean"] > 0 else "does not hold"


def fmt_diff(p: dict) -> str:
    if p["n"] == 0:
        return "-"
    if p["resolved"] is None:
        return f"{p['mean']:+.2f} [n/a]"
    return f"{p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]"


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _pm(mu: float, sd: float) -> str:
    if math.isnan(mu):
        return "-"
    return f"{mu:.2f} +- {'n/a' if math.isnan(sd) else f'{sd:.2f}'}"


# ------------------------------------------------------------------------------ units
def _jsonable(budget: dict) -> dict:
    return json.loads(json.dumps(budget))


def git_state() -> dict:
    """The commit this code runs from, and whether the training code differs from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "mdp_train",
                         "mdp_kernels", "csrc", "configs", "setup.py"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def load_units(units: Path, budget: dict) -> tuple[dict, list[str]]:
    """``{(arm, seed): unit}`` of the unit JSONs in ``units``, and the files ignored (arms
    this driver does not know). A unit of another budget is an error naming its file."""
    out, ignored = {}, []
    want = _jsonable(budget)
    for path in sorted(units.glob("*-seed*.json")) if units.is_dir() else []:
        u = json.loads(path.read_text())
        if u.get("arm") not in ARMS:
            ignored.append(path.name)
            continue
        if u.get("budget") != want:
            raise SystemExit(f"{path} was made with another budget ({u.get('budget')}), not "
                             f"{want}: move it away or pass another --results")
        out[(u["arm"], u["seed"])] = u
    return out, ignored


def run_unit(data: Path, arm: str, seed: int, budget: dict, root: Path, units: Path) -> dict:
    """Pretrain (seed ``seed``, resuming) and fine-tune every protocol of one (arm, seed) into
    ``root``; write ``units/<arm>-seed<seed>.json`` and return it. A fine-tuning finished in
    ``root`` before an interruption is reused."""
    import torch

    from .finetune import finetune
    t0 = time.time()
    label, extra, sets = ARMS[arm]
    init, pre_s = None, 0.0
    if extra is not None:
        init, pre_s = pretrain(data, sets, extra, budget, seed, root / arm / f"pretrain-seed{seed}")
    protos, classes = {}, None
    for proto in protocols(arm):
        if init is None and proto == "all":  # nothing to transfer: the same run as backbone
            protos[proto] = dict(protos[PRIMARY], same_run_as=PRIMARY)
            continue
        run = root / arm / f"seed{seed}" / proto
        wall = None
        if (run / "result.json").is_file():
            r = json.loads((run / "result.json").read_text())
        else:
            t = time.time()
            r = finetune(dataclasses.replace(finetune_opts(data, budget, seed, init, run),
                                             **PROTOCOLS[proto][2]))
            wall = time.time() - t
        classes = r["classes"]
        protos[proto] = {
            "miou": r["miou"], "acc": r["acc"], "iou": r["iou"],
            "init": r["init"].replace(str(REPO) + os.sep, ""),  # no machine paths in git
            "frozen_backbone": r["frozen_backbone"], "flags": PROTOCOLS[proto][1],
            "train_seconds": r["train_seconds"], "wall_seconds": wall,
            "first_loss": r["first_loss"], "last_loss": r["last_loss"],
            "test_images": r["images"]}
    unit = {"arm": arm, "label": label, "seed": seed, "pretrain_seed": seed,
            "finetune_seed": seed, "datasets": list(sets),
            "overrides": None if extra is None else _dotted(extra),
            "protocols": protos, "classes": classes, "pretrain_seconds": pre_s,
            "seconds": time.time() - t0, "budget": _jsonable(budget), "git": git_state(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    files.write_text(units / f"{arm}-seed{seed}.json", dump(unit))
    return unit


def dump(obj) -> str:
    """JSON with one key per line and every flat list on one line (small, readable diffs)."""
    text = json.dumps(obj, indent=1)
    short = re.sub(r"\[\s*([^\[\]{}]*?)\s*\]",
                   lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",\n")) + "]",
                   text)
    return (short if json.loads(short) == obj else text) + "\n"


# ----------------------------------------------------------------------------- report
def values(units: dict, arm: str, proto: str) -> dict:
    """``{seed: mIoU %}`` of one arm and protocol."""
    return {s: 100 * u["protocols"][proto]["miou"] for (a, s), u in units.items()
            if a == arm and proto in u["protocols"]}


def claim_rows(units: dict) -> list[tuple]:
    """``(question, source, protocol, a, b, paired)`` for each claim and protocol that both
    arms have."""
    rows = []
    for q, src, a, b in CLAIMS:
        for proto in PROTOCOLS:
            if proto in protocols(a) and proto in protocols(b):
                rows.append((q, src, proto, a, b, paired(values(units, a, proto),
                                                         values(units, b, proto))))
    return rows


def ordering(units: dict) -> str:
    """Round 1's second explanation for A+B < A, label conflict: the A+B vs A ordering under
    the shared and the dataset-aware softmax, and what the dataset-aware arm (no conflict
    between A's and B's labels) rules out."""
    v = {a: values(units, a, PRIMARY) for a in ("mdp", "mdp_a", "mdp_aware")}
    shared, aware = paired(v["mdp"], v["mdp_a"]), paired(v["mdp_aware"], v["mdp_a"])
    gain = paired(v["mdp_aware"], v["mdp"])
    if not (shared["n"] and aware["n"]):
        return "- A+B vs A ordering with the dataset-aware softmax: no data yet."
    head = (f"- A+B vs A ordering ({PROTOCOLS[PRIMARY][0]}): MDP A+B - MDP A is "
            f"{fmt_diff(shared)} with the shared softmax and {fmt_diff(aware)} with the "
            f"dataset-aware one (dataset-aware - shared: {fmt_diff(gain)}). ")
    if aware["resolved"] is None or shared["resolved"] is None:
        return head + "One seed gives no interval, so nothing is ruled out yet."
    shared_up = shared["resolved"] and shared["mean"] > 0
    if aware["resolved"] and aware["mean"] > 0 and not shared_up:
        return head + ("The dataset-aware softmax puts A+B resolved above A and the shared one "
                       "does not: label conflict in the shared softmax held A+B back.")
    if shared_up:
        return head + ("A+B is resolved above A with the shared softmax already: there is no "
                       "deficit for label conflict to explain.")
    if aware["resolved"]:
        return head + ("A+B stays resolved below A with no label conflict at all, so the "
                       "conflict is ruled out as the cause: B itself does not help A here.")
    return head + (f"Without the label conflict A+B is still not resolved above A, so the "
                   f"conflict does not explain the missing gain at this resolution; the "
                   f"intervals bound the dataset-aware softmax's gain over the shared one at "
                   f"{gain['hi']:+.2f} points and the dataset-aware A+B's gain over A at "
                   f"{aware['hi']:+.2f}.")


def space_fix(units: dict) -> str:
    """Round 1's first explanation for A+B < A, consistency in the wrong space: A+B vs A with
    the consistency in either right space (both con_space arms)."""
    a = values(units, "mdp_a", PRIMARY)
    ps = {c: paired(values(units, "mdp" if c == DEFAULT_CON else OTHER_ARM, PRIMARY), a)
          for c in (DEFAULT_CON, OTHER_CON)}
    if not all(p["n"] for p in ps.values()):
        return "- A+B vs A with the consistency space fixed: no data yet."
    head = ("- A+B vs A with the consistency in the right space (round 1 had it wrong): MDP A+B "
            "- MDP A is " + " and ".join(f"{fmt_diff(p)} with con_space={c}"
                                         for c, p in ps.items()) + ". ")
    if any(p["resolved"] is None for p in ps.values()):
        return head + "One seed gives no interval, so nothing is ruled out yet."
    if any(p["resolved"] and p["mean"] > 0 for p in ps.values()):
        return head + "With the space fixed A+B is resolved above A, as that explanation predicts."
    if all(p["resolved"] for p in ps.values()):
        return head + ("A+B stays resolved below A in either space, so the wrong space was not "
                       "what kept A+B below A.")
    return head + ("Neither is resolved above A: fixing the space does not make B help at this "
                   "resolution.")


def reading(units: dict, rows: list[tuple]) -> list[str]:
    """Bullets generated from the intervals only: one per claim (every protocol it has), round
    1's two explanations for A+B < A, and the arms resolved above / below scratch. ``rows``:
    :func:`claim_rows` of ``units``."""
    out = []
    for q, src, a, b in CLAIMS:
        parts = [f"{proto}: {verdict(p)} ({fmt_diff(p)}, n = {p['n']})"
                 for q2, _, proto, a2, b2, p in rows if (q2, a2, b2) == (q, a, b) and p["n"]]
        out.append(f"- {q} ({SHORT[a]} - {SHORT[b]}; {src}): "
                   + ("; ".join(parts) if parts else "no data yet") + ".")
    out += [space_fix(units), ordering(units)]
    for proto in PROTOCOLS:
        above, below, unres = [], [], []
        for arm in ARMS:
            if arm == "scratch" or proto not in protocols(arm):
                continue
            p = paired(values(units, arm, proto), values(units, "scratch", proto))
            if p["n"] == 0:
                continue
            (above if p["resolved"] and p["mean"] > 0 else
             below if p["resolved"] else unres).append(SHORT[arm])
        if above or below or unres:
            out.append(f"- vs scratch, {proto}: resolved above: {', '.join(above) or 'none'}; "
                       f"resolved below: {', '.join(below) or 'none'}; unresolved (or one "
                       f"seed): {', '.join(unres) or 'none'}.")
    res = [p for *_, p in rows if p["resolved"] is not None]
    out.append(f"- Of the {len(res)} claim comparisons with an interval, "
               f"{sum(p['resolved'] for p in res)} are resolved.")
    return out


# The paper's budget (its implementation details and Sect. 4.3), for the limits section.
PAPER_SCALE = ("a ResNet-50 DeepLab-v3+ with 256-d embeddings, pretrained at batch 128 and 224 px "
               "for 100 epochs over Pascal VOC + ADE20K (about 30K images) on 8 V100s, then "
               "fine-tuned for 40k-80k iterations at 512 px")


def limits(units: dict, budget: dict, rows: list[tuple], names: list[str] | None) -> list[str]:
    """Bullets on what bounds this reproduction: scale against the paper, the smallest
    difference the seeds can resolve, the classes no arm learns (``names``: the units' class
    names), and the label spaces. ``rows``: :func:`claim_rows` of ``units``."""
    m, p, f = budget["model"], budget["pretrain"], budget["finetune"]
    epochs = p["steps"] * p["batch"] / sum(FRAMES.values())
    n = budget["seeds"]
    out = [f"- Scale: the paper trains {PAPER_SCALE}. Here a {m['arch']} at width {m['width']} "
           f"with {m['dim']}-d embeddings sees {p['steps']} x {p['batch']} crops of {p['crop']} "
           f"px (about {epochs:.0f} epochs of A+B's {sum(FRAMES.values())} frames) and "
           f"fine-tunes {f['steps']} steps on 62 frames: a short pretraining signal and a tiny "
           f"downstream set."]
    if n > 1:
        k = t975(n - 1) / math.sqrt(n)
        sds = [pr["std"] for *_, pr in rows if pr["n"] == n]
        sd = float(np.median(sds)) if sds else math.nan
        spread = (f"; the claims' paired differences have a median std of {sd:.2f} points over "
                  f"seeds, so a difference needs to exceed about {k * sd:.1f} points to be "
                  f"resolved" if sds else "")
        out.append(f"- Statistics: {n} seeds give a 95% t-interval of +- {k:.2f} x the std of "
                   f"the per-seed differences ({n - 1} dof){spread}. Unresolved means not "
                   f"measurable at this budget, not equal.")
    if names:
        ious = [[u["protocols"][PRIMARY]["iou"][i] for u in units.values()]
                for i in range(len(names))]
        dead = [c for c, xs in zip(names, ious)  # None: the class is absent from the test set
                if any(x is not None for x in xs) and all(x is None or x < 0.005 for x in xs)]
        if dead:
            out.append(f"- Classes: {len(dead)} of the {len(names)} classes ({', '.join(dead)}) "
                       f"get 0 IoU in every unit at this resolution and budget, so mIoU moves "
                       f"with the other {len(names) - len(dead)} only, and no arm is tested on "
                       f"thin or rare objects.")
    out.append("- Label spaces: B's 7 classes are a strict coarsening of A's 11 "
               "(configs/camvid_coarse.txt): each B class is an A class under a second name or "
               "a union of A classes, so in the concatenated softmax every B pixel's label "
               "competes with the A class it also belongs to. That is the hardest case for the "
               "multi-dataset claim; the paper's VOC and ADE20K overlap only in part. All three "
               "drives come from one city and camera, so B adds little visual variety to A.")
    return out


def _chart(units: dict, rows: list[tuple], title: str, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r[-1]["n"]]
    top, low = 4.2, 0.6 + 0.2 * max(len(rows), 4)  # inches: the bars, the differences
    h = top + low + 0.4
    fig = plt.figure(figsize=(11, h), dpi=110)
    # fixed rectangles, so the long difference labels do not squeeze the bars
    ax = fig.add_axes((0.06, (low + 0.4) / h, 0.66, (top - 0.55) / h))
    dx = fig.add_axes((0.36, 0.45 / h, 0.60, (low - 0.45) / h))
    colours = {a: "0.6" if a == "scratch" else plt.get_cmap("tab20")(i % 20)
               for i, a in enumerate(ARMS)}
    x, ticks, seen = 0.0, [], set()
    for proto in PROTOCOLS:
        arms = [a for a in ARMS if proto in protocols(a) and values(units, a, proto)]
        start = x
        for arm in arms:
            v = values(units, arm, proto)
            mu, sd = mean_std(v.values())
            sd = 0 if math.isnan(sd) else sd
            ax.bar(x, mu, yerr=sd, capsize=2, width=0.8, color=colours[arm],
                   label=None if arm in seen else ARMS[arm][0])
            ax.text(x, mu + sd, f"n={len(v)}", ha="center", va="bottom", fontsize=6)
            seen.add(arm)
            x += 1
        if arms:
            ticks.append(((start + x - 1) / 2, proto))
            x += 1
    if not ticks:
        ax.text(0.5, 0.5, "no finished units yet", ha="center", transform=ax.transAxes)
    ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=8)
    ax.set_ylabel("0001TP test mIoU (%), mean +- std over seeds")
    ax.set_title(title, fontsize=9)
    if seen:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    # the claims as paired differences: what the bars above cannot show at their scale
    hue = {"holds": "tab:green", "does not hold": "tab:red"}
    for i, (q, _, proto, a, b, pr) in enumerate(reversed(rows)):
        err = None if pr["resolved"] is None else [[pr["mean"] - pr["lo"]], [pr["hi"] - pr["mean"]]]
        dx.errorbar(pr["mean"], i, xerr=err, fmt="o", ms=4, capsize=3,
                    color=hue.get(verdict(pr), "0.45"))
    dx.set_yticks(range(len(rows)),
                  [f"{SHORT[a]} - {SHORT[b]} ({proto}, n={pr['n']})"
                   for _, _, proto, a, b, pr in reversed(rows)], fontsize=7)
    dx.axvline(0, color="k", lw=0.8)
    dx.set_xlabel("paired difference a - b (mIoU points), 95% t-interval over seeds; green holds, "
                  "red does not hold, grey unresolved", fontsize=8)
    if not rows:
        dx.text(0.5, 0.5, "no paired differences yet", ha="center", transform=dx.transAxes)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)


def report(units_dir: Path, budget: dict, name: str, out_md: Path, out_png: Path,
           finish: str, note: str = "") -> str:
    """``out_md`` + ``out_png`` from the unit JSONs in ``units_dir``; PARTIAL (with the
    missing units and ``finish``, the command that completes them) while any is missing."""
    units, ignored = load_units(units_dir, budget)
    expected = [(a, s) for s in range(budget["seeds"]) for a in ARMS]
    missing = [k for k in expected if k not in units]
    m, p, f = budget["model"], budget["pretrain"], budget["finetune"]
    status = (f"PARTIAL: {len(expected) - len(missing)} of {len(expected)} units"
              if missing else f"complete: {len(expected)} units")
    title = f"CamVid round 2 ({name}), {status}"
    md = [f"# {title}", ""]
    if missing:
        md += [f"**PARTIAL.** Missing (arm, seed) units ({len(missing)}): "
               + ", ".join(f"{a} seed {s}" for a, s in missing) + ".", "",
               f"Finish (from the repository root; resumable, skips the "
               f"{len(expected) - len(missing)} done units): `{finish}`",
               ""]
    rel = (units_dir.resolve().relative_to(REPO) if units_dir.resolve().is_relative_to(REPO)
           else units_dir)
    commits = sorted({(u["git"]["commit"][:10] + ("+dirty" if u["git"]["dirty"] else ""))
                      for u in units.values()})
    wall = sum(u["seconds"] for u in units.values())
    wall = f"{wall / 3600:.2f} h" if wall >= 3600 else f"{wall / 60:.1f} min"
    mx, lo, se = (config.DEFAULTS[k] for k in ("mix", "loss", "semi"))
    md += [
        "## Setup", "",
        f"- Budget: {m['arch']} (width {m['width']}) DeepLab-v3+ (output stride 16, "
        f"{m['channels']} decoder channels), {m['dim']}-d embeddings. Pretraining: "
        f"{p['steps']} steps x batch {p['batch']}, {p['crop']} px crops, for every arm. "
        f"Fine-tuning (every arm and protocol): {f['steps']} steps x batch {f['batch']}, "
        f"{f['crop'][0]}x{f['crop'][1]} crops at 0.4-0.7 scale, SGD lr {f['lr']} poly, on the "
        f"62 `train_*` frames of 0001TP; mIoU (11 classes, MMSegmentation way) on its 62 "
        f"`test_*` frames at 0.5 scale.",
        "- Data: " + "; ".join(DATA[k][1] for k in ("A", "B", "A1", "A2")) + ". Downstream "
        "0001TP is a third drive (dusk), never pretrained on.",
        f"- Seeds: {budget['seeds']} per arm; fine-tuning seed k starts from pretraining seed "
        f"k, so a seed is one (pretraining, fine-tuning) pair and arms are compared paired by "
        f"seed.",
        "- Protocols: " + "; ".join(f"`{k}` = {v[0]} (`{v[1]}`)" for k, v in PROTOCOLS.items())
        + f". The probe and `all` run for {', '.join(SHORT[a] for a in SIDE_ARMS)} only; "
        "scratch has no checkpoint, so its `all` is its `backbone` run.",
        f"- MDP defaults: loss.alpha {lo['alpha']}, con_space {DEFAULT_CON} "
        f"({CON_WHAT[DEFAULT_CON]}; the {OTHER_ARM} arm: {CON_WHAT[OTHER_CON]}), "
        f"dataset_aware {lo['dataset_aware']}; mix.prob {mx['prob']}, cutmix : mixup "
        f"{mx['cutmix']} : {mx['mixup']}, replace_view {mx['replace_view']}; pseudo-labels "
        f"{se['confidence']} >= {se['threshold']}, warm-up {se['warmup_steps']}.",
        "- Statistics: mean +- sample std over seeds; paired difference a - b over the seeds "
        "both arms have, with its 95% t-interval (n - 1 dof; n/a for one seed); resolved = "
        "the interval excludes 0.",
        f"- Units: `{rel}/<arm>-seed<k>.json`; code {', '.join(commits) or '-'}; {wall} "
        f"wall time for the units' new work (a resumed pretraining counts its last session) "
        f"on {os.cpu_count()} CPU cores.", ""]
    for proto, (what, flags, _) in PROTOCOLS.items():
        md += [f"## {proto}: {what} (`{flags}`)", "",
               "| arm | n | mIoU (%) mean +- std | per seed | vs MDP A+B [95% CI] | resolved | "
               "vs scratch [95% CI] | resolved |",
               "| --- | ---: | ---: | --- | ---: | --- | ---: | --- |"]
        ref = {b: values(units, b, proto) for b in ("mdp", "scratch")}
        for arm in ARMS:
            if proto not in protocols(arm):
                continue
            v = values(units, arm, proto)
            cells = []
            for b in ("mdp", "scratch"):
                if b == arm:
                    cells += ["-", "-"]
                    continue
                d = paired(v, ref[b])
                cells += [fmt_diff(d), "-" if d["resolved"] is None else
                          "yes" if d["resolved"] else "no"]
            seeds = ", ".join(f"{v[s]:.2f}" for s in sorted(v)) or "-"
            md.append(f"| {ARMS[arm][0]} | {len(v)} | {_pm(*mean_std(v.values()))} | {seeds} | "
                      + " | ".join(cells) + " |")
        md.append("")
    md += ["## Claims (paired difference a - b, mIoU points)", "",
           "| question | source | protocol | a - b | n | mean [95% CI] | verdict |",
           "| --- | --- | --- | --- | ---: | ---: | --- |"]
    rows = claim_rows(units)
    names = next((u["classes"] for u in units.values() if u["classes"]), None)
    for q, src, proto, a, b, pr in rows:
        md.append(f"| {q} | {src} | {proto} | {SHORT[a]} - {SHORT[b]} | {pr['n']} | "
                  f"{fmt_diff(pr)} | {verdict(pr)} |")
    md += ["", "## Reading (generated from the intervals above)", "", *reading(units, rows), ""]
    if units:
        md += ["## What limits this reproduction", "", *limits(units, budget, rows, names), ""]
    if names:
        md += [f"## Per-class IoU (%), {PRIMARY}, mean over seeds", "",
               "| arm | " + " | ".join(names) + " |",
               "| --- |" + " ---: |" * len(names)]
        for arm in ARMS:
            us = [u for (a, _), u in units.items() if a == arm]
            if not us:
                continue
            cols = []
            for i in range(len(names)):
                xs = [u["protocols"][PRIMARY]["iou"][i] for u in us]
                xs = [x for x in xs if x is not None]
                cols.append(f"{100 * np.mean(xs):.1f}" if xs else "-")
            md.append(f"| {SHORT[arm]} | " + " | ".join(cols) + " |")
        md.append("")
    md += ["## Arms and time per unit", "",
           "| arm | pretraining sets | overrides | n | pretrain s | fine-tune s per protocol |",
           "| --- | --- | --- | ---: | ---: | --- |"]
    for arm, (label, extra, sets) in ARMS.items():
        us = [u for (a, _), u in units.items() if a == arm]
        pre = _secs(np.mean([u["pretrain_seconds"] for u in us])) if us else "-"
        fin = ", ".join(
            f"{k} = {u0['same_run_as']}" if "same_run_as" in u0 else
            f"{k} {_secs(np.mean([u['protocols'][k]['train_seconds'] for u in us]))}"
            for k, u0 in us[0]["protocols"].items()) if us else "-"
        ov = "-" if extra is None else ", ".join(_dotted(extra)) or "defaults"
        md.append(f"| {label} | {'+'.join(sets) or '-'} | {ov} | {len(us)} | {pre} | {fin} |")
    md.append("")
    if ignored:
        md += [f"Ignored unit files (arms this driver does not know): {', '.join(ignored)}.", ""]
    if note:
        md += [note, ""]
    _chart(units, rows, title, out_png)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(out_md, "\n".join(md) + "\n")
    return "\n".join(md)


# ------------------------------------------------------------------------------- main
def fine_tunings(arms) -> int:
    """Fine-tuning runs of one seed of ``arms`` (scratch's ``all`` is its ``backbone`` run)."""
    return sum(len(protocols(a)) - (a == "scratch" and "all" in protocols(a)) for a in arms)


def estimate(rates: dict | None, budget: dict, todo: list[tuple[str, int]]) -> dict:
    """Hours of the whole run and of the units in ``todo``: at the round-1 quiet 2-core
    figures (``QUIET_RATES``) and, given measured ``rates``, at this load (wall) and on a
    quiet machine (CPU seconds / cores). Fixed-backbone fine-tunings count as full ones (an
    upper bound)."""
    every = [(a, s) for s in range(budget["seeds"]) for a in ARMS]
    out = {}
    for key, us in (("all_units", every), ("remaining_units", todo)):
        n_pre = sum(ARMS[a][1] is not None for a, _ in us)
        n_fin = fine_tunings([a for a, _ in us])
        row = {"units": len(us), "pretrain_runs": n_pre, "finetune_runs": n_fin,
               "hours_at_round1_quiet_2core_rates":
                   run_seconds(QUIET_RATES, budget, n_pre, n_fin) / 3600}
        if rates is not None:
            e = extrapolate(rates, budget, n_pre, n_fin)
            row.update(hours_at_this_load=e["total_minutes_at_this_load"] / 60,
                       hours_quiet_estimate=e["total_minutes_quiet_estimate"] / 60,
                       load_average=e["load_average"], cores=e["cores"])
        out[key] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = run_parser("python -m mdp_train.camvid2", __doc__,
                    "run folder, git-ignored (default out/camvid2[-quick])",
                    "report folder: camvid2[-quick].md/.png, unit JSONs in camvid2[-quick]/")
    ap.add_argument("--arms", nargs="*", choices=list(ARMS),
                    help="run only these arms (the report still expects every arm)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default: torch's, one per core). On a machine "
                         "shared with other jobs, 1 avoids oversubscribing the cores")
    ap.add_argument("--report-only", action="store_true",
                    help="regenerate the report from the unit JSONs, train nothing")
    ap.add_argument("--estimate", type=int, metavar="STEPS",
                    help="time STEPS steps of the budget (semi-supervised arm) and print the "
                         "whole run's and the remaining units' time")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full"
    budget = BUDGETS2[name]
    if budget["pretrain_seeds"] != budget["seeds"]:
        raise SystemExit("round 2 pairs fine-tuning seed k with pretraining seed k")
    sfx = "-quick" if args.quick else ""
    res_dir = Path(args.results)
    units_dir = res_dir / f"camvid2{sfx}"
    root = Path(args.out or REPO / "out" / f"camvid2{sfx}")
    data = Path(args.data)

    def shown(path: Path, default: Path) -> str | None:
        if path.resolve() == default.resolve():
            return None
        return str(path.relative_to(REPO) if path.resolve().is_relative_to(REPO) else path)

    cmd = ["nice -n 10 python -m mdp_train.camvid2"] + (["--quick"] if args.quick else [])
    for flag, path, default in (("--data", data, DEFAULT_DATA),
                                ("--results", res_dir, REPO / "benchmarks" / "results"),
                                ("--out", root, REPO / "out" / f"camvid2{sfx}")):
        s = shown(path, default)
        cmd += [f"{flag} {s}"] if s else []
    finish = " ".join(cmd)
    title = "SMOKE RUN, tiny budget: not a measurement" if args.quick else "full budget"

    def write_report() -> str:
        return report(units_dir, budget, title, res_dir / f"camvid2{sfx}.md",
                      res_dir / f"camvid2{sfx}.png", finish, QUICK_NOTE if args.quick else "")

    if args.report_only:
        print(write_report())
        return
    units, _ = load_units(units_dir, budget)
    order = [(a, s) for s in range(budget["seeds"]) for a in ARMS
             if not args.arms or a in args.arms]
    todo = [k for k in order if k not in units]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if not (data / "classes.txt").is_file():
        raise SystemExit(f"no CamVid at {data} (see its README; set --data or MDP_CAMVID)")
    if args.estimate:
        _, extra, sets = ARMS["mdp_semi"]
        rates = measure(data, sets, extra, budget, args.estimate, root / "estimate")
        print(json.dumps({"measured": rates, **estimate(rates, budget, todo)}, indent=1))
        return
    for arm, seed in order:
        if (arm, seed) in units:
            print(f"== {arm} seed {seed}: done ({units_dir / f'{arm}-seed{seed}.json'})")
            continue
        print(f"== {arm} seed {seed} ==", flush=True)
        u = run_unit(data, arm, seed, budget, root, units_dir)
        print("   " + ", ".join(f"{k} mIoU {100 * v['miou']:.2f}"
                                for k, v in u["protocols"].items()), flush=True)
        write_report()  # a partial table after every unit
    print(write_report())


if __name__ == "__main__":
    main()
