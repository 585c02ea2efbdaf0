"""Short CamVid checks of the method's wiring (issue 16), with the experiment's small model:

* ``con``: consistency space ``proj`` vs ``bank`` vs no consistency (alpha 0), MDP on A+B;
  held-out nearest-prototype probes (``train.probe_every``) of every run, and for the proj
  run the key encoder in eval mode with its own BN statistics vs the query's copied in.
* ``semi``: pseudo-label settings on A+B+U, U = drive 0001TP read as unlabelled with its
  labels hidden (same 11 classes as A): coverage and accuracy of the kept pseudo-labels.

``python -m mdp_train.checks [--steps 200] [--semi-steps 200]`` writes
``benchmarks/results/issue16-checks.md`` (+ ``.json``); runs go to ``out/issue16``. A run
whose final checkpoint exists is not retrained: its numbers are read back from the
checkpoint and its ``metrics.jsonl``, so the checks can be stopped and started again.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

from .config import override
from .experiment import ARMS, BUDGETS, DEFAULT_DATA, REPO, pretrain_config
from .trainer import Trainer

CON_ARMS = {"proj": ["loss.con_space=proj"], "bank": ["loss.con_space=bank"],
            "alpha0": ["loss.alpha=0"]}
SEMI_ARMS = {
    "cosine0.8-nowarmup (paper)": ["semi.confidence=cosine", "semi.threshold=0.8",
                                   "semi.warmup_steps=0"],
    "softmax0.8-warmup": ["semi.confidence=softmax", "semi.threshold=0.8"],
    "margin0.1-warmup": ["semi.confidence=margin", "semi.threshold=0.1"],
}


def _config(data: Path, steps: int, out: Path, extra: list[str], semi: bool) -> dict:
    budget = dict(BUDGETS["full"], pretrain=dict(BUDGETS["full"]["pretrain"], steps=steps))
    _, arm, sets = ARMS["mdp"]
    cfg = pretrain_config(data, sets, arm, budget, 0, out)
    for item in extra:
        cfg = override(cfg, item)
    cfg["train"].update(resume="auto", progress=False, save_every=10 ** 9)
    if semi:
        cfg["train"]["log_every"] = 1
        cfg["data"]["unlabelled"] = [{"type": "folder", "root": str(data),
                                      "subsets": ["0001TP"], "name": "U", "hidden": "A"}]
    else:
        cfg["train"].update(probe_every=max(1, steps // 4))
    return cfg


def _median_best_cos(feats: dict, protos: torch.Tensor, valid: torch.Tensor) -> float:
    best = [torch.einsum("dhw,kd->khw", f, protos[valid]).max(0).values.flatten()
            for rows in feats.values() for f, _ in rows]
    return float(torch.cat(best).median())


def key_bn(tr: Trainer) -> dict:
    """Eval-mode probe of the key encoder against the bank: its own BN statistics vs the
    query's copied in (what the key encoder had before issue 16)."""
    protos, valid = tr.criterion.bank.prototypes()
    own = tr.probe_set.score(tr.probe_set.features(tr.key.model, "proj"), protos, valid)
    copied = copy.deepcopy(tr.key.model)
    for bk, bq in zip(copied.buffers(), tr.model.buffers()):
        bk.copy_(bq)
    cop = tr.probe_set.score(tr.probe_set.features(copied, "proj"), protos, valid)
    names = tr.space.dataset_names
    return {names[d]: {"own": own[d]["acc"], "copied": cop[d]["acc"],
                       "chance": own[d]["chance"]} for d in own}


def _train(cfg: dict) -> tuple[Trainer, list[dict], float]:
    """Train (or restore a finished run) and return it with its logged records."""
    out = Path(cfg["train"]["out"])
    if not (out / "checkpoint.pt").is_file() and (out / "metrics.jsonl").is_file():
        (out / "metrics.jsonl").unlink()  # an interrupted run restarts from scratch
    tr = Trainer(cfg)
    if tr.step < tr.total:
        tr.fit()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "event" not in r]
    return tr, recs, max(r.get("time", 0) for r in recs)


def run_con(data: Path, steps: int, root: Path) -> dict:
    res = {}
    for arm, extra in CON_ARMS.items():
        tr, hist, secs = _train(_config(data, steps, root / f"con-{arm}", extra, semi=False))
        probes = [(h["step"], h["probe"]) for h in hist if "probe" in h]
        protos, valid = tr.criterion.bank.prototypes()
        r = {"probes": probes, "seconds": secs,
             "median_best_cos_proj": _median_best_cos(
                 tr.probe_set.features(tr.model, "proj"), protos, valid),
             "last": {k: hist[-1].get(k) for k in ("class", "con", "proto_cos",
                                                   "proto_cos_centred", "mean_f")}}
        if tr.con_bank is not None:
            r["median_best_cos_con"] = _median_best_cos(
                tr.probe_set.features(tr.model, "con"), *tr.con_bank.prototypes())
        if arm == "proj":
            r["key_bn"] = key_bn(tr)
        res[arm] = r
        print(arm, json.dumps(r["probes"][-1]), flush=True)
    return res


def run_semi(data: Path, steps: int, root: Path) -> dict:
    res = {}
    for arm, extra in SEMI_ARMS.items():
        tr, hist, secs = _train(_config(data, steps, root / f"semi-{arm.split()[0]}", extra,
                                        semi=True))
        ps = [(h["step"], h["pseudo"]) for h in hist if "pseudo" in h]
        res[arm] = {"warmup": tr.warmup, "seconds": secs, "pseudo": ps}
        print(arm, json.dumps(ps[-1]), flush=True)
    return res


def _f(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def report(res: dict, args) -> str:
    cmd = (f"nice -n 10 python -m mdp_train.checks --steps {args.steps} "
           f"--semi-steps {args.semi_steps}")
    md = ["# Issue 16: short CamVid checks of the method's wiring", "",
          f"Reproduce: `{cmd}` (runs in `out/issue16`, about "
          f"{sum(r['seconds'] for part in res.values() for r in part.values()) / 60:.0f} min "
          f"on {os.cpu_count()} shared CPU cores). Model: the experiment's small budget "
          f"(ResNet-18 width 32 DeepLab-v3+, 64 decoder channels, 64-d embeddings, batch 16, "
          f"96 px crops, seed 0), A = 0016E5 (11 classes), B = 0006R0 (7 coarse classes); "
          f"defaults otherwise (mixing: every view-1 sample mixed, as an extra view).", ""]
    if "con" in res:
        c = res["con"]
        md += [f"## Consistency space ({args.steps} steps)", "",
               "Held-out nearest-prototype balanced pixel accuracy (10% of each labelled set, "
               "never trained on; eval mode). support: query proj features vs class means of "
               "its own features on 16 training images per set; bank: query proj vs the "
               "bank's prototypes; key: key encoder vs the bank; con: query con head vs the "
               "con bank. Init = step 0.", "",
               "| arm | set | support init | support end | bank end | key end | con end | "
               "chance |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for arm, r in c.items():
            first, last = r["probes"][0][1], r["probes"][-1][1]
            for ds, row in last.items():
                md.append(f"| {arm} | {ds} | {_f(first[ds]['support'])} | "
                          f"{_f(row['support'])} | {_f(row.get('bank'))} | "
                          f"{_f(row.get('key'))} | {_f(row.get('con'))} | "
                          f"{_f(row['chance'])} |")
        md += ["", "| arm | median best cosine, proj vs bank | median best cosine, con vs "
               "con bank | class loss | con loss | raw proto cos | centred proto cos | "
               "\\|mean f\\| |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for arm, r in c.items():
            la = r["last"]
            md.append(f"| {arm} | {_f(r['median_best_cos_proj'])} | "
                      f"{_f(r.get('median_best_cos_con'))} | {_f(la['class'])} | "
                      f"{_f(la.get('con'))} | {_f(la['proto_cos'])} | "
                      f"{_f(la['proto_cos_centred'])} | {_f(la['mean_f'])} |")
        kb = c["proj"]["key_bn"]
        md += ["", "Key encoder BN (proj run, eval mode, vs the bank): "
               + "; ".join(f"{ds}: own statistics {_f(v['own'])}, query's copied "
                           f"{_f(v['copied'])} (chance {_f(v['chance'])})"
                           for ds, v in kb.items()) + ".", ""]
    if "semi" in res:
        md += [f"## Pseudo-labels ({args.semi_steps} steps, A+B+U, U = 0001TP read as "
               f"unlabelled, its labels hidden)", "",
               "coverage: kept share of U's pixels; acc: kept pseudo-labels equal to the "
               "hidden label (A's class); acc all: the argmax of every U pixel. Means over "
               "the steps in each window (warmup auto = bank slots).", "",
               "| setting | warmup | steps | coverage | acc (kept) | acc all | score q10 / "
               "q50 / q90 |", "| --- | ---: | --- | ---: | ---: | ---: | --- |"]
        for arm, r in res["semi"].items():
            ps = [(s, p) for s, p in r["pseudo"] if "score_q50" in p]
            n = len(ps)
            for lo, hi in ((0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n)):
                win = [p for _, p in ps[lo:hi]]
                if not win:
                    continue
                mean = {k: float(np.mean([w[k] for w in win if w.get(k) is not None]))
                        if any(w.get(k) is not None for w in win) else None
                        for k in ("coverage", "acc", "acc_all", "score_q10", "score_q50",
                                  "score_q90")}
                md.append(f"| {arm} | {r['warmup']} | {ps[lo][0]}-{ps[hi - 1][0]} | "
                          f"{_f(mean['coverage'])} | {_f(mean['acc'])} | "
                          f"{_f(mean['acc_all'])} | {_f(mean['score_q10'], '.2f')} / "
                          f"{_f(mean['score_q50'], '.2f')} / {_f(mean['score_q90'], '.2f')} |")
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mdp_train.checks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MDP_CAMVID", str(DEFAULT_DATA)))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--semi-steps", type=int, default=200)
    ap.add_argument("--parts", nargs="*", default=["con", "semi"], choices=["con", "semi"])
    ap.add_argument("--out", default=str(REPO / "out" / "issue16"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    data, root = Path(args.data), Path(args.out)
    res_json = Path(args.results) / "issue16-checks.json"
    new = {}
    if "con" in args.parts:
        new["con"] = run_con(data, args.steps, root)
    if "semi" in args.parts:
        new["semi"] = run_semi(data, args.semi_steps, root)
    # read back just before writing: another process may have written the other part
    res = json.loads(res_json.read_text()) if res_json.is_file() else {}
    res.update(new)
    res_json.write_text(json.dumps(res, indent=1) + "\n")
    md = report(res, args)
    (Path(args.results) / "issue16-checks.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
