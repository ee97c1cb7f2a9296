"""validate_fkd.py: one validator for every distilled set, four label protocols.

A student is trained from scratch on a distilled set (any ImageFolder-layout folder, normally the
on-disk contract of README.md) and tested on the dataset's real validation split. The
protocol fixes where the student's targets come from and the recipe around them:

  rded    teacher soft labels computed online on every augmented, cutmixed batch; KL at T=20, no T^2,
          AdamW, RDED's quarter cosine (R:validation/main.py, D:evaluation/argument.py; VLCP:04_evaluation/RDED/)
  fkd     soft labels stored once per (epoch, batch) with crop boxes, flips and mix parameters, replayed
          exactly (S:SRe2L/relabel/generate_soft_label.py, D4M:matching/utils_fkd.py:L199-237)
  static  one soft label per image (the teachers' mean logits), interpolated linearly under mixup;
          KL at T=30 (UFC:ufc_validation/val_static.py:200-222); `--label-mode teacher` is INFER's dynamic
          (UFC:ufc_validation/val_dyn.py:243-260)
  hard    cross-entropy on the class labels with cutmix, SGD, step decay (VLCP:04_evaluation/Minimax/train.py)

Citations: D = VILA-Lab/DELT@f2f81ca, R = LINs-lab/RDED@3f6453d, S = VILA-Lab/SRe2L@8d00cba,
D4M = suduo94/D4M@da35d10, UFC = zhangxin-xd/UFC@83d19f8,
VLCP = zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4. Full notes: docs/validate.md.

Every value of a preset can be overridden by its flag. `--repeats N` trains N students (seeds
seed..seed+N-1) and reports mean ± population std of the best and the last evaluation;
`--baseline random` does the same for random real subsets at the same IPC. The whole recipe and
the figures go to <set>/eval_<protocol>.json.

  python validate_fkd.py --syn-data-path runs/delt_digits_ipc10 --protocol rded --repeats 3 --baseline random
  python validate_fkd.py --dataset cifar100 --data-path data/cifar --syn-data-path SET --protocol static --teacher-path T
  torchrun --nproc_per_node 8 validate_fkd.py --dataset imagenet --data-path /data/imagenet --syn-data-path SET --protocol fkd

Deliberate deviations from the official evaluation code: the reported "best" is kept (as all repos
report it) but the last epoch is always reported beside it; CutMix does not mutate the batch that
another forward sees, and no extra student forward updates BN statistics (RDED/DELT's train-accuracy
pass); numpy is seeded too; digits evaluation switches flips off (digits are not mirror-symmetric).
"""
import argparse
import copy
import os
import sys
import tempfile

import numpy as np
import torch

import common

PROTOCOL_LABELS = {"rded": "teacher", "fkd": "fkd", "static": "static", "hard": "hard"}

# Per-protocol recipe; per-dataset changes in DATASET_PRESETS. Every value is a flag.
PROTOCOLS = {
    "rded": dict(  # RDED validation (R:validation/main.py, R:argument.py), D:evaluation/argument.py
        temperature=20.0, t_squared=False, mix="cutmix", alpha=1.0, optimizer="adamw", weight_decay=0.01,
        schedule="quarter", epochs=300, crop="rrc", factor=1, eval_every=10, eval_from=0.8, flip=True),
    "fkd": dict(  # SRe2L train_FKD.sh / D4M validate/train_FKD.sh: T=20, AdamW 1e-3, full cosine
        temperature=20.0, t_squared=False, optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="cosine",
        epochs=300, eval_every=50, eval_from=0.0, flip=True),
    "static": dict(  # INFER val_static.py: AdamW 1e-3/0.01 (hard-coded), cosine, mixup 0.8, T=30, 400 ep, bs 64
        temperature=30.0, t_squared=False, mix="mixup", alpha=0.8, optimizer="adamw", lr=1e-3, weight_decay=0.01,
        schedule="cosine", epochs=400, batch_size=64, crop="pad", eval_every=10, eval_from=0.0, flip=True),
    "hard": dict(  # Minimax train.py: SGD 0.01 m0.9 wd 5e-4, bs 64, MultiStep [2E/3, 5E/6] x0.2, cutmix p=1 beta=1
        mix="cutmix", alpha=1.0, optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="step", gamma=0.2,
        batch_size=64, crop="rrc", min_scale=0.5, color_jitter=0.4, lighting=0.1, eval_from=0.0, flip=True),
}
DATASET_PRESETS = {
    # not published: our choice so that a digits evaluation takes about a minute on 2 CPU cores
    "digits": {"rded": dict(epochs=40, eval_from=0.0), "fkd": dict(epochs=40, eval_every=10), "static": dict(epochs=60),
               "hard": dict(epochs=150), "all": dict(flip=False, student="conv3", teacher="conv3")},
    "cifar10": {"all": dict(student="resnet18_modified", teacher="resnet18_modified")},
    "cifar100": {"all": dict(student="resnet18_modified", teacher="resnet18_modified")},
    # Tiny: RDED/DELT batch 100 whatever the IPC (R:argument.py)
    "tiny": {"rded": dict(batch_size=100), "all": dict(student="resnet18_modified", teacher="resnet18_modified")},
    # ImageNet-like: RDED factor 2 (ShufflePatches 2x2, RRC scale (1/2, 1)); Minimax student ResNetAP-10
    **{d: {"rded": dict(factor=2), "hard": dict(student="resnet_ap10"), "all": dict(student="resnet18", teacher="resnet18")}
       for d in ("imagenette", "imagewoof", "imagenet100", "imagenet")},
}
# RDED's student LR table (R:argument.py); CIFAR-100 conv3 -> conv3 uses 2e-3 with batch 25
STUDENT_LR = {"efficientnet_b0": 2e-3, "mobilenet_v2": 2.5e-3, "mobilenet_v2_cifar": 2.5e-3}


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
    """Minimax epochs (argument.py): 10 classes 3000/2000/1500 for IPC 1/<=10/<=50; 100 classes 2/3 of it."""
    e = 3000 if ipc <= 1 else 2000 if ipc <= 10 else 1500
    return e if num_classes <= 10 else int(e * 2 / 3) // 100 * 100


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--syn-data-path", default=None, help="the distilled set: an ImageFolder-layout folder")
    g.add_argument("--random-real", type=int, default=None, metavar="IPC",
                   help="without a set: evaluate --repeats random real subsets of IPC images per class")
    g.add_argument("--dataset", default="digits", choices=list(common.DATASETS), help="dataset of the set")
    g.add_argument("--data-path", default=None, help="real dataset root (its val split is the test set)")
    g.add_argument("--protocol", default="rded", choices=list(PROTOCOLS), help="label protocol (see the header)")
    g.add_argument("--label-mode", default="auto", choices=("auto", "teacher", "fkd", "static", "hard"),
                   help="override where targets come from (static + teacher = INFER's dynamic labels)")
    g.add_argument("--ipc", type=int, default=None, help="use the first K images (sorted) of every class")
    g.add_argument("--repeats", type=int, default=1, help="students trained with seeds seed..seed+N-1")
    g.add_argument("--baseline", default="none", choices=("none", "random"), help="also evaluate random real subsets")
    g.add_argument("--baseline-ipc", type=int, default=None, help="IPC of the random baseline (default: the set's)")
    g.add_argument("--out", default=None, help="result JSON path (default <set>/eval_<protocol>.json)")
    g.add_argument("--relabel-epochs", type=int, default=None,
                   help="fkd: first store FKD labels for this many epochs with the teacher (SRe2L relabel; resumes)")
    g.add_argument("--relabel-batch-size", type=int, default=None, help="fkd: batch size of the stored labels")
    g = p.add_argument_group("models")
    g.add_argument("--student", default=None, help="student architecture (common.ARCHS)")
    g.add_argument("--teacher", default=None, help="teacher architecture; a comma list is an ensemble")
    g.add_argument("--teacher-path", default=None, help="teacher checkpoint(s), comma list matching --teacher")
    g.add_argument("--norm", default="dataset", choices=("dataset", "imagenet"),
                   help="input normalisation; RDED's released teachers expect ImageNet statistics everywhere")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="explicit normalisation mean (beats --norm)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="explicit normalisation std (beats --norm)")
    g = p.add_argument_group("recipe (each overrides the protocol preset)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--batch-size", type=int, default=None, help="global batch size")
    g.add_argument("--optimizer", default=None, choices=("adamw", "sgd"), help="optimizer")
    g.add_argument("--lr", type=float, default=None, help="learning rate")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (AdamW: weights with ndim > 1 only)")
    g.add_argument("--schedule", default=None, choices=("cosine", "quarter", "step", "constant"), help="per-epoch LR shape")
    g.add_argument("--milestones", default=None, help="comma list of epochs for --schedule step")
    g.add_argument("--gamma", type=float, default=None, help="step decay factor")
    g.add_argument("--temperature", type=float, default=None, help="KD temperature")
    g.add_argument("--t-squared", type=int, default=None, choices=(0, 1), help="multiply the KL by T^2")
    g.add_argument("--mix", default=None, choices=("cutmix", "mixup", "none"), help="batch mixing")
    g.add_argument("--alpha", type=float, default=None, help="Beta(alpha, alpha) of the mix")
    g.add_argument("--crop", default=None, choices=("rrc", "pad"), help="RandomResizedCrop or padded RandomCrop")
    g.add_argument("--min-scale", type=float, default=None, help="RandomResizedCrop lower scale (default 1/factor)")
    g.add_argument("--factor", type=int, default=None, help="RDED ShufflePatches grid (1 = off)")
    g.add_argument("--flip", type=int, default=None, choices=(0, 1), help="random horizontal flips")
    g.add_argument("--rand-augment", default=None, help="timm RandAugment config, e.g. rand-m6-n2-mstd1.0 (DELT)")
    g.add_argument("--color-jitter", type=float, default=None, help="ColorJitter strength (Minimax 0.4)")
    g.add_argument("--lighting", type=float, default=None, help="PCA lighting std (Minimax 0.1)")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every k epochs (and at the last)")
    g.add_argument("--eval-from", type=float, default=None, help="no evaluation before this fraction of training")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="first student seed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default 0 for digits, 8 else)")
    return common.document_defaults(p, sources=(
        "each --protocol is a recipe (PROTOCOLS in validate_fkd.py): rded from LINs-lab/RDED@3f6453d:"
        "argument.py and validation/main.py (+ VILA-Lab/DELT@f2f81ca:evaluation/argument.py), fkd from "
        "VILA-Lab/SRe2L@8d00cba:SRe2L/validate/train_FKD.sh and suduo94/D4M@da35d10:validate/train_FKD.sh, static "
        "from zhangxin-xd/UFC@83d19f8:val_static.py, hard from zou-yawen/Dataset-Distillation-via-Vision-"
        "Language-Category-Prototype@d0060eb4:04_evaluation/Minimax/train.py; per-dataset changes in "
        "DATASET_PRESETS (digits: our choice, about a minute per student on 2 CPU cores). A flag given "
        "explicitly beats the recipe."))


def resolve(args):
    """Fill unset flags: protocol preset, then dataset preset, then the rules that depend on IPC."""
    info = common.dataset_info(args.dataset)
    ds = DATASET_PRESETS.get(args.dataset, {})
    preset = {**PROTOCOLS[args.protocol], **ds.get("all", {}), **ds.get(args.protocol, {})}
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.label_mode = PROTOCOL_LABELS[args.protocol] if args.label_mode == "auto" else args.label_mode
    args.student = args.student or "resnet18"
    args.teacher = args.teacher or args.student
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
    norm = (info.mean, info.std) if args.norm == "dataset" else (common.IMAGENET_MEAN, common.IMAGENET_STD)
    args.mean, args.std = tuple(args.mean or norm[0]), tuple(args.std or norm[1])
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
                              schedule=args.schedule, milestones=tuple(milestones), gamma=args.gamma,
                              temperature=args.temperature or 1.0, t_squared=bool(args.t_squared),
                              mix=args.mix or "none", alpha=args.alpha or 1.0, eval_every=eval_every,
                              eval_from=args.eval_from, seed=args.seed, workers=args.workers)


def load_teachers(args, device):
    archs = args.teacher.split(",")
    paths = args.teacher_path.split(",") if args.teacher_path else [None] * len(archs)
    if len(paths) != len(archs):
        raise common.UserError(f"--teacher-path lists {len(paths)} checkpoints for {len(archs)} teacher architectures")
    teachers = [common.load_teacher(a, args.dataset, p, args.data_path, device=device) for a, p in zip(archs, paths)]
    return teachers[0] if len(teachers) == 1 else common.Ensemble(teachers).eval()


@torch.no_grad()
def ensemble_logits(teacher, images, args, device):
    """Static labels: the teachers' mean logits on each unaugmented image (UFC:ufc_validation/val_static.py:200-222)."""
    out = []
    for x in images.split(256):
        x = common.normalize(x.float().to(device) / 255, args.mean, args.std)
        with common.autocast(device):
            out.append(teacher(x).float().cpu())
    return torch.cat(out)


def train_once(args, images, targets, cfg, teacher, static_labels, fkd_dir, val_loader, d):
    """One student on one image set; returns the train_student result."""
    common.seed_everything(cfg.seed)
    student = common.build_model(args.student, common.dataset_info(args.dataset).num_classes, args.size)
    fkd = None
    train_set = None
    if cfg.labels == "fkd":
        meta = common.fkd_meta(fkd_dir)
        fkd = {"images": images, "dir": fkd_dir, "size": meta["size"], "mean": meta["mean"], "std": meta["std"]}
    else:
        tf = common.train_transform(args.size, args.mean, args.std, crop=args.crop, min_scale=args.min_scale,
                                    flip=bool(args.flip), factor=args.factor or 1, rand_augment=args.rand_augment,
                                    color_jitter=args.color_jitter or 0.0, lighting=args.lighting or 0.0)
        train_set = common.IndexedDataset(images, targets, tf)
    return common.train_student(student, cfg, val_loader, d.device, train_set=train_set, teacher=teacher,
                                static_labels=static_labels, fkd=fkd, dist_info=d,
                                log=print if d.main else (lambda *_: None))


def evaluate_set(args, name, images, targets, ipc, teacher, static_labels, fkd_dir, val_loader, d):
    """`--repeats` students on one set; mean and population std of best and last."""
    runs = []
    for r in range(args.repeats):
        cfg = recipe_for(args, ipc, len(targets))
        if cfg.labels == "fkd":
            meta = common.fkd_meta(fkd_dir)
            if cfg.epochs > meta["epochs"]:
                raise common.UserError(f"--epochs {cfg.epochs} exceeds the {meta['epochs']} epochs of stored FKD labels in {fkd_dir}")
        cfg.seed = args.seed + r
        if d.main:
            print(f"[{name}] repeat {r + 1}/{args.repeats}: {len(targets)} images, protocol {args.protocol} "
                  f"({cfg.labels} labels), student {args.student}, {cfg.epochs} epochs, batch {cfg.batch_size}, seed {cfg.seed}")
        res = train_once(args, images, targets, cfg, teacher, static_labels, fkd_dir, val_loader, d)
        runs.append({"seed": cfg.seed, "best": res["best"], "last": res["last"], "history": res["history"],
                     "seconds": round(res["seconds"], 2), "images_per_s": round(res["images_per_s"], 1)})
    best, last = [r["best"] for r in runs], [r["last"] for r in runs]
    return {"images": len(targets), "ipc": ipc, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "best_mean": float(np.mean(best)), "best_std": float(np.std(best)),
            "last_mean": float(np.mean(last)), "last_std": float(np.std(last)), "runs": runs}, cfg


def store_fkd_labels(args, images, ipc, teacher, fkd_dir, epochs, d):
    """SRe2L relabel: rank 0 stores FKD labels for `images` (RRC 0.08-1, the protocol's mix), all wait."""
    if d.main:
        info = common.dataset_info(args.dataset)
        bs = args.relabel_batch_size or min(rded_batch_size(ipc, info.num_classes, args.dataset, args.student), len(images))
        common.fkd_generate(images, teacher, fkd_dir, epochs, bs, args.size, args.mean, args.std, args.mix or "cutmix",
                            args.alpha or 1.0, 0.08, bool(args.flip), args.seed, d.device)
    common.barrier()


def random_real_runs(args, ipc, teacher, cfg_epochs, val_loader, d):
    """`--repeats` random real subsets at `ipc` (subset seeds seed+1000+r), one student each, same protocol."""
    info = common.dataset_info(args.dataset)
    real = common.real_dataset(args.dataset, args.data_path, "train",
                               common.eval_transform(args.dataset, args.size, normalize=False))
    teacher = teacher or (load_teachers(args, d.device) if args.label_mode == "fkd" else None)
    runs = []
    for r in range(args.repeats):
        idx = common.random_subset(real.targets, ipc, args.seed + 1000 + r, info.num_classes)
        x, y = common.stack_images(real, idx, workers=args.workers)
        x = (x * 255).round().to(torch.uint8)
        labels = ensemble_logits(teacher, x, args, d.device) if args.label_mode == "static" else None
        with tempfile.TemporaryDirectory() as tmp:
            fkd_dir = os.path.join(tmp, "fkd")
            if args.label_mode == "fkd":  # the same relabelling recipe as the set's stored labels
                store_fkd_labels(args, x, ipc, teacher, fkd_dir, cfg_epochs or args.relabel_epochs or args.epochs, d)
            one = copy.copy(args)
            one.repeats, one.seed = 1, args.seed + r
            res, _ = evaluate_set(one, f"random real {r + 1}/{args.repeats}", x, y, ipc, teacher, labels, fkd_dir, val_loader, d)
        runs += res["runs"]
    best, last = [r["best"] for r in runs], [r["last"] for r in runs]
    return {"kind": "random real subsets", "ipc": ipc, "subset_seeds": [args.seed + 1000 + r for r in range(args.repeats)],
            "best_mean": float(np.mean(best)), "best_std": float(np.std(best)),
            "last_mean": float(np.mean(last)), "last_std": float(np.std(last)), "runs": runs}


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    if not args.syn_data_path and not args.random_real:
        raise common.UserError("give --syn-data-path (a set to evaluate) or --random-real IPC (random real subsets only)")
    d = common.dist_setup(args.device)
    info = common.dataset_info(args.dataset)
    classes = common.class_list(args.dataset, args.data_path)
    folder = args.syn_data_path.rstrip("/") if args.syn_data_path else None
    fkd_dir = os.path.join(folder, "fkd") if folder else None

    # --- the distilled set (checked against the dataset's class list) ---
    if folder:
        if args.label_mode == "fkd":
            if args.ipc is not None:
                raise common.UserError("stored FKD labels index the whole set: --ipc cannot select a subset with --protocol fkd")
            if not args.relabel_epochs:
                common.fkd_meta(fkd_dir)  # refuse early when there are no stored labels
        images, targets, rows = common.load_image_set(folder, classes, args.ipc, args.size, return_rows=True)
        ipc = args.ipc or int(torch.bincount(targets, minlength=info.num_classes).min())
    else:
        ipc = args.random_real

    # --- the test set: the real validation split ---
    val = common.real_dataset(args.dataset, args.data_path, "val",
                              common.eval_transform(args.dataset, args.size, mean=args.mean, std=args.std))
    val_loader = torch.utils.data.DataLoader(val, batch_size=256, num_workers=args.workers)

    # --- labels: teachers (online, static) or stored ---
    teacher = load_teachers(args, d.device) if args.label_mode in ("teacher", "static") else None
    record = {"protocol": args.protocol, "label_mode": args.label_mode, "dataset": args.dataset,
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
            path = os.path.join(folder, "soft_labels.pt")
            if os.path.isfile(path):
                stored = torch.load(path, map_location="cpu", weights_only=True)
                stored = stored["logits"] if isinstance(stored, dict) else stored
                if len(stored) <= int(rows.max()):
                    raise common.UserError(f"{path} has {len(stored)} rows but the set holds more images: it belongs to another set")
                static_labels = stored[rows].float()
            else:
                print(f"note: {folder} has no soft_labels.pt; computing static labels from the teacher(s) once")
                static_labels = ensemble_logits(teacher, images, args, d.device)
        # --- students on the distilled set ---
        result, cfg = evaluate_set(args, "distilled", images, targets, ipc, teacher, static_labels, fkd_dir, val_loader, d)
        record.update(result)

    # --- random real subsets at the same IPC, same protocol ---
    if args.baseline == "random" or not folder:
        base = random_real_runs(args, args.random_real or args.baseline_ipc or ipc, teacher,
                                common.fkd_meta(fkd_dir)["epochs"] if folder and args.label_mode == "fkd" else cfg.epochs,
                                val_loader, d)
        if folder:
            record["baseline"] = base
            record["improvement_over_random"] = record["best_mean"] - base["best_mean"]
        else:
            record.update(base)
    record["recipe"] = {**vars(cfg), "crop": args.crop, "min_scale": args.min_scale, "factor": args.factor,
                        "flip": bool(args.flip), "rand_augment": args.rand_augment, "color_jitter": args.color_jitter,
                        "lighting": args.lighting, "size": args.size, "norm": args.norm,
                        "mean": list(args.mean), "std": list(args.std)}

    # --- the record and one summary line ---
    if d.main:
        suffix = "" if args.label_mode == PROTOCOL_LABELS[args.protocol] else f"_{args.label_mode}"
        name = f"eval_{args.protocol}{suffix}.json"
        out = args.out or (os.path.join(folder, name) if folder else
                           os.path.join("runs", f"random_{args.dataset}_ipc{ipc}_{name}"))
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
        print(f"wrote {out}")
    return record


if __name__ == "__main__":
    common.run_cli(main)
