"""common.py: the plumbing every script of the collection shares (README.md, "How the files fit").

Datasets and their class lists, normalisation, the model zoo, teacher loading (and the `digits`
teacher trained on first use), the BatchNorm-statistics hook, the soft-label student-training loop
with stored FKD labels, the image-set writer and run record of the on-disk contract, seeding,
device/dtype choice and torchrun helpers. Nothing in here belongs to one paper: a method's
algorithm lives whole in its own file.
"""
import atexit
import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
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


def user_sentence(e):
    """The sentence of a UserError, also when torch re-raised it from a DataLoader worker: the message
    then holds the worker's traceback, whose last line is "common.UserError: <sentence>"."""
    msg = str(e).strip()
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1].split("UserError: ", 1)[-1]
    return msg


def _peer_failed(e):
    """A collective broken because another torchrun process stopped (that process reports why)."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and isinstance(e, RuntimeError)
            and any(s in str(e) for s in ("closed by peer", "reset by peer", "Broken pipe", "NCCL communicator was aborted")))


def _elastic_error(sentence):
    """Under torchrun, hand the sentence to the launcher, which shows it as the failure's root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            with open(path, "w") as f:
                json.dump({"message": {"message": sentence, "extraInfo": {"py_callstack": sentence,
                                                                          "timestamp": str(int(time.time()))}}}, f)


_SIGNALLED = []  # the signals this process received (a DataLoader worker that died of the same stop is no error)


def _interrupt(signum, frame):
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt(signum)


def _sigint(signum, frame):
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt()


def quiet_worker(worker_id=None):
    """DataLoader worker_init_fn: a worker leaves SIGINT and SIGTERM to the main process, so a stop sent to
    the whole process group (Ctrl-C, `timeout`, SLURM, systemd) ends the run with one sentence, whichever
    process it reaches first. SIGINT is ignored; SIGTERM ends the worker with exit code 0, which the
    DataLoader does not report (torch's own worker handler re-raises a SIGTERM that is not its parent's,
    and the main then fails with "worker ... killed by signal: Terminated")."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))


def _worker_stopped(e):
    """A DataLoader's error about a worker that died or quit, after this process was sent SIGINT/SIGTERM."""
    return isinstance(e, RuntimeError) and "DataLoader worker" in str(e) and (
        bool(_SIGNALLED) or "Terminated" in str(e) or "Interrupt" in str(e))


def run_cli(main):
    """Run a script's main(); a UserError (also one raised in a DataLoader worker or another torchrun
    process) becomes one line on stderr and exit code 2; SIGINT (Ctrl-C) and SIGTERM stop the run with
    one line and exit code 130/143: every file is written atomically, so a rerun resumes. A fresh --out
    of a start that failed before doing any work is removed again (RunDir.rollback_failed_start)."""
    import signal
    signal.signal(signal.SIGINT, _sigint)  # also when started with SIGINT ignored (nohup, &)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            main()
            if dist.is_available() and dist.is_initialized():  # left to exit, gloo's threads may abort the process
                barrier()                                     # ("terminate called without an active exception")
                dist.destroy_process_group()
        except RuntimeError as e:
            if "DataLoader worker" in str(e) and not _SIGNALLED:  # a stop sent to the workers first reaches this
                time.sleep(3)  # process moments later; its handler raises KeyboardInterrupt out of the sleep
            if _worker_stopped(e):  # a worker reached by the same stop first: the stop, not a failure
                raise KeyboardInterrupt(*([signal.SIGTERM] if signal.SIGTERM in _SIGNALLED or "Terminated" in str(e)
                                          else [])) from None
            raise
    except UserError as e:
        sentence = f"error: {user_sentence(e)}"
        RunDir.rollback_failed_start()
        _elastic_error(sentence)
        print(sentence, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up below
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(ValueError, OSError):  # torch's SIGCHLD check must not raise about workers that quit
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        sys.exit(143 if e.args == (signal.SIGTERM,) else 130)
    except Exception as e:
        if _peer_failed(e):  # another process of the job failed and says why; no second traceback
            print(f"[rank {os.environ.get('RANK', '0')}] stopped: another process of this torchrun job failed",
                  file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        RunDir.release_locks()


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
        # prompts use the official prompt files' names ("aquarium fish", "apples", "maple") in torchvision's order
        return [{"index": i, "name": CIFAR100_PROMPT_NAMES.get(n, n.replace("_", " ")), "id": n} for i, n in enumerate(names)]
    _, wnids = _folder_root(dataset, data_path, "train")
    known = imagenet_names()
    words = os.path.join(data_path, "words.txt")  # Tiny-ImageNet's own wnid -> name table
    if os.path.isfile(words):
        with open(words) as f:
            known.update(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    known.update(DISTINCT_NAMES)
    return [{"index": i, "name": known.get(w, w), "id": w} for i, w in enumerate(wnids)]


# The 22 CIFAR-100 classes whose name in the official prompt file differs from torchvision's (suduo94/D4M@da35d10:
# distillation/label-prompt/cifar-100.txt = zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype
# @d0060eb4:03_distiilation/label-prompt/cifar-100.txt, listed in superclass order; the others differ by "_" only).
CIFAR100_PROMPT_NAMES = {
    **{n: n + "s" for n in ("apple", "bottle", "bowl", "can", "cup", "plate", "mushroom", "orange", "pear", "orchid",
                            "rose", "sunflower", "tulip")},
    "sweet_pepper": "sweet peppers", "poppy": "poppies", "keyboard": "computer keyboard", "lawn_mower": "lawn-mower",
    **{f"{n}_tree": n for n in ("maple", "oak", "palm", "pine", "willow")}}

# ImageNet's two "crane" classes share one name in timm's table (and in HF's IMAGENET2012_CLASSES that
# VLCP uses): give each its own, as D4M's imagenet_classes.txt does (there swapped: the bird at 517).
DISTINCT_NAMES = {"n02012849": "crane, bird", "n03126707": "crane, machine"}


def _cifar(dataset, data_path, train):
    if not data_path:
        raise UserError(f"--data-path is required for {dataset}: torchvision downloads it there")
    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    place = (f"place {cls.base_folder}/ (the extracted {cls.filename}) or {cls.filename} itself in "
             f"{os.path.abspath(data_path)}")
    if not os.path.isdir(data_path):  # checked before download=True, which would create the folder
        raise UserError(f"--data-path {data_path} does not exist: create it (torchvision downloads {dataset} there "
                        f"when online) or, offline, {place}")
    try:
        return cls(data_path, train=train, download=False)
    except RuntimeError:  # not there yet: download (online)
        pass
    try:
        return cls(data_path, train=train, download=True)
    except Exception as e:  # no network and no local copy
        raise UserError(f"cannot load {dataset} from {data_path} ({e.__class__.__name__}: {str(e)[:120]}); "
                        f"offline, {place}") from e


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
    for x, y in torch.utils.data.DataLoader(sub, batch_size=batch_size, num_workers=workers, worker_init_fn=quiet_worker):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def normalize(x, mean, std):
    return (x - torch.tensor(mean, device=x.device).view(1, -1, 1, 1)) / torch.tensor(std, device=x.device).view(1, -1, 1, 1)


def denormalize(x, mean, std):
    return x * torch.tensor(std, device=x.device).view(1, -1, 1, 1) + torch.tensor(mean, device=x.device).view(1, -1, 1, 1)


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
    try:
        with open(path) as f:
            theirs = json.load(f)
        ids = [c["id"] for c in theirs]
    except (ValueError, TypeError, KeyError) as e:
        problem = f"is damaged ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else \
            "is not a list of {index, name, id} entries"
        raise UserError(f"{path} {problem}: restore it, or delete it to take the class folders in sorted order") from e
    if ids != [c["id"] for c in classes]:
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
    BatchNorm, not the instance norm of the classic DC ConvNet, so BN matching works; a checkpoint of
    the instance-norm variant (DD-Ranking's default "ConvNet-D") is loaded by load_state into
    instance_norm()'s copy."""

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

    def instance_norm(self):
        """Every BatchNorm replaced by GroupNorm(C, C, affine=True), i.e. affine instance norm, as
        DD-Ranking builds "instancenorm" (NUS-HPC-AI-Lab/DD-Ranking@b8b0966:ddranking/utils/networks.py:70-71)."""
        for i, m in enumerate(self.features):
            if isinstance(m, nn.BatchNorm2d):
                self.features[i] = nn.GroupNorm(m.num_features, m.num_features, affine=True)
        return self


def _modified_stem(model):
    """CIFAR/Tiny ResNet: 3x3 stride-1 bias-free conv1, no max-pool (LINs-lab/RDED@3f6453d:README.md teachers, VILA-Lab/DELT@f2f81ca:recover/models.py)."""
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


ARCHS = ("conv3", "conv4", "conv5", "conv6", "resnet18_modified", "resnet50_modified",
         "resnet101_modified", "resnet18", "resnet50", "resnet101", "mobilenet_v2", "efficientnet_b0",
         "mobilenet_v2_cifar", "efficientnet_b0_cifar", "shufflenet_g2", "resnet_ap10",
         "cifarresnet18", "cifarresnet34", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")


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
    if arch in ("cifarresnet18", "cifarresnet34"):  # DM-KD: resnet*_modified without the stem ReLU
        model = _modified_stem(torchvision.models.get_model(f"resnet{arch[11:]}", weights=None, num_classes=num_classes))
        model.relu = nn.Identity()  # the stem's alone: each torchvision block has its own ReLU
        return model
    if arch.startswith("wrn_"):
        depth, widen = map(int, arch[4:].split("_"))
        return WideResNet(depth, widen, num_classes)
    raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


# --- the small CIFAR nets INFER uses (kuangliu-style, zhangxin-xd/UFC@83d19f8:models/) and ResNetAP
# (Minimax, zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4:04_evaluation/Minimax/) ---
# The three CIFAR nets carry the module names of the official definitions (UFC@83d19f8:models/
# {mobilenetv2,efficientnet,shufflenet}.py, from kuangliu/pytorch-cifar): conv1/bn1, layers (layer1-3
# for ShuffleNet), linear, and conv1..bn3/shortcut/se inside a block, so that the official
# DataParallel checkpoints ("module." prefix, stripped by load_state) load as they are.
def _bn(c):
    return nn.BatchNorm2d(c)


# ---------------------------------------------------------------- MobileNetV2 (CIFAR)
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        mid = expansion * cin
        self.stride = stride
        # kuangliu runs the 1x1 expansion even when expansion == 1 (the 16-ch block).
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), _bn(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)  # linear bottleneck
        # Every stride-1 block gets a residual; channel changes use a 1x1 conv + BN shortcut.
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _bn(cout))
                         if stride == 1 and cin != cout else nn.Sequential())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2Cifar(nn.Module):
    # (expansion, out channels, blocks, stride); the stem and the 24-ch stage use stride 1
    # (instead of ImageNet's 2) so a 32 px input ends on a 4x4 map.
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), _bn(32)
        blocks, cin = [], 32
        for t, c, n, s in self.cfg:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, t, s if i == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = nn.Conv2d(320, 1280, 1, bias=False), _bn(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        # Adaptive pooling == the original avg_pool2d(4) at 32 px, and also works at 64 px.
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------- EfficientNet-B0 (CIFAR)
class SqueezeExcite(nn.Module):
    def __init__(self, channels, se_channels):
        super().__init__()
        self.se1, self.se2 = nn.Conv2d(channels, se_channels, 1), nn.Conv2d(se_channels, channels, 1)

    def forward(self, x):
        return x * self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(x, 1)))).sigmoid()


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expansion):
        super().__init__()
        mid = expansion * cin
        self.expansion = expansion
        # kuangliu builds the expand conv/BN even when expansion == 1 and never runs it: kept so that
        # the official state dict loads; frozen so DDP sees no unused trainable parameter (the BN
        # hook sums only the layers that fired, so this BN never enters the BN loss).
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        if expansion == 1:
            self.conv1.requires_grad_(False)
            self.bn1.requires_grad_(False)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), _bn(mid)
        self.se = SqueezeExcite(mid, int(cin * 0.25))  # SE width from *input* channels
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
        # Drop-connect omitted: its rate is 0 in the reference (block counter never advances).
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = x if self.expansion == 1 else F.silu(self.bn1(self.conv1(x)))
        out = self.se(F.silu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return out + x if self.residual else out


class EfficientNetB0Cifar(nn.Module):
    # (blocks, expansion, out channels, kernel, stride of the stage's first block)
    cfg = [(1, 1, 16, 3, 1), (2, 6, 24, 3, 2), (2, 6, 40, 5, 2), (3, 6, 80, 3, 2),
           (3, 6, 112, 5, 1), (4, 6, 192, 5, 2), (1, 6, 320, 3, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), _bn(32)  # stride-1 stem for 32 px input
        blocks, cin = [], 32
        for n, t, c, k, s in self.cfg:
            for i in range(n):
                blocks.append(MBConv(cin, c, k, s if i == 0 else 1, t))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(320, num_classes)

    def forward(self, x):
        out = self.layers(F.silu(self.bn1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(F.dropout(out, 0.2, self.training))


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
        self.stride = stride
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, groups=g, bias=False), _bn(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), _bn(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False), _bn(cout)
        # Stride-2 blocks concatenate an avg-pooled copy of the input instead of adding it.
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetG2(nn.Module):
    def __init__(self, num_classes=10, out_planes=(200, 400, 800), num_blocks=(4, 8, 4), groups=2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), _bn(24)
        cin = 24
        for stage, (c, n) in enumerate(zip(out_planes, num_blocks), 1):
            blocks = []
            for i in range(n):
                # First block: stride 2, conv branch makes c - cin channels, concat restores c.
                blocks.append(ShuffleBottleneck(cin, c - cin if i == 0 else c, 2 if i == 0 else 1, groups))
                cin = c
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(out_planes[-1], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------- DM-KD's CIFAR-100 nets
# cifarresnet18/34 (zhengli97/DM-KD@bbab9ce:models/cifar_resnet.py:208-254): torchvision's key layout
# (conv1, bn1, layerN.i.{conv,bn}{1,2}, downsample.{0,1}, fc) and a 3x3 stride-1 stem without max-pool,
# but NO ReLU after the stem BN (:233-234): built in build_model from resnet*_modified. A DM-KD checkpoint
# also loads strictly into resnet18_modified (same keys) but gives other logits there.
# WRN-d-k (DM-KD@bbab9ce:models/wrn.py:13-158, Wei Yang's pre-activation WRN), in its key layout.
class WRNBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = _bn(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = _bn(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        # a channel change takes the 1x1 shortcut from the pre-activated input (wrn.py:26-38)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, ch = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for g in range(3):  # blockG.layer.i: its NetworkBlock's Sequential
            blocks = [WRNBlock(ch[g] if i == 0 else ch[g + 1], ch[g + 1], (1 if g == 0 else 2) if i == 0 else 1)
                      for i in range(n)]
            setattr(self, f"block{g + 1}", nn.ModuleDict({"layer": nn.Sequential(*blocks)}))
        self.bn1, self.fc = _bn(ch[3]), nn.Linear(ch[3], num_classes)
        for m in self.modules():  # wrn.py:78-86
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3["layer"](self.block2["layer"](self.block1["layer"](self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1))  # = avg_pool2d(8) at 32 px


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


# ----------------------------------------------------------------------------------------------
# teachers
# ----------------------------------------------------------------------------------------------
def load_state(model, path, what="checkpoint"):
    """Load the checkpoint formats the papers ship into `model`: a bare state dict or one under
    "model"/"state_dict"/"net", keys with a DataParallel "module." prefix, the official key layouts
    (UFC's kuangliu-style CIFAR nets by module name; RDED/DELT's and DD-Ranking's ConvNet renamed by
    convnet_keys), and RDED's classifier that was built 1000-way and sliced to the first C rows.
    Always weights_only=True."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} {'is a folder, not a checkpoint file' if os.path.isdir(path) else 'does not exist'}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what} {path} {_checkpoint_problem(path, e)}") from e
    for key in ("model", "state_dict", "net"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        kind = "an empty dict" if sd == {} else f"a {type(sd).__name__}" if not isinstance(sd, dict) else "a dict of non-tensors"
        raise UserError(f"{what} {path} holds {kind}, not a state dict of named tensors: save the model with "
                        f"torch.save(model.state_dict(), path)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if isinstance(model, ConvNet):
        sd = convnet_keys(sd)
        if not any(k.endswith("running_mean") for k in sd):  # no BN statistics: the instance-norm ConvNet
            model.instance_norm()
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


def convnet_keys(sd):
    """A ConvNet state dict in any of the layouts in use, renamed to ours (features.N, fc.*):
    RDED/DELT's released teachers (layers.conv.d, layers.norm.d, classifier.*; LINs-lab/RDED@31f9117:
    synthesize/models.py) and DD-Ranking's (ours with classifier.* for fc.*). The modules are the
    same, so the outputs are identical."""
    def rename(k):
        parts = k.split(".")
        if parts[0] == "layers" and len(parts) > 3 and parts[1] in ("conv", "norm") and parts[2].isdigit():
            return f"features.{4 * int(parts[2]) + (parts[1] == 'norm')}." + ".".join(parts[3:])
        return "fc." + k[len("classifier."):] if k.startswith("classifier.") else k
    return {rename(k): v for k, v in sd.items()}


def _checkpoint_problem(path, e):
    """What is wrong with a file torch.load(weights_only=True) refused, in words."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "is empty"
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found:
        return (f"holds Python objects besides tensors (such as {found.group(1)}), which the safe weights-only load "
                f"refuses: re-save the state dict alone")
    if head.startswith(b"PK"):  # the zip archive torch.save writes
        return "is a damaged or truncated torch archive (copy it again)"
    return "is not a torch checkpoint (neither the zip archive torch.save writes nor a pickle of tensors)"


def _classifier_keys(state):
    weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    w = weights[-1] if weights else None
    return w, (w[:-6] + "bias") if w else None


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# torchvision ImageNet-1K weights, named as the official code loads them: `pretrained=True` (DELT/RDED
# evaluation, DM-KD), weights='DEFAULT' on resnet18 (DELT recover, D4M; V1 is its only weight) and
# explicit IMAGENET1K_V1 (UFC ufc_imgnet.py:208-225) all mean V1. weights="DEFAULT" would give V2 for
# ResNet-50/101 and MobileNetV2 (stronger teachers than the papers had).
PRETRAINED = {"resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V1", "resnet101": "IMAGENET1K_V1",
              "mobilenet_v2": "IMAGENET1K_V1", "efficientnet_b0": "IMAGENET1K_V1"}


def pretrained_weights(arch):
    """The torchvision weights enum member a pretrained `arch` teacher uses (nothing is downloaded)."""
    return torchvision.models.get_model_weights(arch)[PRETRAINED[arch]]


def load_teacher(arch, dataset, path=None, data_path=None, seed=0, device="cpu"):
    """A frozen eval-mode teacher: `path` if given; torchvision pretrained weights for `imagenet`;
    for `digits` one trained on first use and cached; otherwise a clear request for --teacher-path."""
    info = dataset_info(dataset)
    model = build_model(arch, info.num_classes, input_size(dataset, arch))
    if path:
        load_state(model, path, "teacher checkpoint")
    elif dataset == "digits":
        model = digits_teacher(arch, seed)
    elif dataset == "imagenet" and arch in PRETRAINED:
        try:
            model = torchvision.models.get_model(arch, weights=pretrained_weights(arch))
        except Exception as e:
            raise UserError(f"cannot fetch torchvision's pretrained {arch} weights ({e.__class__.__name__}); "
                            f"download them elsewhere and pass the file with --teacher-path") from e
    else:
        raise UserError(f"no pretrained {arch} teacher is known for {dataset}; pass its checkpoint with --teacher-path")
    return freeze(model).to(device)


def checkpoint_norm(path):
    """What input normalisation a checkpoint expects, when it says so: (mean, std, why) or None.
    A dict with "mean" and "std" entries says it outright; a ConvNet in RDED/DELT's key layout
    (layers.conv.d) was trained by RDED, which normalises with ImageNet statistics on every dataset
    (LINs-lab/RDED@31f9117:synthesize/utils.py, validation/main.py)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None  # load_state reports an unreadable file in one sentence
    if not isinstance(sd, dict):
        return None
    if "mean" in sd and "std" in sd:
        return tuple(map(float, sd["mean"])), tuple(map(float, sd["std"])), f"recorded in {path}"
    for key in ("model", "state_dict", "net"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if any(k.removeprefix("module.").startswith("layers.conv.") for k in sd):
        return IMAGENET_MEAN, IMAGENET_STD, f"ImageNet statistics: {path} is in RDED's ConvNet layout"
    return None


def resolve_norm(dataset, teacher_paths=(), mean=None, std=None, norm="auto", default=None):
    """The (mean, std, source) the teacher's inputs are normalised with. --mean/--std beat everything;
    norm "imagenet"/"dataset" forces a choice; "auto" takes what the checkpoints say (checkpoint_norm)
    and else the dataset's statistics (`default`: (mean, std, why) of a method's own constants)."""
    info = dataset_info(dataset)
    base = default or (info.mean, info.std, f"{dataset} statistics")
    if norm == "imagenet":
        base = (IMAGENET_MEAN, IMAGENET_STD, "ImageNet statistics (--norm imagenet)")
    elif norm == "auto":
        said = {}
        for p in [p for p in teacher_paths if p]:
            hint = checkpoint_norm(p)
            if hint:
                said.setdefault(hint[:2], hint)
        if len(said) > 1:
            raise UserError("the teacher checkpoints expect different input normalisations "
                            f"({'; '.join(h[2] for h in said.values())}): pass --mean and --std")
        base = next(iter(said.values()), base)
    elif norm != "dataset":
        raise UserError(f"unknown normalisation rule {norm!r}: auto, dataset or imagenet")
    if mean is None and std is None:
        return tuple(base[0]), tuple(base[1]), base[2]
    return (tuple(mean or base[0]), tuple(std or base[1]),
            "--mean/--std" if mean and std else f"--{'mean' if mean else 'std'} with {base[2]}")


def cache_dir():
    """Where digits teachers and shared artefacts are cached: $DD_CACHE, else ~/.cache/dd-reference."""
    path = os.environ.get("DD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dd-reference")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"the cache folder {path} ($DD_CACHE) is a file, not a folder: point DD_CACHE at a folder")
    return path


def make_cache_dir(path):
    """Create a folder under the cache before writing into it; a cache that cannot be written is one sentence."""
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UserError(f"cannot write in the cache folder {path} ({e.strerror or e}): point DD_CACHE at a "
                        f"writable folder") from e
    return path


def read_cached(path, what, load):
    """Validate-or-rebuild, for every artefact under $DD_CACHE: `load(path)` returns the artefact and raises on
    anything damaged (unreadable, cut short, wrong keys, shapes or counts). Returns None when the entry is absent
    or was damaged; a damaged entry is removed with one line saying so, and the caller rebuilds it. One that
    cannot be removed is refused in one sentence naming it."""
    if not os.path.lexists(path):
        return None
    try:
        return load(path)
    except Exception as e:
        reason = user_sentence(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        reason = reason if len(reason) < 160 else reason[:157] + "..."
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        except FileNotFoundError:
            pass  # another process (rank) found it damaged too and removed it
        except OSError as err:
            raise UserError(f"the cached {what} {path} is damaged ({reason}) and cannot be removed "
                            f"({err.strerror or err}): delete it") from e
        print(f"note: the cached {what} {path} was damaged ({reason}); removed it, rebuilding it")
        return None


def weights_hash(model):
    """A short sha256 of a model's state dict (names, shapes, dtypes, bytes): which teacher made a
    cached artefact, whatever file or hub id its weights came from."""
    h = hashlib.sha256()
    for name, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def content_hash(obj):
    """A short sha256 of any JSON-able description: the key of a cached artefact."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(kind, key, suffix):
    """$DD_CACHE/<kind>/<content_hash(key)><suffix>: artefacts that depend only on the data and a
    model (DELT's ranking, D4M's latents, VLCP's captions), shared by every run that asks for the same
    thing, so a loop over IPC computes them once. `key` is any JSON-able description of what went in."""
    return os.path.join(cache_dir(), kind, f"{content_hash(key)}{suffix}")




DIGITS_TEACHER_EPOCHS = 3


def digits_teacher(arch, seed=0, epochs=DIGITS_TEACHER_EPOCHS, verbose=True):
    """Train `arch` on the digits train split on first use (seeded, deterministic on the CPU), cache
    it with its test accuracy and training time, and return it (frozen, eval mode)."""
    path = os.path.join(cache_dir(), "teachers", f"digits_{arch}_seed{seed}_ep{epochs}.pt")
    model = build_model(arch, 10, 32)
    load = lambda p: load_state(model, p, "cached digits teacher")  # noqa: E731  damaged or not this arch: retrained
    if read_cached(path, f"digits teacher {arch}", load) is not None:
        return freeze(model)
    make_cache_dir(os.path.dirname(path))
    with open(path + ".lock", "a") as lock:  # two runs started together: one trains, the other waits and loads
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_cached(path, f"digits teacher {arch}", load) is not None:
            return freeze(model)
        return _train_digits_teacher(arch, seed, epochs, path, verbose)


def _train_digits_teacher(arch, seed, epochs, path, verbose):
    """digits_teacher's training: SGD with one-cycle, random shifts, then the test accuracy and the cache file."""
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
def evaluate(model, loader, device="cpu", precision="auto"):
    """Top-1 accuracy (%) of `model` on a loader of (normalised images, labels)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    return 100.0 * float(correct) / max(total, 1)


# ----------------------------------------------------------------------------------------------
# BatchNorm-statistics matching (SRe2L/CDA/DELT/INFER; VILA-Lab/DELT@f2f81ca:recover/utils.py BNFeatureHook)
# ----------------------------------------------------------------------------------------------
class _VarMean(torch.autograd.Function):
    """Biased per-channel (var, mean) of [N,C,H,W] in fp32, whatever the input dtype, with the backward
    written out: d var/dx = 2 (x - mean) / n, d mean/dx = 1 / n (n = N*H*W). It keeps no fp32 copy of a
    bf16 input (autograd of var_mean(x.float()) would keep one per BN layer: here the copy is transient),
    and the input it saves is the one BatchNorm saves anyway. CUDA: one fused var_mean kernel; CPU: two
    vectorised passes (mean, then the centred squares), about 10x faster there than var_mean's Welford
    loop and as accurate."""

    @staticmethod
    def forward(ctx, x):
        xf = x.float()
        if xf.is_cuda:
            var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        else:
            mean = xf.mean((0, 2, 3))
            var = (xf - mean.view(1, -1, 1, 1)).square_().mean((0, 2, 3))
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var, grad_mean):
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        scale = 2.0 / n * grad_var if grad_var is not None else torch.zeros_like(mean)
        shift = (grad_mean / n if grad_mean is not None else 0) - scale * mean
        # x * scale + (grad_mean / n - scale * mean): one elementwise pass, no fp32 copy of x
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)).to(x.dtype)


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
            var, mean = _VarMean.apply(inputs[0])  # in fp32 whatever the input dtype
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
    if name.startswith("cuda"):
        n = torch.cuda.device_count()
        try:
            index = torch.device(name).index
        except RuntimeError:
            index = -1
        if index is not None and not 0 <= index < n:
            raise UserError(f"--device {name} is not a CUDA device of this machine: use cuda or cuda:0 .. cuda:{n - 1}")
    return name


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision, device):
    """What `precision` means on `device`: "auto" -> bf16 on a CUDA GPU with native bf16 (compute
    capability >= 8: Ampere and later), else fp32 (the CPU, and pre-Ampere GPUs, which only emulate
    bf16; fp16 there would need loss scaling inside the recover and UFC graphs, not done). The
    official code is fp32 everywhere. Scripts resolve it once and record the result."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        device = torch.device(device)
        return "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return precision


def add_precision_arg(group):
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="teacher/optimisation arithmetic: fp32 (as the official code) or bf16 autocast; "
                            "auto = bf16 on CUDA GPUs with native bf16 (compute capability >= 8), else fp32; "
                            "the run records what it resolved to")


def autocast(device, precision="auto", cache=True):
    """bf16 autocast (CUDA or CPU) when `precision` resolves to bf16; a no-op for fp32. cache=False
    inside CUDA-graph captures (autocast's weight-cast cache must not outlive a capture)."""
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)


class StepGraph:
    """Runs a fixed-shape step (all its state in device tensors, a step counter included, so that a
    replay is exactly the next step) n times. On CUDA with graphs on: `warmup` eager calls on a side
    stream of the model's device (cuDNN picks its algorithms, optimiser state appears), one call
    captured as a CUDA graph (recorded, not run), then n - warmup replays: no host work per step.
    run(..., same=True) replays the last graph for n more steps without capturing again (the caller's
    step is unchanged, e.g. an EarlyLate round whose active set did not grow). A capture that raises
    is reported once in one sentence and the steps run eagerly (same maths); later captures are not
    tried. Elsewhere (CPU, graphs off) every call is eager."""

    def __init__(self, device, graphs=True):
        self.device = torch.device(device)
        self.graphs = graphs and graph_capable(self.device)
        self.graph, self.captures = None, 0

    def run(self, step, n, same=False, warmup=2):
        if same and self.graph is not None:
            with graph_device(self.device):
                for _ in range(n):
                    self.graph.replay()
            return
        self.graph = None  # the previous graph's memory goes back before the next capture
        if not self.graphs or StepGraph.failed or n <= warmup + 1:
            for _ in range(n):
                step()
            return
        with side_stream(self.device):
            for _ in range(warmup):
                step()
        try:
            self.graph = capture_graph(step, self.device)
            self.captures += 1
        except Exception as e:  # any capture error: the same steps eagerly
            StepGraph.failed = True
            print(f"warning: capturing the step as a CUDA graph failed ({e.__class__.__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly (same maths, slower)",
                  file=sys.stderr, flush=True)
            for _ in range(n - warmup):
                step()
            return
        with graph_device(self.device):
            for _ in range(n - warmup):
                self.graph.replay()

    failed = False  # set on the first capture error of the process: later steps run eagerly without trying


def graph_capable(device):
    """CUDA graphs exist only on CUDA devices."""
    return torch.device(device).type == "cuda"


def graph_device(device):
    """`device` as the current CUDA device while its graphs replay; nothing elsewhere."""
    return torch.cuda.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def side_stream(device):
    """A side stream of `device` (not the current device: --device cuda:N works outside torchrun) that
    waits for the current stream's work and is waited for after; nothing on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.device(device), torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def capture_graph(step, device):
    """One call of step() recorded (not run) as a CUDA graph on a side stream of `device`. Unlike
    torch.cuda.graph it pays no device synchronize and no empty_cache per capture; no pool is shared
    (each graph's memory goes back when it is dropped); thread_local capture mode, so that a
    pin-memory or loader thread does not invalidate it."""
    g = torch.cuda.CUDAGraph()
    with side_stream(device):
        g.capture_begin(capture_error_mode="thread_local")
        try:
            step()
        except BaseException:
            with contextlib.suppress(Exception):
                g.capture_end()
            raise
        g.capture_end()
    return g


def cast_teacher(model, precision, device):
    """For bf16: cast a frozen teacher's conv and linear weights to bf16 once, so that autocast does not
    re-cast them on every forward (it only caches casts of leaves that require grad). The values are
    those autocast would make; BatchNorm stays fp32 (its running statistics are the BN loss's targets).
    The teacher must then only be called under autocast(device, precision)."""
    if resolve_precision(precision, device) == "bf16":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.to(torch.bfloat16)
    return model


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
    if device.startswith("cuda"):  # also for an explicit cuda:N: streams, graphs and syncs act on the current device
        torch.cuda.set_device(torch.device(device))
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
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:  # interrupted or failed: no temp file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_out_folder(path, flag="--out"):
    """An output folder flag checked before any work: an existing folder, or one that can be created (its
    nearest existing ancestor is a writable folder)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == os.path.abspath(path) and not os.path.isdir(probe):
        raise UserError(f"{flag} {path} is a file, not a folder")
    if not os.path.isdir(probe):
        raise UserError(f"cannot create {flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {flag} {path}: {probe} is not writable")
    return path


def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
                 "eval_epochs"}


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


class RunDir:
    """An output folder of the on-disk contract (README.md "The on-disk contract"). It refuses to write over a
    different run unless `overwrite`, writes classes.json and run.json, writes each class atomically
    (a temp folder renamed into place), says which classes are already complete, times stages, and
    finishes with status "done" and a preview grid. Under torchrun every rank writes its own class
    folders; rank 0 alone writes the shared files. Rank 0 holds the folder's lock file (.lock: pid,
    host) until the run finishes or the process ends; a second run on the folder stops with who holds
    it, and a lock whose process is gone is taken over. A folder that holds only the record of a start
    that did no work (status running, no stage done, nothing but records, temp files, empty folders)
    is replaced without --overwrite."""

    CONTRACT = ("classes.json", "run.json", "soft_labels.pt", "fkd", "preview.png")
    LOCK = ".lock"  # {"pid", "host", "started", "argv"} of the process writing the folder
    _active = []  # RunDirs of this process: their locks are released and failed starts rolled back at exit

    def __init__(self, out, args, classes, argv=None, rank=0, overwrite=False, extra_artefacts=(),
                 ignore=()):
        self.out, self.classes, self.rank = out, classes, rank
        self.identity = {k: v for k, v in sorted(vars(args).items())
                         if k not in VOLATILE_ARGS and k not in ignore}
        self.fmt = getattr(args, "format", "png")
        self.record_path = os.path.join(out, "run.json")
        self.lock_path = os.path.join(out, self.LOCK)
        self.locked = False
        before = sorted(os.listdir(out)) if os.path.isdir(out) else None
        self.fresh, self._before = False, before  # set for real once the record is read
        if rank == 0:
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create --out {out}: {e.strerror or e}") from e
            RunDir._active.append(self)
            self._lock()  # before anything in the folder is read or changed
        old = self._read_record(overwrite)
        self.fresh = old is None and not (before or [])  # nothing of an earlier run was there
        if old is not None and old.get("identity") != self.identity:
            failed_start = old.get("status") == "running" and not old.get("stages") and self._holds_no_work()
            if not overwrite and not failed_start:
                raise self.different_run(out, old.get("identity"), self.identity)
            if rank == 0:
                if failed_start and not overwrite:
                    print(f"note: {out} holds only the record of an unfinished start that did no work; replacing it")
                self._clear(extra_artefacts)
            old = None
        elif old is None and os.path.isdir(out) and any(self._is_class_dir(e) for e in os.listdir(out)):
            if not overwrite:
                raise UserError(f"{out} holds class folders but no run record; pass --overwrite to replace them "
                                f"or choose another --out")
            if rank == 0:
                self._clear(extra_artefacts)
        if rank == 0:
            self._remove_temps()
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

    @classmethod
    def precheck(cls, out, args, overwrite=False, ignore=()):
        """The refusals of __init__ (a different run, class folders without a record, a damaged record),
        made before any training, download or model load; reads only, creates nothing."""
        if overwrite or not os.path.isdir(out):
            return
        probe = cls.__new__(cls)
        probe.out, probe.record_path = out, os.path.join(out, "run.json")
        old = probe._read_record()
        identity = json.loads(json.dumps({k: v for k, v in sorted(vars(args).items())
                                          if k not in VOLATILE_ARGS and k not in ignore}))
        if old is not None and old.get("identity") != identity:
            if old.get("status") == "running" and not old.get("stages") and probe._holds_no_work():
                return  # an unfinished start that did no work: replaced
            raise cls.different_run(out, old.get("identity"), identity)
        if old is None and any(cls._is_class_dir(e) for e in os.listdir(out)):
            raise UserError(f"{out} holds class folders but no run record; pass --overwrite to replace them "
                            f"or choose another --out")

    @staticmethod
    def different_run(out, old, identity):
        """The refusal of a folder that holds another run, naming what differs."""
        old = old if isinstance(old, dict) else {}
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        was = old.get("precision")
        if diff == ["precision"] and was in ("fp32", "bf16"):  # e.g. started on the CPU (fp32), resumed on a GPU (bf16)
            return UserError(f"{out} was made with --precision {was} and this run resolves to "
                             f"{identity.get('precision')}: pass --precision {was} to resume it without "
                             f"mixing arithmetics, or --overwrite to start again")
        return UserError(f"{out} holds a different run (differs in {', '.join(diff[:5]) or 'its record'}); "
                         f"pass --overwrite to replace it or choose another --out")

    def _read_record(self, overwrite=False):
        if not os.path.isfile(self.record_path):
            return None
        try:
            with open(self.record_path) as f:
                record = json.load(f)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return record
        except ValueError as e:
            if overwrite:
                return {"identity": None}  # a different run: cleared below
            raise UserError(f"{self.record_path} is damaged ({e}): pass --overwrite to replace the run in "
                            f"{self.out}, or choose another --out") from e

    def _holds_no_work(self):
        """True when the folder holds only bookkeeping: records, the lock, temp files, empty folders."""
        for e in os.scandir(self.out):
            if e.name in ("run.json", "classes.json", self.LOCK) or ".tmp" in e.name:
                continue
            if not (e.is_dir() and not os.listdir(e.path)):
                return False
        return True

    def _remove_temps(self):
        """Temp files and folders of an interrupted run (writes are temp + rename: never counted as done)."""
        for name in os.listdir(self.out):
            if name.startswith(".tmp-") or re.search(r"\.tmp\d+$", name):
                p = os.path.join(self.out, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)

    def _lock(self):
        """Take the folder's lock file, or stop with who holds it. A lock whose process is gone (same
        host) is stale and taken over; one of another host is refused with the way to clear it."""
        import socket
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}
        tmp = f"{self.lock_path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(me, f)
        except OSError as e:
            raise UserError(f"cannot write in --out {self.out}: {e.strerror or e}") from e
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.lock_path)  # atomic: the lock appears with its content, or not at all
                except FileExistsError:
                    holder = self._lock_holder()
                    if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                        break  # this process already holds it (main() called again in one process)
                    if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
                        print(f"note: removing the stale lock of process {holder.get('pid')} on {holder.get('host')}, "
                              f"which is gone")
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(self.lock_path)
                        continue
                    raise UserError(f"{self.out} is in use by another run (process {holder.get('pid')} on host "
                                    f"{holder.get('host')}, started {holder.get('started')}); wait for it to end or "
                                    f"choose another --out (if that process is gone, delete {self.lock_path})")
                if self._lock_holder().get("pid") == me["pid"]:
                    break
            else:
                raise UserError(f"cannot take the lock {self.lock_path}: another run keeps taking it")
        finally:
            os.remove(tmp)
        self.locked = True
        atexit.register(self.release)

    def _lock_holder(self):
        try:
            with open(self.lock_path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below only on this host's terms

    def release(self):
        """Remove this process's lock (at finish, and at exit by run_cli or atexit)."""
        if self.locked:
            self.locked = False
            if self._lock_holder().get("pid") == os.getpid():
                with contextlib.suppress(OSError):
                    os.remove(self.lock_path)

    @classmethod
    def release_locks(cls):
        for run in cls._active:
            run.release()

    @classmethod
    def rollback_failed_start(cls):
        """After a UserError: a fresh --out in which this (single) process did no work is put back as
        it was (removed, if this run created it), so the corrected command starts clean."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return  # other ranks may have written: the next start sees an unfinished start instead
        for run in cls._active:
            if run.locked and run.fresh and os.path.isdir(run.out) and not run.record_stages() and run._holds_no_work():
                run.release()
                for name in os.listdir(run.out):
                    if name not in (run._before or []):
                        p = os.path.join(run.out, name)
                        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
                if run._before is None:
                    with contextlib.suppress(OSError):
                        os.rmdir(run.out)

    def record_stages(self):
        return getattr(self, "record", {}).get("stages")

    def _clear(self, extra):
        for name in os.listdir(self.out):
            if (self._is_class_dir(name) or name in self.CONTRACT or name in extra or name.startswith(".tmp-")
                    or name.startswith(FKD_PREFIX)):
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
        self.release()


JPEG_QUALITY = 75  # PIL's default, which the official DELT/SRe2L/RDED/INFER save_images rely on


def save_images(images, paths):
    """Images [n,3,H,W] in [0,1] -> 8-bit files by suffix. PNG (the collection's default): rounded,
    lossless. JPEG (--format jpg): the official saving, truncated to uint8 ((x*255).astype(uint8))
    and written at quality 75 (e.g. VILA-Lab/DELT@f2f81ca:recover/recover.py save_images)."""
    from PIL import Image
    x = images.detach().float().clamp(0, 1) * 255
    jpeg = [p.lower().endswith((".jpg", ".jpeg")) for p in paths]
    rounded = x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy() if not all(jpeg) else None
    truncated = x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy() if any(jpeg) else None  # float->uint8 truncates
    for i, (p, j) in enumerate(zip(paths, jpeg)):
        if j:
            Image.fromarray(truncated[i]).save(p, quality=JPEG_QUALITY)
        else:
            Image.fromarray(rounded[i]).save(p)


def save_preview(out, classes=10, per_class=8):
    """preview.png: the first images of the first classes, one row per class, upscaled to >= 64 px; as
    many columns as the fullest of those classes has images (up to per_class), so IPC 1 is one column."""
    from PIL import Image
    rows = []
    dirs = sorted(n for n in os.listdir(out) if RunDir._is_class_dir(n))[:classes]
    per_class = min(per_class, max((len(os.listdir(os.path.join(out, d))) for d in dirs), default=0))
    for d in dirs:
        files = sorted(os.listdir(os.path.join(out, d)))[:per_class]
        rows += [to_tensor()(Image.open(os.path.join(out, d, f)).convert("RGB")) for f in files]
        rows += [torch.zeros_like(rows[-1])] * (per_class - len(files)) if files else []
    if not rows:
        return
    size = max(64, rows[0].shape[-1])
    rows = [F.interpolate(r[None], size=(size, size), mode="nearest")[0] for r in rows]
    torchvision.utils.save_image(torch.stack(rows), os.path.join(out, "preview.png"), nrow=per_class, padding=2)


def add_generic_args(parser, ipc=10, out=None):
    """The generic flag group every script shares (each script adds its own groups after it). `out`: the
    rule of the default output folder, shown in --help (the script fills it in)."""
    g = parser.add_argument_group("generic")
    g.add_argument("--dataset", default="digits", choices=list(DATASETS), help="dataset (the table in README.md 'Datasets')")
    g.add_argument("--data-path", default=None,
                   help="dataset root, required for every dataset but digits: train/ and val/ class folders (tiny, "
                        "imagenet*), or the folder holding cifar-10-batches-py/ or cifar-100-python/ (downloaded "
                        "there when online)")
    g.add_argument("--ipc", type=int, default=ipc, help="images per class of the distilled set")
    g.add_argument("--out", default=None, help="output folder of the distilled set (the on-disk contract)"
                   + (f"; default: {out}" if out else ""))
    g.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--format", default="png", choices=("png", "jpg"),
                   help="png: lossless, rounded; jpg: the official saving (JPEG quality 75 of truncated pixels)")
    g.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a different run")
    g.add_argument("--eval", action="store_true", default=None,
                   help="evaluate the distilled set with validate_fkd.py at the end: students on the set and on random "
                        "real images at the same IPC (default: on for digits, off elsewhere, where it takes GPU hours)")
    g.add_argument("--no-eval", dest="eval", action="store_false", help="skip the evaluation (also on digits)")
    return g


NUMBER_RULES = {">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
                "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1,
                "in [0, 0.5]": lambda v: 0 <= v <= 0.5}


def check_numbers(args, rules):
    """Refuse a numeric flag outside its rule in one sentence, before any work (an --epochs 0 read as "the
    preset's" would train for minutes on a typo). `rules`: {rule (a NUMBER_RULES key): "flag_a flag_b ..."};
    unset flags (None) are skipped; a flag of several numbers (--std) is checked number by number."""
    for rule, names in rules.items():
        for name in names.split():
            value = getattr(args, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(math.isfinite(v) and NUMBER_RULES[rule](v) for v in values):
                raise UserError(f"--{name.replace('_', '-')} must be {rule}, not {' '.join(map(str, values))}")


def eval_on(args):
    """--eval/--no-eval as given, else on for digits only (every script the same way). A zero or negative
    --eval-epochs/--eval-repeats is refused here, before any work (it would silently mean the preset's)."""
    check_numbers(args, {">= 1": "eval_epochs eval_repeats"})
    if getattr(args, "eval", None) is None:
        args.eval = args.dataset == "digits"
    return args.eval


DIGITS_EVAL_REPEATS = 3  # students per set and random-real baseline on digits: a mean ± std, not one draw


def eval_repeats(args):
    """--eval-repeats as given, else 3 on digits, else None (validate_fkd's preset: the method's official count)."""
    return args.eval_repeats or (DIGITS_EVAL_REPEATS if args.dataset == "digits" else None)


def teacher_cached(arch, dataset, path=None, seed=0):
    """True when load_teacher will read a digits teacher trained earlier (for the closing line)."""
    return (dataset == "digits" and not path and
            os.path.isfile(os.path.join(cache_dir(), "teachers", f"digits_{arch}_seed{seed}_ep{DIGITS_TEACHER_EPOCHS}.pt")))


def closing_line(method, dataset, ipc, where, result=None, reused=None):
    """The last line of every script and of validate_fkd.py, one shape: method, dataset, IPC, where the
    result is; the students' best top-1 on the distilled set beside random real images at the same IPC
    (mean ± population std); the student budget (students, architecture, epochs, optimiser steps);
    protocol and evaluation preset; what was reused from $DD_CACHE. `result`: validate_fkd.main's record."""
    parts = [f"{method}: {dataset} IPC {ipc} -> {where}"]
    if result is None:
        parts.append("top-1 not evaluated (" + ("--no-eval)" if dataset == "digits" else "pass --eval)"))
    else:
        base = result.get("baseline")
        only_random = result.get("kind") == "random real subsets"
        acc = f"{result['best_mean']:.2f} ± {result['best_std']:.2f}"
        if only_random:
            parts.append(f"top-1 random real {acc}")
        else:
            parts.append(f"top-1 distilled {acc} vs " + (f"random real {base['best_mean']:.2f} ± {base['best_std']:.2f}"
                                                         if base else "no random-real baseline (--baseline random)"))
        steps = f"{result.get('steps', '?')} optimiser steps"
        if base and base.get("steps") != result.get("steps"):
            steps = f"{result.get('steps', '?')} (distilled) / {base.get('steps', '?')} (random real) optimiser steps"
        n, epochs = result["repeats"], result.get("epochs", "?")
        parts.append(f"{n} student{'s' * (n != 1)}{' each' if base else ''}: {result['student']}, {epochs} "
                     f"epoch{'s' * (epochs != 1)} = {steps}")
        parts.append(f"protocol {result['protocol']} ({result['label_mode']} labels), preset {result.get('preset') or 'none'}")
    used = [k for k, v in (reused or {}).items() if v]
    parts.append("reused from cache: " + (", ".join(used) if used else "nothing"))
    return " | ".join(parts)


def apply_presets(args, presets, defaults):
    """Fill every flag the user left unset (None) from the dataset's preset, then from `defaults`:
    an explicit flag always beats a preset."""
    for k, v in {**defaults, **presets.get(args.dataset, {})}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def document_defaults(p, presets=None, defaults=None, sources="", citations=""):
    """Make `--help` a complete guide: every flag's help ends with its default; a flag filled from the
    per-dataset presets lists the value of each dataset that has one; `sources` (where the presets come
    from, read the comment beside each value in the file for the exact line) and `citations` (the key
    of the short citations like D:path in the help texts) go to the epilog."""
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
    if citations:
        p.epilog = ((p.epilog + "\n\n") if p.epilog else "") + "citations: " + citations
    if sources:
        p.epilog = ((p.epilog + "\n\n") if p.epilog else "") + "presets: " + sources
    return p


# diffusers' log lines that say nothing to a user of these scripts (silenced at hub_from_pretrained, and only these):
# DiT's model_index.json stores id2label with string keys (JSON), which DiTPipeline converts itself
NOISE = {"diffusers.pipelines.pipeline_utils": ("Expected types for id2label:",)}


class _DropNoise:
    """A logging filter that drops the records of one logger that start with the given texts."""

    def __init__(self, starts):
        self.starts = starts

    def filter(self, record):
        return not str(record.getMessage()).startswith(self.starts)


def _quiet_diffusers():
    import logging
    for name, starts in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(starts))


def hub_from_pretrained(cls, name, flag, **kwargs):
    """`cls.from_pretrained(name)`; offline without a local copy becomes one sentence naming `flag`.
    Without `accelerate` (not a dependency), diffusers models load with low_cpu_mem_usage=False instead of
    warning that they fall back to it; a pipeline named by hub id is looked up first (hub_check), so an
    offline miss is our sentence, not diffusers' "Couldn't connect to the Hub" lines before it."""
    if cls.__module__.startswith("diffusers"):
        import importlib.util
        _quiet_diffusers()
        if importlib.util.find_spec("accelerate") is None:
            kwargs.setdefault("low_cpu_mem_usage", False)
        if getattr(cls, "config_name", None) == "model_index.json" and not os.path.isdir(name):
            hub_check(name, flag, "model_index.json")
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        if os.path.isdir(name):
            raise UserError(f"cannot load {name} as a {cls.__name__} folder ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from e
        raise UserError(f"cannot load {name!r} from the Hugging Face hub (offline, or no such model) and no local "
                        f"folder has that name; download it elsewhere and pass the folder with {flag}") from e


def hub_check(name, flag, filename="config.json"):
    """Stop before any output when the model `name` (hub id or folder) is not there: a folder must hold
    `filename`; a hub id must resolve it (from the local cache when offline). Loads no weights."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, filename)):
            raise UserError(f"{name} holds no {filename}: it is not a saved model folder for {flag}")
        return
    try:
        from huggingface_hub import hf_hub_download
        hf_hub_download(name, filename)
    except Exception as e:
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
    dirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".") and e.name != "fkd")
    if not dirs:  # before the classes.json warning, which would say nothing useful here
        raise UserError(f"{folder} holds no class folders: a set is one folder per class (00000/, 00001/, ...)")
    check_classes_json(folder, classes)
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


def set_identity(folder):
    """{"images": count, "digest": sha256 of the relative path and bytes of each image, in ImageFolder order}: which
    set stored labels (soft_labels.pt, the FKD store) were made for, recorded with them and checked before training."""
    h, n = hashlib.sha256(), 0
    for d in sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".") and e.name != "fkd"):
        for f in sorted(os.listdir(os.path.join(folder, d))):
            if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")):
                h.update(f"{d}/{f}\0".encode())
                with open(os.path.join(folder, d, f), "rb") as fh:
                    h.update(hashlib.sha256(fh.read()).digest())
                n += 1
    return {"images": n, "digest": h.hexdigest()[:16]}


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
# the same views as matrices: batched on the device, differentiable, fixed shapes
# ----------------------------------------------------------------------------------------------
def resize_weights(start, length, size, out, flip=None, shift=None):
    """One axis of torchvision's resized crop as a matrix: W [..., out, size] takes pixels
    [start, start + length) of an axis of `size` pixels, resizes them to `out` (bilinear,
    align_corners=False, antialiased when shrinking, as F.interpolate(antialias=True)), then mirrors
    them (flip) and rolls them by `shift` (torch.roll), so that a view of x is W_y @ x @ W_x^T.
    start/length/flip/shift are tensors of shape [...] (one view each); only tensor ops, so it runs
    inside a CUDA graph. When enlarging (length <= out) the rows are the 2-tap bilinear weights with
    edge clamping of F.interpolate(antialias=False) as well."""
    dev = start.device
    start, length = start.float()[..., None, None], length.float()[..., None, None]
    q = torch.arange(out, device=dev, dtype=torch.float32)[:, None]  # output position
    if shift is not None:  # roll(v, s)[p] = v[(p - s) mod out]
        q = torch.remainder(q - shift.float()[..., None, None], out)
    if flip is not None:
        q = torch.where(flip.bool()[..., None, None], out - 1 - q, q)
    scale = length / out
    center = scale * (q + 0.5)
    j = torch.arange(size, device=dev, dtype=torch.float32) - start  # input position inside the crop
    w = torch.clamp(1 - torch.abs(j + 0.5 - center) / torch.clamp(scale, min=1.0), min=0)
    w = torch.where((j >= 0) & (j < length), w, torch.zeros((), device=dev))
    return w / w.sum(-1, keepdim=True)


def apply_views(x, wy, wx):
    """x [N,C,H,W] -> wy @ x @ wx^T: wy [out,H] / wx [out,W] shared by the batch, or [N,out,H] /
    [N,out,W] one per image. Always in fp32 (never under autocast): it is the pixels' resampling."""
    if wy.dim() == 3:
        wy, wx = wy[:, None], wx[:, None]
    with torch.autocast(x.device.type, enabled=False):
        return wy @ x.float() @ wx.transpose(-1, -2)


def draw_rrc_boxes(n, h, w, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """n RandomResizedCrop boxes (top, left, height, width) at once, with torchvision's get_params
    distribution: 10 tries of area fraction ~ U(scale), log aspect ~ U(log ratio), sides rounded half
    to even, the first try that fits; else its central fallback. Drawn on the CPU from generator g."""
    area = h * w
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 10, generator=g, dtype=torch.float64)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, 10, generator=g, dtype=torch.float64)
    cw = torch.round(torch.sqrt(area * s * torch.exp(log_r))).long()
    ch = torch.round(torch.sqrt(area * s / torch.exp(log_r))).long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.long().argmax(1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    if w / h < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif w / h > max(ratio):
        fh, fw = h, int(round(h * max(ratio)))
    else:
        fw, fh = w, h
    fits = ok.any(1)
    ch, cw = torch.where(fits, ch, fh), torch.where(fits, cw, fw)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.where(fits, (u[:, 0] * (h - ch + 1)).long(), (h - fh) // 2)
    left = torch.where(fits, (u[:, 1] * (w - cw + 1)).long(), (w - fw) // 2)
    return torch.stack([top, left, ch, cw], 1)


def strip_permutation_index(perm, size):
    """ShufflePatches as a gather index: perm [n, f] orders the f strips torch.tensor_split makes of an
    axis of `size` pixels; returns idx [n, size] with shuffled[k] = x[idx[k]]."""
    f = perm.shape[1]
    lengths = torch.tensor([t.numel() for t in torch.tensor_split(torch.arange(size), f)])
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.stack([torch.cat([torch.arange(starts[k], starts[k] + lengths[k]) for k in p.tolist()]) for p in perm])


def to_device(tensors, device):
    """Integer/bool CPU tensors on `device`: on CUDA in one non-blocking copy from pinned memory (torch's
    caching host allocator keeps the buffer until the copy is done), so the host queues the next batch
    while the GPU works; elsewhere unchanged."""
    if torch.device(device).type != "cuda":
        return list(tensors)
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).pin_memory().to(device, non_blocking=True)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


class DeviceAugment:
    """train_transform's batchable part for a whole batch of uint8 images on the device: RDED's
    ShufflePatches, then RandomResizedCrop or Resize + RandomCrop with zero padding, a horizontal flip
    and the normalisation. Per-image parameters are drawn on the host from a generator with the
    distributions of the per-image path; all spatial ops of an image fold into two matrices
    (resize_weights), applied as two batched matmuls. ColorJitter, Lighting and RandAugment are not
    here: protocols that use them keep the loader path. Per batch the host makes one non-blocking copy
    (the parameters, to_device) and no sync; mean/std live on the device."""

    def __init__(self, size, mean, std, crop="rrc", min_scale=0.08, flip=True, factor=1, pad=4):
        self.size, self.mean, self.std, self.crop = size, mean, std, crop
        self.min_scale, self.flip, self.factor, self.pad = min_scale, flip, factor, pad
        self._norm = {}  # device -> (mean, std) tensors [1,3,1,1]

    def draw(self, n, h, w, g):
        """Per-image parameters: {"box" [n,4] (rrc) or "offset" [n,2] (pad), "flip" [n], "perm_y"/"perm_x" [n,f]}."""
        p = {}
        if self.factor > 1:  # random.shuffle of the strips: a uniform permutation per image and axis
            p["perm_x"] = torch.argsort(torch.rand(n, self.factor, generator=g), 1)
            p["perm_y"] = torch.argsort(torch.rand(n, self.factor, generator=g), 1)
        if self.crop == "rrc":
            p["box"] = draw_rrc_boxes(n, h, w, g, (self.min_scale, 1.0))
        else:  # RandomCrop(size, padding): top/left ~ U{0..2 pad} of the padded resized image
            p["offset"] = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        p["flip"] = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return p

    def matrices(self, p, h, w, device):
        """(W_y [n,size,h], W_x [n,size,w]) of the parameters p for images of h x w pixels."""
        n, s = len(p["flip"]), self.size
        flip = p["flip"].to(device)
        if self.crop == "rrc":
            box = p["box"].to(device)
            wy = resize_weights(box[:, 0], box[:, 2], h, s)
            wx = resize_weights(box[:, 1], box[:, 3], w, s, flip=flip)
        else:  # T.Resize(size) of the square image, then the padded crop (a shifted identity, zeros outside)
            full = torch.zeros(n, device=device)
            ry, rx = resize_weights(full, full + h, h, s), resize_weights(full, full + w, w, s)
            off = p["offset"].to(device)
            q = torch.arange(s, device=device)
            qx = torch.where(flip[:, None], s - 1 - q, q)
            sel_y = (q[None, :, None] + off[:, 0, None, None] - self.pad) == q[None, None, :]
            sel_x = (qx[:, :, None] + off[:, 1, None, None] - self.pad) == q[None, None, :]
            wy, wx = sel_y.float() @ ry, sel_x.float() @ rx
        if self.factor > 1:  # ShufflePatches first: W_total[:, idx[k]] = W[:, k]
            iy, ix = ((p[s] if s in p else strip_permutation_index(p[k], n_)).to(device)
                      for s, k, n_ in (("strip_y", "perm_y", h), ("strip_x", "perm_x", w)))
            wy = torch.zeros_like(wy).scatter_(2, iy[:, None].expand_as(wy), wy)
            wx = torch.zeros_like(wx).scatter_(2, ix[:, None].expand_as(wx), wx)
        return wy, wx

    def __call__(self, images, g, params=None):
        """images: uint8 [n,3,h,w] on the device -> normalised float views [n,3,size,size]."""
        n, _, h, w = images.shape
        p = params or self.draw(n, h, w, g)
        if self.factor > 1:  # the strip gather indices are made on the host, before the one copy
            p = {**p, "strip_y": strip_permutation_index(p["perm_y"], h), "strip_x": strip_permutation_index(p["perm_x"], w)}
        p = dict(zip(p, to_device(list(p.values()), images.device)))
        wy, wx = self.matrices(p, h, w, images.device)
        key = str(images.device)
        if key not in self._norm:
            self._norm[key] = tuple(torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in (self.mean, self.std))
        m, s = self._norm[key]
        return (apply_views(images.float() / 255, wy, wx) - m) / s  # = normalize(...), without a copy per batch


class DeviceImageSet:
    """A distilled set held on the training device as uint8 with DeviceAugment views: train_student
    batches it itself (same sampler and batch rule as the loader path), with no loader processes."""

    def __init__(self, images, targets, augment):
        self.images, self.targets, self.augment = images, torch.as_tensor(targets), augment

    def __len__(self):
        return len(self.targets)


class _DeviceBatches:
    def __init__(self, ds, sampler, batch_size, drop_last, device, g):
        self.ds, self.sampler, self.batch_size, self.drop_last, self.g = ds, sampler, batch_size, drop_last, g
        self.images, self.targets = ds.images.to(device), ds.targets.to(device)

    def __iter__(self):
        dev_order, = to_device([torch.tensor(list(self.sampler))], self.images.device)  # one copy per epoch
        for dev_idx in dev_order.split(self.batch_size):
            if self.drop_last and len(dev_idx) < self.batch_size:
                break
            yield self.ds.augment(self.images.index_select(0, dev_idx), self.g), self.targets.index_select(0, dev_idx), dev_idx


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


def make_optimizer(model, name, lr, weight_decay, momentum=0.9, decay="weights"):
    """AdamW with decay only on weights of ndim > 1 (decay "weights", as the RDED/SRe2L/D4M code) or on
    every parameter (decay "all": INFER's AdamW(model.parameters()), zhangxin-xd/UFC@83d19f8:
    ufc_validation/val_static.py:234), or SGD (decay on every parameter)."""
    if name == "adamw":
        every = decay == "all"
        decayed = [p for n, p in model.named_parameters() if p.ndim > 1 or every]
        rest = [p for n, p in model.named_parameters() if p.ndim <= 1 and not every]
        return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
    if name == "adamw_all":  # decay on every parameter (NUS-HPC-AI-Lab/DD-Ranking@b8b0966:ddranking/utils/train_and_eval.py:109-110)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
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
FKD_PREFIX = "fkd_"  # the store's files sit in the set's root: a folder there is one more class to every ImageFolder reader


def fkd_path(root, name):
    """Path of the FKD store file `name` ("meta.json", "epoch_0000.pt") of the set at `root`:
    <root>/fkd_<name>. Sets written before this layout keep <root>/fkd/<name>; that file is read
    when it is there and the new one is not."""
    new, old = os.path.join(root, FKD_PREFIX + name), os.path.join(root, "fkd", name)
    return old if not os.path.exists(new) and os.path.exists(old) else new


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
                 min_scale=0.08, flip=True, seed=42, device="cpu", start_epoch=0, precision="auto"):
    """Store FKD soft labels (SRe2L relabel / D4M training-time matching) for the set at `out_dir`:
    for each epoch one file <out_dir>/fkd_epoch_XXXX.pt with, per batch, the image indices, crop boxes
    (pixels of the stored image), flips, mix parameters and the teacher's fp16 logits on the augmented,
    mixed batch, and <out_dir>/fkd_meta.json. Files, not a folder, so ImageFolder(<out_dir>) still sees
    exactly the class folders. Complete epoch files (either layout) are kept on a rerun, so an
    interrupted generation resumes."""
    os.makedirs(out_dir, exist_ok=True)
    n, _, h, w = images.shape
    rrc = T.RandomResizedCrop(size, scale=(min_scale, 1.0))
    meta_path = os.path.join(out_dir, FKD_PREFIX + "meta.json")
    if start_epoch == 0 or not os.path.isfile(meta_path):  # which set the labels belong to, checked by the validator
        labelled_set = set_identity(out_dir)
    else:
        with open(meta_path) as f:
            labelled_set = json.load(f).get("set")
    for epoch in range(start_epoch, epochs):
        path = fkd_path(out_dir, f"epoch_{epoch:04d}.pt")
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
            with torch.no_grad(), autocast(device, precision):
                rec["logits"].append(teacher(x).float().half().cpu())
        atomic_torch_save(rec, path)
    atomic_write_json(meta_path, {
        "epochs": epochs, "batch_size": batch_size, "size": size, "mix": mix, "alpha": alpha,
        "min_scale": min_scale, "flip": flip, "seed": seed, "images": n, "mean": list(mean), "std": list(std),
        "set": labelled_set})


class FKDReplay(torch.utils.data.Dataset):
    """A batch-level dataset over one stored FKD epoch of the set at `fkd_dir` (either layout):
    item b is (mixed batch b, its logits)."""

    def __init__(self, images, fkd_dir, epoch, size, mean, std, rank=0, world=1):
        self.rec = torch.load(fkd_path(fkd_dir, f"epoch_{epoch:04d}.pt"), weights_only=True)
        self.images, self.size, self.mean, self.std = images, size, mean, std
        self.batches = list(range(len(self.rec["index"])))[rank::world]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        b = self.batches[k]
        return fkd_batch(self.images, self.rec, b, self.size, self.mean, self.std), self.rec["logits"][b]


def fkd_meta(fkd_dir):
    """The recipe of the FKD labels stored for the set at `fkd_dir` (fkd_meta.json, or fkd/meta.json)."""
    path = fkd_path(fkd_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"{fkd_dir} holds no stored FKD soft labels (fkd_meta.json missing): make them first with "
                        f"validate_fkd.py --relabel-epochs N (or d4m.py --ttm-epochs N), or choose another --protocol")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is damaged ({e}): delete it and store the labels again") from e


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
    decay: str = "weights"  # AdamW decays: weights (ndim > 1) | all (make_optimizer)
    milestones: tuple = ()
    gamma: float = 0.1
    temperature: float = 20.0
    t_squared: bool = False
    mix: str = "cutmix"  # cutmix | mixup | none
    alpha: float = 1.0
    eval_every: int = 10
    eval_from: float = 0.0  # first fraction of training without evaluation (RDED: 0.8)
    eval_phase: int = 0  # evaluate when (epoch - eval_phase) % eval_every == 0 (DD-Ranking: eval_every - 1)
    mix_labels: bool = True  # static labels follow the mix; False keeps each image's own (DD-Ranking mode S)
    seed: int = 0
    workers: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (resolve_precision)


def train_student(student, cfg, val_loader, device, train_set=None, teacher=None, static_labels=None,
                  fkd=None, dist_info=None, log=print):
    """Train `student` from scratch and evaluate it on `val_loader`.

    train_set: a dataset of (normalised augmented image, label, index) for the teacher/static/hard
    modes, or a DeviceImageSet (views made on the device, no loader); fkd: {"images", "dir", "size", "mean", "std"} for replayed stored labels. Returns
    {"best", "last", "history", "seconds", "images_per_s", "data_wait_share"}. Under torchrun the student is wrapped in
    DDP and rank 0 evaluates alone (no padded duplicates in the val set)."""
    d = dist_info or Dist(device=device)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)
    cuda = str(device).startswith("cuda")
    student = student.to(device)
    if cuda:
        student = student.to(memory_format=torch.channels_last)
    model = nn.parallel.DistributedDataParallel(student, device_ids=[d.local_rank] if cuda else None) if d.world > 1 else student
    opt = make_optimizer(student, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg.schedule, e, cfg.epochs, cfg.milestones, cfg.gamma))
    if static_labels is not None:
        static_labels = static_labels.float().to(device)
    loader = None
    if cfg.labels != "fkd":
        sampler = (torch.utils.data.DistributedSampler(train_set, d.world, d.rank, shuffle=True, seed=cfg.seed)
                   if d.world > 1 else torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed)))
        per_rank = max(1, cfg.batch_size // d.world)
        drop_last = len(train_set) % per_rank == 1
        if isinstance(train_set, DeviceImageSet):  # uint8 set on the device, views made there: no loader
            loader = _DeviceBatches(train_set, sampler, per_rank, drop_last, device,
                                    torch.Generator().manual_seed(cfg.seed * 7919 + d.rank + 104729))
        else:
            loader = torch.utils.data.DataLoader(train_set, per_rank, sampler=sampler, num_workers=cfg.workers,
                                                 drop_last=drop_last, pin_memory=cuda, persistent_workers=cfg.workers > 0,
                                                 worker_init_fn=quiet_worker)
    history, seen, waited, t0 = [], 0, 0.0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        batches = loader if loader is not None else torch.utils.data.DataLoader(
            FKDReplay(fkd["images"], fkd["dir"], epoch, fkd["size"], fkd["mean"], fkd["std"], d.rank, d.world),
            batch_size=None, shuffle=False, num_workers=cfg.workers, pin_memory=cuda, worker_init_fn=quiet_worker)
        total, steps = torch.zeros((), device=device), 0
        batches, t_wait = iter(batches), time.time()
        for batch in batches:
            waited += time.time() - t_wait  # time blocked on the data loader
            if cfg.labels == "fkd":
                x, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            else:
                x, y, idx = (t.to(device, non_blocking=True) for t in batch)
                p = draw_mix(cfg.mix, cfg.alpha, len(y), x.shape[-2], x.shape[-1], g)
                if "perm" in p:
                    p["perm"], = to_device([p["perm"]], device)
                x = apply_mix(x, p)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.precision):
                if cfg.labels == "teacher":
                    with torch.no_grad():
                        target = teacher(x)
                elif cfg.labels == "static":
                    target = mix_targets(static_labels[idx], p) if cfg.mix_labels else static_labels[idx]
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
        if d.main and (last or ((epoch - cfg.eval_phase) % cfg.eval_every == 0 and epoch >= cfg.eval_from * cfg.epochs)):
            acc = evaluate(student, val_loader, device, cfg.precision)
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


# ----------------------------------------------------------------------------------------------
# digits generators trained here (ours, not any paper's weights): an SD-1.x-layout Stable Diffusion
# for d4m.py and vlcp.py; dmkd.py's DiT reuses its VAE. Cached like the digits teachers.
# ----------------------------------------------------------------------------------------------
DIGITS_SD = "digits-sd"  # the --model name of digits_sd() in d4m.py and vlcp.py
DIGITS_TEMPLATES = ("{name}", "a handwritten {name}", "the digit {name}", "a handwritten digit {name}")
# every word the prompts, the computed captions (vlcp.py) and the negative prompt use (digits_tokenizer)
DIGITS_WORDS = """a an the of and with to in on is digit number handwritten written drawn image photo picture
thin thick medium bold light strokes stroke ink slanted leaning upright straight left right tall short narrow
wide small large no one two three closed loop loops open round curved black white background cartoon anime
painting""".split()


def digits_tokenizer(path):
    """A CLIPTokenizer over DIGITS_WORDS (written to `path`): the merges spell each word left to right, so
    every word, digit and punctuation mark maps to known tokens, never to <|endoftext|>-as-unknown; every
    word of the prompts and captions is one token (two unused words, black and anime, split in known pieces)."""
    from transformers import CLIPTokenizer
    chars = list(map(chr, range(33, 127)))  # printable ASCII: CLIP's byte-level pre-tokeniser keeps them
    vocab, merges = {}, []
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    for w in sorted(DIGITS_WORDS, key=len, reverse=True):  # longest first: a shorter word's merges never split it
        for k in range(1, len(w)):
            right, end = w[k] + ("</w>" if k == len(w) - 1 else ""), "</w>" if k == len(w) - 1 else ""
            merges.append(f"{w[:k]} {right}")
            vocab.setdefault(w[:k + 1] + end, len(vocab))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer.from_pretrained(path, model_max_length=77)


def cached_build(kind, recipe, build, verbose=True):
    """$DD_CACHE/generators/<kind>_<content_hash(recipe)>: made on first use by build(folder, **recipe) ->
    quality figures (seeded, under a file lock, in a temporary folder renamed when complete), with
    recipe.json holding the recipe, those figures and the training time; later calls return the path."""
    path = os.path.join(cache_dir(), "generators", f"{kind}_{content_hash(recipe)}")
    if os.path.isfile(os.path.join(path, "recipe.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(path, "recipe.json")):
            tmp = f"{path}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            t0, c0, load = time.time(), time.process_time(), os.getloadavg()[0]
            try:
                with torch.random.fork_rng():
                    torch.manual_seed(recipe["seed"])
                    figures = build(tmp, **recipe)
            except BaseException:  # interrupted or failed: no half-made folder left behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            figures.update(recipe=recipe, wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1),
                           threads=torch.get_num_threads(), load_before=load, versions=package_versions())
            atomic_write_json(os.path.join(tmp, "recipe.json"), figures)
            os.rename(tmp, path)
            if verbose:
                print(f"trained {kind} in {figures['wall_s']:.0f}s ({figures['cpu_s']:.0f} CPU-s): "
                      + ", ".join(f"{k} {v}" for k, v in figures.items() if k in ("recon_mse", "agreement")) + f" (cached at {path})")
    return path


def generator_record(path):
    """For run.json: a generator folder made by cached_build with its recipe, quality figures and training
    time (recipe.json), or just the name of any other model."""
    f = os.path.join(str(path), "recipe.json")
    if not os.path.isfile(f):
        return {"model": str(path), "trained_here": False}
    with open(f) as fh:
        rec = json.load(fh)
    return {"model": str(path), "trained_here": True, **{k: v for k, v in rec.items() if k != "versions"}}


def teacher_agreement(images, labels, arch="conv3", dataset="digits"):
    """% of generated images ([N,3,H,W] in [0,1]) that the cached digits teacher assigns to the class they were made for."""
    if dataset != "digits":
        return None
    with torch.enable_grad():  # trained on first use, also when called under no_grad
        teacher = digits_teacher(arch, verbose=False)
    mean, std = DATASETS[dataset].mean, DATASETS[dataset].std
    with torch.no_grad():
        pred = torch.cat([teacher(normalize(x.float(), mean, std)).argmax(1) for x in images.split(256)])
    return round(100.0 * float((pred == torch.as_tensor(labels)).float().mean()), 2)


def digits_vae(seed=0, steps=250, channels=(16, 32, 32), batch=64, lr=2e-3, verbose=True):
    """An SD-layout AutoencoderKL for digits (32 px <-> 4 x 8 x 8 with three blocks), its scaling_factor
    set from the measured latent std; trained on first use (tqdm bar) and cached."""
    return cached_build("digits_vae", dict(seed=seed, steps=steps, channels=list(channels), batch=batch, lr=lr),
                        _train_digits_vae, verbose)


def _train_digits_vae(out, seed, steps, channels, batch, lr):
    from diffusers import AutoencoderKL
    from tqdm import tqdm
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(channels), block_out_channels=channels,
                        up_block_types=("UpDecoderBlock2D",) * len(channels), layers_per_block=1,
                        norm_num_groups=16, latent_channels=4, sample_size=32)
    x = digits_split("train")[0] * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="digits VAE", unit="step"):
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        post = vae.encode(xb).latent_dist
        loss = F.mse_loss(vae.decode(post.sample(g)).sample, xb) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(x).latent_dist.mean.std())
        xt = digits_split("test")[0] * 2 - 1
        recon = float(F.mse_loss(vae.decode(vae.encode(xt).latent_dist.mean).sample, xt))
    vae.register_to_config(scaling_factor=round(1 / std, 5))
    vae.save_pretrained(out)
    return {"recon_mse": round(recon, 5), "latent_std": round(std, 4)}


def ema_update(ema, model, step, decay):
    """ema <- d ema + (1 - d) model with the warm-up d = min(decay, (1 + step) / (10 + step)) (diffusers' EMAModel)."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)


def digits_sd(seed=0, steps=600, batch=32, channels=(32, 64), width=64, prediction="v_prediction", lr=1e-3,
              ema=0.995, guidance=3.0, curve_every=200, judge_per_class=10, vae_steps=250, verbose=True):
    """A text-conditioned SD-1.x folder for digits that StableDiffusion(Img2Img)Pipeline.from_pretrained loads:
    digits_vae, a small CLIP text encoder over DIGITS_WORDS trained jointly with the UNet (class-name prompts
    in DIGITS_TEMPLATES, 10% dropped to "" or the negative prompt for classifier-free guidance), EMA, SD's
    scaled-linear schedule; recipe.json holds the agreement of its samples with the digits teacher."""
    recipe = dict(seed=seed, steps=steps, batch=batch, channels=list(channels), width=width, prediction=prediction,
                  lr=lr, ema=ema, guidance=guidance, curve_every=curve_every,
                  vae=os.path.basename(digits_vae(seed, vae_steps, verbose=verbose)))  # a name: keys never hold $DD_CACHE
    if judge_per_class != 10:
        recipe["judge_per_class"] = judge_per_class
    return cached_build("digits_sd", recipe, _train_digits_sd, verbose)


def digits_latents(vae_name):
    """The digits VAE (its folder name under $DD_CACHE/generators, or a path) and its posterior over the
    digits train split, with the classes: what the digits SD and DiT train on."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(os.path.join(cache_dir(), "generators", vae_name)).eval()
    x, y = digits_split("train")
    with torch.no_grad():
        post = vae.encode(x * 2 - 1).latent_dist
    return vae, post, y


def latent_batch(post, y, batch, scale, g):
    """`batch` random training images as scaled latents drawn from the posterior, and their classes."""
    idx = torch.randint(len(y), (batch,), generator=g)
    return (post.mean[idx] + post.std[idx] * torch.randn(post.mean[idx].shape, generator=g)) * scale, y[idx]


def _train_digits_sd(out, seed, steps, batch, channels, width, prediction, lr, ema, guidance, curve_every, vae,
                     judge_per_class=10):
    import copy
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from tqdm import tqdm
    digits_teacher("conv3", verbose=False)  # the judge of the samples' agreement (trained first if not cached)
    tok = digits_tokenizer(os.path.join(out, "tokenizer"))
    vae, post, y = digits_latents(vae)
    sf = vae.config.scaling_factor
    names = [c["name"] for c in class_list("digits")]
    prompts = [[t.format(name=n) for t in DIGITS_TEMPLATES] for n in names] + [["", "cartoon, anime, painting"]]
    ids = {p: tok(p, padding="max_length", max_length=77, return_tensors="pt").input_ids[0] for row in prompts for p in row}
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=width, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    n = len(channels)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels,
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * n,
                                up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=width,
                                attention_head_dim=8, norm_num_groups=16)
    sd = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type=prediction)  # SD 1.x's schedule
    noise_sched = DDPMScheduler(**sd, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(text), tokenizer=tok, unet=copy.deepcopy(unet),
                                   scheduler=PNDMScheduler(**sd, skip_prk_steps=True, steps_offset=1,
                                                           set_alpha_to_one=False, timestep_spacing="leading"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(seed)
    t0, c0, curve = time.time(), time.process_time(), []
    for step in tqdm(range(steps), desc="digits SD", unit="step"):
        z, row = latent_batch(post, y, batch, sf, g)
        row[torch.rand(batch, generator=g) < 0.1] = len(names)  # classifier-free-guidance dropout
        col = torch.randint(0, len(DIGITS_TEMPLATES), (batch,), generator=g) % torch.tensor([len(prompts[r]) for r in row])
        cond = text(torch.stack([ids[prompts[r][c]] for r, c in zip(row.tolist(), col.tolist())]))[0]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        target = noise if prediction == "epsilon" else noise_sched.get_velocity(z, noise, t)
        loss = F.mse_loss(unet(noise_sched.add_noise(z, noise, t), t, cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(pipe.unet, unet, step, ema)
        ema_update(pipe.text_encoder, text, step, ema)
        if (curve_every and (step + 1) % curve_every == 0) or step + 1 == steps:
            agree = digits_sd_agreement(pipe, guidance, judge_per_class)
            curve.append([step + 1, round(time.time() - t0), round(time.process_time() - c0), agree])
            tqdm.write(f"  step {step + 1}: {curve[-1][1]} s, {curve[-1][2]} CPU-s, teacher agreement {agree}%")
    pipe.save_pretrained(out)
    return {"agreement": curve[-1][-1], "agreement_guidance": guidance, "curve [step, s, cpu_s, agreement]": curve}


@torch.no_grad()
def digits_sd_agreement(pipe, guidance, per_class=10, steps=50, seed=0):
    """Teacher agreement of text-to-image samples, `per_class` per digit, prompted with the class name."""
    names = [c["name"] for c in class_list("digits")]
    prompts = [n for n in names for _ in range(per_class)]
    g = [torch.Generator().manual_seed(seed * 100003 + i) for i in range(len(prompts))]
    images = pipe(prompts, negative_prompt=["cartoon, anime, painting"] * len(prompts), guidance_scale=guidance,
                  num_inference_steps=steps, generator=g, output_type="pt").images
    return teacher_agreement(images, torch.arange(10).repeat_interleave(per_class))
