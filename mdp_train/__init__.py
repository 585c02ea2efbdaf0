"""mdp_train: multi-dataset pixel-to-prototype pretraining (MDP) on top of mdp_kernels.

Readers for Pascal VOC/SBD, ADE20K, Cityscapes, COCO-Stuff, a generic folder format and
unlabelled images; ``LabelSpace`` (concatenated taxonomies); MoCo-v2 views and cross-dataset
CutMix/Mixup; ResNet + DeepLab-v3+ with projection heads and a momentum key encoder; the
``Trainer`` loop (CLI: ``mdp-train`` / ``python -m mdp_train``).
"""
from .config import DEFAULTS, load as load_config
from .datasets import (ADE20K, COCOStuff, Cityscapes, DataError, Folder, ImageFolder, VOC,
                       build_dataset)
from .labels import LabelSpace
from .model import MDPNet, MomentumEncoder, ResNet
from .trainer import Trainer

__all__ = ["ADE20K", "COCOStuff", "Cityscapes", "DEFAULTS", "DataError", "Folder", "ImageFolder",
           "LabelSpace", "MDPNet", "MomentumEncoder", "ResNet", "Trainer", "VOC",
           "build_dataset", "load_config"]
