"""DELT: A Simple Diversity-driven EarlyLate Training for Dataset Distillation.

Zhiqiang Shen, Ammar Sherif, Zeyuan Yin, Shitong Shao. CVPR 2025. arXiv:2411.19946.
Official code: https://github.com/VILA-Lab/DELT, read at commit f2f81cad0e25. Citations below:
D = VILA-Lab/DELT@f2f81ca, S = VILA-Lab/SRe2L@8d00cba, R = LINs-lab/RDED@3f6453d, as `D:path`.
The full notes (stages, presets, what matches the official code and what differs): docs/delt.md.

Pipeline: (1) rank every real training image by the teacher's probability of its true class and
pick IPC per class around the median ("medium", D:data_selection.py); (2) recover: CDA-style
BN-statistics matching that starts from those real images, with the EarlyLate schedule: the IPC images of a
class are split into M = iterations / round-itr groups by rank, group r joins at round r and is
optimised to the end, so early images are fully optimised and late ones stay close to real
(D:recover/recover.py get_images); (3) evaluate with RDED's online soft-label protocol plus
DELT's RandAugment (D:evaluation/argument.py).
`--no-early-late --init noise` gives the CDA baseline from the same file (SRe2L: add
`--milestone 0 --jitter 32`).

  uv run python delt.py  # digits, IPC 10, conv3 teacher; evaluates 3 students on the set and 3 on random
                        # real images (DELT's protocol, 40 epochs = 80 steps each) and ends with
                        # "delt: digits IPC 10 -> runs/delt_digits_ipc10 | top-1 distilled 96.02 ± 0.35 vs
                        # random real 95.46 ± 0.47 | 3 students each: conv3, 40 epochs = 80 optimiser steps | ..."
  uv run python delt.py --dataset imagenet --data-path "$IMAGENET" --ipc 50 --eval   # the official IN-1K setting
  uv run torchrun --nproc_per_node 8 delt.py --dataset tiny --data-path "$TINY" --teacher-path tiny_rn18.pth --ipc 50

Deliberate deviations from the official code (docs/delt.md gives the reason for each):
  * one script does ranking, selection, recover and evaluation; the ranking CSV is cached under
    $DD_CACHE by data and teacher (or --ranking-file) and reused; selection indexes images, it does not copy files;
  * the teacher's own normalisation is used for ranking, recover and evaluation alike (official ranking
    and evaluation always use ImageNet statistics, recover the dataset's): by default what the checkpoint
    expects (RDED's ConvNet layout: ImageNet), else the dataset's; --norm imagenet for RDED's ResNets;
  * medium selection keeps the official spiral order but skips indices past the class end instead
    of crashing (IPC close to the class size); ties in score are broken by dataset index;
  * everything is seeded (crops, flips, jitter, noise init, random selection), per batch/class so
    that results do not depend on how many processes share the work;
  * images are saved as rounded PNG by default (official: JPEG q75 of truncated pixels: --format jpg);
  * the "best image" bookkeeping (a clone per step, compared with a constant) is dropped, the last
    iterate is saved as the official code effectively does; --round-lr-reset (dead) and
    --min-iterations (unused by every script, unseeded) are not implemented;
  * arguments are validated (T a multiple of round-itr, round-itr > 0, IPC <= class size);
  * the teacher is not wrapped in DataParallel (its BN hooks race across replicas, D:recover/utils.py BNFeatureHook).
"""
import argparse
import csv
import json
import math
import os
import random
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common

# ------------------------------------------------------------------------------------------------
# flags and presets
# ------------------------------------------------------------------------------------------------
# Official values exist only for ImageNet-1K (D:scripts/resnet18_imagenet1k_synthesis.sh);
# every other dataset takes them as "not published: our choice (the ImageNet-1K values)".
DEFAULTS = dict(
    teacher="resnet18",        # D:scripts/resnet18_imagenet1k_synthesis.sh
    batch_size=100,            # official script
    lr=0.25,                   # official script
    r_bn=0.01,                 # official script
    first_bn_multiplier=10.0,  # D:recover/recover.py default, never overridden by the scripts
    jitter=0,                  # official script (--jitter 0)
    crop_schedule="cosine",    # official script (--easy2hard-mode cosine)
    milestone=1.0,             # official script (--milestone 1)
    iterations=4000,           # official script (ITR=4000)
    round_itr=500,             # official script (ROUND_ITR=500)
    selection="medium",        # D:data_selection.py, the "medium_prob" init of the scripts
    init="real",               # DELT initialises from the selected real images
    norm="auto",               # what the teacher checkpoint expects (common.resolve_norm), else the dataset's
)
PRESETS = {
    "imagenet": dict(teacher="resnet18"),             # torchvision IMAGENET1K_V1 (official)
    "imagenet100": dict(teacher="resnet18"),          # not published: RDED's ResNet-18 checkpoint (D:recover/models.py)
    "imagenette": dict(teacher="resnet18"),           # not published: RDED's ResNet-18 checkpoint
    "imagewoof": dict(teacher="resnet18"),            # not published: RDED's ResNet-18 checkpoint
    "tiny": dict(teacher="resnet18_modified"),        # not published: D:scripts/select_medium_tiny_rn18_ep50_ipc50.sh ranker
    "cifar10": dict(teacher="resnet18_modified"),     # not published: RDED's CIFAR ResNet-18 (D:recover/models.py)
    "cifar100": dict(teacher="resnet18_modified"),    # not published: RDED's CIFAR ResNet-18
    # not published: our choice so that `python delt.py` (IPC 10) recovers in under a CPU-minute and
    # evaluates itself; 10 rounds of 10 iterations keep the EarlyLate structure (1 image per round)
    "digits": dict(teacher="conv3", iterations=100, round_itr=10, lr=0.1, r_bn=0.01),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\nWith no flags (digits, IPC 10): 153 s on "
                                "2 idle CPU cores with a fresh cache (teacher, ranking, recover, 3 + 3 students of "
                                "40 epochs; README 'How long it takes').",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_generic_args(p, ipc=10, out="runs/delt_<dataset>_ipc<ipc>")
    g = p.add_argument_group("evaluation (validate_fkd.py, DELT's protocol D:evaluation/argument.py)")
    g.add_argument("--eval-student", default=None, help="student architecture (default: the teacher's)")
    g.add_argument("--eval-epochs", type=int, default=None, help="student epochs (default: validate_fkd's preset)")
    g.add_argument("--eval-repeats", type=int, default=None,
                   help="students on the set and on random real images (default: 3 on digits, else DELT's 3 seeds)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default=None, help=f"teacher architecture ({', '.join(common.ARCHS)}); ranks and recovers")
    g.add_argument("--teacher-path", default=None, help="teacher checkpoint (RDED/torchvision formats)")
    g.add_argument("--norm", default=None, choices=("auto", "dataset", "imagenet"),
                   help="input normalisation of the teacher; auto: what the checkpoint expects (RDED's ConvNet "
                        "layout: imagenet), else the dataset's. RDED's ResNet checkpoints expect imagenet")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="explicit normalisation mean (beats --norm)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="explicit normalisation std (beats --norm)")
    g = p.add_argument_group("ranking and selection (D:data_selection.py)")
    g.add_argument("--selection", default=None, choices=("medium", "top", "min", "random"),
                   help="which real images initialise each class (DELT: medium)")
    g.add_argument("--ranking-file", default=None,
                   help="ranking CSV to reuse (ours, or the official D:data_selection.py --store-rank-file CSV: "
                        "score, img_path, class) or to write when absent (default: $DD_CACHE/delt_ranking/<hash of "
                        "dataset, teacher and its weights>.csv, so a loop over IPC ranks once; a copy goes to <out>/ranking.csv)")
    g.add_argument("--init", default=None, choices=("real", "noise"), help="real selected images (DELT) or N(0,1) (SRe2L/CDA)")
    g = p.add_argument_group("recover (D:recover/recover.py get_images)")
    g.add_argument("--iterations", type=int, default=None, help="iterations T of a batch (ITR)")
    g.add_argument("--round-itr", type=int, default=None, help="iterations per EarlyLate round (ROUND_ITR)")
    g.add_argument("--no-early-late", dest="early_late", action="store_false",
                   help="optimise every image for all T iterations (CDA/SRe2L)")
    g.add_argument("--batch-size", type=int, default=None, help="images optimised jointly (class-contiguous)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (cosine to 0 over the batch's T)")
    g.add_argument("--r-bn", type=float, default=None, help="weight of the BN-statistics loss")
    g.add_argument("--first-bn-multiplier", type=float, default=None, help="extra weight of the first BN layer")
    g.add_argument("--jitter", type=int, default=None, help="random roll by 0..J pixels (SRe2L: 32)")
    g.add_argument("--crop-schedule", default=None, choices=("cosine", "linear", "step"),
                   help="CDA curriculum of the RandomResizedCrop lower scale, 1.0 -> 0.08")
    g.add_argument("--milestone", type=float, default=None,
                   help="fraction of T the crop curriculum spans (0 = fixed 0.08, SRe2L)")
    common.add_precision_arg(g)
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run the recover step eagerly on CUDA instead of as one CUDA graph per round (same maths)")
    return common.document_defaults(p, PRESETS, DEFAULTS, (
        "ImageNet-1K from VILA-Lab/DELT@f2f81ca:scripts/resnet18_imagenet1k_synthesis.sh; the official code "
        "publishes no other dataset, which takes the ImageNet-1K values (our choice); digits: our choice, a "
        "few CPU minutes. The source of each value is the comment beside it in PRESETS in delt.py."),
        citations="D:path is VILA-Lab/DELT@f2f81ca:path (the official code), S: VILA-Lab/SRe2L@8d00cba, "
                  "R: LINs-lab/RDED@3f6453d")


# ------------------------------------------------------------------------------------------------
# ranking and selection (D:data_selection.py)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def true_class_probability(teacher, ds, chunks, device, workers, precision="auto"):
    """Teacher softmax probability of each image's true class, one batch per chunk of indices."""
    loader = torch.utils.data.DataLoader(ds, batch_sampler=chunks, num_workers=workers, worker_init_fn=common.quiet_worker)
    scores = []
    for x, y in tqdm(loader, desc="ranking", leave=False):
        with common.autocast(device, precision):
            logits = teacher(x.to(device))
        scores.append(logits.float().softmax(1).gather(1, y.to(device)[:, None])[:, 0].cpu())
    return torch.cat(scores).tolist()


def medium_order(n, ipc):
    """Positions (in the class sorted by ascending score) DELT picks: mid = ceil(n/2), then
    mid, mid+1, mid-1, mid+2, mid-2, ... (official offset int(+-(k+1)/2), sign starting negative).
    The official code indexes past the end when IPC nears n; we skip those positions."""
    mid, order, k = math.ceil(n / 2), [], 0
    while len(order) < ipc:
        i = mid + ((k + 1) // 2 if k % 2 else -((k + 1) // 2))
        if 0 <= i < n:
            order.append(i)
        k += 1
    return order


def select(scored, ipc, how, seed):
    """scored: [(score, dataset index)] of one class -> `ipc` dataset indices in pick order
    (pick order = in-class rank k: EarlyLate optimises low k longest)."""
    ascending = sorted(scored)  # ties broken by dataset index
    if how == "top":
        return [i for _, i in sorted(scored, key=lambda s: (-s[0], s[1]))[:ipc]]
    if how == "min":
        return [i for _, i in ascending[:ipc]]
    if how == "medium":
        return [ascending[p][1] for p in medium_order(len(ascending), ipc)]
    g = torch.Generator().manual_seed(seed)
    return [ascending[p][1] for p in torch.randperm(len(ascending), generator=g)[:ipc].tolist()]


def write_ranking(path, rows, classes):
    """CSV as the official one: score, img_path, class; sorted by class, then score descending.
    Adds `index` (position in the dataset) so in-memory datasets need no file path."""
    rows = sorted(rows, key=lambda r: (r[2], -r[0], r[1]))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["score", "img_path", "class", "index"])
            for score, index, c, path_ in rows:
                w.writerow([repr(score), path_, classes[c]["id"], index])
        os.replace(tmp, path)
    except BaseException as e:  # interrupted or not writable: no temp file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise common.UserError(f"cannot write the ranking file {path}: {e.strerror or e}") from e
        raise


def read_ranking(path, classes, targets, paths, counts):
    """{class index: [(score, dataset index)]} from our CSV (score, img_path, class, index) or the official one
    (D:data_selection.py rank: score, img_path, class, where img_path is <class folder>/<file> under the train
    folder; an unnamed pandas index column is ignored). One row per training image of every class, each for
    this dataset's image and class; anything else (other data, a cut or damaged file) stops in one sentence."""
    if os.path.isdir(path):
        raise common.UserError(f"ranking file {path} is a folder, not a CSV")
    ids = {c["id"]: c["index"] for c in classes}
    by_path = {p: i for i, p in enumerate(paths)} if paths else None
    out, seen = {c: [] for c in range(len(classes))}, set()
    fix = "delete it or pass another --ranking-file"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if not {"score", "img_path", "class"} <= columns:
                raise common.UserError(f"ranking file {path} has the columns {sorted(columns)}, not score, img_path, "
                                       f"class (the official DELT CSV) nor also index (ours): {fix}")
            if "index" not in columns and by_path is None:
                raise common.UserError(f"ranking file {path} has no index column, and the official layout's img_path "
                                       f"needs an image folder dataset: rank again without --ranking-file")
            for row in reader:
                try:
                    score = float(row["score"])
                    i = int(row["index"]) if "index" in columns else by_path[row["img_path"]]
                    c = ids[row["class"]]
                except (TypeError, ValueError, KeyError):
                    raise common.UserError(f"ranking file {path} line {reader.line_num} is cut short or names an image "
                                           f"or class this dataset does not have: {fix}") from None
                if not (0 <= i < len(targets)) or targets[i] != c or (paths and paths[i] != row["img_path"]) \
                        or not math.isfinite(score) or i in seen:
                    raise common.UserError(f"ranking file {path} line {reader.line_num} does not match this dataset "
                                           f"({row['img_path']} as class {row['class']}): {fix}")
                seen.add(i)
                out[c].append((score, i))
    except (UnicodeDecodeError, csv.Error) as e:
        raise common.UserError(f"ranking file {path} is not a readable CSV ({e.__class__.__name__}): {fix}") from e
    for c in range(len(classes)):
        if len(out[c]) != counts[c]:
            raise common.UserError(f"ranking file {path} has {len(out[c])} rows for class {c}, the dataset "
                                   f"{int(counts[c])}: {fix}")
    return out


# ------------------------------------------------------------------------------------------------
# EarlyLate schedule and batches (D:recover/recover.py get_round_imgs_indx)
# ------------------------------------------------------------------------------------------------
def early_late_schedule(ipc, iterations, round_itr, early_late=True):
    """M = T // R groups by in-class rank; sizes floor(IPC/M), the first IPC mod M one larger;
    group r joins at round r and runs to the end: (M - r) * R iterations."""
    rounds, per_round = (iterations // round_itr, round_itr) if early_late else (1, iterations)
    sizes = [ipc // rounds + (r < ipc % rounds) for r in range(rounds)]
    group = [r for r, s in enumerate(sizes) for _ in range(s)]
    its = [(rounds - g) * per_round for g in group]
    return {"rounds": rounds, "round_itr": per_round, "group_sizes": sizes, "group_of_rank": group,
            "iterations_by_rank": its, "image_iterations": sum(its), "all_at_T": ipc * iterations,
            "fraction_of_all_at_T": sum(its) / (ipc * iterations)}


def plan_batches(num_classes, ipc, batch_size):
    """Class-contiguous batches of (class, in-class rank) as the official unshuffled loader; a class
    split across batches keeps its ranks. Batches sharing a class form a chain; chains hold whole
    classes and are what torchrun ranks share out, so batches never depend on the world size."""
    images = [(c, k) for c in range(num_classes) for k in range(ipc)]
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    chains = []
    for b, batch in enumerate(batches):
        if chains and batches[chains[-1][-1]][-1][0] == batch[0][0]:
            chains[-1].append(b)
        else:
            chains.append([b])
    return batches, chains


# ------------------------------------------------------------------------------------------------
# recover (D:recover/recover.py get_images)
# ------------------------------------------------------------------------------------------------
def crop_min_scale(t, total, schedule, milestone):
    """CDA's easy-to-hard curriculum of the RandomResizedCrop lower scale (D:recover/recover.py get_images)."""
    if t < milestone * total:
        u = t / (milestone * total)
        return {"cosine": 0.08 + 0.92 * (1 + math.cos(math.pi * u)) / 2, "linear": 0.08 + 0.92 * (1 - u),
                "step": 1.0}[schedule]
    return 0.08


def crop_box(rng, size, min_scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawn from a seeded python RNG (no device sync)."""
    for _ in range(10):
        area = size * size * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= size and 0 < h <= size:
            return rng.randint(0, size - h), rng.randint(0, size - w), h, w
    return 0, 0, size, size  # square input, ratio range holds 1: the fallback is the whole image


def draw_views(rng, total, size, args):
    """Every iteration's view, drawn up front in the official loop's order (RandomResizedCrop box at
    the curriculum's scale, flip, roll): one RandomResizedCrop + flip (+ roll) per iteration shared by
    the whole active subset, as torchvision transforms on a batched tensor do in the official code.
    Returns [total, 7] = (top, left, h, w, flip, dy, dx) for the device to read step by step."""
    rows = []
    for t in range(total):
        i, j, h, w = crop_box(rng, size, crop_min_scale(t, total, args.crop_schedule, args.milestone))
        flip = rng.random() < 0.5
        dy, dx = (rng.randint(0, args.jitter), rng.randint(0, args.jitter)) if args.jitter else (0, 0)
        rows.append((i, j, h, w, flip, dy, dx))
    return torch.tensor(rows, dtype=torch.float32)


@torch.no_grad()
def full_batch_losses(teacher, hook, x, y, device, precision="auto"):
    """CE and BN-statistics loss of all images of a batch, unaugmented (before/after recover). Recover
    optimises augmented views, so the unaugmented BN loss may rise while the objective falls."""
    with common.autocast(device, precision):
        logits = teacher(x)
    return F.cross_entropy(logits.float(), y).item(), float(hook.loss())


def recover_views(key, total, size, args, n=8):
    """n of the recover views (crop at the curriculum's scale, flip, roll) spread over a batch's T
    (t = 0, T/n, ...), drawn as draw_views draws them from a RNG seeded by `key`: [n, 7]."""
    table = draw_views(random.Random(key), total, size, args)
    return table[[k * total // n for k in range(n)]]


@torch.no_grad()
def objective_on_views(teacher, hook, x, y, views, args, device, precision="auto"):
    """The recover objective CE + r_bn * BN, averaged over the same views for any x: how the final
    images score against the initial ones."""
    total, s = 0.0, x.shape[-1]
    for v in views.to(x.device):
        wy = common.resize_weights(v[0], v[2], s, s, shift=v[5])
        wx = common.resize_weights(v[1], v[3], s, s, flip=v[4], shift=v[6])
        with common.autocast(device, precision):
            logits = teacher(common.apply_views(x, wy, wx))
        total += F.cross_entropy(logits.float(), y).item() + args.r_bn * float(hook.loss())
    return total / len(views)


def recover_step(teacher, hook, x, opt, active, ys, t, views, lrs, r_bn, lo, hi, trace, precision):
    """One recover iteration, entirely on the device with fixed shapes (so CUDA can replay it as a
    graph): read step t's view and LR from the device tables, crop/flip/roll the active rows as two
    resampling matrices (gradients flow through), CE + r_bn * BN loss, Adam step, clip to [0, 1]
    pixels (D:recover/recover.py get_images), trace[t] = (CE, BN), t += 1."""
    v = views.index_select(0, t)[0]
    s = x.shape[-1]
    wy = common.resize_weights(v[0], v[2], s, s, shift=v[5])
    wx = common.resize_weights(v[1], v[3], s, s, flip=v[4], shift=v[6])
    opt.zero_grad(set_to_none=True)
    xs = common.apply_views(x if active is None else x.index_select(0, active), wy, wx)
    if x.is_cuda:
        xs = xs.contiguous(memory_format=torch.channels_last)
    with common.autocast(x.device, precision, cache=False):  # the hook takes BN statistics in fp32
        logits = teacher(xs)
    ce = F.cross_entropy(logits.float(), ys)
    bn = torch.as_tensor(hook.loss(), dtype=torch.float32, device=x.device)
    (ce + r_bn * bn).backward()
    opt.param_groups[0]["lr"].copy_(lrs.index_select(0, t)[0])  # cosine without warm-up (D:recover/recover.py get_images)
    opt.step()
    with torch.no_grad():
        x.clamp_(lo, hi)
        trace.index_copy_(0, t, torch.stack([ce.detach(), bn.detach()])[None])
        t.add_(1)


def early_late_recover(teacher, hook, x0, y, group, sched, args, rng, mean, std, device, graphs=True):
    """Optimise a batch (normalised pixels x0, labels y, EarlyLate group of each image).

    Round r's active set is every image with group <= r. Leading rounds with no active image
    (a batch holding only late ranks of a split class) are dropped and T shrinks by R each, as the
    official code does; LR and crop curricula run over this batch's T. One Adam over the whole
    tensor: inactive rows get exactly zero gradient so their moments stay zero and they do not move.
    Adam's bias correction uses the global step, so an image joining at step t >> 1 takes a first
    step of lr*(1-b1)/sqrt(1-b2) = lr*0.5/sqrt(0.1) ~ 1.58*lr per pixel, not the lr of a fresh Adam
    (kept: it is the official behaviour). On CUDA each round is one CUDA graph (its active set has a
    fixed size), so a step costs the GPU work of the active images and no host time; a round whose
    active set did not grow replays the previous round's graph; cuDNN picks its algorithms once per
    active-set size (cached for the process) in the eager warm-up steps. A capture error falls back to
    eager steps (common.StepGraph)."""
    cuda = str(device).startswith("cuda")
    R, first = sched["round_itr"], int(group.min())
    total = (sched["rounds"] - first) * R
    rounds = []
    for r in range(first, sched["rounds"]):
        idx = (group <= r).nonzero().flatten()
        if rounds and len(idx) == (len(group) if rounds[-1][0] is None else len(rounds[-1][0])):
            rounds.append(rounds[-1])  # the active set did not grow: the same step (and graph)
        else:
            idx = idx.to(device)
            rounds.append((None, y) if len(idx) == len(group) else (idx, y.index_select(0, idx)))
    views = draw_views(rng, total, x0.shape[-1], args).to(device)
    lrs = torch.tensor([0.5 * args.lr * (1 + math.cos(math.pi * t / total)) for t in range(total)], device=device)
    lo = torch.tensor([(0 - m) / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    x = x0.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=torch.tensor(args.lr, device=device), betas=(0.5, 0.9), eps=1e-8,
                           **({"fused": True, "capturable": True} if cuda else {}))
    t = torch.zeros(1, dtype=torch.long, device=device)
    trace = torch.zeros(total, 2, device=device)  # per step: CE, BN loss
    steps = common.StepGraph(device, graphs)
    for r, (idx, ys) in enumerate(tqdm(rounds, desc="recover rounds", leave=False, disable=len(rounds) < 2)):
        steps.run(lambda: recover_step(teacher, hook, x, opt, idx, ys, t, views, lrs, args.r_bn, lo, hi, trace,
                                       args.precision), R, same=r > 0 and rounds[r] is rounds[r - 1])
    active = [len(group) if idx is None else len(idx) for idx, _ in rounds]
    trace = trace.view(len(rounds), R, 2).mean(1).tolist()
    return x.detach(), {"iterations": total, "dropped_rounds": first, "active_per_round": active,
                        "image_iterations": sum(a * R for a in active),
                        "ce_per_round": [c for c, _ in trace], "bn_per_round": [b for _, b in trace]}


def classifier_input(model, x):
    """Penultimate features: the input of the model's last nn.Linear, caught with a hook."""
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = {}
    h = fc.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    try:
        model(x)
    finally:
        h.remove()
    return seen["x"].flatten(1)


@torch.no_grad()
def within_class_similarity(teacher, x):
    """The diversity of D:imgs/diversity_comparison.png (lower = more diverse): mean cosine similarity over
    ordered pairs i != j of the teacher's penultimate features of one class's images. Our assumption: the paper's
    extractor is not in the repo."""
    if len(x) < 2:
        return None
    f = F.normalize(classifier_input(teacher, x).float(), dim=1)
    sim = f @ f.T
    return float((sim.sum() - sim.diagonal().sum()) / (len(x) * (len(x) - 1)))


def open_stats(out, rank, identity):
    """This rank's delt_stats_rank<r>.jsonl for appending (a stats folder would read as a class to
    ImageFolder); its first line is the run identity, and a file of another run is started afresh."""
    path = os.path.join(out, f"delt_stats_rank{rank}.jsonl")
    try:
        with open(path) as f:
            ours = json.loads(f.readline()).get("identity") == identity
    except (OSError, ValueError):
        ours = False
    f = open(path, "a" if ours else "w")
    if not ours:
        f.write(json.dumps({"identity": identity}) + "\n")
    return f


def load_stats(out, identity):
    """Per-batch and per-class records of every rank's delt_stats_rank*.jsonl that belong to this run
    (first line: the run identity); a line cut by an interruption is skipped."""
    stats = {"batch": {}, "class": {}}
    for name in sorted(os.listdir(out)):
        if not (name.startswith("delt_stats_rank") and name.endswith(".jsonl")):
            continue
        with open(os.path.join(out, name)) as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if i == 0 and entry.get("identity") != identity:
                break
            if i > 0:
                stats[entry["kind"]][entry["id"]] = entry
    return stats


def class_record(teacher, x_init, x_final, mean, std, device, precision="auto"):
    """One class's diversity before/after (D:imgs/diversity_comparison.png) and how far each rank
    moved from its start (RMS pixel change: EarlyLate's early ranks should move furthest)."""
    pix_i, pix_f = common.denormalize(x_init, mean, std).clamp(0, 1), common.denormalize(x_final, mean, std).clamp(0, 1)
    with common.autocast(device, precision):
        div_i, div_f = (within_class_similarity(teacher, x.to(device)) for x in (x_init, x_final))
    return {"diversity_initial": div_i, "diversity_final": div_f,
            "rms_change_by_rank": (pix_f - pix_i).pow(2).mean((1, 2, 3)).sqrt().tolist()}


def mean_of(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args = common.apply_presets(build_parser().parse_args(argv), PRESETS, DEFAULTS)
    common.eval_on(args)
    common.check_numbers(args, {">= 1": "ipc batch_size iterations", "> 0": "lr std",
                                ">= 0": "milestone jitter r_bn first_bn_multiplier workers"})
    if args.early_late and (args.round_itr <= 0 or args.iterations % args.round_itr):
        raise common.UserError(f"EarlyLate needs --iterations ({args.iterations}) to be a positive multiple of "
                               f"--round-itr ({args.round_itr}); or pass --no-early-late")
    args.out = common.check_out_folder(args.out or os.path.join("runs", f"delt_{args.dataset}_ipc{args.ipc}"))
    if args.ranking_file and os.path.isdir(args.ranking_file):
        raise common.UserError(f"--ranking-file {args.ranking_file} is a folder, not a ranking CSV")
    if args.ranking_file and not os.path.lexists(args.ranking_file) and not os.path.isdir(
            os.path.dirname(os.path.abspath(args.ranking_file))):
        raise common.UserError(f"--ranking-file {args.ranking_file} does not exist and its folder does not either: "
                               f"give an existing CSV, or a path in an existing folder to write the ranking to")
    ignore = ("eval_student", "eval_epochs", "eval_repeats", "cuda_graph")
    # recorded (and resumed) as what runs; resolved before the output's record is compared
    args.precision = common.resolve_precision(args.precision, common.pick_device(args.device))
    common.RunDir.precheck(args.out, args, args.overwrite, ignore)  # before the teacher is trained or loaded
    d = common.dist_setup(args.device)
    common.seed_everything(args.seed)
    mean, std, norm_source = common.resolve_norm(args.dataset, [args.teacher_path], args.mean, args.std, args.norm)
    size = common.input_size(args.dataset, args.teacher)
    classes = common.class_list(args.dataset, args.data_path)
    train = common.real_dataset(args.dataset, args.data_path, "train",
                                common.eval_transform(args.dataset, size, mean=mean, std=std))
    targets = [int(t) for t in train.targets]
    counts = torch.bincount(torch.tensor(targets), minlength=len(classes))
    if int(counts.min()) < args.ipc:
        raise common.UserError(f"--ipc {args.ipc} exceeds the {int(counts.min())} training images of class "
                               f"{int(counts.argmin())}")
    workers = 0 if args.dataset == "digits" else args.workers
    sched = early_late_schedule(args.ipc, args.iterations, args.round_itr, args.early_late)
    group_of_rank = torch.tensor(sched["group_of_rank"])

    # --- stage 0: squeeze = a pre-trained teacher (D:recover/models.py), trained/cached once for digits ---
    if not d.main:
        common.barrier()  # rank 0 trains/caches a digits teacher first
    teacher_reused = common.teacher_cached(args.teacher, args.dataset, args.teacher_path)
    teacher = common.load_teacher(args.teacher, args.dataset, args.teacher_path, args.data_path, device=d.device)
    if d.main:
        common.barrier()
    if str(d.device).startswith("cuda"):
        teacher = teacher.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    teacher = common.cast_teacher(teacher, args.precision, d.device)  # bf16 weights once, not per forward
    run = common.RunDir(args.out, args, classes, rank=d.rank, overwrite=args.overwrite,
                        extra_artefacts=("ranking.csv", "eval_rded.json",
                                         *(f"delt_stats_rank{r}.jsonl" for r in range(1024))),
                        ignore=ignore)
    run.record["normalisation"] = {"mean": list(mean), "std": list(std), "source": norm_source}
    if d.main:
        print(f"teacher inputs normalised with mean {mean} std {std} ({norm_source})")
    identity = json.loads(json.dumps(run.identity))
    stats_files = []  # opened at the first record, so a start that fails before any work leaves no file

    def log_stats(kind, key, entry):
        if not stats_files:
            stats_files.append(open_stats(args.out, d.rank, identity))
        stats_files[0].write(json.dumps({"kind": kind, "id": key, **entry}, separators=(",", ":")) + "\n")
        stats_files[0].flush()

    batches, chains = plan_batches(len(classes), args.ipc, args.batch_size)
    mine = [b for chain in common.shard(chains, d.rank, d.world) for b in chain]
    my_classes = sorted({c for b in mine for c, _ in batches[b]})
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)

    # --- stage 1: rank real images by the teacher's true-class probability and select (D:data_selection.py) ---
    picks = {}
    if args.init == "real":
        paths = ([os.path.relpath(p, train.root) for p, _ in train.samples] if hasattr(train, "samples") else None)
        # the ranking depends on the data and the teacher only, not on IPC: cached under $DD_CACHE by
        # (dataset, its files, teacher, the teacher's weights, normalisation), so a loop over IPC ranks once
        ranking = args.ranking_file or common.cache_path("delt_ranking", {
            "dataset": args.dataset, "data_path": os.path.abspath(args.data_path) if args.data_path else None,
            "files": common.content_hash([paths, targets]), "teacher": args.teacher,
            "weights": common.weights_hash(teacher), "mean": list(mean), "std": list(std), "size": size}, ".csv")
        load = lambda p: read_ranking(p, classes, targets, paths, counts)  # noqa: E731
        with run.stage("selection", items=sum(len(by_class[c]) for c in my_classes)):
            scored = None
            if d.main:  # a --ranking-file that does not fit stops; a damaged cached one is ranked again
                scored = (load(ranking) if args.ranking_file else common.read_cached(ranking, "DELT ranking", load)) \
                    if os.path.lexists(ranking) else None
            ranking_reused = scored is not None
            if d.world > 1:
                box = [ranking_reused]
                dist.broadcast_object_list(box, src=0)
                ranking_reused = box[0]
            if not ranking_reused:
                chunks = [by_class[c][i:i + 256] for c in my_classes for i in range(0, len(by_class[c]), 256)]
                scores = true_class_probability(teacher, train, chunks, d.device, workers, args.precision)
                order = [i for ch in chunks for i in ch]
                rows = [(s, i, targets[i], paths[i] if paths else f"train[{i}]") for s, i in zip(scores, order)]
                if d.world > 1:
                    gathered = [None] * d.world
                    dist.all_gather_object(gathered, rows)
                    rows = [r for part in gathered for r in part]
                if d.main:
                    if not args.ranking_file:
                        common.make_cache_dir(os.path.dirname(ranking))
                    write_ranking(ranking, rows, classes)
                common.barrier()
            scored = scored or load(ranking)
            for c in my_classes:
                picks[c] = select(scored[c], args.ipc, args.selection, args.seed * 1000003 + c)
        if d.main and os.path.abspath(ranking) != os.path.abspath(os.path.join(args.out, "ranking.csv")):
            shutil.copyfile(ranking, os.path.join(args.out, f"ranking.csv.tmp{os.getpid()}"))  # a copy beside the set
            os.replace(os.path.join(args.out, f"ranking.csv.tmp{os.getpid()}"), os.path.join(args.out, "ranking.csv"))
        run.record["ranking"] = {"path": os.path.abspath(ranking), "reused": ranking_reused}
        print(f"[rank {d.rank}] selected {args.ipc} {args.selection} images for {len(my_classes)} classes "
              f"(ranking: {ranking})")

    # --- stage 2: EarlyLate recover (D:recover/recover.py get_images), class-contiguous batches, last iterate saved ---
    hook = common.BNStatsHook(teacher, first_bn_multiplier=args.first_bn_multiplier)
    complete = {c for c in my_classes if run.class_complete(c, args.ipc)}
    todo = [b for b in mine if not all(c in complete for c, _ in batches[b])]
    planned = sum(sched["iterations_by_rank"][k] for b in todo for _, k in batches[b])
    finals, inits = {}, {}
    print(f"[rank {d.rank}] schedule: {sched['rounds']} round(s) of {sched['round_itr']} its, groups "
          f"{sched['group_sizes']}, {sched['fraction_of_all_at_T']:.1%} of the image-iterations of all-at-T; "
          f"{len(todo)}/{len(mine)} batches to do")
    with run.stage("recover", items=planned, unit="image_iterations"):
        for n, b in enumerate(todo):
            batch, t0 = batches[b], time.time()
            y = torch.tensor([c for c, _ in batch])
            if args.init == "real":
                x0, _ = common.stack_images(train, [picks[c][k] for c, k in batch], workers=workers)
            else:  # SRe2L/CDA: N(0,1) in normalised space, one generator per class
                x0 = torch.stack([torch.randn(args.ipc, 3, size, size, generator=torch.Generator().manual_seed(
                    args.seed * 1000003 + c))[k] for c, k in batch])
            y_dev, x0_dev = y.to(d.device), x0.to(d.device)
            rng = random.Random(f"delt-{args.seed}-{batch[0][0]}-{batch[0][1]}")
            before = full_batch_losses(teacher, hook, x0_dev, y_dev, d.device, args.precision)
            views = recover_views(f"delt-{args.seed}-{b}", (sched["rounds"] - int(group_of_rank[[k for _, k in batch]].min()))
                                  * sched["round_itr"], x0_dev.shape[-1], args)
            obj_before = objective_on_views(teacher, hook, x0_dev, y_dev, views, args, d.device, args.precision)
            t1 = time.time()
            x, rec = early_late_recover(teacher, hook, x0_dev, y_dev, group_of_rank[[k for _, k in batch]],
                                        sched, args, rng, mean, std, d.device, args.cuda_graph)
            loop_s = time.time() - t1  # the traces' .tolist() inside has synchronised the device
            after = full_batch_losses(teacher, hook, x, y_dev, d.device, args.precision)
            obj_after = objective_on_views(teacher, hook, x, y_dev, views, args, d.device, args.precision)
            seconds = time.time() - t0
            rec.update(batch=b, classes=sorted(set(y.tolist())), images=len(batch), seconds=round(seconds, 3),
                       ms_per_iteration=round(1000 * loop_s / rec["iterations"], 3),
                       ce_before=before[0], bn_before=before[1], ce_after=after[0], bn_after=after[1],
                       objective_views_before=obj_before, objective_views_after=obj_after)
            log_stats("batch", b, rec)
            print(f"batch {n + 1}/{len(todo)} classes {rec['classes'][0]}-{rec['classes'][-1]} T {rec['iterations']} "
                  f"image-its {rec['image_iterations']} objective on {len(views)} recover views {obj_before:.3f}->"
                  f"{obj_after:.3f} (unaugmented: bn {before[1]:.3f}->{after[1]:.3f} ce {before[0]:.3f}->"
                  f"{after[0]:.3f}) {seconds:.1f}s ({rec['ms_per_iteration']:.1f} ms/it)", flush=True)
            for i, (c, k) in enumerate(batch):
                finals.setdefault(c, {})[k], inits.setdefault(c, {})[k] = x[i].cpu(), x0[i]
                if len(finals[c]) < args.ipc:
                    continue
                if c in complete:  # a finished class that shares a redone batch: kept as it is
                    del finals[c], inits[c]
                    continue
                xi, xf = (torch.stack([imgs[c][j] for j in range(args.ipc)]) for imgs in (inits, finals))
                log_stats("class", c, class_record(teacher, xi, xf, mean, std, d.device, args.precision))
                run.write_class(c, common.denormalize(xf, mean, std).clamp(0, 1))
                del finals[c], inits[c]
    hook.remove()
    for f in stats_files:
        f.close()

    # --- stage 3: the record (rank 0 gathers every rank's per-batch and per-class stats) ---
    common.barrier()
    summary = {}
    if d.main:
        stats = load_stats(args.out, identity)
        bstats = [stats["batch"][b] for b in range(len(batches))]
        cstats = [stats["class"][c] for c in range(len(classes))]
        div_i = mean_of(s["diversity_initial"] for s in cstats)
        div_f = mean_of(s["diversity_final"] for s in cstats)
        change = [mean_of(s["rms_change_by_rank"][k] for s in cstats) for k in range(args.ipc)]
        run.record["delt"] = {
            "schedule": sched, "batches": len(batches), "chains": len(chains),
            "image_iterations": sum(s["image_iterations"] for s in bstats),
            "iterations": sum(s["iterations"] for s in bstats),
            "recover_seconds_sum": round(sum(s["seconds"] for s in bstats), 2),
            "ms_per_iteration_mean": mean_of(s["ms_per_iteration"] for s in bstats),
            "bn_loss_before": mean_of(s["bn_before"] for s in bstats), "bn_loss_after": mean_of(s["bn_after"] for s in bstats),
            "ce_before": mean_of(s["ce_before"] for s in bstats), "ce_after": mean_of(s["ce_after"] for s in bstats),
            "objective_on_recover_views": {
                "what": "CE + r_bn * BN loss of the initial and the final images on the same 8 augmented views per "
                        "batch, spread over the crop curriculum (the unaugmented bn/ce above are not what recover optimises)",
                "before": mean_of(s["objective_views_before"] for s in bstats),
                "after": mean_of(s["objective_views_after"] for s in bstats)},
            "diversity": {"metric": "within-class mean pairwise cosine similarity of the teacher's penultimate "
                                    "features (D:imgs/diversity_comparison.png; lower = more diverse)",
                          "initial_mean": div_i, "final_mean": div_f,
                          "initial_per_class": [s["diversity_initial"] for s in cstats],
                          "final_per_class": [s["diversity_final"] for s in cstats]},
            "rms_pixel_change_by_rank": change}
        summary = {"image_iterations": run.record["delt"]["image_iterations"], "diversity_initial": div_i,
                   "diversity_final": div_f}
    run.finish(device=d.device, **summary)

    # --- stage 4: evaluation with DELT's protocol (D:evaluation/argument.py): RDED online soft labels + RandAugment ---
    result = None
    if args.eval:
        import validate_fkd
        student = args.eval_student or args.teacher
        cmd = ["--syn-data-path", args.out, "--dataset", args.dataset, "--protocol", "rded", "--ipc", str(args.ipc),
               "--teacher", args.teacher, "--student", student, "--mean", *map(str, mean), "--std", *map(str, std),
               "--rand-augment", "rand-m6-n2-mstd1.0", "--min-scale", "0.25", "--factor", "1",
               "--baseline", "random", "--seed", str(args.seed), "--device", args.device, "--precision", args.precision]
        cmd += ["--data-path", args.data_path] if args.data_path else []
        cmd += ["--teacher-path", args.teacher_path] if args.teacher_path else []
        cmd += ["--epochs", str(args.eval_epochs)] if args.eval_epochs else []
        cmd += ["--repeats", str(common.eval_repeats(args))] if common.eval_repeats(args) else []
        t0 = time.time()
        result = validate_fkd.main(cmd, closing=False, norm_source=f"{norm_source}, as in recover")
        if d.main:
            run.record["stages"]["evaluation"] = {"seconds": round(time.time() - t0, 3)}
            run.record["eval"] = {k: result[k] for k in ("protocol", "best_mean", "best_std", "last_mean", "last_std")}
            run.record["eval"]["random_real"] = {k: result["baseline"][k] for k in ("best_mean", "best_std", "last_mean", "last_std")}
            run.save_record()

    if d.main:
        rd = run.record["delt"]
        line = (f"recover {run.record['stages']['recover']['seconds']:.0f}s, "
                f"{rd['image_iterations']} image-its ({rd['image_iterations'] / (len(classes) * args.ipc * args.iterations):.1%} "
                f"of all-at-T) | objective (CE + r_bn*BN) on the recover views {rd['objective_on_recover_views']['before']:.3f}"
                f" -> {rd['objective_on_recover_views']['after']:.3f} | unaugmented BN loss {rd['bn_loss_before']:.3f} -> "
                f"{rd['bn_loss_after']:.3f}")
        if rd["diversity"]["final_mean"] is not None:
            line += f" | diversity (cos, lower = more diverse) {rd['diversity']['initial_mean']:.3f} -> {rd['diversity']['final_mean']:.3f}"
        print(line)
        print(common.closing_line("delt", args.dataset, args.ipc, args.out, result, {
            "teacher": teacher_reused, "ranking": run.record.get("ranking", {}).get("reused")}))
    return result


if __name__ == "__main__":
    common.run_cli(main)
