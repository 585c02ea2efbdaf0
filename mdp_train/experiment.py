"""A small real-data reproduction of the paper's claims on CamVid (``make experiment``).

Pretraining (label spaces concatenated, nothing mapped by hand):
  A = drive 0016E5 with CamVid's 11 classes, B = drive 0006R0 relabelled to 7 coarse classes
  (``configs/camvid_coarse.txt``); U = drive 0006R0's images without labels.
Downstream: fine-tune DeepLab-v3+ on drive 0001TP ``train_*`` (62 frames), 11-class mIoU on
its ``test_*`` frames (62), the same budget for every arm.

Arms: scratch; MDP on A+B; MDP on A; MDP without mixing; MDP without consistency;
pixel-to-pixel contrast on A+B; concatenated-label cross-entropy on A+B; MDP semi-supervised
(A+B+U). Every (arm, seed) writes ``<out>/<arm>/seed<k>/finetune/result.json``; those that
exist are skipped, finished pretrainings (``<out>/<arm>/pretrain-seed<p>/done.json``) are
reused and an interrupted one resumes from its checkpoint, so the driver can be stopped and
started again. ``--quick`` is a tiny smoke budget (one seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from . import config, files
from .finetune import FinetuneConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "camvid"

ARMS = {  # name: (label, pretraining overrides or None for scratch, datasets: DATA keys)
    "scratch": ("scratch (random init)", None, ()),
    "mdp": ("MDP, A+B", {}, ("A", "B")),
    "mdp_a": ("MDP, A only", {}, ("A",)),
    "mdp_nomix": ("MDP w/o mixing, A+B", {"mix": {"prob": 0}}, ("A", "B")),
    "mdp_nocon": ("MDP w/o consistency, A+B", {"loss": {"alpha": 0}}, ("A", "B")),
    "pixel": ("pixel-to-pixel, A+B", {"loss": {"kind": "pixel"}, "mix": {"mixup": 0}},
              ("A", "B")),
    "ce": ("concatenated-label CE, A+B", {"loss": {"kind": "ce"}}, ("A", "B")),
    "mdp_semi": ("MDP semi-supervised, A+B+U", {}, ("A", "B", "U")),
}

# The pretraining sets an arm can name: (labelled?, what it is, its reader spec under the
# CamVid root). A1/A2 split drive 0016E5 by frame (time order): A1 = the first half
# (labelled), A2 = the second half read as plain images, so its labels are never opened.
FRAMES = {"A": 305, "B": 101}  # labelled frames per set (tests/test_experiment2.py counts them)
DATA = {
    "A": (True, f"A = 0016E5, {FRAMES['A']} frames, 11 classes",
          {"type": "folder", "subsets": ["0016E5"], "name": "A"}),
    "A1": (True, "A1 = the first half of 0016E5's frames in time order (152), 11 classes",
           {"type": "folder", "subsets": ["0016E5"], "name": "A1", "frames": "first_half"}),
    "B": (True, f"B = 0006R0, {FRAMES['B']} frames, 7 coarse classes (configs/camvid_coarse.txt)",
          {"type": "folder", "subsets": ["0006R0"], "name": "B",
           "remap": str(REPO / "configs" / "camvid_coarse.txt")}),
    "U": (False, "U = 0006R0's images without labels (the images of B)",
          {"type": "images", "sub": "0006R0/images", "name": "U"}),
    "A2": (False, "A2 = the second half of 0016E5's frames (153) as unlabelled images, "
                  "disjoint from A1, labels never read",
           {"type": "images", "sub": "0016E5/images", "name": "A2", "frames": "second_half"}),
}

# Model and step budgets. "full" takes about 40 min on a quiet 2-core CPU (measured wall
# time: 0.6 s per pretraining step, 0.1 s per fine-tuning step, 2 s per evaluation);
# with --pretrain-steps 600 (about 2 h for the table) every pretrained arm measured beats
# scratch; at 150 only CE and MDP semi-supervised do, within noise (benchmarks/results).
# Fine-tuning seed k starts from pretraining seed k % pretrain_seeds (--pretrain-seeds 1
# shares one pretraining per arm: about half the time, std over fine-tuning seeds only).
BUDGETS = {
    "full": {"model": {"arch": "resnet18", "width": 32, "channels": 64, "dim": 64},
             "pretrain": {"steps": 150, "batch": 16, "crop": 96},
             "finetune": {"steps": 200, "batch": 8, "crop": [96, 128], "lr": 0.02},
             "seeds": 3, "pretrain_seeds": 3},
    "quick": {"model": {"arch": "resnet18", "width": 8, "channels": 16, "dim": 16},
              "pretrain": {"steps": 3, "batch": 8, "crop": 64},
              "finetune": {"steps": 4, "batch": 4, "crop": [64, 96], "lr": 0.02},
              "seeds": 1, "pretrain_seeds": 1},
}


QUICK_NOTE = ("This is a smoke run: it proves that every arm runs end to end on the real "
              "data (pretraining, fine-tuning, evaluation, table, chart). With a few steps of "
              "a width-8 network every number here is noise; it neither supports nor refutes "
              "the paper. The reproduction is `make experiment` (full budget).")


def _dotted(tree: dict, where: str = "") -> list[str]:
    """``{"mix": {"prob": 0}}`` -> ``["mix.prob=0"]``: an arm's overrides as the CLI takes them."""
    out = []
    for k, v in tree.items():
        out += _dotted(v, f"{where}{k}.") if isinstance(v, dict) else [f"{where}{k}={v}"]
    return out


def dataset_specs(data: Path, sets) -> tuple[list[dict], list[dict]]:
    """The labelled and the unlabelled reader specs of ``sets`` (keys of ``DATA``)."""
    lab, unl = [], []
    for key in sets:
        labelled, _, spec = DATA[key]
        spec = dict(spec)
        sub = spec.pop("sub", None)
        spec["root"] = str(data / sub if sub else data)
        (lab if labelled else unl).append(spec)
    return lab, unl


def pretrain_config(data: Path, sets, extra: dict, budget: dict, seed: int, out: Path) -> dict:
    """The pretraining config of an arm: ``sets`` (keys of ``DATA``), ``extra`` (its
    overrides of the defaults), ``budget``'s model and steps."""
    m, p = budget["model"], budget["pretrain"]
    specs, unl = dataset_specs(data, sets)
    base = {
        "data": {"datasets": specs, "unlabelled": unl, "crop_size": p["crop"], "workers": 1},
        "model": {"arch": m["arch"], "width": m["width"], "channels": m["channels"],
                  "dim": m["dim"], "momentum": 0.99},
        "train": {"batch_size": p["batch"], "steps": p["steps"], "seed": seed, "out": str(out),
                  "log_every": 10, "save_every": max(1, p["steps"] // 4), "resume": "auto",
                  "progress": True},
        "optim": {"lr": 0.8, "ref_batch": 128}}
    return config.merge(config.merge(config.DEFAULTS, base), extra)


def finetune_opts(data: Path, budget: dict, seed: int, init: Path | None,
                  out: Path) -> FinetuneConfig:
    m, f = budget["model"], budget["finetune"]
    return FinetuneConfig(
        data=str(data), out=str(out), subsets=["0001TP"], prefix="train_", eval_prefix="test_",
        init=str(init) if init else None, arch=m["arch"], width=m["width"],
        channels=m["channels"], steps=f["steps"], batch_size=f["batch"], lr=f["lr"],
        crop=list(f["crop"]), seed=seed)


def pretrain(data: Path, sets, extra: dict, budget: dict, seed: int, pre: Path
             ) -> tuple[Path, float]:
    """Pretrain into ``pre`` unless ``pre/done.json`` says it finished (an interrupted run
    resumes from ``pre/checkpoint.pt``); returns the checkpoint and the pretraining seconds
    (those of the call that finished it)."""
    from .trainer import Trainer
    if (pre / "done.json").is_file():
        return pre / "checkpoint.pt", json.loads((pre / "done.json").read_text())["seconds"]
    t0 = time.time()
    Trainer(pretrain_config(data, sets, extra, budget, seed, pre)).fit()
    seconds = time.time() - t0
    files.write_text(pre / "done.json", json.dumps({"seconds": seconds}) + "\n")
    return pre / "checkpoint.pt", seconds


def run_arm(data: Path, arm: str, budget: dict, seed: int, root: Path) -> dict:
    """Pretrain (resuming) and fine-tune one (arm, seed) unless its result exists."""
    from .finetune import finetune
    run = root / arm / f"seed{seed}" / "finetune"
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    init, pre_s, t0 = None, 0.0, time.time()
    _, extra, sets = ARMS[arm]
    if extra is not None:
        ps = seed % budget["pretrain_seeds"]
        init, pre_s = pretrain(data, sets, extra, budget, ps, root / arm / f"pretrain-seed{ps}")
    res = finetune(finetune_opts(data, budget, seed, init, run))
    res["pretrain_seconds"] = pre_s
    res["wall_seconds"] = time.time() - t0  # this call: new pretraining (if any) + fine-tuning
    files.write_text(run / "result.json", json.dumps(res, indent=1) + "\n")
    return res


def summarise(results: dict, budget: dict, name: str, out_md: Path, out_png: Path,
              note: str = "") -> str:
    """Markdown table (mean +- sample std over seeds, gain over scratch) and a bar chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, means, stds, labels = [], [], [], []
    scratch = [r["miou"] for r in results.get("scratch", [])]
    base = float(np.mean(scratch)) if scratch else math.nan
    for arm, rs in results.items():
        v = 100 * np.array([r["miou"] for r in rs])
        mu = float(v.mean())
        sd = float(v.std(ddof=1)) if len(v) > 1 else math.nan  # shown as n/a
        gain = mu - 100 * base
        pre = np.mean([r["pretrain_seconds"] for r in rs])
        fin = np.mean([r["train_seconds"] for r in rs])
        rows.append(f"| {ARMS[arm][0]} | {mu:.2f} +- {'n/a' if math.isnan(sd) else f'{sd:.2f}'}"
                    f" | {gain:+.2f} | "
                    f"{', '.join(f'{x:.2f}' for x in v)} | {pre:.0f} | {fin:.0f} |")
        means.append(mu), stds.append(0 if math.isnan(sd) else sd), labels.append(ARMS[arm][0])
    m, p, f = budget["model"], budget["pretrain"], budget["finetune"]
    wall = sum(r["wall_seconds"] for rs in results.values() for r in rs)
    spread = ("std over seeds, each with its own pretraining" if budget["pretrain_seeds"] > 1
              else "std over fine-tuning seeds only")
    md = [f"# CamVid: multi-dataset pretraining -> 0001TP fine-tuning ({name})", "",
          f"Model: {m['arch']} (width {m['width']}) DeepLab-v3+ (output stride 16, "
          f"{m['channels']} decoder channels), {m['dim']}-d embeddings. Pretraining: "
          f"{p['steps']} steps x batch {p['batch']}, {p['crop']} px square crops "
          f"({DATA['A'][1]}; {DATA['B'][1]}; U = 0006R0 without labels). Fine-tuning: "
          f"{f['steps']} steps x batch {f['batch']}, "
          f"{f['crop'][0]}x{f['crop'][1]} crops at 0.4-0.7 scale, SGD lr {f['lr']} poly, on the "
          f"62 `train_*` frames of 0001TP; mIoU (11 classes, MMSegmentation way) on its 62 "
          f"`test_*` frames at 0.5 scale. Fine-tuning seeds per arm: "
          f"{len(next(iter(results.values())))}, from {budget['pretrain_seeds']} pretraining "
          f"seed(s) per arm ({spread}). "
          f"Total wall time {wall / 60:.1f}"
          f" min on {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the "
          f"end: the machine may be shared).", "",
          "| arm | mIoU (%) mean +- std | vs scratch | per seed | pretrain s | finetune s |",
          "| --- | ---: | ---: | --- | ---: | ---: |", *rows, ""]
    mx, lo, se = (config.DEFAULTS[k] for k in ("mix", "loss", "semi"))
    md += [f"Pretraining settings per arm (MDP defaults: loss.alpha {lo['alpha']}, con_space "
           f"{lo['con_space']}; mix.prob {mx['prob']}, cutmix : mixup {mx['cutmix']} : "
           f"{mx['mixup']}, replace_view {mx['replace_view']}; U is pseudo-labelled, "
           f"{se['confidence']} >= {se['threshold']}, warm-up {se['warmup_steps']}): " + "; ".join(
               f"{ARMS[a][0]}: {', '.join(_dotted(ARMS[a][1])) or 'defaults'}" for a in results
               if ARMS[a][1] is not None) + ".", ""]
    worse = [ARMS[a][0] for a, mu in zip(results, means) if a != "scratch" and mu <= 100 * base]
    if not math.isnan(base):
        md += [f"Pretrained arms not above scratch (mean): {'; '.join(worse) or 'none'}.", ""]
    if note:
        md += [note, ""]
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    ax.bar(range(len(means)), means, yerr=stds, capsize=3,
           color=["0.6"] + ["C0"] * (len(means) - 1))
    ax.set_xticks(range(len(means)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("0001TP test mIoU (%)")
    ax.set_title(f"CamVid downstream mIoU ({name})", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    out_md.write_text("\n".join(md) + "\n")
    return "\n".join(md)


def measure(data: Path, sets, extra: dict, budget: dict, steps: int, root: Path) -> dict:
    """Time ``steps`` pretraining steps of one arm (``sets``, ``extra``), ``steps``
    fine-tuning steps and one evaluation of ``budget``'s model, in wall and CPU seconds (data
    loading in-process, so the CPU time counts it)."""
    from .finetune import evaluate, finetune, load_segnet, preload, split_dataset
    from .trainer import Trainer
    cfg = pretrain_config(data, sets, extra, budget, 0, root / "estimate-pretrain")
    cfg["train"].update(resume=None, progress=False)
    cfg["data"]["workers"] = 0
    tr = Trainer(cfg)
    tr.fit(max_steps=1)  # warm-up (first batch, allocations)
    w, c = time.time(), time.process_time()
    tr.fit(max_steps=1 + steps)
    pre = ((time.time() - w) / steps, (time.process_time() - c) / steps)
    b = dict(budget, finetune=dict(budget["finetune"], steps=steps))
    opts = dataclasses.replace(finetune_opts(data, b, 0, None, root / "estimate-finetune"),
                               progress=False)
    res = finetune(opts)
    fin = (res["seconds_per_step"], res["train_cpu_seconds"] / steps)
    model, _, _ = load_segnet(root / "estimate-finetune" / "model.pt")
    pairs = preload(split_dataset(data, ["0001TP"], "test_"))
    w, c = time.time(), time.process_time()
    evaluate(model, pairs, 11, 0.5, False)
    ev = (time.time() - w, time.process_time() - c)
    return {"pretrain_s_per_step": pre[0], "pretrain_cpu_s_per_step": pre[1],
            "finetune_s_per_step": fin[0], "finetune_cpu_s_per_step": fin[1],
            "eval_s": ev[0], "eval_cpu_s": ev[1]}


def run_seconds(rates: dict, budget: dict, n_pre: int, n_fin: int, cpu: bool = False) -> float:
    """Seconds of ``n_pre`` pretrainings and ``n_fin`` fine-tunings + evaluations of
    ``budget`` at ``rates`` (``pretrain_s_per_step``, ``finetune_s_per_step``, ``eval_s``, or
    their ``_cpu`` versions)."""
    k = "_cpu" if cpu else ""
    return (n_pre * budget["pretrain"]["steps"] * rates[f"pretrain{k}_s_per_step"]
            + n_fin * (budget["finetune"]["steps"] * rates[f"finetune{k}_s_per_step"]
                       + rates[f"eval{k}_s"]))


def extrapolate(rates: dict, budget: dict, n_pre: int, n_fin: int) -> dict:
    """``n_pre`` pretrainings and ``n_fin`` fine-tunings (+ evaluations) of ``budget`` at the
    measured ``rates``: minutes at this load (wall) and on a quiet machine (CPU seconds /
    cores). On a shared machine the wall time is inflated by the other jobs."""
    cores = os.cpu_count() or 1
    tot = [run_seconds(rates, budget, n_pre, n_fin, cpu) for cpu in (False, True)]
    return {"pretrain_runs": n_pre, "finetune_runs": n_fin,
            "total_minutes_at_this_load": tot[0] / 60,
            "total_minutes_quiet_estimate": tot[1] / cores / 60,
            "load_average": os.getloadavg()[0], "cores": cores}


def estimate(data: Path, budget: dict, steps: int, root: Path) -> dict:
    """Measure (MDP, A+B+U: the costliest arm) and extrapolate the whole table."""
    _, extra, sets = ARMS["mdp_semi"]
    rates = measure(data, sets, extra, budget, steps, root)
    n_pre = sum(1 for a in ARMS.values() if a[1] is not None) * budget["pretrain_seeds"]
    n_fin = len(ARMS) * budget["seeds"]
    return {**rates, **extrapolate(rates, budget, n_pre, n_fin)}


def run_parser(prog: str, description: str, out_help: str,
               results_help: str) -> argparse.ArgumentParser:
    """A CamVid driver's parser with the options every round shares: --data, --quick,
    --out and --results."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MDP_CAMVID", str(DEFAULT_DATA)),
                    help="CamVid root (default ../shared/data/camvid from the repo, or "
                         "$MDP_CAMVID)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke budget, one seed")
    ap.add_argument("--out", help=out_help)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"),
                    help=results_help)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = run_parser("python -m mdp_train.experiment", __doc__,
                    "run folder (default out/camvid-full or out/camvid-quick)",
                    "where camvid.md/.png (camvid-quick.* with --quick) go")
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, help="override the number of fine-tuning seeds")
    ap.add_argument("--pretrain-seeds", type=int,
                    help="override the number of pretraining runs per arm")
    ap.add_argument("--pretrain-steps", type=int,
                    help="override the pretraining length (a budget-sensitivity run: default "
                         "folder out/camvid-full-pre<N>, results camvid-pre<N>.md/.png)")
    ap.add_argument("--estimate", type=int, metavar="STEPS",
                    help="only time STEPS steps of the budget and print the full-run estimate")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full"
    budget = dict(BUDGETS[name])
    if args.seeds:
        budget["seeds"] = args.seeds
    if args.pretrain_seeds:
        budget["pretrain_seeds"] = args.pretrain_seeds
    pre = ""
    if args.pretrain_steps:
        budget["pretrain"] = dict(budget["pretrain"], steps=args.pretrain_steps)
        pre = f"-pre{args.pretrain_steps}"
    data = Path(args.data)
    if not (data / "classes.txt").is_file():
        raise SystemExit(f"no CamVid at {data} (see its README; set --data or MDP_CAMVID)")
    root = Path(args.out or REPO / "out" / f"camvid-{name}{pre}")
    if args.estimate:
        est = estimate(data, budget, args.estimate, root)
        print(json.dumps(est, indent=1))
        return
    results: dict = {}
    for seed in range(budget["seeds"]):
        for arm in args.arms:
            print(f"== {arm} seed {seed} ==", flush=True)
            r = run_arm(data, arm, budget, seed, root)
            print(f"   mIoU {100 * r['miou']:.2f}", flush=True)
            results.setdefault(arm, []).append(r)
    suffix = ("-quick" if args.quick else "") + pre
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    title = ("SMOKE RUN, tiny budget: not a reproduction" if args.quick else
             "full budget" if not args.pretrain_steps else
             f"full budget, pretraining {args.pretrain_steps} steps")
    print(summarise({a: results[a] for a in args.arms}, budget, title,
                    res_dir / f"camvid{suffix}.md", res_dir / f"camvid{suffix}.png",
                    QUICK_NOTE if args.quick else ""))


if __name__ == "__main__":
    main()
