"""validate_fkd.py: one validator for every distilled set, four label protocols.

A student is trained from scratch on a distilled set (any ImageFolder-layout folder, normally the
on-disk contract of README.md) and tested on the dataset's real validation split. The
protocol fixes where the student's targets come from and the recipe around them:

  rded    teacher soft labels computed online on every augmented, cutmixed batch; KL at T=20, no T^2,
          AdamW, RDED's quarter cosine, ImageNet statistics (R:validation/main.py, D:evaluation/argument.py;
          DELT and VLCP evaluate with it: VLCP:04_evaluation/RDED/)
  fkd     soft labels stored once per (epoch, batch) with crop boxes, flips and mix parameters, replayed
          exactly (S:SRe2L/relabel/generate_soft_label.py, D4M:matching/utils_fkd.py:L199-237)
  static  one soft label per image (the teachers' mean logits), interpolated linearly under mixup;
          KL at T=30 (UFC:ufc_validation/val_static.py:200-222); `--label-mode teacher` is INFER's dynamic
          (UFC:ufc_validation/val_dyn.py:243-260)
  hard    cross-entropy on the class labels with cutmix, SGD, step decay, tested on Resize(s)+CenterCrop(s)
          (VLCP:04_evaluation/Minimax/train.py; VLCP's ImageNette/Woof/IDC evaluation). This is not
          DD-Ranking's hard-label evaluation (ConvNet with instance norm, DSA, SGD, 1000 epochs, batch 256,
          a learning-rate search)

Citations: D = VILA-Lab/DELT@f2f81ca, R = LINs-lab/RDED@3f6453d, S = VILA-Lab/SRe2L@8d00cba,
D4M = suduo94/D4M@da35d10, UFC = zhangxin-xd/UFC@83d19f8,
VLCP = zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4. Full notes: docs/validate.md.

A set gets its own paper's evaluation: `--preset auto` reads the method that made it from its run.json
and applies that method's official scripts' values (METHOD_PRESETS; e.g. VLCP's RDED runs 500 epochs,
DELT's adds RandAugment); `--dry-run` prints the resolved recipe and which preset was applied. Every
value can be overridden by its flag. `--repeats N` trains N students (seeds seed..seed+N-1) and reports
mean ± population std of the best and the last evaluation; `--baseline random` does the same for random
real subsets at the same IPC and reports the improvement over random (IOR) paired per repeat; `--lrs`
adds DD-Ranking's hard-label recovery (HLR, against a full-real-data student trained once and cached)
and label-robust score (LRS, on fractions; DD-Ranking 0.2.0's percentage-point value beside it).
Everything goes to <set>/eval_<protocol>.json with the definitions. `--export-ddranking DIR` writes the
set in DD-Ranking's formats instead. `--preset ddranking --ddranking-mode S|M` runs DD-Ranking 0.2.0's own
evaluation recipe, quirks included (DDRANKING_RECIPE; scripts/ddranking_check.py compares it with the package).

  python validate_fkd.py --syn-data-path runs/delt_digits_ipc10 --repeats 3 --baseline random
  python validate_fkd.py --syn-data-path runs/delt_digits_ipc10 --repeats 3 --lrs --dry-run
  python validate_fkd.py --dataset cifar100 --data-path data/cifar --syn-data-path SET --protocol static --teacher-path T
  torchrun --nproc_per_node 8 validate_fkd.py --dataset imagenet --data-path /data/imagenet --syn-data-path SET --protocol fkd

Deliberate deviations from the official evaluation code: the reported "best" is kept (as all repos
report it) but the last epoch is always reported beside it; CutMix does not mutate the batch that
another forward sees, and no extra student forward updates BN statistics (RDED/DELT's train-accuracy
pass); numpy is seeded too; digits evaluation switches flips off (digits are not mirror-symmetric);
LRS is computed on fractions (DD-Ranking 0.2.0's code uses percentage points); `--lr-search` (DD-Ranking's
selection on the test set) is off by default.
"""
import argparse
import copy
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch

import common

T = common.lazy_module("torchvision.transforms.v2")  # imported on first use: --help does not pay for it

PROTOCOL_LABELS = {"rded": "teacher", "fkd": "fkd", "static": "static", "hard": "hard"}

# Per-protocol recipe; per-dataset changes in DATASET_PRESETS, per-method ones in METHOD_PRESETS. Every value is a flag.
PROTOCOLS = {
    "rded": dict(  # RDED validation (R:validation/main.py, R:argument.py; R:scripts/*.sh --re-epochs 300), D:evaluation/argument.py
        temperature=20.0, t_squared=False, mix="cutmix", alpha=1.0, optimizer="adamw", weight_decay=0.01,
        schedule="quarter", epochs=300, crop="rrc", factor=1, eval_every=10, eval_from=0.8, flip=True,
        norm="imagenet",  # ImageNet statistics for teacher and student on every dataset (validation/main.py:111)
        test_view="ratio"),
    "fkd": dict(  # SRe2L train_FKD.sh / D4M validate/train_FKD.sh: T=20, AdamW 1e-3, full cosine
        temperature=20.0, t_squared=False, optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="cosine",
        epochs=300, eval_every=50, eval_from=0.0, flip=True, test_view="ratio"),
    "static": dict(  # INFER val_static.py: AdamW 1e-3/0.01 (hard-coded), cosine, mixup 0.8, T=30, 400 ep, bs 64;
        # the AdamW decays every parameter, BN and biases too (UFC:ufc_validation/val_static.py:234, val_dyn.py:212)
        temperature=30.0, t_squared=False, mix="mixup", alpha=0.8, optimizer="adamw", lr=1e-3, weight_decay=0.01, decay="all",
        schedule="cosine", epochs=400, batch_size=64, crop="pad", eval_every=10, eval_from=0.0, flip=True,
        test_view="ratio"),
    "hard": dict(  # Minimax train.py: SGD 0.01 m0.9 wd 5e-4, bs 64, MultiStep [2E/3, 5E/6] x0.2, cutmix p=1 beta=1
        mix="cutmix", alpha=1.0, optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="step", gamma=0.2,
        batch_size=64, crop="rrc", min_scale=0.5, color_jitter=0.4, lighting=0.1, eval_from=0.0, flip=True,
        test_view="full"),  # Resize(s)+CenterCrop(s), the whole image (Minimax data.py:309)
}
DATASET_PRESETS = {
    # not published: our choice so that a digits evaluation takes about a minute on 2 CPU cores; the cached
    # digits teachers are trained on digits statistics, so every protocol keeps them
    "digits": {"rded": dict(epochs=40, eval_from=0.0), "fkd": dict(epochs=40, eval_every=10), "static": dict(epochs=60),
               "hard": dict(epochs=150), "all": dict(flip=False, student="conv3", teacher="conv3", norm="dataset")},
    "cifar10": {"all": dict(student="resnet18_modified", teacher="resnet18_modified")},
    "cifar100": {"all": dict(student="resnet18_modified", teacher="resnet18_modified")},
    # Tiny: RDED/DELT batch 100 whatever the IPC (R:argument.py)
    "tiny": {"rded": dict(batch_size=100), "all": dict(student="resnet18_modified", teacher="resnet18_modified")},
    # ImageNet-like: RDED factor 2 (ShufflePatches 2x2, RRC scale (1/2, 1)); Minimax student ResNetAP-10
    **{d: {"rded": dict(factor=2), "hard": dict(student="resnet_ap10"), "all": dict(student="resnet18", teacher="resnet18")}
       for d in ("imagenette", "imagewoof", "imagenet100", "imagenet")},
}
# What each method's own official evaluation scripts run (a set gets its paper's evaluation by default:
# --preset auto reads the method from the set's run.json). "protocol": the method's protocol, per
# dataset where it differs; then {dataset or "all": {protocol: values}}, applied over the presets above.
SMALL, IMAGENET_LIKE = ("cifar10", "cifar100", "tiny"), ("imagenette", "imagewoof", "imagenet100", "imagenet")
_DMKD_KD = dict(t_squared=1, mix="none", optimizer="sgd", schedule="step", gamma=0.1, eval_every=1, eval_from=0.0,
                flip=True, norm="dataset")
METHOD_PRESETS = {
    # RDED's own scripts (LINs-lab/RDED@3f6453d:scripts/*.sh:4,9): --factor 1 on CIFAR and Tiny, 2 on the
    # ImageNet sets; --re-epochs 300
    "rded": {"protocol": "rded",
             **{d: {"rded": dict(epochs=300, factor=1 if d in SMALL else 2)} for d in SMALL + IMAGENET_LIKE}},
    # DELT's validation scripts (VILA-Lab/DELT@f2f81ca:scripts/resnet18_imagenet1k_validation.sh:14,28-31,36):
    # RandAugment m6-n2-mstd1.0, RRC scale (0.25, 1), no ShufflePatches, 300 epochs; seeds 3407/4663/2897 (3 runs);
    # tested at epoch 0, every 10 epochs and the last (D:evaluation/validation/main.py:195), not only in the last 20 %
    "delt": {"protocol": "rded", "all": {"rded": dict(rand_augment="rand-m6-n2-mstd1.0", min_scale=0.25, factor=1,
                                                      eval_every=10, eval_from=0.0)},
             **{d: {"rded": dict(epochs=300, repeats=3)} for d in SMALL + IMAGENET_LIKE}},
    # VLCP: RDED's validation copied into zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype
    # @d0060eb4:04_evaluation/RDED/*.sh (--re-epochs 500 :9/:27; --factor 1 CIFAR, 2 Tiny and ImageNet-1K) and
    # Minimax for Nette/Woof/IDC/ImageNet-100 (run_nette.sh:29: --repeat 3)
    "vlcp": {"protocol": {"imagenette": "hard", "imagewoof": "hard", "imagenet100": "hard"},
             "cifar10": {"rded": dict(epochs=500, factor=1)}, "cifar100": {"rded": dict(epochs=500, factor=1)},
             "tiny": {"rded": dict(epochs=500, factor=2)}, "imagenet": {"rded": dict(epochs=500, factor=2)},
             **{d: {"hard": dict(repeats=3)} for d in ("imagenette", "imagewoof", "imagenet100")}},
    # D4M: training-time matching replayed (suduo94/D4M@da35d10:validate/train_FKD.sh: 300 epochs, T 20, AdamW
    # 1e-3 cosine = the fkd protocol); a set without stored labels falls back to rded (online teacher)
    "d4m": {"protocol": "fkd", "imagenet": {"fkd": dict(epochs=300)}},
    # INFER: static labels; CIFAR = the static protocol (UFC README: 400 epochs, batch 64), CIFAR-100 normalised with
    # its own statistics (UFC:ufc_validation/val_static.py:77-91); the teachers (CIFAR: the four-net ensemble) and the
    # normalisation they saw are read from the set's run.json. ImageNet and its subsets: not published: our choice,
    # the nearest published ImageNet soft-label recipe, DWA's (INFER's base code; AngusDujw/Diversity-Driven-Synthesis
    # @c5b125f:validation/validation_imgnet.py:38,82-83,147-150: 300 epochs, RRC 224 scale (0.08, 1) + flip, AdamW
    # 1e-3 / 0.01, full cosine; batch 128 in scripts/run_imgnet.sh:13), with INFER's mixup + T=30 labels. Tiny: not
    # published: our choice, the CIFAR recipe at 64 px.
    "infer": {"protocol": "static", "teachers_from_run": True,
              "stats": {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                                     "CIFAR-100 statistics (INFER: UFC:ufc_validation/val_static.py:77-91)")},
              "unpublished": {d: "not published: our choice (INFER released CIFAR evaluation only; "
                                 + ("DWA's ImageNet recipe with INFER's static labels)" if d != "tiny" else
                                    "INFER's CIFAR recipe at 64 px)") for d in ("tiny", *IMAGENET_LIKE)},
              **{d: {"static": dict(epochs=300, batch_size=128, crop="rrc", min_scale=0.08, norm="imagenet")}
                 for d in IMAGENET_LIKE}},
    # DM-KD: its own KD recipe (zhengli97/DM-KD@bbab9ce): the teacher's soft labels online (the rded protocol's labels),
    # KL x T^2 (distiller_zoo/KD.py:13-19, helper/loops.py:154-160), no mixing (--use_aug none), SGD momentum 0.9
    # (train_student.py:286-289) with step decay x0.1 (helper/util.py:21-27), RandomCrop(32, pad 4) + flip and
    # DM-KD's CIFAR-100 statistics (dataset/cifar100.py:81-108), tested every epoch. ImageNet: scripts/
    # imagenet_distill.sh (100 epochs, batch 256, lr 0.1, milestones 30/60/90, wd 1e-4, T 10, RRC 224 + flip);
    # CIFAR-100: train_student.py argparse defaults (240 epochs, batch 128, lr 0.1, milestones 150/180/210, wd 5e-4,
    # T 4). The teacher and its normalisation are read from the set's run.json (dmkd.py records them).
    "dmkd": {"protocol": "rded", "teachers_from_run": True,
             "stats": {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                                    "CIFAR-100 statistics (DM-KD: dataset/cifar100.py:81-108)")},
             "unpublished": {d: "not published: our choice (DM-KD's " + ("CIFAR-100" if d in SMALL else "ImageNet")
                                + " recipe)" for d in ("cifar10", "tiny", "imagenette", "imagewoof", "imagenet100")},
             # digits: dmkd.py's digits preset (not published: our choice)
             "digits": {"rded": dict(_DMKD_KD, crop="pad", epochs=30, batch_size=64, lr=0.02, weight_decay=5e-4,
                                     milestones="20,25", temperature=4.0, eval_every=5)},
             **{d: {"rded": dict(_DMKD_KD, crop="pad", epochs=240, batch_size=128, lr=0.1, weight_decay=5e-4,
                                 milestones="150,180,210", temperature=4.0)} for d in SMALL},
             # CIFAR-100 pair RN-34 -> RN-18 in DM-KD's own nets (models/cifar_resnet.py), as dmkd.py's preset
             "cifar100": {"rded": dict(_DMKD_KD, crop="pad", epochs=240, batch_size=128, lr=0.1, weight_decay=5e-4,
                                       milestones="150,180,210", temperature=4.0, teacher="cifarresnet34",
                                       student="cifarresnet18")},
             **{d: {"rded": dict(_DMKD_KD, crop="rrc", min_scale=0.08, factor=1, epochs=100, batch_size=256, lr=0.1,
                                 weight_decay=1e-4, milestones="30,60,90", temperature=10.0,
                                 **({"student": "resnet50"} if d == "imagenet100" else {}))}  # README: RN-18 -> RN-50
                for d in IMAGENET_LIKE}},
}
# DD-Ranking 0.2.0's evaluation as its code runs it (DDR = NUS-HPC-AI-Lab/DD-Ranking@b8b0966, whose ddranking/ equals the
# PyPI 0.2.0 files and the "Release v0.2.0" commit c1ea0b3; ddranking/ omitted below). Values its constructor takes
# come from DDR:configs/Demo_LRS_Soft_Label.yaml ("Demo yaml") where that sets them, else from the constructor's defaults
# (DDR:metrics/soft_label.py:24-30); the mechanics are fixed in its code. Mode S = protocol static, M = rded.
DDR = "NUS-HPC-AI-Lab/DD-Ranking@b8b0966"
DDRANKING_RECIPE = dict(
    optimizer="adamw_all",  # AdamW, decay on every parameter: Demo yaml:59, DDR:utils/train_and_eval.py:109-110
    weight_decay=0.01,  # Demo yaml:61
    schedule="quarter",  # 'cosine' = LambdaLR 0.5(1+cos(pi e/2E)) stepped per epoch: Demo yaml:60, train_and_eval.py:121-127
    epochs=300, repeats=5,  # num_epochs, num_eval: Demo yaml:63-64
    batch_size=256,  # syn_batch_size: constructor default (soft_label.py:28)
    temperature=1.0, t_squared=False,  # KL(teacher || student) batchmean at T, no T^2: Demo yaml:54-56, loss/kl.py:53-60
    mix="cutmix", alpha=1.0,  # Cutmix(beta 1.0) on every batch: Demo yaml:17-19, aug/cutmix.py:28-34, train_and_eval.py:174
    crop="none", flip=False, factor=1,  # no crop, no flip: TensorDataset of the images as given (utils/data.py:38-52)
    eval_every=20, eval_from=0.0,  # tested when (epoch + 1) % 20 == 0, best kept: soft_label.py:130,318,374
    test_view="full", norm="dataset")  # test set: ToTensor + Normalize(dataset stats), no resize (utils/data.py:65-77)
DDRANKING_QUIRKS = {
    "S": ["mode S: cutmix mixes the images but each keeps its own soft label (DDR:metrics/soft_label.py:335, "
          "utils/train_and_eval.py:174-187)"],
    "M": ["mode M: the teacher labels each cutmixed batch online (DDR:utils/train_and_eval.py:174-180)"],
    "all": ["five learning rates (0.001..0.1) tried per student, the best TEST top-1 kept (soft_label.py:210-266, 516-558)",
            "hard-label students: the soft recipe's optimiser, schedule, epochs and batch, cross-entropy, no augmentation, "
            "tested every 20 epochs (soft_label.py:268-316)",
            "full-data student retrained every repeat for the soft recipe's epochs (not its config's) at batch 256, no "
            "augmentation, with its per-dataset SGD config: a step schedule longer than the run is a constant rate "
            "(soft_label.py:280-305, 526-535)",
            "LRS on percentage points (soft_label.py:561-564): the reported LRS is lrs_ddranking_code"]}
# its full-data configs (DDR:utils/train_and_eval.py:20-98), keyed by (DD-Ranking dataset, model); lr, weight decay,
# StepLR step (gamma 0.1: get_lr_scheduler gets no gamma, train_and_eval.py:117). The loop runs the soft recipe's epochs.
DDRANKING_REAL = {("CIFAR10", "ConvNet-3"): (0.01, 5e-4, 100), ("CIFAR10", "ConvNet-3-BN"): (0.01, 5e-4, 100),
                  ("CIFAR100", "ConvNet-3"): (0.01, 5e-4, 100), ("CIFAR100", "ConvNet-3-BN"): (0.01, 5e-4, 100),
                  ("TinyImageNet", "ConvNet-4-BN"): (0.01, 5e-4, 50), ("ImageNet1K", "ResNet-18-BN"): (0.1, 1e-4, 30),
                  # not in DD-Ranking (it has no digits): our choice, its CIFAR10-ConvNet-3-BN entry
                  ("digits", "ConvNet-3-BN"): (0.01, 5e-4, 100)}
# its full-data top-1 figures (REAL_DATA_ACC_CACHE, DDR:utils/train_and_eval.py:15-18), read when eval_full_data is False
# (the constructor's default, soft_label.py:28, 536-540); other pairs must train the full-data student
DDRANKING_ACC_CACHE = {("ImageNet1K", "ResNet-18-BN"): 56.5, ("TinyImageNet", "ResNet-18-BN"): 46.4}
METHOD_PRESETS["ddranking"] = {
    "protocol": "static", "all": {"static": DDRANKING_RECIPE, "rded": DDRANKING_RECIPE},
    # not published: our choice so that the 16 students of one repeat take about a minute on 2 CPU cores
    "digits": {p: dict(epochs=20, batch_size=64) for p in ("static", "rded")}}
METHOD_SCRIPTS = {"delt.py": "delt", "d4m.py": "d4m", "vlcp.py": "vlcp", "infer_ufc.py": "infer", "dmkd.py": "dmkd"}
# RDED's student LR table (R:argument.py); CIFAR-100 conv3 -> conv3 uses 2e-3 with batch 25
STUDENT_LR = {"efficientnet_b0": 2e-3, "mobilenet_v2": 2.5e-3, "mobilenet_v2_cifar": 2.5e-3}
# --lr-search: DD-Ranking 0.2.0's five rates (ddranking/metrics/soft_label.py, lr_list), best on the test set
LR_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)
# --lrs: epochs of the full-real-data hard-label run (HLR). Not published: our choice, DD-Ranking 0.2.0's
# real-data epochs (ddranking/utils/train_and_eval.py REAL_DATA_TRAINING_CONFIG: CIFAR 200, Tiny 100, ImageNet 90)
FULL_DATA_EPOCHS = {"digits": 30, "cifar10": 200, "cifar100": 200, "tiny": 100, "imagenette": 90, "imagewoof": 90,
                    "imagenet100": 90, "imagenet": 90}
# --export-ddranking: DD-Ranking's dataset names and the statistics its test sets are normalised with (ddranking/utils/data.py)
DDRANKING_DATASETS = {"cifar10": ("CIFAR10", common.CIFAR_MEAN, common.CIFAR_STD),
                      "cifar100": ("CIFAR100", common.CIFAR_MEAN, common.CIFAR_STD),
                      "tiny": ("TinyImageNet", common.IMAGENET_MEAN, common.IMAGENET_STD),
                      "imagenet": ("ImageNet1K", common.IMAGENET_MEAN, common.IMAGENET_STD),
                      "imagenette": ("ImageNette", common.IMAGENET_MEAN, common.IMAGENET_STD),
                      "imagewoof": ("ImageWoof", common.IMAGENET_MEAN, common.IMAGENET_STD)}


def rded_batch_size(ipc, num_classes, dataset, student):
    """RDED/DELT batch rule (R:argument.py): IPC>=30 -> 100, IPC>=10 -> 50, else 10; x2 for 100 or 1000
    classes; /2 for resnet101 on ImageNet-1K/100; capped at IPC*C."""
    bs = 100 if ipc >= 30 else 50 if ipc >= 10 else 10
    if num_classes in (100, 1000):
        bs *= 2
    if student.startswith("resnet101") and dataset in ("imagenet", "imagenet100"):
        bs //= 2
    return min(bs, ipc * num_classes)


def minimax_epochs(ipc, num_classes):
    """Minimax epochs (VLCP:04_evaluation/Minimax/argument.py:18-43, factor 1): 3000 / 2000 / 1500 / 1000 / 500 /
    300 for IPC 1 / <=10 / <=50 / <=200 / <=500 / above; 100 classes 2/3 of it, rounded down to hundreds."""
    e = 3000 if ipc <= 1 else 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000 if ipc <= 200 else 500 if ipc <= 500 else 300
    return e if num_classes <= 10 else int(e * 2 / 3) // 100 * 100


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--syn-data-path", default=None, help="the distilled set: an ImageFolder-layout folder")
    g.add_argument("--random-real", type=int, default=None, metavar="IPC",
                   help="without a set: evaluate --repeats random real subsets of IPC images per class")
    g.add_argument("--dataset", default=None, choices=list(common.DATASETS),
                   help="dataset of the set (default: the one in the set's run.json, else digits)")
    g.add_argument("--data-path", default=None, help="real dataset root (its val split is the test set)")
    g.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                   help="label protocol: rded = teacher soft labels online on each augmented batch (RDED, DELT, VLCP); "
                        "fkd = soft labels stored per epoch and batch, replayed (D4M, SRe2L); static = one soft label "
                        "per image (INFER); hard = class labels with cutmix (Minimax). Default: the set's method's, "
                        "else rded")
    g.add_argument("--preset", default="auto", choices=("auto", "none", *METHOD_PRESETS),
                   help="whose official evaluation to apply: auto = the method named in the set's run.json; "
                        "none = the protocol's generic recipe; ddranking = DD-Ranking 0.2.0's (--ddranking-mode). "
                        "Explicit flags beat it")
    g.add_argument("--ddranking-mode", default="S", choices=("S", "M"),
                   help="--preset ddranking: DD-Ranking's soft_label_mode: S = one stored soft label per image (its "
                        "constructor's default), M = the teacher on every augmented batch")
    g.add_argument("--label-mode", default="auto", choices=("auto", "teacher", "fkd", "static", "hard"),
                   help="override where targets come from (static + teacher = INFER's dynamic labels)")
    g.add_argument("--ipc", type=int, default=None, help="use the first K images (sorted) of every class")
    g.add_argument("--repeats", type=int, default=None, help="students trained with seeds seed..seed+N-1 (default 1)")
    g.add_argument("--baseline", default="none", choices=("none", "random"), help="also evaluate random real subsets")
    g.add_argument("--baseline-ipc", type=int, default=None, help="IPC of the random baseline (default: the set's)")
    g.add_argument("--out", default=None, help="result JSON path, or an existing folder to write eval_<protocol>.json into (default: into the set)")
    g.add_argument("--relabel-epochs", type=int, default=None,
                   help="fkd: first store FKD labels for this many epochs with the teacher (SRe2L relabel; resumes)")
    g.add_argument("--relabel-batch-size", type=int, default=None, help="fkd: batch size of the stored labels")
    g.add_argument("--dry-run", action="store_true", help="print the resolved recipe (preset, protocol, every value) and exit")
    g.add_argument("--export-ddranking", default=None, metavar="DIR",
                   help="write the set for DD-Ranking (images.pt, soft_labels.pt, the teacher in its key layout, "
                        "ddranking.json) into DIR and exit; no training")
    g = p.add_argument_group("DD-Ranking metrics (arXiv 2505.13300): IOR, HLR, LRS")
    g.add_argument("--lrs", action="store_true",
                   help="also train the set with hard labels and (once, cached) the full real train split, and report "
                        "HLR and the label-robust score LRS (implies --baseline random)")
    g.add_argument("--lrs-lambda", type=float, default=0.5, help="LRS weight of IOR against HLR (DD-Ranking's default 0.5)")
    g.add_argument("--hard-epochs", type=int, default=None, help="--lrs: epochs of the set's hard-label runs (default: the hard protocol's)")
    g.add_argument("--full-top1", type=float, default=None, metavar="ACC",
                   help="--lrs: take ACC as the full-data hard-label top-1 instead of training it (DD-Ranking's "
                        "eval_full_data=False, which reads its REAL_DATA_ACC_CACHE)")
    g.add_argument("--full-epochs", type=int, default=None,
                   help="--lrs: epochs of the full-data hard-label run (default: DD-Ranking's real-data epochs)")
    g.add_argument("--lr-search", action="store_true",
                   help="DD-Ranking's rule: train each student at five learning rates (%s) and keep the best ON THE TEST "
                        "SET (optimistic: selection on the test data); applies to the set, the random subsets and the "
                        "hard-label runs; the winners are recorded" % ", ".join(map(str, LR_GRID)))
    g = p.add_argument_group("models")
    g.add_argument("--student", default=None, help=f"student architecture ({', '.join(common.ARCHS)})")
    g.add_argument("--teacher", default=None, help="teacher architecture; a comma list is an ensemble")
    g.add_argument("--teacher-path", default=None, help="teacher checkpoint(s), comma list matching --teacher")
    g.add_argument("--norm", default=None, choices=("dataset", "imagenet"),
                   help="input normalisation (default: the preset's; RDED/DELT use ImageNet statistics everywhere)")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="explicit normalisation mean (beats --norm)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="explicit normalisation std (beats --norm)")
    g = p.add_argument_group("recipe (each overrides the protocol preset)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--batch-size", type=int, default=None, help="global batch size")
    g.add_argument("--optimizer", default=None, choices=("adamw", "adamw_all", "sgd"),
                   help="optimizer (adamw_all: weight decay on every parameter, as DD-Ranking)")
    g.add_argument("--lr", type=float, default=None, help="learning rate")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (AdamW: see --decay)")
    g.add_argument("--decay", default=None, choices=("weights", "all"),
                   help="what AdamW decays: weights = ndim > 1 only (RDED/SRe2L/D4M), all = every parameter (INFER)")
    g.add_argument("--schedule", default=None, choices=("cosine", "quarter", "step", "constant"), help="per-epoch LR shape")
    g.add_argument("--milestones", default=None, help="comma list of epochs for --schedule step")
    g.add_argument("--gamma", type=float, default=None, help="step decay factor")
    g.add_argument("--temperature", type=float, default=None, help="KD temperature")
    g.add_argument("--t-squared", type=int, default=None, choices=(0, 1), help="multiply the KL by T^2")
    g.add_argument("--mix", default=None, choices=("cutmix", "mixup", "none"), help="batch mixing")
    g.add_argument("--alpha", type=float, default=None, help="Beta(alpha, alpha) of the mix")
    g.add_argument("--crop", default=None, choices=("rrc", "pad", "none"), help="RandomResizedCrop, padded RandomCrop, or none")
    g.add_argument("--min-scale", type=float, default=None, help="RandomResizedCrop lower scale (default 1/factor)")
    g.add_argument("--factor", type=int, default=None, help="RDED ShufflePatches grid (1 = off)")
    g.add_argument("--flip", type=int, default=None, choices=(0, 1), help="random horizontal flips")
    g.add_argument("--rand-augment", default=None, help="timm RandAugment config, e.g. rand-m6-n2-mstd1.0 (DELT)")
    g.add_argument("--color-jitter", type=float, default=None, help="ColorJitter strength (Minimax 0.4)")
    g.add_argument("--lighting", type=float, default=None, help="PCA lighting std (Minimax 0.1)")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every k epochs (and at the last)")
    g.add_argument("--eval-from", type=float, default=None, help="no evaluation before this fraction of training")
    g.add_argument("--test-view", default=None, choices=("ratio", "full"),
                   help="test images: ratio = Resize(s*8/7)+CenterCrop(s) (RDED/SRe2L/INFER); full = Resize(s)+"
                        "CenterCrop(s), the whole image (Minimax)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="first student seed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default 0 for digits, 8 else)")
    common.add_precision_arg(g)
    g.add_argument("--augment-on", default="auto", choices=("auto", "loader", "device"),
                   help="where training views are made: per image in loader processes, or batched on the training "
                        "device from a uint8 copy of the set (same distributions); auto = device on CUDA unless "
                        "RandAugment, ColorJitter or Lighting is on (those stay in the loader)")
    return common.document_defaults(p, sources=(
        "each --protocol is a recipe (PROTOCOLS in validate_fkd.py): rded from LINs-lab/RDED@3f6453d:"
        "argument.py and validation/main.py (+ VILA-Lab/DELT@f2f81ca:evaluation/argument.py), fkd from "
        "VILA-Lab/SRe2L@8d00cba:SRe2L/validate/train_FKD.sh and suduo94/D4M@da35d10:validate/train_FKD.sh, static "
        "from zhangxin-xd/UFC@83d19f8:val_static.py, hard from zou-yawen/Dataset-Distillation-via-Vision-"
        "Language-Category-Prototype@d0060eb4:04_evaluation/Minimax/train.py; per-dataset changes in "
        "DATASET_PRESETS (digits: our choice, about a minute per student on 2 CPU cores). A flag given "
        "explicitly beats the recipe."),
        citations="X:path is that repository's file at the commit read: D = VILA-Lab/DELT@f2f81ca, R = "
                  "LINs-lab/RDED@3f6453d, S = VILA-Lab/SRe2L@8d00cba, D4M = suduo94/D4M@da35d10, UFC = "
                  "zhangxin-xd/UFC@83d19f8, VLCP = zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4")


def set_record(folder):
    """The set's run.json (None when it has none or it is unreadable) and the method that made it."""
    path = os.path.join(folder, "run.json") if folder else None
    if not path or not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None, None
    method = rec.get("method") or (rec.get("args") or {}).get("method")
    if not method and rec.get("argv"):
        method = METHOD_SCRIPTS.get(os.path.basename(str(rec["argv"][0])))
    return rec, method


def choose_preset(args):
    """Dataset, method preset and protocol: flags first, then the set's run.json, then the defaults.
    Returns (method or None, where the choice came from)."""
    rec, made_by = set_record(args.syn_data_path)
    if args.dataset is None:
        args.dataset = ((rec or {}).get("args") or {}).get("dataset") or "digits"
        common.dataset_info(args.dataset)  # a run.json from an unknown dataset stops here
    if args.preset == "none":
        method, source = None, "--preset none"
    elif args.preset != "auto":
        method, source = args.preset, "--preset"
    elif made_by in METHOD_PRESETS:
        method, source = made_by, f"{os.path.join(args.syn_data_path, 'run.json')} (made by {made_by})"
    else:
        method, source = None, (f"generic: the set was made by {made_by}, which has no evaluation preset here" if made_by
                                else "generic: no method named in a run.json")
    if args.export_ddranking and method != "ddranking":
        if args.preset not in ("auto", "ddranking"):
            raise common.UserError(f"--export-ddranking writes DD-Ranking's own recipe: drop --preset {args.preset}")
        method, source = "ddranking", "--export-ddranking"
    if args.protocol is None and method == "ddranking":
        args.protocol = "static" if args.ddranking_mode == "S" else "rded"
    if args.protocol is None:
        proto = METHOD_PRESETS.get(method, {}).get("protocol", "rded")
        proto = proto.get(args.dataset, "rded") if isinstance(proto, dict) else proto
        if proto == "fkd" and not (args.relabel_epochs or (args.syn_data_path and os.path.isfile(
                common.fkd_path(args.syn_data_path.rstrip("/"), "meta.json")))):
            proto = "rded"  # D4M's alternative when the set holds no stored labels
        args.protocol = proto
    return method, source


def resolve(args, method=None):
    """Fill unset flags: protocol preset, then dataset preset, then the method's official values, then
    the rules that depend on IPC."""
    info = common.dataset_info(args.dataset)
    ds = DATASET_PRESETS.get(args.dataset, {})
    explicit_norm = args.norm
    mp = METHOD_PRESETS.get(method, {})
    # INFER's ensemble and DM-KD's teacher (and student), with the normalisation they were used with, are part of
    # the set's recipe: taken from its run.json unless given as flags
    run_norm = None
    if mp.get("teachers_from_run"):
        rec, _ = set_record(args.syn_data_path)
        made = (rec or {}).get("args") or {}
        if args.teacher is None and made.get("teacher"):
            args.teacher, args.teacher_path = made["teacher"], args.teacher_path or made.get("teacher_path")
        if method == "dmkd" and args.student is None and made.get("student"):
            args.student = made["student"]
        tn = (rec or {}).get("teacher_norm") or {}
        if tn.get("mean") and tn.get("std"):
            run_norm = (tuple(tn["mean"]), tuple(tn["std"]), f"the set's run.json ({tn.get('source', 'teacher_norm')})")
    args.preset_note = mp.get("unpublished", {}).get(args.dataset)
    preset = {**PROTOCOLS[args.protocol], **ds.get("all", {}), **ds.get(args.protocol, {}),
              **mp.get("all", {}).get(args.protocol, {}), **mp.get(args.dataset, {}).get(args.protocol, {})}
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.method = method
    args.label_mode = PROTOCOL_LABELS[args.protocol] if args.label_mode == "auto" else args.label_mode
    args.student = args.student or "resnet18"
    args.teacher = args.teacher or args.student
    args.repeats = args.repeats or 1
    args.norm = args.norm or "dataset"
    args.test_view = args.test_view or "ratio"
    args.workers = (0 if args.dataset == "digits" else 8) if args.workers is None else args.workers
    if args.lr is None:
        args.lr = STUDENT_LR.get(args.student, 1e-3)
        if args.dataset == "cifar100" and args.student == "conv3" and args.protocol == "rded":
            args.lr, args.batch_size = 2e-3, args.batch_size or 25
    if args.min_scale is None:
        args.min_scale = 1.0 / args.factor if args.factor else 0.08
    if args.t_squared is None:
        args.t_squared = 0
    if args.gamma is None:
        args.gamma = 0.1
    args.size = common.input_size(args.dataset, args.student)
    if method == "ddranking":
        if args.protocol not in ("static", "rded") or args.label_mode not in ("static", "teacher"):
            raise common.UserError("--preset ddranking has two label modes: --ddranking-mode S (static) or M (teacher)")
        args.ddranking_mode = "S" if args.label_mode == "static" else "M"
        args.lr_search = True  # its students always search the five rates (soft_label.py:516-558)
        args.lrs = True  # and every repeat trains the hard-label and full-data students (soft_label.py:516-535)
        key = ddranking_key(args)
        if args.full_top1 is None and key in DDRANKING_ACC_CACHE:
            args.full_top1 = DDRANKING_ACC_CACHE[key]
        elif args.full_top1 is None and key not in DDRANKING_REAL:
            raise common.UserError(f"DD-Ranking 0.2.0 has neither a full-data figure nor a full-data recipe for "
                                   f"{key[0]}-{key[1]}: choose --student (e.g. conv3 for CIFAR) or give --full-top1")
    norm = ((info.mean, info.std, f"{args.dataset} statistics ({'--norm' if explicit_norm else 'preset'} dataset)")
            if args.norm == "dataset" else
            (common.IMAGENET_MEAN, common.IMAGENET_STD, f"ImageNet statistics ({'--norm' if explicit_norm else 'preset'} imagenet)"))
    if not explicit_norm:  # the set's record, else the method's own constants (INFER's, DM-KD's CIFAR-100 statistics)
        norm = run_norm or mp.get("stats", {}).get(args.dataset) or norm
    # a teacher checkpoint that says what it expects (RDED's ConvNet layout, stored mean/std) beats the preset,
    # an explicit --norm or --mean/--std beats both
    paths = (args.teacher_path or "").split(",") if args.label_mode != "hard" and not explicit_norm else []
    args.mean, args.std, args.norm_source = common.resolve_norm(args.dataset, paths, args.mean, args.std, "auto", default=norm)
    return args


def recipe_for(args, ipc, n_images):
    """The IPC-dependent rest of the recipe, as a TrainConfig."""
    info = common.dataset_info(args.dataset)
    epochs = args.epochs or minimax_epochs(ipc, info.num_classes)
    bs = args.batch_size or rded_batch_size(ipc, info.num_classes, args.dataset, args.student)
    milestones = ([int(m) for m in args.milestones.split(",")] if args.milestones
                  else [2 * epochs // 3, 5 * epochs // 6] if args.schedule == "step" else [])
    eval_every = args.eval_every or max(1, epochs // 100)
    return common.TrainConfig(labels=args.label_mode, epochs=epochs, batch_size=min(bs, n_images),
                              optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                              decay=args.decay or "weights", schedule=args.schedule, milestones=tuple(milestones), gamma=args.gamma,
                              temperature=args.temperature or 1.0, t_squared=bool(args.t_squared),
                              mix=args.mix or "none", alpha=args.alpha or 1.0, eval_every=eval_every,
                              eval_from=args.eval_from, seed=args.seed, workers=args.workers, precision=args.precision,
                              **(dict(eval_phase=eval_every - 1, mix_labels=False) if args.method == "ddranking" else {}))


def recipe_record(args, cfg):
    """Everything that decides a result, for the JSON and the dry run."""
    defaults = {"eval_phase": 0, "mix_labels": True}  # recorded only where a preset changes them (DD-Ranking's)
    return {**{k: v for k, v in vars(cfg).items() if k not in ("seed", "workers") and (k not in defaults or v != defaults[k])},
            "milestones": list(cfg.milestones), "crop": args.crop,
            "min_scale": args.min_scale, "factor": args.factor, "flip": bool(args.flip), "rand_augment": args.rand_augment,
            "color_jitter": args.color_jitter, "lighting": args.lighting, "size": args.size, "norm": args.norm,
            "norm_source": args.norm_source,
            "mean": list(args.mean), "std": list(args.std), "test_view": args.test_view, "repeats": args.repeats,
            "lr_search": list(LR_GRID) if args.lr_search else None}


def val_transform(args):
    """The test view: RDED/SRe2L's Resize(s//7*8)+CenterCrop(s), or Minimax's Resize(s)+CenterCrop(s)."""
    if args.test_view == "ratio":
        return common.eval_transform(args.dataset, args.size, mean=args.mean, std=args.std)
    return T.Compose([common.to_tensor(), T.Resize(args.size, antialias=True), T.CenterCrop(args.size),
                      T.Normalize(args.mean, args.std)])


def class_folders_ipc(folder):
    """Smallest number of image files in a class folder, without reading any image (for the dry run)."""
    if not os.path.isdir(folder):
        raise common.UserError(f"the set {folder} does not exist")
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
    counts = [sum(f.lower().endswith(exts) for f in os.listdir(e.path)) for e in os.scandir(folder)
              if e.is_dir() and not e.name.startswith(".") and e.name != "fkd"]
    return min(counts) if counts else 0


def stored_soft_labels(path, labelled, num_classes):
    """The set's soft_labels.pt as [images, classes] logits, checked before any training: a tensor (or a dict
    with "logits") of floats, one row per image of the set, one column per class, finite, and, when the file
    records it ("set", common.set_identity), made for these very images."""
    fix = "delete it (the static protocol then computes labels from the teacher) or remake the set"
    if os.path.isdir(path):
        raise common.UserError(f"{path} is a folder, not a soft-label file: {fix}")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise common.UserError(f"{path} {common._checkpoint_problem(path, e)}") from e
    logits = stored.get("logits") if isinstance(stored, dict) else stored
    if not torch.is_tensor(logits) or logits.ndim != 2:
        what = f"a {tuple(logits.shape)} tensor" if torch.is_tensor(logits) else f"a {type(logits).__name__}"
        raise common.UserError(f"{path} holds {what}, not soft labels [images, classes]: {fix}")
    if not logits.is_floating_point():
        raise common.UserError(f"{path} holds {logits.dtype} values, not soft labels (floating-point logits): {fix}")
    if len(logits) != labelled["images"]:
        raise common.UserError(f"{path} has {len(logits)} rows but the set holds {labelled['images']} images: it "
                               f"belongs to another set; {fix}")
    if logits.shape[1] != num_classes:
        raise common.UserError(f"{path} has {logits.shape[1]} columns but the dataset has {num_classes} classes: it "
                               f"belongs to another dataset; {fix}")
    made_for = stored.get("set") if isinstance(stored, dict) else None
    if isinstance(made_for, dict) and made_for.get("digest") not in (None, labelled["digest"]):
        raise common.UserError(f"{path} was made for other images than the set holds now (image digest "
                               f"{made_for['digest']}, the set's {labelled['digest']}): {fix}")
    if not torch.isfinite(logits).all():
        raise common.UserError(f"{path} holds NaN or infinite values: {fix}")
    return logits


def check_fkd_store(fkd_dir, labelled, num_classes):
    """Stored FKD labels checked against the set before any training: one entry per image of the set, the
    set's images (digest, when recorded), one logit per class, and every epoch file present and readable."""
    meta = common.fkd_meta(fkd_dir)
    fix = "delete the fkd_* files and store the labels again (validate_fkd.py --relabel-epochs N)"
    if meta.get("images") != labelled["images"]:
        raise common.UserError(f"the FKD labels in {fkd_dir} are for {meta.get('images')} images but the set holds "
                               f"{labelled['images']}: {fix}")
    made_for = meta.get("set")
    if isinstance(made_for, dict) and made_for.get("digest") not in (None, labelled["digest"]):
        raise common.UserError(f"the FKD labels in {fkd_dir} were made for other images than the set holds now: {fix}")
    for e in range(meta.get("epochs", 0)):
        path = common.fkd_path(fkd_dir, f"epoch_{e:04d}.pt")
        if not os.path.isfile(path):
            raise common.UserError(f"{path} is missing ({meta['epochs']} epochs stored per fkd_meta.json): {fix}")
        if e == 0:
            try:
                rec = torch.load(path, map_location="cpu", weights_only=True)
                width = {int(x.shape[-1]) for x in rec["logits"]}
                top = max(int(i.max()) for i in rec["index"])
            except Exception as err:
                raise common.UserError(f"{path} is not a readable FKD label file ({type(err).__name__}): {fix}") from err
            if width != {num_classes} or top >= labelled["images"]:
                raise common.UserError(f"{path} holds logits for {sorted(width)} classes and image indices up to {top}, "
                                       f"but the dataset has {num_classes} classes and the set {labelled['images']} "
                                       f"images: {fix}")
    return meta


def result_path(out, name):
    """Where the result JSON goes: --out as a file path, or into --out when it names an existing folder (or
    ends with /); checked before any training: its folder must exist or be creatable and be writable."""
    if out and (os.path.isdir(out) or out.endswith(os.sep)):
        out = os.path.join(out, name)
    elif not out:
        return None
    parent = os.path.dirname(os.path.abspath(out))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise common.UserError(f"cannot write the result --out {out}: {probe} is "
                               f"{'not a folder' if not os.path.isdir(probe) else 'not writable'}")
    return out


def load_teachers(args, device, cast=True):
    """The teacher (or an Ensemble of them); cast=True: conv/linear weights in bf16 when the run is bf16
    (common.cast_teacher; call it under autocast), cast=False: the checkpoint's own fp32 weights."""
    archs = args.teacher.split(",")
    paths = args.teacher_path.split(",") if args.teacher_path else [None] * len(archs)
    if len(paths) != len(archs):
        raise common.UserError(f"--teacher-path lists {len(paths)} checkpoints for {len(archs)} teacher architectures")
    teachers = [common.load_teacher(a, args.dataset, p, args.data_path, device=device) for a, p in zip(archs, paths)]
    teachers = [common.cast_teacher(t, args.precision, device) if cast else t for t in teachers]
    return teachers[0] if len(teachers) == 1 else common.Ensemble(teachers).eval()


@torch.no_grad()
def ensemble_logits(teacher, images, args, device):
    """Static labels: the teachers' mean logits on each unaugmented image (UFC:ufc_validation/val_static.py:200-222)."""
    out = []
    for x in images.split(256):
        x = common.normalize(x.float().to(device) / 255, args.mean, args.std)
        with common.autocast(device, args.precision):
            out.append(teacher(x).float().cpu())
    return torch.cat(out)


def augment_on_device(args, device):
    """Batched views on the device (common.DeviceAugment) unless an op it does not batch is on."""
    per_image_only = bool(args.rand_augment or args.color_jitter or args.lighting)
    if args.augment_on == "device" and per_image_only:
        raise common.UserError("--augment-on device does not do RandAugment, ColorJitter or Lighting: use --augment-on loader")
    if args.augment_on == "device" and args.crop == "none":
        raise common.UserError("--crop none has no device views: use --augment-on loader")
    return args.augment_on == "device" or (args.augment_on == "auto" and str(device).startswith("cuda") and not per_image_only
                                           and args.crop != "none")


def resolve_execution(args, device):
    """--precision and --augment-on as what runs on `device` (records and cache keys say what ran)."""
    args.precision = common.resolve_precision(args.precision, device)
    args.augment_on = "device" if augment_on_device(args, device) else "loader"


def train_once(args, images, targets, cfg, teacher, static_labels, fkd_dir, val_loader, d, train_set=None):
    """One student on one image set (or on `train_set`, a dataset of (image, label, index)); returns the
    train_student result."""
    common.seed_everything(cfg.seed)
    student = common.build_model(args.student, common.dataset_info(args.dataset).num_classes, args.size)
    fkd = None
    if cfg.labels == "fkd":
        meta = common.fkd_meta(fkd_dir)
        fkd = {"images": images, "dir": fkd_dir, "size": meta["size"], "mean": meta["mean"], "std": meta["std"]}
    elif train_set is None and augment_on_device(args, d.device):
        aug = common.DeviceAugment(args.size, args.mean, args.std, crop=args.crop, min_scale=args.min_scale,
                                   flip=bool(args.flip), factor=args.factor or 1)
        train_set = common.DeviceImageSet(images, targets, aug)
    elif train_set is None:
        train_set = IndexedDataset(images, targets, train_view(args))
    return common.train_student(student, cfg, val_loader, d.device, train_set=train_set, teacher=teacher,
                                static_labels=static_labels, fkd=fkd, dist_info=d,
                                log=print if d.main else (lambda *_: None))


def train_view(args):
    if args.crop == "none":  # the images as they are, normalised (DD-Ranking: TensorDataset, no transform)
        return T.Compose([common.to_tensor(), T.Normalize(args.mean, args.std)])
    return common.train_transform(args.size, args.mean, args.std, crop=args.crop, min_scale=args.min_scale,
                                  flip=bool(args.flip), factor=args.factor or 1, rand_augment=args.rand_augment,
                                  color_jitter=args.color_jitter or 0.0, lighting=args.lighting or 0.0)


def train_repeat(args, name, images, targets, cfg, teacher, static_labels, fkd_dir, val_loader, d):
    """One repeat: one student; with --lr-search one per rate of LR_GRID, keeping the best top-1 on the test
    set (DD-Ranking's rule; the first of equal maxima, as its strict '>'). Returns (result, tried)."""
    if not args.lr_search:
        return train_once(args, images, targets, cfg, teacher, static_labels, fkd_dir, val_loader, d), None
    tried, seed = [], cfg.seed
    for i, lr in enumerate(LR_GRID):
        cfg.lr = lr
        # DD-Ranking's trials draw from one running RNG: each rate gets its own initialisation and batch order, so
        # the kept maximum also selects over those (DDR:metrics/soft_label.py:239-265); here seed*5 + i
        cfg.seed = seed * len(LR_GRID) + i if args.method == "ddranking" else seed
        if d.main:
            print(f"[{name}] --lr-search: lr {lr} (seed {cfg.seed})")
        tried.append((lr, cfg.seed, train_once(args, images, targets, cfg, teacher, static_labels, fkd_dir, val_loader, d)))
    lr, _, res = max(tried, key=lambda t: t[2]["best"])
    cfg.lr, cfg.seed = lr, seed
    return res, [{"lr": r, "seed": sd, "best": t["best"], "last": t["last"]} for r, sd, t in tried]


def summarise(runs):
    best, last = [r["best"] for r in runs], [r["last"] for r in runs]
    return {"best_mean": float(np.mean(best)), "best_std": float(np.std(best)),
            "last_mean": float(np.mean(last)), "last_std": float(np.std(last)), "runs": runs}


def evaluate_set(args, name, images, targets, ipc, teacher, static_labels, fkd_dir, val_loader, d, label=None):
    """`--repeats` students on one set; mean and population std of best and last. `label` replaces the
    "repeat r/N" of the log line (a random real subset is one repeat of its own)."""
    runs = []
    for r in range(args.repeats):
        cfg = recipe_for(args, ipc, len(targets))
        if cfg.labels == "fkd":
            meta = common.fkd_meta(fkd_dir)
            if cfg.epochs > meta["epochs"]:
                raise common.UserError(f"--epochs {cfg.epochs} exceeds the {meta['epochs']} epochs of stored FKD labels in {fkd_dir}")
            cfg.batch_size = meta.get("batch_size", cfg.batch_size)  # the replay trains on the stored batches: record what runs
        cfg.seed = args.seed + r
        if d.main:
            print(f"[{name}] {label or f'repeat {r + 1}/{args.repeats}'}: {len(targets)} images, protocol {args.protocol} "
                  f"({cfg.labels} labels), student {args.student}, {cfg.epochs} epochs, batch {cfg.batch_size}, seed {cfg.seed}")
        res, tried = train_repeat(args, name, images, targets, cfg, teacher, static_labels, fkd_dir, val_loader, d)
        runs.append({"seed": cfg.seed, "best": res["best"], "last": res["last"], "history": res["history"],
                     "seconds": round(res["seconds"], 2), "images_per_s": round(res["images_per_s"], 1)})
        if tried:
            runs[-1].update({"lr": cfg.lr, "lr_search": tried})
    return {"images": len(targets), "ipc": ipc, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "steps": cfg.epochs * steps_per_epoch(len(targets), cfg, fkd_dir), **summarise(runs)}, cfg


class IndexedDataset(torch.utils.data.Dataset):
    """(transform(image), label, index) over a uint8 image tensor: static labels need the index."""

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.targets[i]), i


def steps_per_epoch(n, cfg, fkd_dir=None):
    """Optimiser steps of one epoch: the loader's batches (a last batch of one image is dropped,
    common.train_student), or the stored FKD batches."""
    bs = common.fkd_meta(fkd_dir)["batch_size"] if cfg.labels == "fkd" else cfg.batch_size
    return n // bs + (n % bs > 1)


def store_fkd_labels(args, images, ipc, teacher, fkd_dir, epochs, d, like=None):
    """SRe2L relabel: rank 0 stores FKD labels for `images` (RRC 0.08-1, the protocol's mix), all wait.
    `like`: a set's fkd_meta.json, whose batch size, mix, crop scale and flip are copied, so that random real
    images get the same number of optimiser steps and the same views as the set they are compared with."""
    if d.main:
        info = common.dataset_info(args.dataset)
        bs = args.relabel_batch_size or min(rded_batch_size(ipc, info.num_classes, args.dataset, args.student), len(images))
        mix, alpha, min_scale, flip = args.mix or "cutmix", args.alpha or 1.0, 0.08, bool(args.flip)
        if like:
            bs = min(like["batch_size"], len(images))
            mix, alpha, min_scale, flip = like["mix"], like["alpha"], like["min_scale"], like["flip"]
        common.fkd_generate(images, teacher, fkd_dir, epochs, bs, args.size, args.mean, args.std, mix,
                            alpha, min_scale, flip, args.seed, d.device, precision=args.precision)
    common.barrier()


def random_real_runs(args, ipc, teacher, cfg_epochs, val_loader, d, fkd_like=None):
    """`--repeats` random real subsets at `ipc` (subset seeds seed+1000+r), one student each, same protocol."""
    info = common.dataset_info(args.dataset)
    real = common.real_dataset(args.dataset, args.data_path, "train",
                               common.to_tensor() if args.method == "ddranking" else  # its random images: no resize or crop
                               common.eval_transform(args.dataset, args.size, normalize=False))
    teacher = teacher or (load_teachers(args, d.device) if args.label_mode == "fkd" else None)
    runs, res = [], {}
    for r in range(args.repeats):
        idx = common.random_subset(real.targets, ipc, args.seed + 1000 + r, info.num_classes)
        x, y = common.stack_images(real, idx, workers=args.workers)
        x = (x * 255).round().to(torch.uint8)
        labels = ensemble_logits(teacher, x, args, d.device) if args.label_mode == "static" else None
        with tempfile.TemporaryDirectory() as tmp:
            if args.label_mode == "fkd":  # the same relabelling recipe as the set's stored labels
                store_fkd_labels(args, x, ipc, teacher, tmp, cfg_epochs or args.relabel_epochs or args.epochs, d, fkd_like)
            one = copy.copy(args)
            one.repeats, one.seed = 1, args.seed + r
            res, _ = evaluate_set(one, "random real", x, y, ipc, teacher, labels, tmp, val_loader, d,
                                  label=f"subset {r + 1}/{args.repeats}")
        runs += res["runs"]
    return {"kind": "random real subsets", "ipc": ipc, "subset_seeds": [args.seed + 1000 + r for r in range(args.repeats)],
            "epochs": res.get("epochs"), "steps": res.get("steps"), **summarise(runs)}


# ----------------------------------------------------------------------------------------------
# DD-Ranking's metrics (Li et al., arXiv 2505.13300, Sec. 3): IOR, HLR, LRS
# ----------------------------------------------------------------------------------------------
def label_robust_score(ior, hlr, lam=0.5):
    """LRS = (e^a - e^-1) / (e - e^-1), a = lam * IOR - (1 - lam) * HLR. On accuracies as fractions
    a lies in [-1, 1] and LRS in [0, 1]; DD-Ranking 0.2.0's code passes percentage points
    (ddranking/metrics/soft_label.py:561-564): that LRS tends to -e^-1/(e - e^-1) = -0.157 once HLR exceeds IOR by a
    few points, is 0.269 when they are equal and grows without bound when IOR exceeds HLR."""
    a = lam * ior - (1 - lam) * hlr
    return (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))


def mean_std(values):
    return {"per_repeat": [float(v) for v in values], "mean": float(np.mean(values)), "std": float(np.std(values))}


def ddranking_key(args):
    """(DD-Ranking's dataset name, its model name of the student): the key of its full-data tables."""
    return DDRANKING_DATASETS.get(args.dataset, (args.dataset,))[0], ddranking_model(args.student)[0]


def ddranking_real_config(h):
    """DD-Ranking's full-data (lr, weight decay, StepLR step) for the student, or a clear refusal."""
    key = ddranking_key(h)
    if key not in DDRANKING_REAL:
        raise common.UserError(f"DD-Ranking 0.2.0 has no full-data config for {key[0]}-{key[1]} (its REAL_DATA_TRAINING_CONFIG "
                               f"holds {sorted(f'{a}-{b}' for a, b in DDRANKING_REAL)}): choose --student accordingly")
    return DDRANKING_REAL[key]


def ddranking_metrics(syn, rand, syn_hard=None, full_hard=None, lam=0.5):
    """Per repeat r (all in percent): IOR_r = syn_r - rand_r (distilled seed s against random subset s),
    HLR_r = full_hard - syn_hard_r, LRS_r on fractions and, for comparison with published tables, the
    value DD-Ranking 0.2.0's code gives (percentage points in the exponential). Mean and population std."""
    out = {"ior": mean_std([s - r for s, r in zip(syn, rand)])}
    if syn_hard is not None and full_hard is not None:
        full_hard = full_hard if isinstance(full_hard, list) else [full_hard] * len(syn_hard)  # one full run per repeat
        hlr = [f - h for f, h in zip(full_hard, syn_hard)]
        out["hlr"] = mean_std(hlr)
        out["lrs"] = mean_std([label_robust_score((s - r) / 100, h / 100, lam) for s, r, h in zip(syn, rand, hlr)])
        out["lrs_ddranking_code"] = mean_std([label_robust_score(s - r, h, lam) for s, r, h in zip(syn, rand, hlr)])
    return out


METRIC_DEFINITIONS = {
    "ior": "improvement over random, percentage points: per repeat r, top-1 of the student trained on the distilled set "
           "(seed s = seed + r) minus top-1 of the student trained on random real subset r (seed s) under the same "
           "protocol; mean and population std over repeats",
    "hlr": "hard-label recovery, percentage points: top-1 on the full real train split minus top-1 on the distilled set, "
           "both with hard labels under the same student and hard-label recipe (the hard protocol); lower is better",
    "lrs": "label-robust score: (e^a - e^-1)/(e - e^-1), a = lambda*IOR - (1-lambda)*HLR with IOR and HLR as fractions "
           "(in [0, 1]); per repeat, then mean and population std",
    "lrs_ddranking_code": "the same formula with IOR and HLR in percentage points, as DD-Ranking 0.2.0's code computes it "
                          "(ddranking/metrics/soft_label.py); printed for comparison with its published tables",
    "accuracies": "each run's best top-1 over its evaluations, as DD-Ranking uses",
}


class WithIndex(torch.utils.data.Dataset):
    """(image, label, index) items over a dataset of (image, label): the training loop's format."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


def hard_label_args(args):
    """The hard protocol's generic recipe for this dataset with the evaluation's student and normalisation;
    under --preset ddranking DD-Ranking's hard-label students: the soft recipe with cross-entropy on the class
    labels and no augmentation (DDR:metrics/soft_label.py:268-316)."""
    if args.method == "ddranking":
        h = copy.copy(args)
        h.protocol, h.label_mode, h.mix, h.epochs = "hard", "hard", "none", args.hard_epochs or args.epochs
        return h
    argv = ["--dataset", args.dataset, "--protocol", "hard", "--preset", "none", "--student", args.student,
            "--mean", *map(str, args.mean), "--std", *map(str, args.std), "--seed", str(args.seed),
            "--device", str(args.device), "--workers", str(args.workers), "--repeats", str(args.repeats)]
    argv += ["--data-path", args.data_path] if args.data_path else []
    argv += ["--epochs", str(args.hard_epochs)] if args.hard_epochs else []
    h = resolve(build_parser().parse_args(argv))
    h.lr_search = args.lr_search
    device = common.pick_device(args.device)  # the hard-label students run as the evaluation does, resolved
    h.precision = common.resolve_precision(args.precision, device)
    # the hard recipe's ColorJitter and Lighting are per image: its views stay in the loader (recorded so)
    per_image_only = h.rand_augment or h.color_jitter or h.lighting
    h.augment_on = "device" if augment_on_device(args, device) and not per_image_only else "loader"
    return h


def full_data_top1(h, val_loader, d, epochs):
    """Top-1 of the student trained with hard labels on the whole real train split under the recipe `h`,
    trained once per (dataset, student, recipe) and cached under $DD_CACHE/full_data with its recipe.
    The recipe is the set's hard-label recipe but for the epochs (a distilled set's thousands of passes
    would be absurd over the full data)."""
    cfg = recipe_for(h, 10**9, 10**9)
    cfg.epochs = epochs
    cfg.milestones = (2 * epochs // 3, 5 * epochs // 6) if h.schedule == "step" and not h.milestones else cfg.milestones
    cfg.eval_every = max(1, epochs // 10)
    if h.method == "ddranking":  # its full-data student: SGD m0.9 per its config, StepLR gamma 0.1, batch 256 (real_batch_size)
        lr, wd, step = ddranking_real_config(h)
        cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.schedule = "sgd", lr, wd, 0.9, "step"
        cfg.milestones, cfg.gamma, cfg.batch_size = tuple(range(step, epochs, step)), 0.1, 256
        cfg.eval_every, cfg.eval_phase, cfg.mix = 20, 19, "none"
    key = {"dataset": h.dataset, "student": h.student, "seed": h.seed, **recipe_record(h, cfg),
           "augment_on": "loader"}  # the real split's views are made per image by the loader
    key.pop("repeats"), key.pop("lr_search")
    path = os.path.join(common.cache_dir(), "full_data", f"{h.dataset}_{h.student}_{common.content_hash(key)}.json")
    def load(p):  # damaged (cut short, not this recipe's record): trained again
        with open(p) as f:
            rec = json.load(f)
        if not isinstance(rec.get("top1"), (int, float)) or rec.get("recipe") != json.loads(json.dumps(key)):
            raise ValueError("not the record of this recipe")
        return rec
    cached = common.read_cached(path, "full-data result", load)
    if cached is not None:
        if d.main:
            print(f"full real data, hard labels: top-1 {cached['top1']:.2f} (cached {path})")
        return {**cached, "cache": path, "cached": True}
    if d.main:
        common.make_cache_dir(os.path.dirname(path))  # an unwritable cache is refused before the training, not after
    real = WithIndex(common.real_dataset(h.dataset, h.data_path, "train", train_view(h)))
    cfg.batch_size = min(cfg.batch_size, len(real))
    if d.main:
        print(f"full real data, hard labels: {len(real)} images, student {h.student}, {epochs} epochs, batch {cfg.batch_size}, "
              f"{h.precision} (once; cached in {path})")
    res = train_once(h, None, None, cfg, None, None, None, val_loader, d, train_set=real)
    out = {"top1": res["best"], "last": res["last"], "history": res["history"], "seconds": round(res["seconds"], 2),
           "recipe": key, "versions": common.package_versions(), "device": common.device_name(d.device)}
    if d.main:
        common.atomic_write_json(path, out)
    return {**out, "cache": path, "cached": False}


def hard_label_metrics(args, images, targets, ipc, d):
    """HLR's two figures: `--repeats` hard-label students on the set and the cached full-data one."""
    h = hard_label_args(args)
    val = common.real_dataset(h.dataset, h.data_path, "val", val_transform(h))
    val_loader = torch.utils.data.DataLoader(val, batch_size=256, num_workers=h.workers, worker_init_fn=common.quiet_worker)
    syn, cfg = evaluate_set(h, "distilled, hard labels", images, targets, ipc, None, None, None, val_loader, d)
    if args.full_top1 is not None:  # given, not trained (DDR:metrics/soft_label.py:536-540)
        return {"recipe": recipe_record(h, cfg), "student": h.student, **syn}, {
            "top1": args.full_top1, "per_repeat": [args.full_top1] * h.repeats, "given": "--full-top1"}
    if h.method == "ddranking":  # retrained every repeat (eval_full_data, DDR:metrics/soft_label.py:526-535)
        runs = []
        for r in range(h.repeats):
            one = copy.copy(h)
            one.seed = h.seed + r
            runs.append(full_data_top1(one, val_loader, d, args.full_epochs or h.epochs))
        top1 = [f["top1"] for f in runs]
        return {"recipe": recipe_record(h, cfg), "student": h.student, **syn}, {
            "top1": float(np.mean(top1)), "per_repeat": top1, "std": float(np.std(top1)), "runs": runs}
    full = full_data_top1(h, val_loader, d, args.full_epochs or FULL_DATA_EPOCHS[args.dataset])
    return {"recipe": recipe_record(h, cfg), "student": h.student, **syn}, full


# ----------------------------------------------------------------------------------------------
# export for DD-Ranking (ddranking 0.2.0): what its LabelRobustScoreSoft reads
# ----------------------------------------------------------------------------------------------
def ddranking_model(arch):
    """DD-Ranking's model name for one of ours and whether it is its torchvision variant: our convD is
    layer for layer its ConvNet-D-BN (width 128, BatchNorm, ReLU, AvgPool), resnet18(_modified) its
    torchvision ResNet-18 (3x3 stem without max-pool at 32/64 px)."""
    if arch.startswith("conv") and arch[4:].isdigit():
        return f"ConvNet-{arch[4:]}-BN", False
    if arch in ("resnet18", "resnet18_modified"):
        return "ResNet-18-BN", True
    raise common.UserError(f"DD-Ranking has no architecture matching teacher {arch!r}: export a conv3..conv6, "
                           f"resnet18 or resnet18_modified teacher (--teacher)")


def ddranking_state_dict(model, arch):
    """Our state dict in DD-Ranking's key layout: ConvNet's fc.* is its classifier.*; the rest is equal."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if arch.startswith("conv"):
        sd = {("classifier." + k[3:] if k.startswith("fc.") else k): v for k, v in sd.items()}
    return sd


def ddranking_step_size(args):
    """StepLR's step for --schedule step: DD-Ranking decays by 0.1 every step_size epochs (utils/train_and_eval.py:117)."""
    ms = [int(m) for m in (args.milestones or "").split(",") if m]
    if not ms or ms != list(range(ms[0], args.epochs, ms[0])):
        raise common.UserError("DD-Ranking's step schedule decays every step_size epochs: give --milestones S,2S,3S,... "
                               "below --epochs")
    return ms[0]


def ddranking_kwargs(args, ipc, model_name, student_tv, teacher_name, teacher_tv, dd_name, out_dir):
    """Keyword arguments of DD-Ranking 0.2.0's LabelRobustScoreSoft(...) and of its compute_metrics(...), each a
    name of its signature (DDR:metrics/soft_label.py:24-30, 495), for the resolved --preset ddranking recipe. Every
    argument whose default fails in 0.2.0 is given (step_size with 'step'; random_data_format 'tensors'; loss_fn_kwargs
    None); im_size only where it is not the default (32, 32): JSON holds a list, and its torchvision ResNet compares
    im_size with a tuple (DDR:utils/model.py:97)."""
    sched = {"quarter": "cosine", "step": "step", "cosine": None, "constant": None}[args.schedule]
    opt = {"adamw_all": "adamw", "sgd": "sgd", "adamw": None}[args.optimizer]
    if sched is None or opt is None or args.mix not in ("cutmix", "mixup", "none") or args.crop != "none":
        raise common.UserError("DD-Ranking cannot run this recipe (its optimisers: adamw on every parameter, sgd; schedules: "
                               "quarter cosine 'cosine', 'step'; no crops): export with the ddranking preset's values")
    aug = {"cutmix": ("cutmix", {"beta": args.alpha}), "mixup": ("mixup", {"lambda": args.alpha}), "none": ("none", {})}[args.mix]
    init = {"dataset": dd_name, "real_data_path": args.data_path or "./dataset/", "ipc": ipc, "model_name": model_name,
            "soft_label_criterion": "kl", "loss_fn_kwargs": {"temperature": args.temperature, "scale_loss": bool(args.t_squared)},
            "data_aug_func": aug[0], "aug_params": aug[1], "soft_label_mode": args.ddranking_mode, "optimizer": opt,
            "lr_scheduler": sched, "step_size": ddranking_step_size(args) if sched == "step" else None, "weight_decay": args.weight_decay, "momentum": 0.9, "num_eval": args.repeats,
            "num_epochs": args.epochs, "use_zca": False, "use_aug_for_hard": False, "random_data_format": "tensor",
            "random_data_path": os.path.abspath(os.path.join(out_dir, "random_data")), "real_batch_size": 256,
            "syn_batch_size": args.batch_size, "save_path": os.path.abspath(os.path.join(out_dir, "ddranking_scores.csv")),
            "eval_full_data": args.full_top1 is None, "stu_use_torchvision": student_tv, "tea_use_torchvision": teacher_tv,
            "num_workers": args.workers, "teacher_dir": os.path.abspath(os.path.join(out_dir, "teacher_models")),
            "teacher_model_names": [teacher_name], "device": "cuda" if torch.cuda.is_available() else "cpu", "dist": False}
    if args.size != 32:
        init["im_size"] = [args.size, args.size]
    call = {"image_tensor": os.path.abspath(os.path.join(out_dir, "images.pt")), "lrs_lambda": args.lrs_lambda}
    if args.ddranking_mode == "S":
        call["soft_labels"] = os.path.abspath(os.path.join(out_dir, "soft_labels.pt"))
    return {"LabelRobustScoreSoft": init, "compute_metrics": call}


def export_ddranking(args, folder, images, targets, rows, out_dir, d, stored=None):
    """images.pt (float [N,3,H,W], class-major, normalised as DD-Ranking normalises the dataset's test set),
    soft_labels.pt (float [N,C] teacher logits, row i = image i), the teacher at
    teacher_models/<Dataset>/<Model>/ckpt_best.pt (a plain state dict in its key layout), ddranking.json (exactly
    the keyword arguments of LabelRobustScoreSoft(...) and compute_metrics(...); the tensors as file paths to
    torch.load) and export.json (what was exported, from where)."""
    info = common.dataset_info(args.dataset)
    counts = torch.bincount(targets, minlength=info.num_classes)
    if int(counts.min()) != int(counts.max()):
        raise common.UserError(f"DD-Ranking needs the same number of images in every class (its hard labels are IPC "
                               f"copies of each class); {folder} holds {int(counts.min())} to {int(counts.max())}: pass --ipc")
    if "," in args.teacher:
        raise common.UserError("export one teacher for DD-Ranking (--teacher with one architecture)")
    model_name, torchvision_variant = ddranking_model(args.teacher)
    student_name, student_tv = ddranking_model(args.student)
    dd_name, dd_mean, dd_std = DDRANKING_DATASETS.get(args.dataset, (args.dataset, info.mean, info.std))
    teacher = load_teachers(args, d.device, cast=False)  # the file gets the fp32 weights, whatever --precision
    if any(isinstance(m, torch.nn.GroupNorm) for m in teacher.modules()):  # an instance-norm ConvNet: its default
        model_name = model_name.removesuffix("-BN")
    ipc = int(counts[0])
    kwargs = ddranking_kwargs(args, ipc, student_name, student_tv, model_name, torchvision_variant, dd_name, out_dir)
    if stored is not None:  # the set's soft_labels.pt, checked against the set (stored_soft_labels)
        soft = stored[rows].float()
        source = "the set's soft_labels.pt"
    else:
        soft = ensemble_logits(teacher, images, args, d.device)
        source = f"teacher {args.teacher} on the unaugmented images (static labels, {args.precision})"
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "teacher_models", dd_name, model_name, "ckpt_best.pt")
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    common.atomic_torch_save(ddranking_state_dict(teacher, args.teacher), ckpt)
    common.atomic_torch_save(common.normalize(images.float() / 255, dd_mean, dd_std).contiguous(),
                             os.path.join(out_dir, "images.pt"))
    common.atomic_torch_save(soft.contiguous(), os.path.join(out_dir, "soft_labels.pt"))
    common.atomic_write_json(os.path.join(out_dir, "ddranking.json"), kwargs)
    spec = {"ddranking_version": "0.2.0", "code": DDR, "dataset": dd_name, "ipc": ipc, "num_images": len(targets),
            "model_name": student_name, "teacher_model_name": model_name, "im_size": [args.size, args.size],
            "soft_labels_from": source, "image_path": os.path.abspath(folder),
            "images_normalised_with": {"mean": list(dd_mean), "std": list(dd_std)},
            "teacher_expects": {"mean": list(args.mean), "std": list(args.std)},
            "order": "class-major, IPC images per class in ImageFolder order (DD-Ranking's hard labels)",
            "supported_by_ddranking": dd_name in {v[0] for v in DDRANKING_DATASETS.values()},
            # with eval_full_data False DD-Ranking reads REAL_DATA_ACC_CACHE[dataset-model]; a figure it lacks is set there
            "full_data_top1": args.full_top1, "full_data_top1_is_ddranking_s": ddranking_key(args) in DDRANKING_ACC_CACHE,
            "usage": "kw = json.load(open('ddranking.json')); m = LabelRobustScoreSoft(**kw['LabelRobustScoreSoft']); "
                     "m.compute_metrics(**{k: torch.load(v) if k in ('image_tensor', 'soft_labels') else v for k, v in "
                     "kw['compute_metrics'].items()}) -- mode S needs the two workarounds of docs/validate.md"}
    common.atomic_write_json(os.path.join(out_dir, "export.json"), spec)
    if tuple(args.mean) != tuple(dd_mean) or tuple(args.std) != tuple(dd_std):
        print(f"note: the teacher was used with mean {list(args.mean)} / std {list(args.std)}, but DD-Ranking normalises "
              f"{dd_name} with {list(dd_mean)} / {list(dd_std)}: its online teacher (mode M) sees other inputs")
    if not spec["supported_by_ddranking"]:
        print(f"note: DD-Ranking 0.2.0 has no dataset {dd_name!r}; scripts/ddranking_check.py supplies it from outside")
    print(f"exported {len(targets)} images ({ipc} per class), soft labels from {source}, teacher {args.teacher} as "
          f"DD-Ranking {model_name}, student {student_name}, mode {args.ddranking_mode} -> {out_dir}")
    return spec


# the numeric flags a user can get wrong, each with its rule (common.check_numbers)
FLAG_RULES = {">= 1": "random_real ipc repeats baseline_ipc relabel_epochs relabel_batch_size hard_epochs full_epochs "
                      "epochs batch_size eval_every factor",
              "> 0": "lr temperature alpha gamma std", ">= 0": "weight_decay workers color_jitter lighting",
              "in (0, 1]": "min_scale", "in [0, 1]": "eval_from lrs_lambda"}


def main(argv=None, closing=True, norm_source=None):
    """The evaluation; returns its record. `closing`: print the closing line (a script that evaluates its
    own set prints it instead, with its own facts); `norm_source`: why the --mean/--std a script passes
    are what they are (printed instead of "--mean/--std", which its user did not pass)."""
    args = build_parser().parse_args(argv)
    common.check_numbers(args, FLAG_RULES)
    if args.full_top1 is not None and not 0 <= args.full_top1 <= 100:
        raise common.UserError(f"--full-top1 is a top-1 % in [0, 100], not {args.full_top1}")
    method, source = choose_preset(args)
    args = resolve(args, method)
    args.norm_source = norm_source or args.norm_source
    augment_on_device(args, args.device)  # refuses --augment-on device with per-image-only ops, before any output
    if not args.syn_data_path and not args.random_real:
        raise common.UserError("give --syn-data-path (a set to evaluate) or --random-real IPC (random real subsets only)")
    if args.export_ddranking and not args.syn_data_path:
        raise common.UserError("--export-ddranking needs --syn-data-path (the set to export)")
    if args.lrs:
        args.baseline = "random"
    info = common.dataset_info(args.dataset)
    folder = args.syn_data_path.rstrip("/") if args.syn_data_path else None
    if folder and not os.path.isdir(folder):  # before any output
        raise common.UserError(f"the set {folder} does not exist (--syn-data-path)")
    fkd_dir = folder  # stored FKD labels are files in the set's root (common.fkd_path; the old fkd/ folder is read too)
    preset_line = (f"preset: {method or 'none'} ({source}); protocol {args.protocol}; inputs normalised with "
                   f"mean {[round(m, 4) for m in args.mean]} std {[round(v, 4) for v in args.std]} ({args.norm_source})"
                   + (f"; {args.dataset} recipe: {args.preset_note}" if args.preset_note else ""))
    quirks = DDRANKING_QUIRKS[args.ddranking_mode] + DDRANKING_QUIRKS["all"] if method == "ddranking" else None
    if quirks:
        preset_line += f"; DD-Ranking 0.2.0 mode {args.ddranking_mode} ({DDR}), quirks reproduced: " + "; ".join(quirks)

    # --- dry run: the resolved recipe, nothing loaded or trained ---
    if args.dry_run:
        resolve_execution(args, common.pick_device(args.device))
        ipc = args.ipc or (class_folders_ipc(folder) if folder else args.random_real)
        cfg = recipe_for(args, ipc, ipc * info.num_classes)
        if args.label_mode == "fkd" and folder and os.path.isfile(common.fkd_path(folder, "meta.json")):
            cfg.batch_size = common.fkd_meta(folder).get("batch_size", cfg.batch_size)  # the stored batches are what the replay trains on
        resolved = {"preset": method, "preset_source": source, "preset_note": args.preset_note, "protocol": args.protocol,
                    "label_mode": args.label_mode, "dataset": args.dataset, "ipc": ipc, "student": args.student,
                    "teacher": None if args.label_mode == "hard" else args.teacher,
                    "teacher_path": None if args.label_mode == "hard" else args.teacher_path, "recipe": recipe_record(args, cfg)}
        print(preset_line)
        for k, v in {**{k: v for k, v in resolved.items() if k != "recipe"}, **resolved["recipe"]}.items():
            print(f"  {k:14s} {json.dumps(v)}")
        return resolved
    d = common.dist_setup(args.device)
    resolve_execution(args, d.device)
    classes = common.class_list(args.dataset, args.data_path)  # missing data stops before the preset line
    teacher_reused = args.label_mode != "hard" and any(common.teacher_cached(a, args.dataset, args.teacher_path)
                                                       for a in args.teacher.split(","))
    if d.main:
        print(preset_line)

    # --- the distilled set (checked against the dataset's class list) ---
    if folder:
        if args.label_mode == "fkd":
            if args.ipc is not None:
                raise common.UserError("stored FKD labels index the whole set: --ipc cannot select a subset with --protocol fkd")
            if not args.relabel_epochs:
                common.fkd_meta(fkd_dir)  # refuse early when there are no stored labels
        images, targets, rows = common.load_image_set(folder, classes, args.ipc, args.size, return_rows=True)
        ipc = args.ipc or int(torch.bincount(targets, minlength=info.num_classes).min())
        # stored labels must fit this set (rows, classes, dtype, the images they were made for): before any training
        labels_path = os.path.join(folder, "soft_labels.pt")
        if args.label_mode == "fkd" and not args.relabel_epochs:
            check_fkd_store(fkd_dir, common.set_identity(folder), info.num_classes)
        elif args.label_mode == "fkd" and os.path.isfile(common.fkd_path(fkd_dir, "meta.json")):
            made_for = (common.fkd_meta(fkd_dir).get("set") or {}).get("digest")
            if made_for not in (None, common.set_identity(folder)["digest"]):
                raise common.UserError(f"the FKD labels in {fkd_dir} were made for other images than the set holds now: "
                                       f"delete the fkd_* files before --relabel-epochs stores new ones")
        stored_labels = (stored_soft_labels(labels_path, common.set_identity(folder), info.num_classes)
                         if args.label_mode == "static" or args.export_ddranking else None) if os.path.lexists(labels_path) else None
    else:
        ipc = args.random_real
    suffix = "" if args.label_mode == PROTOCOL_LABELS[args.protocol] else f"_{args.label_mode}"
    result_name = f"eval_{args.protocol}{suffix}.json"
    out_json = result_path(args.out, result_name)  # refused now, not after training
    if args.export_ddranking:
        common.check_out_folder(args.export_ddranking, "--export-ddranking")
        return (export_ddranking(args, folder, images, targets, rows, args.export_ddranking, d, stored_labels)
                if d.main else None)

    # --- the test set: the real validation split ---
    val = common.real_dataset(args.dataset, args.data_path, "val", val_transform(args))
    val_loader = torch.utils.data.DataLoader(val, batch_size=256, num_workers=args.workers, worker_init_fn=common.quiet_worker)

    # --- labels: teachers (online, static) or stored ---
    teacher = load_teachers(args, d.device) if args.label_mode in ("teacher", "static") else None
    record = {"protocol": args.protocol, "label_mode": args.label_mode, "dataset": args.dataset,
              "preset": method, "preset_source": source, "preset_note": args.preset_note,
              **({"ddranking": {"version": "0.2.0", "code": DDR, "mode": args.ddranking_mode, "quirks": quirks}} if quirks else {}),
              "syn_data_path": os.path.abspath(folder) if folder else None, "student": args.student,
              "teacher": None if args.label_mode == "hard" else args.teacher, "teacher_path": args.teacher_path,
              "repeats": args.repeats, "std": "population standard deviation (numpy ddof=0) over repeats",
              "reported": "best = max over evaluations (every eval_every epochs and the last); last = final epoch",
              "argv": sys.argv if argv is None else argv, "versions": common.package_versions(),
              "device": common.device_name(d.device)}
    cfg = recipe_for(args, ipc, ipc * info.num_classes)
    if folder:
        if args.label_mode == "fkd" and args.relabel_epochs:  # SRe2L relabel: store the labels first
            store_fkd_labels(args, images, ipc, load_teachers(args, d.device) if d.main else None, fkd_dir,
                             args.relabel_epochs, d)
        static_labels = None
        if args.label_mode == "static":
            if stored_labels is not None:
                static_labels = stored_labels[rows].float()
            else:
                print(f"note: {folder} has no soft_labels.pt; computing static labels from the teacher(s) once")
                static_labels = ensemble_logits(teacher, images, args, d.device)
        # --- students on the distilled set ---
        result, cfg = evaluate_set(args, "distilled", images, targets, ipc, teacher, static_labels, fkd_dir, val_loader, d)
        record.update(result)

    # --- random real subsets at the same IPC, same protocol ---
    if args.baseline == "random" or not folder:
        base = random_real_runs(args, args.random_real or args.baseline_ipc or ipc, teacher,
                                cfg.epochs,  # fkd: labels for the epochs the students train, not all the set stores
                                val_loader, d, common.fkd_meta(fkd_dir) if folder and args.label_mode == "fkd" else None)
        if folder:
            record["baseline"] = base
            record["improvement_over_random"] = record["best_mean"] - base["best_mean"]
        else:
            record.update(base)
    record["recipe"] = {**recipe_record(args, cfg), "augment_on": "device" if augment_on_device(args, d.device) else "loader"}
    if args.lr_search:
        record["lr_search"] = {"rates": list(LR_GRID), "selected_on": "the test set (DD-Ranking's rule): optimistic",
                               "distilled": [r.get("lr") for r in record.get("runs", [])] if folder else None,
                               "random": [r.get("lr") for r in record.get("baseline", record)["runs"]]}

    # --- DD-Ranking's metrics: paired IOR, and with --lrs HLR and LRS ---
    if folder and "baseline" in record:
        syn, rand = [r["best"] for r in record["runs"]], [r["best"] for r in record["baseline"]["runs"]]
        metrics = {"definitions": METRIC_DEFINITIONS, "lambda": args.lrs_lambda}
        syn_hard = full = None
        if args.lrs:
            hard, full = hard_label_metrics(args, images, targets, ipc, d)
            syn_hard = [r["best"] for r in hard["runs"]]
            metrics.update({"hard_label": hard, "full_data": full})
            if args.lr_search:
                record["lr_search"]["distilled_hard_labels"] = [r.get("lr") for r in hard["runs"]]
        metrics.update(ddranking_metrics(syn, rand, syn_hard, (full.get("per_repeat") or full["top1"]) if full else None,
                                         args.lrs_lambda))
        record["metrics"] = metrics

    # --- the record and one summary line ---
    if d.main:
        out = out_json or (os.path.join(folder, result_name) if folder else
                           os.path.join("runs", f"random_{args.dataset}_ipc{ipc}_{result_name}"))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        common.atomic_write_json(out, record)
        what = "distilled" if folder else "random real"
        line = (f"result: {args.dataset} protocol {args.protocol} ({args.label_mode} labels) student {args.student} "
                f"{ipc} images/class {what}: best {record['best_mean']:.2f} ± {record['best_std']:.2f}, last "
                f"{record['last_mean']:.2f} ± {record['last_std']:.2f} over {args.repeats} run(s)")
        if "baseline" in record:
            b = record["baseline"]
            line += (f"; random real ({args.baseline_ipc or ipc} images/class): best {b['best_mean']:.2f} ± {b['best_std']:.2f}, last {b['last_mean']:.2f} ± "
                     f"{b['last_std']:.2f} (improvement {record['improvement_over_random']:+.2f})")
        print(line)
        m = record.get("metrics")
        if m:
            text = f"metrics: IOR {m['ior']['mean']:+.2f} ± {m['ior']['std']:.2f} pp (paired per repeat)"
            if "lrs" in m:
                text += (f", HLR {m['hlr']['mean']:.2f} ± {m['hlr']['std']:.2f} pp (full data {m['full_data']['top1']:.2f}), "
                         f"LRS {m['lrs']['mean']:.4f} ± {m['lrs']['std']:.4f} (lambda {args.lrs_lambda}, on fractions); "
                         f"DD-Ranking 0.2.0's code would give LRS {m['lrs_ddranking_code']['mean']:.4f} "
                         f"(percentage points in the exponential)")
            print(text)
        if args.lr_search:
            print(f"lr search (selected on the test set): distilled {record['lr_search']['distilled']}, "
                  f"random {record['lr_search']['random']}")
        if closing:
            reused = {"teacher": teacher_reused,
                      "full-data student": bool(record.get("metrics", {}).get("full_data", {}).get("cached"))}
            print(common.closing_line("validate_fkd", args.dataset, ipc, out, record, reused))
    return record


if __name__ == "__main__":
    common.run_cli(main)
