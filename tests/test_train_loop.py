"""mdp_train model and loop: torchvision names, one step lowers the loss, exact resume,
2-process gloo torchrun, CLI/config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mdp_kernels as mk
import train_fixtures as fx
from mdp_train import config
from mdp_train.model import DeepLabV3Plus, MDPNet, MomentumEncoder, ResNet, load_torchvision
from mdp_train.trainer import Trainer, _down

ROOT = Path(__file__).resolve().parents[1]


def test_resnet_torchvision_names_and_sizes():
    r50 = ResNet("resnet50")
    names = dict(r50.named_parameters())
    # torchvision's ResNet-50 has 25,557,032 parameters, 2,049,000 of them in fc.
    assert sum(p.numel() for p in names.values()) == 25_557_032 - 2_049_000
    for k in ("conv1.weight", "bn1.bias", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.weight", "layer4.2.conv3.weight", "layer3.5.bn2.weight"):
        assert k in names
    assert "layer4.2.bn3.running_var" in r50.state_dict()
    r18 = ResNet("resnet18")
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512 - 513_000


@pytest.mark.parametrize("os_", [8, 16])
def test_deeplab_output_stride(os_):
    net = DeepLabV3Plus("resnet18", os_, width=8, channels=16).eval()
    x = torch.randn(1, 3, 64, 64)
    low, high = net.backbone(x)
    assert low.shape[2:] == (16, 16) and high.shape[2:] == (64 // os_, 64 // os_)
    assert net(x).shape == (1, 16, 16, 16)
    out = MDPNet("resnet18", os_, 8, 16, 12, ("proj", "con", "cls"), 5).eval()(x)
    assert out["proj"].shape == (1, 12, 16, 16) and out["cls"].shape == (1, 5, 16, 16)
    assert torch.allclose(out["con"].norm(dim=1), torch.ones(1, 16, 16), atol=1e-5)


def test_load_torchvision_checkpoint(tmp_path):
    src = ResNet("resnet18", width=8)
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(10, 64), torch.zeros(10)
    torch.save(sd, tmp_path / "r18.pth")
    dst = ResNet("resnet18", width=8)
    load_torchvision(dst, tmp_path / "r18.pth")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items() if k[:3] != "fc.")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        load_torchvision(dst, tmp_path / "bad.pth")


def test_momentum_encoder_ema():
    q = torch.nn.Linear(3, 2)
    k = MomentumEncoder(q, 0.75)
    before = k.model.weight.clone()
    with torch.no_grad():
        q.weight.add_(1.0)
    k.update(q)
    assert torch.allclose(k.model.weight, 0.75 * before + 0.25 * q.weight)
    assert not k.model.weight.requires_grad


def _fixed_loss(tr, batch, protos, valid):
    """Eq. 3 on the batch's two views against fixed prototypes (no bank update)."""
    with torch.no_grad():
        feats = tr.model(torch.cat([batch["view1"], batch["view2"]]))["proj"]
        lbl = _down(torch.cat([batch["label1"], batch["label2"]]), tuple(feats.shape[2:]))
        return float(mk.prototype_contrast_loss(feats, protos, lbl, class_mask=valid,
                                                ignore_index=-1))


@pytest.mark.parametrize("kind", ["mdp", "ce", "pixel"])
def test_one_step_decreases_loss_on_fixed_batch(tmp_path, kind):
    # alpha 0: the consistency term (on the proj features) is not part of the fixed loss
    cfg = fx.tiny_config(tmp_path, tmp_path / "run", f"loss.kind={kind}", "mix.prob=0",
                         "loss.alpha=0", "optim.lr=0.05", "optim.momentum=0")
    tr = Trainer(cfg)
    batch = next(iter(tr.loader()))
    if kind == "mdp":
        tr.train_step(batch)  # fills the bank
        protos, valid = tr.criterion.bank.prototypes()
        before = _fixed_loss(tr, batch, protos, valid)
        tr.train_step(batch)
        assert _fixed_loss(tr, batch, protos, valid) < before
    else:
        before = tr.train_step(batch)["loss"]
        tr.train_step(batch)
        assert tr.train_step(batch)["loss"] < before


def _state(tr):
    return ({k: v.clone() for k, v in tr.model.state_dict().items()},
            {k: v.clone() for k, v in tr.key.state_dict().items()},
            {k: v.clone() for k, v in tr.criterion.state_dict().items()})


def test_resume_after_interruption_is_exact(tmp_path):
    extra = ("train.steps=4", "train.save_every=2", "semi.threshold=-1.0", "semi.warmup_steps=1")
    full = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "a", *extra, unlabelled=True))
    hist = full.fit()
    # threshold -1: every pixel of an unlabelled image gets a pseudo-label once the bank
    # has prototypes (after step 1)
    pseudo = [m["pseudo"]["coverage"] for m in hist[1:] if "pseudo" in m]
    assert pseudo and all(p == 1.0 for p in pseudo)
    cut = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "b", *extra, unlabelled=True))
    cut.fit(max_steps=3)  # "killed" after step 3: only the step-2 checkpoint exists
    assert cut.step == 3 and torch.load(tmp_path / "b" / "checkpoint.pt",
                                        weights_only=False)["step"] == 2
    resumed = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "b", *extra, unlabelled=True))
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 4
    for a, b in zip(_state(full), _state(resumed)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert int(resumed.criterion.bank.num_updates) == 4
    assert resumed.opt.param_groups[0]["lr"] == full.opt.param_groups[0]["lr"]
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 3, 4, 4]  # step 3 redone after the resume
    assert lines[-1]["event"] == "end"


@pytest.mark.parametrize("space", ["proj", "bank"])
def test_torchrun_two_ranks_agree(tmp_path, space):
    # con_space=bank: the con bank too is fed by every rank (its state is in the digest)
    cfg = fx.tiny_config(tmp_path, tmp_path / "run", "train.steps=3", f"loss.con_space={space}")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "mdp_train", "pretrain", "--config",
           str(tmp_path / "cfg.yaml"), "train.seed=3"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    end = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["step"] == 3
    assert len(end["digests"]) == 2 and end["digests"][0] == end["digests"][1]
    assert "2 rank(s)" in r.stdout and "bank:" in r.stdout
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert int(ck["criterion"]["bank.num_updates"]) == 3
    assert (ck["con_bank"] is not None) == (space == "bank")
    if space == "bank":
        assert int(ck["con_bank"]["num_updates"]) == 3


def test_config_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {batch_size: 32}\nmix: {cutmix: 0.0}\n")
    cfg = config.load(p, ["model.arch=resnet18", "loss.tau=0.1", "data.crop_scale=[0.5,1]"])
    assert cfg["train"]["batch_size"] == 32
    assert cfg["mix"] == {"prob": 1.0, "cutmix": 0.0, "mixup": 0.5, "replace_view": False}
    assert cfg["model"]["arch"] == "resnet18" and cfg["loss"]["tau"] == 0.1
    assert cfg["data"]["crop_scale"] == [0.5, 1] and cfg["optim"]["lr"] == 0.8
    with pytest.raises(KeyError, match="loss.tua"):
        config.load(None, ["loss.tua=1"])
    with pytest.raises(ValueError, match="key=value"):
        config.load(None, ["loss.tau"])
    # typed values: the default's type (ints for floats), or the documented alternatives
    for bad, msg in (("train.steps=x", "'train.steps' takes NoneType or int"),
                     ("train.amp=1", "'train.amp' takes bool"),
                     ("data.crop_size=true", "'data.crop_size' takes int"),
                     ("loss.tau=fast", "'loss.tau' takes int or float")):
        with pytest.raises(ValueError, match=msg):
            config.load(None, [bad])
    cfg = config.load(None, ["optim.lr=1", "loss.bank_images=64", "train.resume=null"])
    assert cfg["optim"]["lr"] == 1 and cfg["loss"]["bank_images"] == 64
    with pytest.raises(ValueError, match="mixup"):
        Trainer(fx.tiny_config(tmp_path, tmp_path / "r", "loss.kind=pixel"))
