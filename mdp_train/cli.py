"""``mdp-train`` / ``python -m mdp_train``: ``pretrain --config X.yaml [key=value ...]``,
``demo``, ``finetune``, ``eval``, ``export`` and ``visualize``."""
from __future__ import annotations

import argparse
import dataclasses
import json

from . import config
from .finetune import FinetuneConfig


def _data_args(p: argparse.ArgumentParser, prefix_help: str) -> None:
    p.add_argument("--data", required=True, help="Folder-format dataset root (classes.txt, "
                   "<subset>/images, <subset>/labels), e.g. CamVid")
    p.add_argument("--subsets", nargs="*", help="sub-folders to read (default: all)")
    p.add_argument("--prefix", help=prefix_help)
    p.add_argument("--scale", type=float, default=FinetuneConfig.eval_scale,
                   help="inference resize factor")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mdp-train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="MDP pretraining (also under torchrun)")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=64")
    d = sub.add_parser("demo", help="pretrain on generated VOC/ADE-layout data (~2 min, CPU)")
    d.add_argument("--seconds", type=float, default=argparse.SUPPRESS,
                   help="time budget; the number of steps is sized to it")
    d.add_argument("--steps", type=int, help="a fixed number of steps instead")
    d.add_argument("--out", help="run folder and PNG (default: a temporary run, PNG in "
                   "out/demo)")

    f = sub.add_parser("finetune", help="DeepLab-v3+ with cross-entropy on one dataset")
    FinetuneConfig.add_arguments(f)

    e = sub.add_parser("eval", help="mIoU (MMSegmentation way) of a fine-tuned model")
    e.add_argument("checkpoint")
    _data_args(e, "evaluate on images whose name starts with this (test_)")
    e.add_argument("--json", help="also write the result here")

    x = sub.add_parser("export", help="backbone as a torchvision-named ResNet state dict")
    x.add_argument("checkpoint")
    x.add_argument("out")

    v = sub.add_parser("visualize", help="t-SNE of pixel embeddings and prediction overlays")
    v.add_argument("checkpoint")
    _data_args(v, "use images whose name starts with this")
    v.add_argument("--out", required=True, help="folder for tsne.png / overlays.png")
    # defaults: visualize()'s own (a flag not given is not passed)
    v.add_argument("--points", type=int, default=argparse.SUPPRESS, help="t-SNE points")
    v.add_argument("--images", type=int, default=argparse.SUPPRESS,
                   help="overlay rows (fine-tuned models)")
    v.add_argument("--perplexity", type=float, default=argparse.SUPPRESS)
    v.add_argument("--iters", type=int, default=argparse.SUPPRESS, help="t-SNE iterations")
    v.add_argument("--seed", type=int, default=argparse.SUPPRESS)
    return ap


def _pretrain(args) -> None:
    from .trainer import Trainer
    trainer = Trainer(config.load(args.config, args.overrides))
    if trainer.rank == 0:
        space = trainer.space
        sets = ", ".join(f"{n}@{o}" for n, o in zip(space.dataset_names, space.offsets))
        print(f"{len(trainer.data)} images, {space.num_classes} classes ({sets}), "
              f"{trainer.world} rank(s), step {trainer.step}/{trainer.total}, lr {trainer.lr:g}")
    try:
        trainer.fit()
    except BaseException:
        trainer.close(wait=False)
        raise
    trainer.close()
    if trainer.rank == 0:
        print(trainer.summary())


def _demo(args) -> None:
    from .demo import main as demo
    demo(**{k: v for k, v in vars(args).items() if k in ("seconds", "out", "steps")})


def _finetune(args) -> None:
    from .finetune import finetune
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    res = finetune(FinetuneConfig.from_dict({k: v for k, v in vars(args).items() if k in names}))
    print(f"{res['init']}; {res['steps']} steps, {res['seconds_per_step']:.2f} s/step, "
          f"loss {res['first_loss']:.3f} -> {res['last_loss']:.3f}")
    if "miou" in res:
        print(f"mIoU {100 * res['miou']:.2f} (per class: {args.out}/eval.md)")


def _eval(args) -> None:
    from .finetune import evaluate, load_segnet, preload, split_dataset
    model, names, _ = load_segnet(args.checkpoint)
    ds = split_dataset(args.data, args.subsets, args.prefix)
    if list(ds.classes) != names:
        raise SystemExit(f"the model predicts {names}, the dataset has {list(ds.classes)}")
    meter = evaluate(model, preload(ds), len(names), args.scale)
    print(f"{len(ds)} images\n{meter.table(names)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"miou": meter.miou(), "acc": meter.accuracy(),
                       "iou": dict(zip(names, meter.iou().tolist()))}, fh, indent=1)


def _export(args) -> None:
    from .finetune import export_backbone
    sd = export_backbone(args.checkpoint, args.out)
    print(f"wrote {len(sd)} tensors ({sum(v.numel() for v in sd.values()):,} values) "
          f"to {args.out}")


def _visualize(args) -> None:
    from .visualize import visualize
    given = {k: v for k, v in vars(args).items()
             if k in ("points", "images", "seed", "perplexity", "iters")}
    for path in visualize(args.checkpoint, args.data, args.out, args.subsets, args.prefix,
                          scale=args.scale, **given):
        print(f"wrote {path}")


COMMANDS = {"pretrain": _pretrain, "demo": _demo, "finetune": _finetune, "eval": _eval,
            "export": _export, "visualize": _visualize}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    COMMANDS[args.cmd](args)
