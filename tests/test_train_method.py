"""mdp_train wiring of the method: which encoder, which head and which labels reach which
term (consistency space, mixing views, bank), key encoder BN, pseudo-labels, probes, the
RNG restore path, config errors, and the demo learning."""
import importlib.util
import json
import sys
import types

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import mdp_kernels as mk
import train_fixtures as fx
from mdp_train import demo
from mdp_train import trainer as T
from mdp_train.model import MDPNet, MomentumEncoder
from mdp_train.trainer import Trainer, _down


def _spy(monkeypatch, tr):
    """Record the inputs and outputs of the query and key encoders, the class criterion and
    the consistency loss."""
    rec = {}

    def wrap(name, fn):
        def call(*a, **k):
            out = fn(*a, **k)
            rec.setdefault(name, []).append((a, k, out))
            return out
        return call

    tr.model.forward = wrap("query", tr.model.forward)
    tr.key.forward = wrap("key", tr.key.forward)
    tr.criterion.forward = wrap("criterion", tr.criterion.forward)
    monkeypatch.setattr(mk, "prototype_consistency_loss",
                        wrap("con", mk.prototype_consistency_loss))
    return rec


def _one_step(tmp_path, monkeypatch, *extra):
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "run", *extra))
    rec = _spy(monkeypatch, tr)
    batch = next(iter(tr.loader()))
    m = tr.train_step(batch)
    return tr, rec, batch, m


@pytest.mark.parametrize("space", ["proj", "bank"])
def test_consistency_space_wiring(tmp_path, monkeypatch, space):
    tr, rec, batch, m = _one_step(tmp_path, monkeypatch, f"loss.con_space={space}")
    b = batch["view1"].shape[0]
    assert set(tr.model.heads) == ({"proj"} if space == "proj" else {"proj", "con"})
    (kin,), _, kout = rec["key"][0]
    assert torch.equal(kin, torch.cat([batch["view1"], batch["view2"], batch["teacher"]]))
    (qin,), _, qout = rec["query"][0]
    assert torch.equal(qin[b:2 * b], batch["view2"])
    (student, teacher, protos), kw, _ = rec["con"][0]
    head = "proj" if space == "proj" else "con"
    assert torch.equal(student, qout[head][b:2 * b])  # query, view 2
    assert torch.equal(teacher, kout[head][2 * b:])  # key, colour-only copy of view 2
    _, ckw, _ = rec["criterion"][0]
    if space == "proj":
        want, valid = tr.criterion.bank.prototypes()
    else:
        # a bank of the key's con features of views 1 and 2, with the class bank's labels
        ref = mk.PrototypeBank(tr.space.num_classes, 16, tr.con_bank.num_slots, ignore_index=-1)
        ref.update(kout["con"][:2 * b], ckw["key_labels"])
        want, valid = ref.prototypes()
        assert int(tr.con_bank.num_updates) == 1
        assert torch.allclose(tr.con_bank.prototypes()[0], want, atol=1e-6)
    assert torch.allclose(protos, want, atol=1e-6) and torch.equal(kw["class_mask"], valid)
    assert m["con"] > 0


def test_alpha_zero_has_no_consistency_nor_teacher(tmp_path, monkeypatch):
    tr, rec, batch, m = _one_step(tmp_path, monkeypatch, "loss.alpha=0")
    b = batch["view1"].shape[0]
    assert set(tr.model.heads) == {"proj"} and "con" not in rec and "con" not in m
    assert rec["key"][0][0][0].shape[0] == 2 * b


@pytest.mark.parametrize("replace", [False, True])
def test_mixed_view_and_bank_labels(tmp_path, monkeypatch, replace):
    tr, rec, batch, m = _one_step(tmp_path, monkeypatch, "mix.prob=1", "mix.cutmix=1",
                                  "mix.mixup=0", f"mix.replace_view={replace}")
    b = batch["view1"].shape[0]
    (qin,), _, qout = rec["query"][0]
    kout = rec["key"][0][2]
    (feats, labels, key_feats), ckw, _ = rec["criterion"][0]
    size = tuple(feats.shape[2:])
    unmixed = _down(torch.cat([batch["label1"], batch["label2"]]), size)
    assert m["mixed"] == 1.0
    assert torch.equal(qin[b:2 * b], batch["view2"])
    if replace:  # view 1 is replaced by its mixed version
        assert qin.shape[0] == 2 * b and not torch.equal(qin[:b], batch["view1"])
    else:  # view 1 still contributes, unmixed, and the mixed view comes on top
        assert qin.shape[0] == 3 * b and torch.equal(qin[:b], batch["view1"])
        assert torch.equal(labels[:2 * b], unmixed)
    assert torch.equal(feats, qout["proj"]) and labels.shape[0] == qin.shape[0]
    # the bank gets the key encoder's unmixed views 1 and 2 with their own labels
    assert torch.equal(key_feats, kout["proj"][:2 * b])
    assert torch.equal(ckw["key_labels"], unmixed)


def test_key_encoder_keeps_its_own_bn_statistics(tmp_path, monkeypatch):
    q = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    k = MomentumEncoder(q, 0.5)
    with torch.no_grad():
        q[1].running_mean.fill_(3.0)
    k.update(q)
    assert torch.equal(k.model[1].running_mean, torch.zeros(4))
    tr, *_ = _one_step(tmp_path, monkeypatch)
    kb = tr.key.model.net.backbone.bn1.running_mean
    qb = tr.model.net.backbone.bn1.running_mean
    assert not torch.equal(kb, qb) and not torch.equal(kb, torch.zeros_like(kb))


def test_sync_bn_is_a_torchrun_option(tmp_path):
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "run", "model.sync_bn=true"))
    # one process: nothing to synchronise, plain BatchNorm
    assert not any(isinstance(x, torch.nn.SyncBatchNorm) for x in tr.model.modules())
    tr.fit(max_steps=1)


def test_sync_bn_converts_query_and_key(tmp_path, monkeypatch):
    net = MDPNet("resnet18", 16, 8, 16, 16)
    n_bn = sum(isinstance(x, _BatchNorm) for x in net.modules())
    assert T.sync_batchnorm(net, 1, torch.device("cpu")) is net  # one process: unchanged
    with pytest.raises(ValueError, match="model.sync_bn needs CUDA"):
        T.sync_batchnorm(net, 2, torch.device("cpu"))
    # the conversion runs on CPU modules; the cuda device only passes the check
    sync = T.sync_batchnorm(net, 2, torch.device("cuda"))
    kinds = [type(x) for x in sync.modules() if isinstance(x, _BatchNorm)]
    assert len(kinds) == n_bn > 0 and set(kinds) == {torch.nn.SyncBatchNorm}

    def two_ranks(self, device):  # rank 0 of 2 CPU ranks, without a process group
        self.world, self.rank, self._owns_group = 2, 0, False
        self.device = torch.device("cpu")

    monkeypatch.setattr(Trainer, "_init_dist", two_ranks)
    monkeypatch.setattr(T, "DistributedDataParallel", lambda model, device_ids: model)
    with pytest.raises(ValueError, match="model.sync_bn needs CUDA"):
        Trainer(fx.tiny_config(tmp_path, tmp_path / "a", "model.sync_bn=true"))
    real = T.sync_batchnorm
    monkeypatch.setattr(T, "sync_batchnorm",
                        lambda model, world, device: real(model, world, torch.device("cuda")))
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "b", "model.sync_bn=true"))
    for enc in (tr.model, tr.key.model):  # the key encoder is copied after the conversion
        kinds = {type(x) for x in enc.modules() if isinstance(x, _BatchNorm)}
        assert kinds == {torch.nn.SyncBatchNorm}


def test_resume_restores_rng_when_loaded_for_another_device(tmp_path, monkeypatch):
    extra = ("train.steps=3", "train.save_every=1")
    a = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "a", *extra))
    a.fit(max_steps=1)
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "a", *extra, "train.resume=null"))
    # A trainer on another device (meta stands in for cuda): the checkpoint must still be
    # read to the CPU, where torch.set_rng_state needs its ByteTensor.
    b.device = torch.device("meta")
    torch.manual_seed(1234)
    b._maybe_resume("auto")
    assert b.step == 1 and torch.equal(torch.get_rng_state(), ck["rng"]["torch"])
    for k, v in ck["model"].items():
        assert torch.equal(b.model.state_dict()[k], v), k
    # A state dict whose RNG state was loaded to another device: load_state_dict must hand
    # torch.set_rng_state a CPU ByteTensor. Meta stands in for cuda; it holds no data, so
    # its copy out yields the saved bytes.
    saved = ck["rng"]["torch"]
    ck["rng"]["torch"] = saved.to("meta")
    to = torch.Tensor.to
    c = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "c", *extra))
    torch.manual_seed(4321)
    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "to",
                   lambda self, *a, **k: to(saved, *a, **k) if self.is_meta else to(self, *a, **k))
        c.load_state_dict(ck)
    assert c.step == 1 and torch.equal(torch.get_rng_state(), saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda(tmp_path):
    extra = ("train.steps=3", "train.save_every=1", "train.device=cuda")
    a = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "a", *extra))
    assert a.device.type == "cuda"
    a.fit(max_steps=1)
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    torch.manual_seed(1234)
    torch.cuda.manual_seed_all(1234)
    b = Trainer(fx.tiny_config(tmp_path / "d", tmp_path / "a", *extra))  # resume: auto
    assert b.step == 1 and torch.equal(torch.get_rng_state(), ck["rng"]["torch"])
    cuda = torch.cuda.get_rng_state_all()
    assert len(cuda) == len(ck["rng"]["cuda"])
    assert all(torch.equal(x, y) for x, y in zip(cuda, ck["rng"]["cuda"]))
    for k, v in ck["model"].items():
        assert torch.equal(b.model.state_dict()[k].cpu(), v), k
    b.fit()
    assert b.step == 3


def test_confidence_scores():
    f = torch.nn.functional.normalize(torch.randn(2, 8, 3, 3), dim=1)
    p = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    valid = torch.tensor([True, True, False, True, True])
    sims = torch.einsum("bdhw,cd->bchw", f, p)[:, valid]
    ids = valid.nonzero().flatten()
    lbl, score = T.confidence(f, p, valid, "cosine", 0.1, "reference")
    assert torch.allclose(score, sims.max(1).values, atol=1e-6)
    assert torch.equal(lbl, ids[sims.argmax(1)])
    lbl, score = T.confidence(f, p, valid, "softmax", 0.1)
    assert torch.allclose(score, torch.softmax(sims / 0.1, 1).max(1).values, atol=1e-6)
    assert torch.equal(lbl, ids[sims.argmax(1)])
    lbl, score = T.confidence(f, p, valid, "margin", 0.1)
    top = sims.topk(2, 1).values
    assert torch.allclose(score, top[:, 0] - top[:, 1], atol=1e-6)
    one = torch.zeros(5, dtype=torch.bool)
    one[3] = True
    lbl, score = T.confidence(f, p, one, "margin", 0.1)
    assert (lbl == 3).all() and torch.allclose(score, 1 + sims[:, 2], atol=1e-6)


def _hidden_config(tmp_path, *extra):
    """A labelled folder A (seqA) + the folder's seqB read as unlabelled, labels hidden."""
    root = fx.write_folder(tmp_path, n=4)
    cfg = fx.tiny_config(tmp_path, tmp_path / "run", *extra)
    cfg["data"]["datasets"] = [{"type": "folder", "root": str(root), "subsets": ["seqA"],
                                "name": "A"}]
    cfg["data"]["unlabelled"] = [{"type": "folder", "root": str(root), "subsets": ["seqB"],
                                  "name": "U", "hidden": "A"}]
    return cfg


def test_pseudo_labels_warmup_and_hidden_accuracy(tmp_path, monkeypatch):
    tr = Trainer(_hidden_config(tmp_path, "semi.warmup_steps=2", "semi.threshold=0.5",
                                "train.steps=3"))
    assert tr.space.num_classes == 3  # the hidden set adds no classes
    forced = {}

    def fake(feats, protos, valid, kind, tau, backend="auto"):
        forced.setdefault("feats", []).append(feats)
        shape = (feats.shape[0],) + tuple(feats.shape[2:])
        lbl = torch.full(shape, 1, dtype=torch.int64)  # every pixel "road"
        score = torch.linspace(0, 1, lbl.numel()).view(shape)  # half kept at 0.5
        forced.setdefault("keep", []).append(score >= 0.5)
        return lbl, score

    monkeypatch.setattr(T, "confidence", fake)
    rec = _spy(monkeypatch, tr)
    loader = iter(tr.loader())
    for step in range(3):
        batch = next(loader)
        while bool(batch["labelled"].all()):  # want unlabelled images in the batch
            batch = next(loader)
        m = tr.train_step(batch)
        unl = ~batch["labelled"]
        (_, labels, _), ckw, _ = rec["criterion"][-1]
        b = batch["view1"].shape[0]
        lu = torch.cat([labels[:b][unl], labels[b:2 * b][unl]])
        # what the bank is fed for the unlabelled images of views 1 and 2
        kl = ckw["key_labels"]
        ku = torch.cat([kl[:b][unl], kl[b:2 * b][unl]])
        if step < 2:  # warm-up: no pseudo-labels, and the hidden labels never reach the loss
            assert m["pseudo"] == {"coverage": 0.0} and (lu == -1).all()
            assert (ku == -1).all() and "feats" not in forced  # nothing enters the bank
            continue
        # pseudo-labels from the key encoder's proj features of views 1 and 2
        kout = rec["key"][-1][2]
        assert len(forced["feats"]) == 2
        for v, f in enumerate(forced["feats"]):
            assert torch.equal(f, kout["proj"][v * b:(v + 1) * b][unl])
        # the same pseudo-labels reach the loss and the bank
        assert torch.equal(ku, lu) and set(ku.unique().tolist()) == {-1, 1}
        keep = torch.cat([k.flatten() for k in forced["keep"]])
        assert m["pseudo"]["coverage"] == pytest.approx(float(keep.float().mean()))
        assert set(lu.unique().tolist()) <= {-1, 1}
        size = tuple(labels.shape[1:])
        hid = torch.cat([_down(batch[f"hidden{v}"][unl], size).flatten() for v in (1, 2)])
        has = hid != -1
        assert m["pseudo"]["acc_all"] == pytest.approx(float((hid[has] == 1).float().mean()))
        assert m["pseudo"]["acc"] == pytest.approx(
            float((hid[has & keep] == 1).float().mean()))
        for q in ("score_q10", "score_q50", "score_q90"):
            assert 0 <= m["pseudo"][q] <= 1


def test_warmup_auto_is_the_bank_size(tmp_path):
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "run", "loss.bank_images=8",
                                unlabelled=True))
    assert tr.warmup == tr.criterion.bank.num_slots == 2


def test_proto_stats_centres_a_shared_offset():
    k, d = 5, 16
    eye = torch.eye(d)
    # K prototypes = a large shared offset + small orthogonal parts, and an invalid row
    protos = torch.nn.functional.normalize(torch.cat([10 * eye[0] + 0.1 * eye[1:k + 1],
                                                      -eye[:1]]), dim=1)
    valid = torch.tensor([True] * k + [False])
    st = T.proto_stats(protos, valid)
    assert st["proto_cos"] == pytest.approx(1.0, abs=1e-3)  # looks collapsed
    assert st["proto_cos_centred"] == pytest.approx(-1 / (k - 1), abs=1e-5)  # a simplex
    one = torch.zeros(k + 1, dtype=torch.bool)
    one[2] = True
    assert T.proto_stats(protos, one) == {}


def test_probe_holds_out_and_metrics_are_logged(tmp_path):
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "run", "train.probe_every=2",
                                "train.probe_fraction=0.34", "train.steps=4",
                                "loss.con_space=bank"))
    held = {d: [i for i in range(len(x)) if (d, i) not in set(tr.data.index)]
            for d, x in enumerate(tr.labelled)}
    assert all(len(v) == 2 for v in held.values())  # round(0.34 * 6)
    assert len(tr.data) == 8
    tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in recs if "probe" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]
    assert set(probes[0]["probe"]["voc"]) == {"support", "chance"}  # empty bank at step 0
    end = probes[-1]["probe"]
    for ds in ("voc", "ade20k"):
        assert set(end[ds]) == {"support", "bank", "key", "con", "chance"}
        assert all(0 <= v <= 1 for v in end[ds].values())
    last = recs[-2]
    for k in ("valid_classes", "filled_slots", "proto_cos", "proto_cos_centred", "mean_f",
              "class", "con"):
        assert k in last, k
    assert last["filled_slots"] == min(4, tr.criterion.bank.num_slots)


def test_probe_balanced_accuracy_and_chance():
    from mdp_train.probe import Probe
    p = Probe([], type("S", (), {"offsets": [0, 3], "sizes": [3, 2], "num_classes": 5})(),
              {}, {}, 8)
    protos = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    valid = torch.tensor([True, True, False, True, True])
    # dataset 0: pixels exactly at prototypes 0 and 1, plus one ignored pixel
    f = torch.stack([protos[0], protos[1], protos[1], protos[3]], 1).view(4, 1, 4)
    y = torch.tensor([[0, 1, 0, -1]])
    res = p.score({0: [(f, y)]}, protos, valid)
    # class 0: 1 of 2 right, class 1: 1 of 1 -> balanced 0.75; candidates {0, 1}
    assert res[0] == {"acc": 0.75, "chance": 0.5}


def test_method_config_errors(tmp_path):
    for bad, match in (("loss.con_space=con", "con_space"), ("semi.confidence=prob", "confidence"),
                       ("semi.warmup_steps=-1", "warmup"), ("mix.prob=2", "mix.prob"),
                       ("train.probe_every=0.5", "probe_every"),
                       ("train.probe_every=1 loss.kind=ce", "no embedding")):
        with pytest.raises(ValueError, match=match):
            Trainer(fx.tiny_config(tmp_path, tmp_path / "r", *bad.split()))
    with pytest.raises(ValueError, match="probe_fraction"):
        Trainer(fx.tiny_config(tmp_path, tmp_path / "r", "train.probe_every=1",
                               "train.probe_fraction=1.5"))
    cfg = _hidden_config(tmp_path)
    del cfg["data"]["unlabelled"][0]["hidden"]
    with pytest.raises(ValueError, match="hidden"):
        Trainer(cfg)
    cfg["data"]["unlabelled"][0]["hidden"] = "B"
    with pytest.raises(ValueError, match="not a labelled dataset"):
        Trainer(cfg)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(tmp_path):
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "r", "train.tensorboard=true"))
    with pytest.raises(ImportError, match="tensorboard"):
        tr.fit(max_steps=1)


def test_tensorboard_writes_the_logged_records(tmp_path, monkeypatch):
    calls = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, logdir):
            calls.append(("logdir", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            calls.append(("flush",))

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "run", "train.tensorboard=true",
                                "train.probe_every=1", "train.steps=2"))
    tr.fit()
    assert calls[0] == ("logdir", str(tmp_path / "run" / "tb")) and calls[-1] == ("flush",)
    scalars = {(c[0], c[2]): c[1] for c in calls[1:-1]}
    assert len(scalars) == len(calls) - 2  # one value per tag and step
    recs = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                      .read_text().splitlines()) if "event" not in r}
    assert sorted(recs) == [0, 1, 2]
    for tag, step in [("loss", 1), ("loss", 2), ("lr", 2), ("filled_slots", 1),
                      ("filled_slots", 2), ("proto_cos_centred", 2), ("mixed", 1),
                      ("probe/voc/support", 0), ("probe/ade20k/support", 0),
                      ("probe/voc/support", 2), ("probe/voc/bank", 2),
                      ("probe/ade20k/key", 2)]:
        assert (tag, step) in scalars, (tag, step)
    assert ("probe/voc/bank", 0) not in scalars  # the bank is empty at step 0
    for (tag, step), value in scalars.items():  # each scalar is the logged record's field
        assert tag != "step"
        field = recs[step]
        for part in tag.split("/"):
            field = field[part]
        assert value == field, (tag, step)


def test_demo_sizes_steps_to_the_budget(tmp_path, monkeypatch):
    cfg = demo.demo_config(tmp_path / "data", tmp_path / "run", n=8)
    clock = {"now": 0.0, "steps": 0}

    def step(self, batch):  # the first (warm-up, untimed) step is slow, then 0.5 s a step
        clock["steps"] += 1
        clock["now"] += 100.0 if clock["steps"] == 1 else 0.5
        return {}

    monkeypatch.setattr(demo.Trainer, "train_step", step)
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    assert demo.size_steps(cfg, 10.0) == int(10 * 0.85 / 0.5) == 17
    assert clock["steps"] == 5
    clock["steps"] = 0
    assert demo.size_steps(cfg, 10.0, probe_share=0.5) == 10
    clock["steps"] = 0
    assert demo.size_steps(cfg, 1.0) == 8  # the floor


def test_demo_learns_on_both_datasets(tmp_path, capsys):
    res = demo.main(out=str(tmp_path / "demo"), n=32, steps=30)
    assert res["step"] == res["total"] == 30  # the cosine schedule ran to its end
    for ds in ("voc", "ade20k"):
        row = res["table"][ds]
        assert row["end"] > row["init"] + 0.1 and row["end"] > row["chance"] + 0.15, (ds, row)
    assert 0 <= res["alignment"] <= 1
    assert (tmp_path / "demo" / "prototypes.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| voc |" in out and "cross-dataset alignment" in out and "prototypes.png" in out


def test_dataset_aware_masks(tmp_path, monkeypatch):
    """loss.dataset_aware: each image's softmax over its dataset's classes (class and
    consistency terms); a mixed image over the union of both images' datasets."""
    tr, rec, batch, m = _one_step(tmp_path, monkeypatch, "loss.dataset_aware=true",
                                  "mix.prob=1", "mix.cutmix=1", "mix.mixup=0")
    own = tr.dataset_masks[batch["dataset"]]
    assert (own.sum(1) == torch.tensor([tr.space.sizes[d] for d in batch["dataset"]])).all()
    _, ckw, _ = rec["criterion"][0]
    b = own.shape[0]
    cm = ckw["class_mask"]
    assert cm.shape == (3 * b, tr.space.num_classes)
    assert torch.equal(cm[:b], own) and torch.equal(cm[b:2 * b], own)
    # the partner is from the other dataset: the union is both taxonomies
    assert cm[2 * b:].all()
    _, kw, _ = rec["con"][0]
    assert torch.equal(kw["class_mask"], own & tr.criterion.bank.prototypes()[1])
    assert m["loss"] > 0
