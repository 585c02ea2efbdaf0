"""The round-2 CamVid driver (mdp_train.camvid2): statistics on hand-made numbers, the report
(PARTIAL / complete, verdicts), the frame-half split of drive 0016E5 and a tiny end-to-end
run of two arms on the real data (skipped where there is no CamVid copy)."""
import json
import math
import re
from pathlib import Path

import pytest

from mdp_train import camvid2 as C
from mdp_train import datasets as D
from mdp_train.experiment import FRAMES, dataset_specs

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"  # beside the repo
needs_camvid = pytest.mark.skipif(not (CAMVID / "classes.txt").is_file(),
                                  reason="no CamVid copy at ../shared/data/camvid")


# ------------------------------------------------------------------------- statistics
def test_paired_difference_and_interval():
    a = {0: 31.0, 1: 33.0, 2: 35.0}
    p = C.paired(a, {0: 30.0, 1: 31.0, 2: 32.0})  # differences 1, 2, 3
    assert p["n"] == 3 and p["mean"] == pytest.approx(2.0) and p["std"] == pytest.approx(1.0)
    half = 4.303 / math.sqrt(3)  # t_{0.975}(2 dof) * sd / sqrt(n)
    assert (p["lo"], p["hi"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert p["resolved"] is False and C.verdict(p) == "unresolved"
    assert C.fmt_diff(p) == "+2.00 [-0.48, +4.48]"
    tight = C.paired({0: 32.0, 1: 32.1, 2: 31.9}, {0: 30.0, 1: 30.0, 2: 30.0})  # 2, 2.1, 1.9
    assert tight["resolved"] is True and C.verdict(tight) == "holds"
    assert tight["hi"] - tight["lo"] == pytest.approx(2 * 4.303 * 0.1 / math.sqrt(3))
    rev = C.paired({0: 30.0, 1: 30.0, 2: 30.0}, {0: 32.0, 1: 32.1, 2: 31.9})
    assert rev["resolved"] and rev["hi"] < 0 and C.verdict(rev) == "does not hold"
    # paired by seed: only the seeds both arms have (here 0 and 2, so 1 dof)
    two = C.paired(a, {0: 30.0, 2: 30.0})
    assert two["n"] == 2 and two["seeds"] == [0, 2] and two["mean"] == pytest.approx(3.0)
    assert two["hi"] - two["lo"] == pytest.approx(2 * 12.706 * math.sqrt(8) / math.sqrt(2))
    one = C.paired({0: 31.0}, {0: 30.0, 1: 29.0})
    assert one["n"] == 1 and one["resolved"] is None and math.isnan(one["lo"])
    assert C.fmt_diff(one) == "+1.00 [n/a]" and C.verdict(one).startswith("unresolved")
    none = C.paired({1: 1.0}, {0: 1.0})
    assert none["n"] == 0 and C.verdict(none) == "no data" and C.fmt_diff(none) == "-"
    mu, sd = C.mean_std([1.0, 2.0, 4.0])
    assert mu == pytest.approx(7 / 3) and sd == pytest.approx(1.5275252)
    assert math.isnan(C.mean_std([5.0])[1])
    with pytest.raises(ValueError):
        C.t975(0)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (*range(1, 40), 60, 200, 10_000):
        assert C.t975(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=2e-3), dof


# ---------------------------------------------------------------------------- report
BUDGET = {"model": {"arch": "resnet18", "width": 8, "channels": 16, "dim": 16},
          "pretrain": {"steps": 3, "batch": 8, "crop": 64},
          "finetune": {"steps": 4, "batch": 4, "crop": [64, 96], "lr": 0.02},
          "seeds": 3, "pretrain_seeds": 3}
# mIoU % by arm (seeds 0, 1, 2): MDP A+B clearly above MDP A, CE clearly above MDP A+B,
# mixing within noise.
MIOU = {"scratch": (25.0, 26.0, 27.0), "mdp": (30.0, 31.0, 32.0), "mdp_a": (28.0, 29.1, 29.9),
        "ce": (33.0, 34.1, 34.9), "mdp_nomix": (31.0, 29.0, 33.5)}


def _write_units(folder: Path, budget=BUDGET, skip=()):
    for arm in C.ARMS:
        for seed in range(budget["seeds"]):
            if (arm, seed) in skip:
                continue
            v = MIOU.get(arm, (20.0, 21.0, 22.0))[seed] / 100
            protos = {p: {"miou": v - (0.05 if p == "probe" else 0), "acc": 0.5,
                          "iou": [0.0] + [v] * 9 + [None], "train_seconds": 1.0}
                      for p in C.protocols(arm)}
            unit = {"arm": arm, "seed": seed, "protocols": protos, "budget": budget,
                    "classes": [f"c{i}" for i in range(11)], "pretrain_seconds": 2.0,
                    "seconds": 4.0, "git": {"commit": "abcdef0123456789", "dirty": False}}
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{arm}-seed{seed}.json").write_text(C.dump(unit))


def _claim(md: str, question: str, proto: str = "backbone") -> str:
    rows = [ln for ln in md.splitlines() if ln.startswith(f"| {question} |")
            and f"| {proto} |" in ln]
    assert len(rows) == 1, (question, rows)
    return rows[0]


def test_report_complete_then_partial(tmp_path):
    units = tmp_path / "camvid2"
    _write_units(units)
    md = C.report(units, BUDGET, "test", tmp_path / "r.md", tmp_path / "r.png", "FINISH-CMD")
    assert "complete: 33 units" in md and "PARTIAL" not in md and "FINISH-CMD" not in md
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r.md").read_text() == md + "\n"
    # MDP A+B - MDP A = 2.0, 1.9, 2.1: resolved; CE above MDP A+B: the claim does not hold
    row = _claim(md, "multi-dataset > single-dataset")
    assert "| 3 | +2.00 [+1.75, +2.25] | holds |" in row
    assert _claim(md, "prototype > concatenated-label CE").endswith("| does not hold |")
    assert _claim(md, "mixing adds").endswith("| unresolved |")
    assert _claim(md, "multi-dataset > single-dataset", "probe").endswith("| holds |")
    assert "| MDP, A only | 3 | 29.00 +- 0.95 | 28.00, 29.10, 29.90 | -2.00 [-2.25, -1.75] | yes |" in md
    reading = md.split("## Reading")[1].split("##")[0]
    assert "multi-dataset > single-dataset (MDP A+B - MDP A; paper): backbone: holds" in reading
    assert "{" not in reading and "TODO" not in reading
    lim = md.split("## What limits this reproduction")[1].split("##")[0]
    assert "3 seeds give a 95% t-interval of +- 2.48 x the std" in lim
    # c0 is 0 in every unit; c10 is absent from the test set (None), which is not a 0 IoU
    assert "1 of the 11 classes (c0) get 0 IoU in every unit" in lim and "{" not in lim
    # one unit missing: PARTIAL in the title, the unit listed, the command to finish
    (units / "mdp_a-seed2.json").unlink()
    md = C.report(units, BUDGET, "test", tmp_path / "r.md", tmp_path / "r.png", "FINISH-CMD")
    assert md.splitlines()[0] == "# CamVid round 2 (test), PARTIAL: 32 of 33 units"
    assert "Missing (arm, seed) units (1): mdp_a seed 2." in md and "`FINISH-CMD`" in md
    # seeds 0 and 1 only: 2.0 and 1.9, 1 dof: 1.95 +- 12.706 * 0.0707 / sqrt(2)
    assert "| 2 | +1.95 [+1.31, +2.59] | holds |" in _claim(md, "multi-dataset > single-dataset")
    # a unit of another budget is refused, naming its file
    other = json.loads((units / "mdp-seed0.json").read_text())
    other["budget"] = dict(BUDGET, seeds=1)
    (units / "mdp-seed0.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="mdp-seed0.json"):
        C.report(units, BUDGET, "test", tmp_path / "r.md", tmp_path / "r.png", "x")


@pytest.mark.parametrize("mdp, aware, says", [
    ((30.0, 31.0, 32.0), (33.0, 34.1, 34.9), "there is no deficit for label conflict"),
    ((27.0, 28.0, 29.1), (31.0, 32.0, 33.0), "label conflict in the shared softmax held"),
    ((27.0, 28.0, 29.1), (25.0, 26.0, 27.0), "the conflict is ruled out as the cause"),
    ((27.0, 28.0, 29.1), (29.5, 27.0, 30.5), "bound the dataset-aware softmax's gain over the "
                                             "shared one at +5.41 points"),
])
def test_ordering_says_what_the_dataset_aware_arm_rules_out(mdp, aware, says):
    mdp_a = (28.0, 29.1, 29.9)
    units = {(arm, k): {"protocols": {"backbone": {"miou": v[k] / 100}}}
             for arm, v in (("mdp", mdp), ("mdp_a", mdp_a), ("mdp_aware", aware)) for k in range(3)}
    assert says in C.ordering(units)
    one = {k: u for k, u in units.items() if k[1] == 0}
    assert C.ordering(one).endswith("nothing is ruled out yet.")
    assert C.ordering({}).endswith("no data yet.")


@pytest.mark.parametrize("proj, bank, says", [
    ((30.0, 31.0, 32.0), (27.0, 28.0, 29.1), "as that explanation predicts"),
    ((27.0, 28.0, 29.1), (26.0, 27.0, 28.0), "the wrong space was not what kept"),
    ((27.0, 28.0, 29.1), (29.5, 27.0, 30.5), "fixing the space does not make B help"),
])
def test_space_fix_says_whether_the_right_space_lifts_a_plus_b(proj, bank, says):
    mdp_a = (28.0, 29.1, 29.9)
    units = {(arm, k): {"protocols": {"backbone": {"miou": v[k] / 100}}}
             for arm, v in (("mdp", proj), ("mdp_a", mdp_a), (C.OTHER_ARM, bank))
             for k in range(3)}
    assert says in C.space_fix(units)
    assert C.space_fix({k: u for k, u in units.items() if k[1] == 0}).endswith("yet.")


def test_report_with_no_units_and_the_estimate(tmp_path):
    md = C.report(tmp_path / "none", BUDGET, "t", tmp_path / "r.md", tmp_path / "r.png", "go")
    assert "PARTIAL: 0 of 33 units" in md and "`go`" in md
    assert "multi-dataset > single-dataset (MDP A+B - MDP A; paper): no data yet." in md
    est = C.estimate(None, C.BUDGETS2["full"], [("mdp", 2), ("scratch", 2)])
    # 10 pretrained arms; per seed 11 backbone + 4 probe + 3 all fine-tunings (scratch's
    # `all` is its backbone run)
    assert est["all_units"]["units"] == 33 and est["all_units"]["pretrain_runs"] == 30
    assert est["all_units"]["finetune_runs"] == 54
    assert est["remaining_units"]["pretrain_runs"] == 1
    assert est["remaining_units"]["finetune_runs"] == 5
    assert 3 < est["all_units"]["hours_at_round1_quiet_2core_rates"] < 4
    assert C.BUDGETS2["full"]["pretrain"]["steps"] == 600


# ---------------------------------------------------------------- data and end to end
@needs_camvid
def test_camvid_frame_halves_split_drive_0016E5():
    lab, unl = dataset_specs(CAMVID, ("A1", "B", "A2"))
    a1, b = (D.build_dataset(s) for s in lab)
    (a2,) = (D.build_dataset(s) for s in unl)
    every = sorted(p.stem for p in (CAMVID / "0016E5" / "images").iterdir())
    s1, s2 = [p[0].stem for p in a1.pairs], [p[0].stem for p in a2.pairs]
    assert s1 + s2 == every and len(every) == FRAMES["A"]  # disjoint halves in time order
    assert len(b.pairs) == FRAMES["B"]
    assert (len(s1), len(s2)) == (152, 153) and max(s1) < min(s2)
    assert a1.labelled and not a2.labelled and all(lbl is None for _, lbl in a2.pairs)
    assert b.name == "B" and not set(s1 + s2) & {p[0].stem for p in b.pairs}


@pytest.fixture
def one_thread():
    """One torch thread: a niced test on a 2-core machine shared with another job does not
    oversubscribe the cores (while such a job ran, this test took 64 s with 2 threads)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@needs_camvid
def test_end_to_end_two_arms_resume_and_skip(tmp_path, monkeypatch, one_thread):
    import mdp_train.experiment as E
    import mdp_train.finetune as F
    log = tmp_path / "labels-read.txt"
    real = D.read_label

    def recording(path):  # a file, so DataLoader worker processes record too
        with open(log, "a") as f:
            f.write(f"{path}\n")
        return real(path)
    monkeypatch.setattr(D, "read_label", recording)
    res, out = tmp_path / "res", tmp_path / "out"
    args = ["--quick", "--data", str(CAMVID), "--results", str(res), "--out", str(out),
            "--arms", "scratch", "mdp_semi"]
    C.main(args)
    units = res / "camvid2-quick"
    assert sorted(p.name for p in units.iterdir()) == ["mdp_semi-seed0.json",
                                                       "scratch-seed0.json"]
    scr = json.loads((units / "scratch-seed0.json").read_text())
    semi = json.loads((units / "mdp_semi-seed0.json").read_text())
    assert set(scr["protocols"]) == {"backbone", "probe", "all"}
    assert scr["protocols"]["all"]["same_run_as"] == "backbone"
    assert scr["protocols"]["probe"]["frozen_backbone"] and scr["overrides"] is None
    assert set(semi["protocols"]) == {"backbone"} and semi["datasets"] == ["A1", "B", "A2"]
    assert semi["pretrain_seconds"] > 0 and semi["overrides"] == []
    for u in (scr, semi):
        for r in u["protocols"].values():
            assert 0 <= r["miou"] <= 1 and len(r["iou"]) == 11 and r["test_images"] == 62
        assert u["budget"] == json.loads(json.dumps(C.BUDGETS2["quick"]))
        assert len(u["git"]["commit"]) == 40 and u["seed"] == 0
    md = (res / "camvid2-quick.md").read_text()
    assert "PARTIAL: 2 of 11 units" in md.splitlines()[0] and "mdp seed 0" in md
    assert f"`nice -n 10 python -m mdp_train.camvid2 --quick --results {res} --out {out}`" in md
    assert (res / "camvid2-quick.png").stat().st_size > 0
    # A2 (the second half of 0016E5) is never read for labels; A1's labels are
    read = set(log.read_text().split())
    halves = sorted((CAMVID / "0016E5" / "labels").iterdir())
    assert not read & {str(p) for p in halves[152:]}
    assert read & {str(p) for p in halves[:152]}
    assert (out / "mdp_semi" / "pretrain-seed0" / "done.json").is_file()

    # Everything done: nothing pretrains or fine-tunes again, the JSONs stay as they were.
    def boom(*a, **k):
        raise AssertionError("retrained a finished unit")
    monkeypatch.setattr(F, "finetune", boom)
    monkeypatch.setattr(E, "pretrain", boom)
    monkeypatch.setattr(C, "pretrain", boom)
    before = {p.name: p.read_text() for p in units.iterdir()}
    C.main(args)
    assert {p.name: p.read_text() for p in units.iterdir()} == before
    # A unit interrupted after its fine-tunings, before its JSON: rebuilt from out/ (still
    # without fine-tuning anything).
    (units / "scratch-seed0.json").unlink()
    C.main(args)
    again = json.loads((units / "scratch-seed0.json").read_text())
    assert again["protocols"]["probe"]["miou"] == scr["protocols"]["probe"]["miou"]
    assert again["protocols"]["probe"]["wall_seconds"] is None  # taken from out/
    (res / "camvid2-quick.md").unlink()
    C.main(args + ["--report-only"])
    assert "PARTIAL: 2 of 11 units" in (res / "camvid2-quick.md").read_text()


@needs_camvid
def test_interrupted_pretraining_resumes_from_its_checkpoint(tmp_path, monkeypatch, one_thread):
    import mdp_train.experiment as E
    from mdp_train.trainer import Trainer
    budget = C.BUDGETS2["quick"]
    pre = tmp_path / "mdp_a" / "pretrain-seed0"
    _, extra, sets = C.ARMS["mdp_a"]
    cfg = E.pretrain_config(CAMVID, sets, extra, budget, 0, pre)
    cfg["train"]["progress"] = False
    Trainer(cfg).fit(max_steps=1)  # interrupted after step 1 (checkpointed: save_every 1)
    assert (pre / "checkpoint.pt").is_file() and not (pre / "done.json").exists()
    starts = []
    fit = Trainer.fit

    def recording(self, *a, **k):
        starts.append(self.step)
        return fit(self, *a, **k)
    monkeypatch.setattr(Trainer, "fit", recording)
    ckpt, _ = E.pretrain(CAMVID, sets, extra, budget, 0, pre)
    assert starts == [1] and ckpt == pre / "checkpoint.pt" and (pre / "done.json").is_file()
    E.pretrain(CAMVID, sets, extra, budget, 0, pre)  # finished: not even resumed
    assert starts == [1]


# ------------------------------------------------------------------------------ README
NUMBER = re.compile(r"[+-]?\d+\.\d\d(?: \+- \d+\.\d\d| \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\])")


def test_readme_round2_summary_quotes_the_committed_report():
    """Every mean +- std and every paired interval in the README's round-2 summary is in
    camvid2.md, and the summary is labelled partial exactly when the report is."""
    root = Path(__file__).resolve().parents[1]
    report = (root / "benchmarks" / "results" / "camvid2.md").read_text()
    readme = (root / "README.md").read_text()
    summary = " ".join(readme.split("Round 2 results (")[1].split("\n\n")[0].split())
    quoted = NUMBER.findall(summary)
    assert len(quoted) >= 10, summary
    assert [q for q in quoted if q not in report] == []
    assert ("PARTIAL" in summary) == ("PARTIAL" in report.splitlines()[0])
