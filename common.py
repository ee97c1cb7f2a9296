"""common.py: the plumbing every script of the collection shares (README.md, "How the files fit").

Datasets and their class lists, normalisation, the model zoo, teacher loading (and the `digits`
teacher trained on first use), the BatchNorm-statistics hook, the soft-label student-training loop
with stored FKD labels, the image-set writer and run record of the on-disk contract, seeding,
device/dtype choice and torchrun helpers. Nothing in here belongs to one paper: a method's
algorithm lives whole in its own file.
"""
import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))


class lazy_module:
    """A module imported on first attribute access. torchvision's import pulls in torch._dynamo
    (seconds), so `--help` and argument errors do not pay for it; the code reads as usual."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        import importlib
        return getattr(importlib.import_module(self._name), attr)


torchvision = lazy_module("torchvision")
T = lazy_module("torchvision.transforms.v2")


# ----------------------------------------------------------------------------------------------
# errors a user can cause: one sentence, non-zero exit, nothing earlier touched
# ----------------------------------------------------------------------------------------------
class UserError(Exception):
    """A mistake in the input (path, flag, checkpoint, class order): reported in one sentence."""


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# datasets (README.md "Datasets"): class index = position in the torchvision class order
# ----------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # std: the field's usual value


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    size: int  # resolution images are used at (ResNet-type models)
    mean: tuple
    std: tuple


DATASETS = {
    # digits statistics measured on its 1437 training images after the 32x32 upsample
    "digits": DatasetInfo("digits", 10, 32, (0.3054,) * 3, (0.3237,) * 3),
    "cifar10": DatasetInfo("cifar10", 10, 32, CIFAR_MEAN, CIFAR_STD),
    # CIFAR-100 uses the CIFAR-10 constants as SRe2L/RDED/DELT do (INFER's own differ; see infer_ufc.py)
    "cifar100": DatasetInfo("cifar100", 100, 32, CIFAR_MEAN, CIFAR_STD),
    "tiny": DatasetInfo("tiny", 200, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenette": DatasetInfo("imagenette", 10, 224, IMAGENET_MEAN, IMAGENET_STD),
    "imagewoof": DatasetInfo("imagewoof", 10, 224, IMAGENET_MEAN, IMAGENET_STD),
    "imagenet100": DatasetInfo("imagenet100", 100, 224, IMAGENET_MEAN, IMAGENET_STD),
    "imagenet": DatasetInfo("imagenet", 1000, 224, IMAGENET_MEAN, IMAGENET_STD),
}
FOLDER_DATASETS = ("tiny", "imagenette", "imagewoof", "imagenet100", "imagenet")


def dataset_info(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def input_size(dataset, arch):
    """Resolution a model of `arch` sees on `dataset`: ConvNet teachers use 64 px on ImageNet-1K and
    128 px on the other ImageNet subsets (LINs-lab/RDED@3f6453d:argument.py, VILA-Lab/DELT@f2f81ca:recover/models.py)."""
    info = dataset_info(dataset)
    if arch.startswith("conv") and dataset in FOLDER_DATASETS and dataset != "tiny":
        return 64 if dataset == "imagenet" else 128
    return info.size


def imagenet_names():
    """wnid -> the WordNet synonym string ("tench, Tinca tinca"), from the table timm ships."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return {w: info.label_name_to_description(w) for w in info.label_names()}


def _folder_root(dataset, data_path, split):
    if not data_path:
        raise UserError(f"--data-path is required for {dataset}: the folder holding train/ and val/")
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f"{root} does not exist: --data-path must hold {split}/ with one folder per class")
    if dataset == "tiny" and split == "val":
        _refolder_tiny_val(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"{root} holds no class folders")
    if len(classes) != DATASETS[dataset].num_classes:
        raise UserError(f"{root} has {len(classes)} class folders but {dataset} has {DATASETS[dataset].num_classes} "
                        f"classes: the teacher's class indices would not line up")
    return root, classes


def _refolder_tiny_val(root):
    """Tiny-ImageNet ships val/images/*.JPEG plus val_annotations.txt; move each image into
    val/<wnid>/ once so that ImageFolder gives the torchvision class order."""
    ann, images = os.path.join(root, "val_annotations.txt"), os.path.join(root, "images")
    if not (os.path.isfile(ann) and os.path.isdir(images)):
        return
    print(f"re-foldering Tiny-ImageNet {root} into one folder per class (once)")
    with open(ann) as f:
        for line in f:
            name, wnid = line.split("\t")[:2]
            os.makedirs(os.path.join(root, wnid), exist_ok=True)
            src = os.path.join(images, name)
            if os.path.exists(src):
                os.replace(src, os.path.join(root, wnid, name))
    if not os.listdir(images):
        os.rmdir(images)


def class_list(dataset, data_path=None):
    """[{"index", "name", "id"}] in the dataset's torchvision order; prompts come from `name`."""
    if dataset == "digits":
        return [{"index": i, "name": str(i), "id": str(i)} for i in range(10)]
    if dataset in ("cifar10", "cifar100"):
        names = _cifar(dataset, data_path, train=True).classes
        return [{"index": i, "name": n, "id": n} for i, n in enumerate(names)]
    _, wnids = _folder_root(dataset, data_path, "train")
    known = imagenet_names()
    words = os.path.join(data_path, "words.txt")  # Tiny-ImageNet's own wnid -> name table
    if os.path.isfile(words):
        with open(words) as f:
            known.update(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    return [{"index": i, "name": known.get(w, w), "id": w} for i, w in enumerate(wnids)]


def _cifar(dataset, data_path, train):
    if not data_path:
        raise UserError(f"--data-path is required for {dataset}: torchvision downloads it there")
    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        return cls(data_path, train=train, download=True)
    except Exception as e:  # no network and no local copy
        raise UserError(f"cannot load {dataset} from {data_path} ({e.__class__.__name__}: {e})") from e


_DIGITS = {}


def digits_split(split):
    """scikit-learn's 8x8 digits: pixel/16, bilinear upsample to 32x32, grey copied to 3 channels;
    train_test_split(arange(1797), test_size=0.2, random_state=0, stratify=y) (README.md "Datasets")."""
    if split not in _DIGITS:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        d = load_digits()
        x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
        train, test = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
        idx = train if split == "train" else test
        _DIGITS[split] = (x[idx].contiguous(), torch.tensor(d.target[idx]))
    return _DIGITS[split]


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held as a [N,3,H,W] tensor (float in [0,1] or uint8) with integer targets."""

    def __init__(self, images, targets, transform=None):
        self.images, self.targets, self.transform = images, [int(t) for t in targets], transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i]
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return (self.transform(x) if self.transform else x), self.targets[i]


def _checked_loader(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}): remove or replace the file") from e


def image_folder(root, transform=None):
    """torchvision ImageFolder that names a corrupt file instead of crashing a worker."""
    if not os.path.isdir(root) or not any(e.is_dir() for e in os.scandir(root)):
        raise UserError(f"{root} is missing or holds no class folders")
    return torchvision.datasets.ImageFolder(root, transform=transform, loader=_checked_loader, allow_empty=True)


def real_dataset(dataset, data_path, split, transform=None):
    """The real train or val split; items are (transform(image), class index). Images reach the
    transform as a [3,H,W] float tensor in [0,1] (digits) or a PIL image (all others): start
    transforms with `to_tensor()` to accept both."""
    dataset_info(dataset)
    if dataset == "digits":
        x, y = digits_split("train" if split == "train" else "test")
        return TensorImageDataset(x, y.tolist(), transform)
    if dataset in ("cifar10", "cifar100"):
        ds = _cifar(dataset, data_path, train=split == "train")
        ds.transform = transform
        return ds
    root, _ = _folder_root(dataset, data_path, split)
    return image_folder(root, transform)


def to_tensor():
    return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def eval_transform(dataset, size=None, normalize=True, mean=None, std=None):
    """Resize(s//7*8) + CenterCrop(s) (+ Normalize), the evaluation/scoring view of all repos."""
    info = dataset_info(dataset)
    size = size or info.size
    ops = [to_tensor(), T.Resize(size // 7 * 8, antialias=True), T.CenterCrop(size)]
    if normalize:
        ops.append(T.Normalize(mean or info.mean, std or info.std))
    return T.Compose(ops)


def random_subset(targets, ipc, seed, num_classes=None):
    """Indices of `ipc` images per class drawn with a seeded generator, grouped by class."""
    targets = torch.as_tensor(targets)
    num_classes = num_classes or int(targets.max()) + 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = (targets == c).nonzero().flatten()
        if len(idx) < ipc:
            raise UserError(f"class {c} has {len(idx)} images, fewer than --ipc {ipc}")
        picked += idx[torch.randperm(len(idx), generator=g)[:ipc]].tolist()
    return picked


def stack_images(ds, indices, batch_size=256, workers=0):
    """Load ds[i] for i in indices into one tensor (images) and one label tensor."""
    sub = torch.utils.data.Subset(ds, list(indices))
    xs, ys = [], []
    for x, y in torch.utils.data.DataLoader(sub, batch_size=batch_size, num_workers=workers):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def normalize(x, mean, std):
    return (x - torch.tensor(mean, device=x.device).view(1, -1, 1, 1)) / torch.tensor(std, device=x.device).view(1, -1, 1, 1)


def denormalize(x, mean, std):
    return x * torch.tensor(std, device=x.device).view(1, -1, 1, 1) + torch.tensor(mean, device=x.device).view(1, -1, 1, 1)


def clip_normalized(x, mean, std):
    """In place: clamp each channel of a normalised tensor to the image of pixel range [0, 1]."""
    with torch.no_grad():
        for c, (m, s) in enumerate(zip(mean, std)):
            x[:, c].clamp_((0 - m) / s, (1 - m) / s)
    return x


# ----------------------------------------------------------------------------------------------
# class lists on disk: classes.json written by every stage, checked by every reader
# ----------------------------------------------------------------------------------------------
def write_classes_json(folder, classes):
    atomic_write_json(os.path.join(folder, "classes.json"), classes)


def check_classes_json(folder, classes, what="the set"):
    """Refuse a set whose classes.json disagrees with the dataset; warn when there is none."""
    path = os.path.join(folder, "classes.json")
    if not os.path.isfile(path):
        print(f"warning: {folder} has no classes.json; its class folders are taken in sorted order "
              f"as class 0..{len(classes) - 1}")
        return False
    with open(path) as f:
        theirs = json.load(f)
    if [c["id"] for c in theirs] != [c["id"] for c in classes]:
        first = next((i for i, (a, b) in enumerate(zip(theirs, classes)) if a["id"] != b["id"]),
                     min(len(theirs), len(classes)))
        raise UserError(f"{what} at {folder} was made with a different class order or class set than "
                        f"the dataset ({len(theirs)} vs {len(classes)} classes, first difference at "
                        f"index {first}): its labels would be wrong")
    return True


# ----------------------------------------------------------------------------------------------
# model zoo
# ----------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """ConvNet-D (RDED/DELT): D x [conv3x3 width 128 -> BatchNorm -> ReLU -> AvgPool 2]; linear.
    BatchNorm, not the instance norm of the classic DC ConvNet, so BN matching works."""

    def __init__(self, depth, num_classes, size=32, width=128):
        super().__init__()
        if size // 2 ** depth < 1:
            raise UserError(f"conv{depth} needs inputs of at least {2 ** depth} px, not {size}")
        layers, c = [], 3
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2, 2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width * (size // 2 ** depth) ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def _modified_stem(model):
    """CIFAR/Tiny ResNet: 3x3 stride-1 bias-free conv1, no max-pool (LINs-lab/RDED@3f6453d:README.md teachers, VILA-Lab/DELT@f2f81ca:recover/models.py)."""
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


ARCHS = ("conv3", "conv4", "conv5", "conv6", "resnet18_modified", "resnet50_modified",
         "resnet101_modified", "resnet18", "resnet50", "resnet101", "mobilenet_v2", "efficientnet_b0",
         "mobilenet_v2_cifar", "efficientnet_b0_cifar", "shufflenet_g2", "resnet_ap10")


def build_model(arch, num_classes, size=32):
    """A freshly initialised network of the zoo; `size` is the input resolution it will see."""
    if arch.startswith("conv") and arch[4:].isdigit():
        return ConvNet(int(arch[4:]), num_classes, size)
    if arch.endswith("_modified"):
        return _modified_stem(torchvision.models.get_model(arch[:-9], weights=None, num_classes=num_classes))
    if arch in ("resnet18", "resnet50", "resnet101", "mobilenet_v2", "efficientnet_b0"):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    extra = {"mobilenet_v2_cifar": MobileNetV2Cifar, "efficientnet_b0_cifar": EfficientNetB0Cifar,
             "shufflenet_g2": ShuffleNetG2}
    if arch in extra:
        return extra[arch](num_classes)
    if arch == "resnet_ap10":
        return ResNetAP(num_classes, depth=10, im_size=size)
    raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


# --- the small CIFAR nets INFER uses (kuangliu-style, zhangxin-xd/UFC@83d19f8:models/) and ResNetAP
# (Minimax, zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4:04_evaluation/Minimax/) ---
def conv_bn(cin, cout, k=1, stride=1, groups=1, act=None):
    """Conv (no bias: the BN that follows has its own shift) + BN [+ activation]."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act) if act is not None else nn.Sequential(*layers)


# ---------------------------------------------------------------- MobileNetV2 (CIFAR)
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        mid = expansion * cin
        # kuangliu runs the 1x1 expansion even when expansion == 1 (the 16-ch block).
        self.body = nn.Sequential(conv_bn(cin, mid, 1, act=nn.ReLU(inplace=True)),
                                  conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU(inplace=True)),
                                  conv_bn(mid, cout, 1))  # linear bottleneck: no activation
        # Every stride-1 block gets a residual; channel changes use a 1x1 conv + BN shortcut.
        self.shortcut = None if stride != 1 else (nn.Identity() if cin == cout else conv_bn(cin, cout, 1))

    def forward(self, x):
        out = self.body(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class MobileNetV2Cifar(nn.Module):
    # (expansion, out channels, blocks, stride); the stem and the 24-ch stage use stride 1
    # (instead of ImageNet's 2) so a 32 px input ends on a 4x4 map.
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, act=nn.ReLU(inplace=True))], 32
        for t, c, n, s in self.cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, t, s if i == 0 else 1))
                cin = c
        layers.append(conv_bn(320, 1280, 1, act=nn.ReLU(inplace=True)))
        # Adaptive pooling == the original avg_pool2d(4) at 32 px, and also works at 64 px.
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- EfficientNet-B0 (CIFAR)
class SqueezeExcite(nn.Module):
    def __init__(self, channels, se_channels):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, se_channels, 1), nn.SiLU(),
                                  nn.Conv2d(se_channels, channels, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expansion):
        super().__init__()
        mid = expansion * cin
        # kuangliu builds (but never runs) an expand conv/BN when expansion == 1; we omit it
        # so no dead BN layer confuses BatchNorm-statistics hooks.
        expand = [conv_bn(cin, mid, 1, act=nn.SiLU())] if expansion != 1 else []
        self.body = nn.Sequential(*expand, conv_bn(mid, mid, k, stride, groups=mid, act=nn.SiLU()),
                                  SqueezeExcite(mid, int(cin * 0.25)),  # SE width from *input* channels
                                  conv_bn(mid, cout, 1))
        # Drop-connect omitted: its rate is 0 in the reference (block counter never advances).
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.body(x)
        return out + x if self.residual else out


class EfficientNetB0Cifar(nn.Module):
    # (blocks, expansion, out channels, kernel, stride of the stage's first block)
    cfg = [(1, 1, 16, 3, 1), (2, 6, 24, 3, 2), (2, 6, 40, 5, 2), (3, 6, 80, 3, 2),
           (3, 6, 112, 5, 1), (4, 6, 192, 5, 2), (1, 6, 320, 3, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, act=nn.SiLU())], 32  # stride-1 stem for 32 px input
        for n, t, c, k, s in self.cfg:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(320, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- ShuffleNet v1, g=2 (CIFAR)
class ChannelShuffle(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        # [N, g*c, H, W] -> [N, c*g, H, W] so the next grouped conv sees every group.
        n, ch, h, w = x.shape
        return x.view(n, self.groups, ch // self.groups, h, w).transpose(1, 2).reshape(n, ch, h, w)


class ShuffleBottleneck(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        """cout = channels produced by the conv branch (out - cin for stride-2 concat blocks)."""
        super().__init__()
        mid = cout // 4
        g = 1 if cin == 24 else groups  # the stem output (24 ch) is too thin to group
        self.body = nn.Sequential(conv_bn(cin, mid, 1, groups=g, act=nn.ReLU(inplace=True)), ChannelShuffle(g),
                                  conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU(inplace=True)),
                                  conv_bn(mid, cout, 1, groups=groups))
        # Stride-2 blocks concatenate an avg-pooled copy of the input instead of adding it.
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.body(x)
        out = torch.cat([out, self.pool(x)], 1) if self.pool is not None else out + x
        return self.relu(out)


class ShuffleNetG2(nn.Module):
    def __init__(self, num_classes=10, out_planes=(200, 400, 800), num_blocks=(4, 8, 4), groups=2):
        super().__init__()
        layers, cin = [conv_bn(3, 24, 1, act=nn.ReLU(inplace=True))], 24
        for c, n in zip(out_planes, num_blocks):
            for i in range(n):
                # First block: stride 2, conv branch makes c - cin channels, concat restores c.
                layers.append(ShuffleBottleneck(cin, c - cin if i == 0 else c, 2 if i == 0 else 1, groups))
                cin = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(out_planes[-1], num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- ResNetAP (IDC protocol)
def _norm(c, norm):
    if norm == 'instance':
        return nn.GroupNorm(c, c, affine=True)  # one group per channel == affine instance norm
    if norm == 'batch':
        return nn.BatchNorm2d(c)
    raise ValueError(f'unknown norm {norm!r}')


class APBasicBlock(nn.Module):
    """BasicBlock whose downsampling is a 2x2 average pool, not a strided conv."""

    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        pool = [nn.AvgPool2d(stride)] if stride != 1 else []
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), _norm(cout, norm),
                                  nn.ReLU(inplace=True), *pool,
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _norm(cout, norm))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # official order: 1x1 conv, pool, norm
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), *pool, _norm(cout, norm))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetAP(nn.Module):
    layers_for_depth = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}

    def __init__(self, num_classes, depth=10, width=1.0, norm='instance', im_size=224):
        super().__init__()
        c = int(64 * width)
        # Stem by resolution (IDC's small <=64 / mid <=128 / large): always a stride-1 conv; large
        # is a full-resolution 7x7 conv (expensive at 224 px, but the official design) + 4x4 pool.
        k, pool = (3, 1) if im_size <= 64 else (3, 2) if im_size <= 128 else (7, 4)
        stem = [nn.Conv2d(3, c, k, 1, k // 2, bias=False), _norm(c, norm), nn.ReLU(inplace=True)]
        stem += [nn.AvgPool2d(pool)] if pool > 1 else []
        layers, cin = stem, c
        for i, n in enumerate(self.layers_for_depth[depth]):
            for j in range(n):
                layers.append(APBasicBlock(cin, c * 2 ** i, 2 if (i > 0 and j == 0) else 1, norm))
                cin = c * 2 ** i
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():  # He init with fan-out n = k*k*out_channels, as in IDC
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


def classifier_input(model, x):
    """Penultimate features: the input of the model's last nn.Linear, caught with a hook."""
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen = {}
    h = fc.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    try:
        model(x)
    finally:
        h.remove()
    return seen["x"].flatten(1)


# ----------------------------------------------------------------------------------------------
# teachers
# ----------------------------------------------------------------------------------------------
def load_state(model, path, what="checkpoint"):
    """Load the checkpoint formats the papers ship into `model`: a bare state dict or one under
    "model"/"state_dict"/"net", keys with a DataParallel "module." prefix, and RDED's classifier that
    was built 1000-way and sliced to the first C rows. Always weights_only=True."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {what} {path} as a weights-only torch checkpoint ({e.__class__.__name__})") from e
    for key in ("model", "state_dict", "net"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise UserError(f"{what} {path} does not fit a {model.__class__.__name__} "
                        f"({len(missing)} missing keys such as {missing[:2]}, {len(unexpected)} unexpected "
                        f"such as {unexpected[:2]}): check --teacher/--student and the checkpoint")
    last_w, last_b = _classifier_keys(own)
    for k, v in sd.items():
        if v.shape == own[k].shape:
            continue
        if k in (last_w, last_b) and v.shape[0] > own[k].shape[0] and v.shape[1:] == own[k].shape[1:]:
            print(f"note: {what} classifier {k} has {v.shape[0]} rows; keeping the first {own[k].shape[0]} (RDED slicing)")
            sd[k] = v[: own[k].shape[0]]
            continue
        raise UserError(f"{what} {path} does not fit: {k} has shape {tuple(v.shape)} but the model expects "
                        f"{tuple(own[k].shape)} (wrong architecture or class count)")
    model.load_state_dict(sd)
    return model


def _classifier_keys(state):
    weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    w = weights[-1] if weights else None
    return w, (w[:-6] + "bias") if w else None


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(arch, dataset, path=None, data_path=None, seed=0, device="cpu"):
    """A frozen eval-mode teacher: `path` if given; torchvision pretrained weights for `imagenet`;
    for `digits` one trained on first use and cached; otherwise a clear request for --teacher-path."""
    info = dataset_info(dataset)
    model = build_model(arch, info.num_classes, input_size(dataset, arch))
    if path:
        load_state(model, path, "teacher checkpoint")
    elif dataset == "digits":
        model = digits_teacher(arch, seed)
    elif dataset == "imagenet" and arch in ("resnet18", "resnet50", "resnet101", "mobilenet_v2", "efficientnet_b0"):
        try:
            model = torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as e:
            raise UserError(f"cannot fetch torchvision's pretrained {arch} weights ({e.__class__.__name__}); "
                            f"download them elsewhere and pass the file with --teacher-path") from e
    else:
        raise UserError(f"no pretrained {arch} teacher is known for {dataset}; pass its checkpoint with --teacher-path")
    return freeze(model).to(device)


def cache_dir():
    """Where digits teachers and shared artefacts are cached: $DD_CACHE, else ~/.cache/dd-reference."""
    return os.environ.get("DD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dd-reference")


def weights_hash(model):
    """A short sha256 of a model's state dict (names, shapes, dtypes, bytes): which teacher made a
    cached artefact, whatever file or hub id its weights came from."""
    h = hashlib.sha256()
    for name, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(kind, key, suffix):
    """$DD_CACHE/<kind>/<sha256 of key>[:16]<suffix>: artefacts that depend only on the data and a
    model (DELT's ranking, D4M's latents), shared by every run that asks for the same thing, so a
    loop over IPC computes them once. `key` is any JSON-able description of what went in."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), kind, f"{digest}{suffix}")


DIGITS_TEACHER_EPOCHS = 3


def digits_teacher(arch, seed=0, epochs=DIGITS_TEACHER_EPOCHS, verbose=True):
    """Train `arch` on the digits train split on first use (seeded, deterministic on the CPU), cache
    it with its test accuracy and training time, and return it (frozen, eval mode)."""
    path = os.path.join(cache_dir(), "teachers", f"digits_{arch}_seed{seed}_ep{epochs}.pt")
    model = build_model(arch, 10, 32)
    if os.path.isfile(path):
        load_state(model, path, "cached digits teacher")
        return freeze(model)
    t0 = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(arch, 10, 32)
        x, y = digits_split("train")
        mean, std = DATASETS["digits"].mean, DATASETS["digits"].std
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        steps = epochs * math.ceil(len(y) / 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=g).split(64):
                xb = _random_shift(x[idx], 2, g)  # digits must not be flipped: shifts only
                loss = F.cross_entropy(model(normalize(xb, mean, std)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    seconds = time.time() - t0
    acc = evaluate(freeze(model), torch.utils.data.DataLoader(
        real_dataset("digits", None, "val", T.Normalize(mean, std)), batch_size=256))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_torch_save({"model": model.state_dict(), "acc": acc, "seconds": seconds, "arch": arch,
                       "epochs": epochs, "seed": seed}, path)
    if verbose:
        print(f"trained digits teacher {arch}: test top-1 {acc:.2f}% in {seconds:.1f}s (cached at {path})")
    return model


def _random_shift(x, pad, g):
    """Per-image random translation by up to `pad` pixels with zero fill: RandomCrop(padding=pad)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    return torch.stack([p[:, a:a + h, b:b + w] for p, a, b in zip(padded, dy, dx)])


@torch.no_grad()
def evaluate(model, loader, device="cpu"):
    """Top-1 accuracy (%) of `model` on a loader of (normalised images, labels)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    return 100.0 * float(correct) / max(total, 1)


# ----------------------------------------------------------------------------------------------
# BatchNorm-statistics matching (SRe2L/CDA/DELT/INFER; VILA-Lab/DELT@f2f81ca:recover/utils.py BNFeatureHook)
# ----------------------------------------------------------------------------------------------
class BNStatsHook:
    """Per BatchNorm2d layer l, on the input of the current forward:
    r_l = r_var * ||var - running_var||_2 + ||mean - running_mean||_2 (biased variance over N,H,W).
    loss() = sum over the layers that fired in the last forward of w_l r_l, w_1 = first_bn_multiplier.
    Summing only what fired fixes UFC's EfficientNet quirk (a BN that never runs). Do not wrap the
    model in DataParallel: replicas would race on the stored values (a bug of all three repos)."""

    def __init__(self, model, first_bn_multiplier=10.0, r_var=1.0):
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.weights = [first_bn_multiplier] + [1.0] * (len(self.bns) - 1)
        self.r_var = r_var
        self.values = {}
        self.handles = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(self.bns)]

    def _hook(self, i):
        def hook(module, inputs, output):
            x = inputs[0].float()
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.values[i] = (self.r_var * torch.linalg.vector_norm(var - module.running_var)
                              + torch.linalg.vector_norm(mean - module.running_mean))
        return hook

    def loss(self):
        """The weighted sum for the last forward; clears the stored values."""
        total = sum(self.weights[i] * v for i, v in self.values.items())
        self.values = {}
        return total

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------------
# seeding, device, dtype, torchrun
# ----------------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available")
    return name


def autocast(device, dtype=torch.bfloat16):
    """bf16 autocast on CUDA (the maths of every loss here tolerates it); plain fp32 on the CPU."""
    device = str(device)
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self):
        return self.rank == 0


def dist_setup(device="auto"):
    """Under torchrun: one process per GPU (nccl), or gloo processes on the CPU; else a single rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device)
    if device == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, local, device)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard(items, rank, world):
    """Rank r takes every world-th item (README.md "Scale"): class c goes to rank c % world."""
    return list(items)[rank::world]


# ----------------------------------------------------------------------------------------------
# the on-disk contract: atomic writes, image-set writer, run record
# ----------------------------------------------------------------------------------------------
def atomic_write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def package_versions():
    out = {"python": sys.version.split()[0]}
    for p in ("torch", "torchvision", "diffusers", "transformers", "scikit-learn", "numpy", "pillow", "timm"):
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except Exception:
        return None


def device_name(device):
    device = str(device)
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# args that change how a run executes but not what it produces: a rerun may differ in them
VOLATILE_ARGS = {"eval", "device", "overwrite", "workers", "out", "eval_protocol", "eval_repeats",
                 "eval_epochs", "format"}


class RunDir:
    """An output folder of the on-disk contract (README.md "The on-disk contract"). It refuses to write over a
    different run unless `overwrite`, writes classes.json and run.json, writes each class atomically
    (a temp folder renamed into place), says which classes are already complete, times stages, and
    finishes with status "done" and a preview grid. Under torchrun every rank writes its own class
    folders; rank 0 alone writes the shared files."""

    CONTRACT = ("classes.json", "run.json", "soft_labels.pt", "fkd", "preview.png")

    def __init__(self, out, args, classes, argv=None, rank=0, overwrite=False, extra_artefacts=(),
                 ignore=()):
        self.out, self.classes, self.rank = out, classes, rank
        self.identity = {k: v for k, v in sorted(vars(args).items())
                         if k not in VOLATILE_ARGS and k not in ignore}
        self.fmt = getattr(args, "format", "png")
        self.record_path = os.path.join(out, "run.json")
        old = self._read_record()
        if old is not None and old.get("identity") != self.identity:
            if not overwrite:
                diff = sorted(k for k in set(old.get("identity", {})) | set(self.identity)
                              if old.get("identity", {}).get(k) != self.identity.get(k))
                raise UserError(f"{out} holds a different run (differs in {', '.join(diff[:5]) or 'its record'}); "
                                f"pass --overwrite to replace it or choose another --out")
            if rank == 0:
                self._clear(extra_artefacts)
            old = None
        elif old is None and os.path.isdir(out) and any(self._is_class_dir(e) for e in os.listdir(out)):
            if not overwrite:
                raise UserError(f"{out} holds class folders but no run record; pass --overwrite to replace them "
                                f"or choose another --out")
            if rank == 0:
                self._clear(extra_artefacts)
        os.makedirs(out, exist_ok=True)
        barrier()
        if old is not None and os.path.isfile(os.path.join(out, "classes.json")):
            check_classes_json(out, classes, "the earlier run")
        self.record = old or {"stages": {}}
        self.record.update({"argv": argv if argv is not None else sys.argv, "args": vars(args),
                            "identity": self.identity, "versions": package_versions(),
                            "git_commit": git_commit(), "status": "running",
                            "started": datetime.datetime.now().isoformat(timespec="seconds")})
        if rank == 0:
            write_classes_json(out, classes)
            self.save_record()

    @staticmethod
    def _is_class_dir(name):
        return len(name) == 5 and name.isdigit()

    def _read_record(self):
        if not os.path.isfile(self.record_path):
            return None
        with open(self.record_path) as f:
            return json.load(f)

    def _clear(self, extra):
        for name in os.listdir(self.out):
            if self._is_class_dir(name) or name in self.CONTRACT or name in extra or name.startswith(".tmp-"):
                p = os.path.join(self.out, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)

    def class_dir(self, c):
        return os.path.join(self.out, f"{c:05d}")

    def class_complete(self, c, n):
        """True when class c's folder exists with at least n images (it only appears whole)."""
        d = self.class_dir(c)
        return os.path.isdir(d) and len(os.listdir(d)) >= n

    def write_class(self, c, images, names=None):
        """Write images [n,3,H,W] in [0,1] as class c, atomically: a temp folder renamed into place."""
        tmp = os.path.join(self.out, f".tmp-{c:05d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_images(images, [os.path.join(tmp, n) for n in
                             (names or [f"{i:05d}.{self.fmt}" for i in range(len(images))])])
        final = self.class_dir(c)
        if os.path.isdir(final):
            shutil.rmtree(final)  # an incomplete or superseded class is redone whole
        os.replace(tmp, final)

    @contextlib.contextmanager
    def stage(self, name, items=None, unit="images"):
        """Time a stage and record its seconds and throughput in run.json."""
        t0 = time.time()
        yield
        seconds = time.time() - t0
        entry = {"seconds": round(seconds, 3)}
        if items:
            entry.update({unit: items, f"{unit}_per_s": round(items / max(seconds, 1e-9), 4)})
        self.record["stages"][name] = entry
        if self.rank == 0:
            self.save_record()

    def save_record(self):
        atomic_write_json(self.record_path, self.record)

    def finish(self, device=None, **summary):
        """Mark the run done (rank 0), with a summary and a preview grid of the first classes."""
        barrier()
        if self.rank != 0:
            return
        self.record.update(summary)
        self.record.update({"status": "done", "device": device_name(device or "cpu"),
                            "finished": datetime.datetime.now().isoformat(timespec="seconds")})
        self.save_record()
        save_preview(self.out)


def save_images(images, paths):
    """Images [n,3,H,W] in [0,1] -> 8-bit files (rounded, not truncated); PNG or JPEG by suffix."""
    from PIL import Image
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for a, p in zip(arr, paths):
        Image.fromarray(a).save(p)


def save_preview(out, classes=10, per_class=8):
    """preview.png: the first images of the first classes, one row per class, upscaled to >= 64 px."""
    from PIL import Image
    rows = []
    for d in sorted(n for n in os.listdir(out) if RunDir._is_class_dir(n))[:classes]:
        files = sorted(os.listdir(os.path.join(out, d)))[:per_class]
        rows += [to_tensor()(Image.open(os.path.join(out, d, f)).convert("RGB")) for f in files]
        rows += [torch.zeros_like(rows[-1])] * (per_class - len(files)) if files else []
    if not rows:
        return
    size = max(64, rows[0].shape[-1])
    rows = [F.interpolate(r[None], size=(size, size), mode="nearest")[0] for r in rows]
    torchvision.utils.save_image(torch.stack(rows), os.path.join(out, "preview.png"), nrow=per_class, padding=2)


def add_generic_args(parser, ipc=10, out=None):
    """The generic flag group every script shares (each script adds its own groups after it)."""
    g = parser.add_argument_group("generic")
    g.add_argument("--dataset", default="digits", choices=list(DATASETS), help="dataset (the table in README.md 'Datasets')")
    g.add_argument("--data-path", default=None, help="dataset root: train/ and val/ folders, or the CIFAR download folder")
    g.add_argument("--ipc", type=int, default=ipc, help="images per class of the distilled set")
    g.add_argument("--out", default=out, help="output folder of the distilled set (the on-disk contract)")
    g.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--format", default="png", choices=("png", "jpg"), help="image file format")
    g.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a different run")
    g.add_argument("--eval", action="store_true", help="evaluate the distilled set with validate_fkd.py at the end")
    return g


def apply_presets(args, presets, defaults):
    """Fill every flag the user left unset (None) from the dataset's preset, then from `defaults`:
    an explicit flag always beats a preset."""
    for k, v in {**defaults, **presets.get(args.dataset, {})}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def document_defaults(p, presets=None, defaults=None, sources=""):
    """Make `--help` a complete guide: every flag's help ends with its default; a flag filled from the
    per-dataset presets lists the value of each dataset that has one; `sources` (where the presets come
    from, read the comment beside each value in the file for the exact line) goes to the epilog."""
    presets, defaults = presets or {}, defaults or {}
    for a in p._actions:
        if a.help in (None, argparse.SUPPRESS) or a.dest == "help" or "default" in a.help.lower():
            continue
        per = {d: v[a.dest] for d, v in presets.items() if a.dest in v}
        if a.dest in defaults or per:
            text = f"default {defaults[a.dest]!r}" if a.dest in defaults else "no default"
            text += "".join(f"; {d}: {v!r}" for d, v in per.items())
            a.help += f" (preset: {text})".replace("%", "%%")
        elif isinstance(a, argparse._StoreAction) and a.default not in (None, argparse.SUPPRESS):
            a.help += " (default: %(default)s)"
    if sources:
        p.epilog = ((p.epilog + "\n\n") if p.epilog else "") + "presets: " + sources
    return p


def hub_from_pretrained(cls, name, flag, **kwargs):
    """`cls.from_pretrained(name)`; offline without a local copy becomes one sentence naming `flag`."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        if os.path.isdir(name):
            raise UserError(f"cannot load {name} as a {cls.__name__} folder ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from e
        raise UserError(f"cannot load {name!r} from the Hugging Face hub (offline, or no such model) and no local "
                        f"folder has that name; download it elsewhere and pass the folder with {flag}") from e


# ----------------------------------------------------------------------------------------------
# image sets and train-time augmentation
# ----------------------------------------------------------------------------------------------
def load_image_set(folder, classes, ipc=None, size=None, return_rows=False):
    """An ImageFolder-layout set (the on-disk contract or any other tool's) as uint8 [N,3,H,W] plus
    targets, in ImageFolder order; `ipc` keeps the first ipc files (sorted) of each class. Images
    whose size differs from the first are resized to `size`. With return_rows, also the position
    of each kept image in the whole set (the row of soft_labels.pt). Bad sets stop with one sentence."""
    if not os.path.isdir(folder):
        raise UserError(f"the set {folder} does not exist")
    check_classes_json(folder, classes)
    dirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".") and e.name != "fkd")
    if len(dirs) != len(classes):
        raise UserError(f"{folder} has {len(dirs)} class folders but the dataset has {len(classes)} classes")
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
    images, targets, rows, offset = [], [], [], 0
    for c, d in enumerate(dirs):
        files = sorted(f for f in os.listdir(os.path.join(folder, d)) if f.lower().endswith(exts))
        if not files:
            raise UserError(f"class folder {os.path.join(folder, d)} holds no images")
        if ipc is not None and len(files) < ipc:
            raise UserError(f"class folder {os.path.join(folder, d)} holds {len(files)} images, fewer than --ipc {ipc}")
        for k, f in enumerate(files[:ipc]):
            images.append(torch.from_numpy(np.array(_checked_loader(os.path.join(folder, d, f)))).permute(2, 0, 1))
            targets.append(c)
            rows.append(offset + k)
        offset += len(files)
    if any(x.shape != images[0].shape for x in images):
        if size is None:
            raise UserError(f"{folder} holds images of different sizes")
        images = [x if x.shape[-2:] == (size, size) else F.interpolate(x[None].float(), size=(size, size), mode="bilinear",
                  antialias=True)[0].round().clamp(0, 255).to(torch.uint8) for x in images]
    out = (torch.stack(images), torch.tensor(targets))
    return out + (torch.tensor(rows),) if return_rows else out


class ShufflePatches:
    """RDED: cut the image into `factor` vertical strips and shuffle them, then the same for
    horizontal strips (a random permutation of the stitched patches). Identity for factor 1."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        if self.factor <= 1:
            return x
        for dim in (-1, -2):
            strips = list(torch.tensor_split(x, self.factor, dim=dim))
            random.shuffle(strips)
            x = torch.cat(strips, dim=dim)
        return x


class Lighting:
    """AlexNet-style PCA lighting noise (the Minimax/IDC training transform), on a [0,1] tensor."""
    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alphastd=0.1):
        self.alphastd = alphastd

    def __call__(self, x):
        alpha = torch.randn(3) * self.alphastd
        return x + (self.EIGVEC @ (alpha * self.EIGVAL)).view(3, 1, 1)


def train_transform(size, mean, std, crop="rrc", min_scale=0.08, flip=True, factor=1, rand_augment=None,
                    color_jitter=0.0, lighting=0.0, pad=4):
    """The per-image training view of the protocols: RandomResizedCrop (rded/fkd/hard) or
    RandomCrop with padding (INFER static), flips, RDED's ShufflePatches, DELT's timm RandAugment,
    Minimax's jitter and lighting, then normalisation. Takes a [3,H,W] uint8 or float tensor."""
    ops = []
    if rand_augment:  # timm's RandAugment works on PIL images (VILA-Lab/DELT@f2f81ca:evaluation/argument.py)
        from timm.data.auto_augment import rand_augment_transform
        ops += [T.ToPILImage(), rand_augment_transform(rand_augment, {"translate_const": 117,
                                                                       "img_mean": (124, 116, 104)})]
    ops += [to_tensor(), ShufflePatches(factor)]
    if crop == "rrc":
        ops.append(T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True))
    else:
        ops += [T.Resize(size, antialias=True), T.RandomCrop(size, padding=pad)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    if color_jitter:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if lighting:
        ops.append(Lighting(lighting))
    ops.append(T.Normalize(mean, std))
    return T.Compose(ops)


# ----------------------------------------------------------------------------------------------
# batch mixing and losses
# ----------------------------------------------------------------------------------------------
def cutmix_box(lam, h, w, g):
    """A box of side sqrt(1-lam)*size at a uniform centre, clipped (CutMix, FKD/SRe2L/RDED)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = torch.randint(0, h, (1,), generator=g).item(), torch.randint(0, w, (1,), generator=g).item()
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


def draw_mix(mix, alpha, n, h, w, g):
    """One batch's mixing parameters, drawn on the CPU from generator g (no device sync):
    {"mix", "perm", "lam" (the label weight: box-area corrected for cutmix), "box"}."""
    if mix == "none" or n < 2:
        return {"mix": "none"}
    lam = float(np.random.default_rng(torch.randint(0, 2**31, (1,), generator=g).item()).beta(alpha, alpha))
    perm = torch.randperm(n, generator=g)
    if mix == "mixup":
        return {"mix": "mixup", "perm": perm, "lam": lam}
    y1, y2, x1, x2 = cutmix_box(lam, h, w, g)
    return {"mix": "cutmix", "perm": perm, "box": (y1, y2, x1, x2), "lam": 1.0 - (y2 - y1) * (x2 - x1) / (h * w)}


def apply_mix(x, p):
    """Mix a batch with parameters from draw_mix (out of place)."""
    if p["mix"] == "none":
        return x
    perm = p["perm"].to(x.device)
    if p["mix"] == "mixup":
        return p["lam"] * x + (1 - p["lam"]) * x[perm]
    y1, y2, x1, x2 = p["box"]
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    return x


def mix_targets(t, p):
    """Linear interpolation of per-image targets (static soft labels, one-hot) with the mix weight."""
    if p["mix"] == "none":
        return t
    return p["lam"] * t + (1 - p["lam"]) * t[p["perm"].to(t.device)]


def kd_loss(student_logits, teacher_logits, temperature, t_squared=False):
    """KL(softmax(t/T) || softmax(s/T)), batchmean, optionally times T^2 (Hinton KD, DM-KD)."""
    loss = F.kl_div(F.log_softmax(student_logits.float() / temperature, 1),
                    F.log_softmax(teacher_logits.float() / temperature, 1), reduction="batchmean", log_target=True)
    return loss * temperature**2 if t_squared else loss


def lr_factor(schedule, epoch, epochs, milestones=(), gamma=0.1):
    """Per-epoch LR multiplier: full cosine to 0, RDED/DELT's quarter cosine 0.5(1+cos(pi e/2E))
    that ends at 0.5, or step decay by gamma at each milestone (DM-KD, Minimax)."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "quarter":
        return 0.5 * (1 + math.cos(math.pi * epoch / (2 * epochs)))
    if schedule == "step":
        return gamma ** sum(epoch >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise UserError(f"unknown LR schedule {schedule!r}")


def make_optimizer(model, name, lr, weight_decay, momentum=0.9):
    """AdamW with decay only on weights of ndim > 1 (as the RDED/SRe2L/D4M code), or SGD."""
    if name == "adamw":
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}")


class Ensemble(nn.Module):
    """Mean of the members' logits (INFER's teacher ensemble; one member is a plain teacher)."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x).float() for m in self.members]).mean(0)


# ----------------------------------------------------------------------------------------------
# FKD soft labels: stored once per epoch, replayed exactly (no torch patching)
# ----------------------------------------------------------------------------------------------
def fkd_batch(images, rec, b, size, mean, std):
    """Rebuild batch b of an FKD epoch record from the stored crop boxes, flips and mix: used both
    when the labels are made and when they are replayed, so the two batches are the same pixels."""
    idx, boxes, flips = rec["index"][b], rec["boxes"][b], rec["flips"][b]
    crops = []
    for i, (top, left, h, w), f in zip(idx.tolist(), boxes.tolist(), flips.tolist()):
        x = images[i][:, top:top + h, left:left + w].float() / 255
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        crops.append(x.flip(-1) if f else x)
    x = normalize(torch.stack(crops), mean, std)
    return apply_mix(x, rec["mix"][b])


def fkd_generate(images, teacher, out_dir, epochs, batch_size, size, mean, std, mix="cutmix", alpha=1.0,
                 min_scale=0.08, flip=True, seed=42, device="cpu", start_epoch=0):
    """Store FKD soft labels (SRe2L relabel / D4M training-time matching): for each epoch one file
    fkd/epoch_XXXX.pt with, per batch, the image indices, crop boxes (pixels of the stored image),
    flips, mix parameters and the teacher's fp16 logits on the augmented, mixed batch. Complete
    epoch files are kept on a rerun, so an interrupted generation resumes."""
    os.makedirs(out_dir, exist_ok=True)
    n, _, h, w = images.shape
    rrc = T.RandomResizedCrop(size, scale=(min_scale, 1.0))
    for epoch in range(start_epoch, epochs):
        path = os.path.join(out_dir, f"epoch_{epoch:04d}.pt")
        if os.path.isfile(path):
            continue
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(n, generator=g).split(batch_size)
        rec = {"index": [], "boxes": [], "flips": [], "mix": [], "logits": []}
        for b, idx in enumerate(order):
            with torch.random.fork_rng():  # torchvision draws crop boxes from the global RNG
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
                boxes = torch.tensor([rrc.get_params(images[0], rrc.scale, rrc.ratio) for _ in idx])
            rec["index"].append(idx)
            rec["boxes"].append(boxes)
            rec["flips"].append(torch.rand(len(idx), generator=g) < 0.5 if flip else torch.zeros(len(idx), dtype=torch.bool))
            rec["mix"].append(draw_mix(mix, alpha, len(idx), size, size, g))
            x = fkd_batch(images, rec, b, size, mean, std).to(device)
            with torch.no_grad(), autocast(device):
                rec["logits"].append(teacher(x).float().half().cpu())
        atomic_torch_save(rec, path)
    atomic_write_json(os.path.join(out_dir, "meta.json"), {
        "epochs": epochs, "batch_size": batch_size, "size": size, "mix": mix, "alpha": alpha,
        "min_scale": min_scale, "flip": flip, "seed": seed, "images": n, "mean": list(mean), "std": list(std)})


class FKDReplay(torch.utils.data.Dataset):
    """A batch-level dataset over one stored FKD epoch: item b is (mixed batch b, its logits)."""

    def __init__(self, images, fkd_dir, epoch, size, mean, std, rank=0, world=1):
        self.rec = torch.load(os.path.join(fkd_dir, f"epoch_{epoch:04d}.pt"), weights_only=True)
        self.images, self.size, self.mean, self.std = images, size, mean, std
        self.batches = list(range(len(self.rec["index"])))[rank::world]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        b = self.batches[k]
        return fkd_batch(self.images, self.rec, b, self.size, self.mean, self.std), self.rec["logits"][b]


def fkd_meta(fkd_dir):
    path = os.path.join(fkd_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"{fkd_dir} holds no stored FKD soft labels (meta.json missing): make them first "
                        f"(e.g. d4m.py --ttm-epochs) or choose another --protocol")
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# the soft-label student-training loop (docs/validate.md)
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    labels: str = "teacher"  # teacher | fkd | static | hard
    epochs: int = 300
    batch_size: int = 100
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | quarter | step | constant
    milestones: tuple = ()
    gamma: float = 0.1
    temperature: float = 20.0
    t_squared: bool = False
    mix: str = "cutmix"  # cutmix | mixup | none
    alpha: float = 1.0
    eval_every: int = 10
    eval_from: float = 0.0  # first fraction of training without evaluation (RDED: 0.8)
    seed: int = 0
    workers: int = 0


def train_student(student, cfg, val_loader, device, train_set=None, teacher=None, static_labels=None,
                  fkd=None, dist_info=None, log=print):
    """Train `student` from scratch and evaluate it on `val_loader`.

    train_set: a dataset of (normalised augmented image, label, index) for the teacher/static/hard
    modes; fkd: {"images", "dir", "size", "mean", "std"} for replayed stored labels. Returns
    {"best", "last", "history", "seconds", "images_per_s", "data_wait_share"}. Under torchrun the student is wrapped in
    DDP and rank 0 evaluates alone (no padded duplicates in the val set)."""
    d = dist_info or Dist(device=device)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)
    cuda = str(device).startswith("cuda")
    student = student.to(device)
    if cuda:
        student = student.to(memory_format=torch.channels_last)
    model = nn.parallel.DistributedDataParallel(student, device_ids=[d.local_rank] if cuda else None) if d.world > 1 else student
    opt = make_optimizer(student, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg.schedule, e, cfg.epochs, cfg.milestones, cfg.gamma))
    if static_labels is not None:
        static_labels = static_labels.float().to(device)
    loader = None
    if cfg.labels != "fkd":
        sampler = (torch.utils.data.DistributedSampler(train_set, d.world, d.rank, shuffle=True, seed=cfg.seed)
                   if d.world > 1 else torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed)))
        per_rank = max(1, cfg.batch_size // d.world)
        loader = torch.utils.data.DataLoader(train_set, per_rank, sampler=sampler, num_workers=cfg.workers,
                                             drop_last=len(train_set) % per_rank == 1, pin_memory=cuda,
                                             persistent_workers=cfg.workers > 0)
    history, seen, waited, t0 = [], 0, 0.0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        batches = loader if loader is not None else torch.utils.data.DataLoader(
            FKDReplay(fkd["images"], fkd["dir"], epoch, fkd["size"], fkd["mean"], fkd["std"], d.rank, d.world),
            batch_size=None, shuffle=False, num_workers=cfg.workers)
        total, steps = torch.zeros((), device=device), 0
        batches, t_wait = iter(batches), time.time()
        for batch in batches:
            waited += time.time() - t_wait  # time blocked on the data loader
            if cfg.labels == "fkd":
                x, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            else:
                x, y, idx = (t.to(device, non_blocking=True) for t in batch)
                p = draw_mix(cfg.mix, cfg.alpha, len(y), x.shape[-2], x.shape[-1], g)
                x = apply_mix(x, p)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                if cfg.labels == "teacher":
                    with torch.no_grad():
                        target = teacher(x)
                elif cfg.labels == "static":
                    target = mix_targets(static_labels[idx], p)
                out = model(x)
                if cfg.labels == "hard":
                    onehot = F.one_hot(y, out.shape[1]).float()
                    loss = torch.sum(-mix_targets(onehot, p) * F.log_softmax(out.float(), 1), 1).mean()
                else:
                    loss = kd_loss(out, target, cfg.temperature, cfg.t_squared)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
            seen += len(x)
            t_wait = time.time()
        sched.step()
        last = epoch == cfg.epochs - 1
        if d.main and (last or (epoch % cfg.eval_every == 0 and epoch >= cfg.eval_from * cfg.epochs)):
            acc = evaluate(student, val_loader, device)
            history.append((epoch, acc))
            log(f"epoch {epoch:4d}  loss {float(total) / max(steps, 1):.4f}  lr {opt.param_groups[0]['lr']:.2e}  top1 {acc:.2f}")
        barrier()
    seconds = time.time() - t0
    if d.world > 1:  # every rank returns rank 0's evaluations
        box = [history]
        dist.broadcast_object_list(box, src=0)
        history = box[0]
    accs = [a for _, a in history]
    return {"best": max(accs) if accs else None, "last": accs[-1] if accs else None, "history": history,
            "seconds": seconds, "images_per_s": seen * d.world / max(seconds, 1e-9),
            "data_wait_share": waited / max(seconds, 1e-9)}


class IndexedDataset(torch.utils.data.Dataset):
    """(transform(image), label, index) over a uint8 image tensor: static labels need the index."""

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.targets[i]), i
