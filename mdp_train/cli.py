"""``mdp-train`` / ``python -m mdp_train``: ``pretrain --config X.yaml [key=value ...]`` and
``demo``."""
from __future__ import annotations

import argparse

from . import config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mdp-train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="MDP pretraining (also under torchrun)")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=64")
    d = sub.add_parser("demo", help="pretrain on generated VOC/ADE-layout data (~2 min, CPU)")
    d.add_argument("--seconds", type=float, default=120.0)
    d.add_argument("--out", help="run folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from .demo import main as demo
        demo(args.seconds, args.out)
        return
    from .trainer import Trainer
    trainer = Trainer(config.load(args.config, args.overrides))
    if trainer.rank == 0:
        print(f"{len(trainer.data)} images, {trainer.space.num_classes} classes "
              f"({', '.join(f'{n}@{o}' for n, o in zip(trainer.space.dataset_names, trainer.space.offsets))}), "
              f"{trainer.world} rank(s), step {trainer.step}/{trainer.total}, lr {trainer.lr:g}")
    trainer.fit()
    if trainer.rank == 0:
        print(trainer.summary())
