"""Smoke tests of fine-tuning, evaluation, backbone export, visualisation and the CamVid
experiment driver on generated data."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdp_train import cli
from mdp_train.finetune import (FinetuneConfig, export_backbone, finetune, load_segnet,
                                read_checkpoint)
from mdp_train.model import ResNet
from mdp_train.trainer import Trainer

from train_fixtures import tiny_config, write_folder

# torchvision resnet18 (no fc): 120 tensors; a few of their shapes.
TV_RESNET18 = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,),
               "bn1.num_batches_tracked": (), "layer1.0.conv1.weight": (64, 64, 3, 3),
               "layer2.0.conv1.weight": (128, 64, 3, 3),
               "layer2.0.downsample.0.weight": (128, 64, 1, 1),
               "layer2.0.downsample.1.running_mean": (128,),
               "layer3.1.conv2.weight": (256, 256, 3, 3),
               "layer4.0.downsample.0.weight": (512, 256, 1, 1), "layer4.1.bn2.bias": (512,)}


def _opts(root: Path, out: Path, **kw) -> dict:
    o = {"data": str(root), "subsets": ["seqA"], "prefix": None, "eval_subsets": ["seqB"],
         "eval_prefix": None, "init": None, "scope": "all", "freeze_backbone": False,
         "arch": "resnet18", "output_stride": 16, "width": 8, "channels": 16, "steps": 3,
         "batch_size": 2, "lr": 0.01, "crop": [24, 32], "scale": [0.8, 1.2],
         "eval_scale": 1.0, "seed": 0, "out": str(out), "progress": False}
    o.update(kw)
    return o


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    tr = Trainer(tiny_config(tmp / "data", tmp / "run", "train.steps=2"))
    tr.fit()
    return tmp / "run" / "checkpoint.pt"


def test_finetune_scratch_eval_cli(tmp_path):
    root = write_folder(tmp_path)
    res = finetune(_opts(root, tmp_path / "ft"))
    assert res["steps"] == 3 and 0 <= res["miou"] <= 1 and res["images"] == 4
    assert len(res["iou"]) == 3 and (tmp_path / "ft" / "eval.md").is_file()
    out = tmp_path / "ev.json"
    cli.main(["eval", str(tmp_path / "ft" / "model.pt"), "--data", str(root), "--subsets",
              "seqB", "--scale", "1", "--json", str(out)])
    ev = json.loads(out.read_text())
    assert ev["miou"] == pytest.approx(res["miou"])  # same model, same split, same scale


def test_prefix_split(tmp_path):
    root = write_folder(tmp_path, n=4)
    res = finetune(_opts(root, tmp_path / "ft", subsets=["seqA", "seqB"], prefix="seqA",
                         eval_subsets=None, eval_prefix="seqB_00", steps=1))
    assert res["images"] == 4
    with pytest.raises(ValueError, match="starts with"):
        finetune(_opts(root, tmp_path / "x", prefix="nope"))


def test_from_pretrain_frozen_backbone(tmp_path, pretrained):
    root = write_folder(tmp_path)
    res = finetune(_opts(root, tmp_path / "ft", init=str(pretrained), freeze_backbone=True,
                         width=99))  # the architecture comes from the checkpoint
    assert res["arch"]["width"] == 8 and res["frozen_backbone"]
    pre = read_checkpoint(pretrained)["state"]
    model, names, _ = load_segnet(tmp_path / "ft" / "model.pt")
    assert names == ["sky", "road", "car"]
    for k, v in model.net.backbone.state_dict().items():  # weights and BN statistics fixed
        assert torch.equal(v, pre["net.backbone." + k]), k
    head = model.net.aspp.project[0].weight
    assert not torch.equal(head, pre["net.aspp.project.0.weight"])  # the rest trains


def test_export_from_pretrain_loads_strict(tmp_path, pretrained):
    sd = export_backbone(pretrained, tmp_path / "bb.pth")
    ref = ResNet("resnet18", width=8).state_dict()
    assert set(sd) == set(ref)
    assert all(sd[k].shape == ref[k].shape for k in ref)
    assert not any(k.startswith(("module.", "backbone.", "net.", "fc.")) for k in sd)
    net = ResNet("resnet18", width=8)
    net.load_state_dict(torch.load(tmp_path / "bb.pth", weights_only=True), strict=True)
    pre = read_checkpoint(pretrained)["state"]
    assert torch.equal(net.layer3[1].conv2.weight, pre["net.backbone.layer3.1.conv2.weight"])
    # the export is also a fine-tuning initialisation (backbone only)
    root = write_folder(tmp_path)
    res = finetune(_opts(root, tmp_path / "ft", init=str(tmp_path / "bb.pth"), steps=1,
                         freeze_backbone=True))
    assert res["init"].startswith("backbone from backbone")
    model, _, _ = load_segnet(tmp_path / "ft" / "model.pt")
    assert torch.equal(model.net.backbone.conv1.weight, sd["conv1.weight"])


def test_export_torchvision_resnet18_layout(tmp_path):
    root = write_folder(tmp_path, n=2)
    finetune(_opts(root, tmp_path / "ft", width=64, steps=1, eval_subsets=None))
    cli.main(["export", str(tmp_path / "ft" / "model.pt"), str(tmp_path / "r18.pth")])
    sd = torch.load(tmp_path / "r18.pth", weights_only=True)
    assert len(sd) == 120 and set(sd) == set(ResNet("resnet18").state_dict())
    for k, shape in TV_RESNET18.items():
        assert tuple(sd[k].shape) == shape, k
    assert "layer1.0.downsample.0.weight" not in sd  # basic blocks keep width in layer1
    with pytest.raises(ValueError, match="neither"):
        bad = tmp_path / "bad.pt"
        torch.save({"a": 1}, bad)
        read_checkpoint(bad)


def test_visualize_pngs(tmp_path, pretrained):
    root = write_folder(tmp_path)
    finetune(_opts(root, tmp_path / "ft", steps=1, eval_subsets=None))
    for ck, want in ((tmp_path / "ft" / "model.pt", {"tsne.png", "overlays.png"}),
                     (pretrained, {"tsne.png"})):
        out = tmp_path / f"viz-{ck.stem}"
        cli.main(["visualize", str(ck), "--data", str(root), "--subsets", "seqB", "--scale", "1",
                  "--out", str(out), "--points", "60", "--iters", "60", "--images", "2"])
        assert {p.name for p in out.iterdir()} == want
        for p in out.iterdir():
            with Image.open(p) as im:
                assert im.format == "PNG" and min(im.size) > 100


def _fake_camvid(root: Path) -> Path:
    """CamVid layout with its 11 classes: 0016E5, 0006R0, 0001TP (train_/test_ frames)."""
    rng = np.random.default_rng(0)
    names = ("sky building pole road pavement tree sign_symbol fence car pedestrian "
             "bicyclist").split()
    cv = root / "camvid"
    cv.mkdir(parents=True)
    (cv / "classes.txt").write_text("\n".join(names) + "\n")
    frames = {"0016E5": ["0016E5_f0", "0016E5_f1", "0016E5_f2", "0016E5_f3"],
              "0006R0": ["0006R0_f0", "0006R0_f1", "0006R0_f2", "0006R0_f3"],
              "0001TP": ["train_0", "train_1", "test_0", "test_1"]}
    for seq, fs in frames.items():
        for f in fs:
            for sub in ("images", "labels"):
                (cv / seq / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(
                cv / seq / "images" / f"{f}.jpg")
            lbl = rng.choice([*range(11), 255], (36, 48)).astype(np.uint8)
            Image.fromarray(lbl).save(cv / seq / "labels" / f"{f}.png")
    return cv


def test_experiment_driver_quick_and_resume(tmp_path, capsys):
    from mdp_train import experiment
    cv = _fake_camvid(tmp_path)
    args = ["--quick", "--data", str(cv), "--out", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--arms", "scratch", "mdp_semi", "ce"]
    experiment.main(args)
    md = (tmp_path / "res" / "camvid-quick.md").read_text()
    assert "SMOKE RUN" in md and "MDP semi-supervised" in md and "concatenated-label CE" in md
    assert (tmp_path / "res" / "camvid-quick.png").stat().st_size > 0
    assert not (tmp_path / "res" / "camvid.md").exists()
    first = json.loads((tmp_path / "runs" / "ce" / "seed0" / "finetune" /
                        "result.json").read_text())
    assert first["pretrain_seconds"] > 0
    model = tmp_path / "runs" / "ce" / "seed0" / "finetune" / "model.pt"
    stamp = model.stat().st_mtime_ns
    capsys.readouterr()
    experiment.main(args)  # everything done: nothing retrains, same numbers
    assert model.stat().st_mtime_ns == stamp
    assert f"{100 * first['miou']:.2f}" in capsys.readouterr().out


def test_experiment_pretrain_steps_override(tmp_path):
    from mdp_train import experiment
    cv = _fake_camvid(tmp_path)
    experiment.main(["--quick", "--data", str(cv), "--out", str(tmp_path / "runs"), "--results",
                     str(tmp_path / "res"), "--arms", "mdp", "--pretrain-steps", "2"])
    md = (tmp_path / "res" / "camvid-quick-pre2.md").read_text()
    assert "Pretraining: 2 steps x batch" in md
    log = (tmp_path / "runs" / "mdp" / "pretrain-seed0" / "metrics.jsonl").read_text()
    assert max(json.loads(l)["step"] for l in log.splitlines()) == 2
    assert not (tmp_path / "res" / "camvid-quick.md").exists()


def test_initialise_scopes(pretrained):
    from mdp_train.finetune import SegNet, initialise
    pre = read_checkpoint(pretrained)["state"]
    for scope, aspp_loaded in (("all", True), ("backbone", False)):
        torch.manual_seed(0)
        model = SegNet(3, "resnet18", 16, 8, 16)
        initialise(model, pretrained, scope)
        assert torch.equal(model.net.backbone.layer4[0].conv1.weight,
                           pre["net.backbone.layer4.0.conv1.weight"])
        same = torch.equal(model.net.aspp.project[0].weight, pre["net.aspp.project.0.weight"])
        assert same == aspp_loaded, scope
    with pytest.raises(ValueError, match="scope"):
        initialise(SegNet(3, "resnet18", 16, 8, 16), pretrained, "decoder")


def test_finetune_cli(tmp_path, capsys):
    root = write_folder(tmp_path)
    out = tmp_path / "ft"
    cli.main(["finetune", "--data", str(root), "--subsets", "seqA", "--eval-subsets", "seqB",
              "--width", "8", "--channels", "16", "--steps", "2", "--batch-size", "2",
              "--crop", "24", "32", "--train-scale", "0.9", "1.1", "--eval-scale", "1",
              "--lr", "0.05", "--seed", "3", "--freeze-backbone", "--out", str(out),
              "--no-progress"])
    res = json.loads((out / "result.json").read_text())
    assert res["steps"] == 2 and res["frozen_backbone"] and res["images"] == 4
    assert f"mIoU {100 * res['miou']:.2f}" in capsys.readouterr().out
    opts = read_checkpoint(out / "model.pt")["cfg"]
    assert opts["crop"] == [24, 32] and opts["scale"] == [0.9, 1.1] and opts["seed"] == 3


def test_config_from_dict_and_sgd_options(tmp_path, monkeypatch):
    """Unknown options are refused by name; data and out are required; the SGD momentum and
    weight decay given on the command line reach the optimiser."""
    with pytest.raises(KeyError, match="unknown fine-tuning options \\['stpes'\\]"):
        FinetuneConfig.from_dict({"data": "d", "out": "o", "stpes": 3})
    with pytest.raises(ValueError, match="needs data and out"):
        FinetuneConfig.from_dict({"data": "d"})
    assert FinetuneConfig.from_dict({"data": "d", "out": "o"}).momentum == 0.9
    seen = []
    sgd = torch.optim.SGD

    def spy(params, **kw):
        seen.append(kw)
        return sgd(params, **kw)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    root = write_folder(tmp_path)
    cli.main(["finetune", "--data", str(root), "--subsets", "seqA", "--width", "8",
              "--channels", "16", "--steps", "1", "--batch-size", "2", "--crop", "24", "32",
              "--momentum", "0.5", "--weight-decay", "0.001", "--out", str(tmp_path / "ft"),
              "--no-progress"])
    assert seen and seen[0]["momentum"] == 0.5 and seen[0]["weight_decay"] == 0.001
