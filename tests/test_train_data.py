"""mdp_train data: readers in each real layout, bad input, LabelSpace, views, CutMix/Mixup."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_fixtures as fx
from mdp_train import transforms as T
from mdp_train.datasets import (ADE20K, COCOStuff, Cityscapes, DataError, Folder, ImageFolder,
                                VOC, read_label)
from mdp_train.labels import LabelSpace

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"  # beside the repo


def _raw(path):
    return torch.from_numpy(np.asarray(Image.open(path)).astype(np.int64))


@pytest.mark.parametrize("aug", [False, True])
def test_voc(tmp_path, aug):
    ds = VOC(fx.write_voc(tmp_path, aug=aug), aug=aug)
    assert len(ds) == 6 and len(ds.classes) == 21 and ds.classes[15] == "person"
    img, lbl = ds.load(2)
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 48) and lbl.shape == (40, 48)
    assert torch.equal(lbl, _raw(ds.pairs[2][1]))  # palette indices, not colours
    assert set(lbl.unique().tolist()) <= {0, 1, 15, 20, 255}


def test_ade20k_shifts_and_ignores_zero(tmp_path):
    ds = ADE20K(fx.write_ade(tmp_path))
    assert len(ds.classes) == 150
    for i in range(len(ds)):
        raw, (_, lbl) = _raw(ds.pairs[i][1]), ds.load(i)
        assert torch.equal(lbl[raw == 0], torch.full_like(lbl[raw == 0], 255))
        assert torch.equal(lbl[raw > 0], raw[raw > 0] - 1)
    vals = torch.cat([ds.load(i)[1].flatten() for i in range(len(ds))]).unique().tolist()
    assert set(vals) <= {0, 1, 149, 255} and 149 in vals


def test_cityscapes_and_coco_stuff(tmp_path):
    cs = Cityscapes(fx.write_cityscapes(tmp_path))
    assert len(cs) == 3 and len(cs.classes) == 19
    img, lbl = cs.load(1)
    assert img.shape == (3, 32, 64) and torch.equal(lbl, _raw(cs.pairs[1][1]))
    img_path, lbl_path = cs.pairs[2]  # sorted: aachen_0, aachen_2, bremen_1
    assert img_path.parent.name == lbl_path.parent.name == "bremen"
    assert lbl_path.name == "bremen_000001_000019_gtFine_labelTrainIds.png"
    cc = COCOStuff(fx.write_coco_stuff(tmp_path))
    assert len(cc) == 3 and len(cc.classes) == 171
    assert set(cc.load(0)[1].unique().tolist()) <= {0, 79, 170, 255}


def test_folder_and_unlabelled(tmp_path):
    root = fx.write_folder(tmp_path)
    ds = Folder(root)
    assert ds.classes == ["sky", "road", "car"] and len(ds) == 8 and ds.name == "folder"
    assert len(Folder(root, subsets=["seqB"])) == 4
    assert set(ds.load(5)[1].unique().tolist()) <= {0, 1, 2, 255}
    u = ImageFolder(fx.write_images(tmp_path))
    img, lbl = u.load(0)
    assert len(u) == 4 and lbl is None and img.shape == (3, 40, 40) and not u.labelled


def test_frames_select_sorted_subsets(tmp_path, monkeypatch):
    from mdp_train import datasets as D
    root = fx.write_folder(tmp_path, n=5, subsets=("seqA",))  # 5 frames: halves 2 + 3
    spec = {"type": "folder", "root": str(root), "subsets": ["seqA"]}
    every = [p[0].name for p in D.build_dataset(spec).pairs]
    assert every == sorted(every) and len(every) == 5
    first = D.build_dataset(dict(spec, frames="first_half"))
    second = D.build_dataset(dict(spec, frames="second_half"))
    names = [[p[0].name for p in ds.pairs] for ds in (first, second)]
    assert names == [every[:2], every[2:]]  # disjoint, in order, together all frames
    assert [p[0].name for p in D.build_dataset(dict(spec, frames=[1, 4])).pairs] == every[1:4]
    # the second half read as plain images: no label is ever opened
    unl = D.build_dataset({"type": "images", "root": str(root / "seqA" / "images"),
                           "frames": "second_half"})
    assert [p[0].name for p in unl.pairs] == every[2:] and not unl.labelled

    def no_labels(path):
        raise AssertionError(f"label read: {path}")
    monkeypatch.setattr(D, "read_label", no_labels)
    assert all(unl.load(i)[1] is None for i in range(len(unl)))
    for bad, msg in (("middle", "must be one of"), ([3, 3], "start < stop"),
                     ([0, 6], "the reader has 5 images"), ([-1, 2], "0 <= start"),
                     ([0.0, 2], "two ints"), ([True, 2], "two ints"), (3, "two ints")):
        with pytest.raises(DataError, match=msg):
            D.build_dataset(dict(spec, frames=bad))


@pytest.mark.skipif(not CAMVID.is_dir(), reason="no CamVid copy here")
def test_camvid_folder_and_coarse_remap():
    ds = Folder(CAMVID, subsets=["0001TP"])
    assert len(ds.classes) == 11 and len(ds) == 124
    img, lbl = ds.load(0)
    assert img.shape == (3, 180, 240) and lbl.shape == (180, 240)
    space = LabelSpace([ds], [Path(__file__).parents[1] / "configs" / "camvid_coarse.txt"])
    assert space.num_classes == 7
    g = space.to_global(0, lbl)
    names = [space.names[v] if v >= 0 else "ignore" for v in g.flatten().tolist()]
    fine = [ds.classes[v] if v != 255 else "ignore" for v in lbl.flatten().tolist()]
    pairs = set(zip(fine, names))
    assert ("pavement", "camvid/flat") in pairs or ("road", "camvid/flat") in pairs
    assert all(n == "ignore" for f, n in pairs if f == "ignore")
    assert ("car", "camvid/vehicle") in pairs or "car" not in fine


def test_bad_input_names_the_file(tmp_path):
    voc = fx.write_voc(tmp_path)
    (voc / "SegmentationClass" / "2008_000003.png").unlink()
    with pytest.raises(DataError, match="2008_000003.png"):
        VOC(voc)
    ade = fx.write_ade(tmp_path)
    bad = ade / "annotations" / "training" / "ADE_train_00000002.png"
    Image.fromarray(np.full((36, 44), 151, np.uint8)).save(bad)  # class 150 does not exist
    ds = ADE20K(ade)
    with pytest.raises(DataError, match="ADE_train_00000002.png"):
        ds.load(2)
    jpg = ade / "images" / "training" / "ADE_train_00000001.jpg"
    jpg.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="ADE_train_00000001.jpg"):
        ds.load(1)
    folder = fx.write_folder(tmp_path, subsets=("s",))
    Image.fromarray(np.full((32, 40), 3, np.uint8)).save(folder / "s" / "labels" / "s_001.png")
    with pytest.raises(DataError, match="s_001.png"):
        Folder(folder).load(1)
    rgb = folder / "s" / "labels" / "s_002.png"
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match="s_002.png"):
        read_label(rgb)


def test_label_space_offsets_and_ignore(tmp_path):
    voc, ade = VOC(fx.write_voc(tmp_path)), ADE20K(fx.write_ade(tmp_path))
    folder, unl = Folder(fx.write_folder(tmp_path)), ImageFolder(fx.write_images(tmp_path))
    space = LabelSpace([voc, ade, unl, folder])
    assert space.offsets == [0, 21, 171, 171] and space.num_classes == 174
    assert space.names[21] == "ade20k/wall" and space.names[173] == "folder/car"
    local = torch.tensor([[0, 2, 255], [2, 1, 0]])
    assert space.to_global(3, local).tolist() == [[171, 173, -1], [173, 172, 171]]
    assert space.to_global(0, local).tolist() == [[0, 2, -1], [2, 1, 0]]
    g = space.to_global(3, torch.tensor([[0, 2, 255]]))
    assert g.tolist() == [[171, 173, -1]]
    assert space.to_global(1, torch.tensor([149, 0, 255])).tolist() == [170, 21, -1]
    assert space.to_global(2, None, (2, 3)).eq(-1).all()
    assert [space.dataset_of(c) for c in (0, 20, 21, 170, 171, 173)] == [0, 0, 1, 1, 3, 3]
    with pytest.raises(ValueError, match="folder"):
        space.to_global(3, torch.tensor([3]))


def test_remap_file_errors(tmp_path):
    folder = Folder(fx.write_folder(tmp_path))
    good = tmp_path / "r.txt"
    good.write_text("sky: up  # comment\n1: down\ncar: ignore\n")
    space = LabelSpace([folder], [good])
    assert space.names == ["folder/up", "folder/down"]
    assert space.to_global(0, torch.tensor([0, 1, 2, 255])).tolist() == [0, 1, -1, -1]
    bad = tmp_path / "bad.txt"
    bad.write_text("sky: up\n")
    with pytest.raises(DataError, match="bad.txt.*road"):
        LabelSpace([folder], [bad])
    bad.write_text("sky: up\nroad: x\ncar: x\nbus: y\n")
    with pytest.raises(DataError, match="bad.txt:4"):
        LabelSpace([folder], [bad])


def test_views_keep_image_and_mask_aligned():
    """Colour encodes the label; after crop + resize + flip every pixel away from a label
    edge still has its label's colour."""
    g = torch.Generator().manual_seed(0)
    pal = torch.rand(6, 3, generator=g)
    for trial in range(20):
        h, w = 48 + trial, 64 - trial
        lbl = torch.randint(0, 6, (h // 8 + 1, w // 8 + 1), generator=g)
        lbl = lbl.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
        img = pal[lbl].permute(2, 0, 1)
        im, lb = T.geometric(img, lbl, 32, g)
        nearest = ((im.permute(1, 2, 0)[..., None, :] - pal).norm(dim=-1)).argmin(-1)
        inner = torch.ones_like(lb, dtype=torch.bool)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            inner &= lb == lb.roll((dy, dx), (0, 1))
        inner[0], inner[-1], inner[:, 0], inner[:, -1] = False, False, False, False
        agree = (nearest == lb)[inner].float().mean()
        assert agree > 0.97, (trial, float(agree))


def test_make_views_teacher_is_colour_only_copy():
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    lbl = torch.arange(40 * 50).view(40, 50) % 7
    v = T.make_views(img, lbl, 24, g)
    assert v["view1"].shape == v["teacher"].shape == (3, 24, 24) and v["label2"].shape == (24, 24)
    # Same crop as view2: with the colour removed (undo normalisation, per-image rank
    # correlation of brightness) the teacher matches view2 far better than view1.
    def gray(x):
        return (x * T.STD + T.MEAN).mean(0).flatten()
    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm() + 1e-8))
    hits = 0
    for s in range(10):
        v = T.make_views(img, lbl, 24, torch.Generator().manual_seed(s))
        hits += corr(gray(v["teacher"]), gray(v["view2"])) > corr(gray(v["teacher"]), gray(v["view1"]))
    assert hits >= 8


def test_hsv_round_trip():
    x = torch.rand(3, 9, 11)
    assert torch.allclose(T.hsv_to_rgb(T.rgb_to_hsv(x)), x, atol=1e-5)


def test_cutmix_box_area_matches_lam():
    g = torch.Generator().manual_seed(0)
    h, w = 224, 160
    fits = 0
    for _ in range(300):
        lam = float(torch.rand((), generator=g))
        y0, y1, x0, x1 = T.cutmix_box(lam, h, w, g)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        rh, rw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        assert (y1 - y0, x1 - x0) == (min(rh, h - y0), min(rw, w - x0))  # start, size, clip
        if y1 - y0 == rh and x1 - x0 == rw:  # unclipped: area fraction is 1 - lam
            fits += 1
            assert abs((y1 - y0) * (x1 - x0) / (h * w) - (1 - lam)) < 2 * (h + w) / (h * w) + 1e-9
    assert fits > 20


def test_mix_batch_cross_dataset():
    g = torch.Generator().manual_seed(1)
    b, h, w = 8, 16, 16
    imgs = torch.randn(b, 3, h, w)
    labels = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone()
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    part = T.partners(groups, torch.Generator().manual_seed(5))
    assert (groups[part] != groups).all()
    out, la, lb, lam, mixed, _ = T.mix_batch(imgs, labels, groups, g, cutmix=0.0, mixup=1.0)
    assert mixed.all() and ((lam > 0) & (lam < 1)).all() and torch.equal(la, labels)
    j = lb[:, 0, 0]
    assert (groups[j] != groups).all()
    assert torch.allclose(out, lam.view(-1, 1, 1, 1) * imgs + (1 - lam.view(-1, 1, 1, 1)) * imgs[j])
    out, la, lb, lam, _, _ = T.mix_batch(imgs, labels, groups, g, cutmix=1.0, mixup=0.0)
    assert (lam == 1).all() and torch.equal(la, lb)
    for i in range(b):
        pasted = la[i] != i
        if pasted.any():
            j = int(la[i][pasted][0])
            assert groups[j] != groups[i]
            assert torch.equal(out[i][:, pasted], imgs[j][:, pasted])
        assert torch.equal(out[i][:, ~pasted], imgs[i][:, ~pasted])
    for kw in ({"cutmix": 0.0, "mixup": 0.0}, {"prob": 0.0}):
        same = T.mix_batch(imgs, labels, groups, g, **kw)
        assert torch.equal(same[0], imgs) and (same[3] == 1).all() and not same[4].any()
    with pytest.raises(ValueError, match="prob"):
        T.mix_batch(imgs, labels, groups, g, prob=1.5)


def test_mix_prob_and_ratio():
    """mix.prob is the share of mixed samples, cutmix : mixup the ratio of the methods."""
    g = torch.Generator().manual_seed(2)
    b = 400
    imgs, groups = torch.randn(b, 3, 8, 8), torch.arange(b) % 2
    labels = torch.arange(b).view(b, 1, 1).expand(b, 8, 8).clone()
    _, _, lb, lam, mixed, _ = T.mix_batch(imgs, labels, groups, g, prob=0.3, cutmix=1, mixup=3)
    assert abs(float(mixed.float().mean()) - 0.3) < 0.08
    blended = lam < 1
    assert not (blended & ~mixed).any()
    assert abs(float(blended.sum()) / float(mixed.sum()) - 0.75) < 0.12
    assert torch.equal(lb[~mixed], labels[~mixed])


def test_mean_cutmix_area_is_not_one_minus_lam():
    """The rebuttal's box (uniform start over the image, clipped): the mean pasted area is
    11/60 without pixel rounding (the large-image limit), not 0.5; the exact discrete mean
    matches sampled boxes."""
    assert abs(T.mean_box_area(2048, 2048) - 11 / 60) < 3e-4
    assert round(T.mean_box_area(96, 96), 3) == 0.186
    g = torch.Generator().manual_seed(3)
    for h, w in ((64, 64), (24, 40)):
        areas = []
        for _ in range(4000):
            y0, y1, x0, x1 = T.cutmix_box(float(torch.rand((), generator=g)), h, w, g)
            areas.append((y1 - y0) * (x1 - x0) / (h * w))
        # 4000 samples of an area with std < 0.25: standard error < 0.004
        assert abs(sum(areas) / len(areas) - T.mean_box_area(h, w)) < 0.012, (h, w)
