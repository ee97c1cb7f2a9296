"""infer_ufc.py: INFER's universal feature compensators (UFCs), end to end, with static soft labels.

Paper: "Breaking Class Barriers: Efficient Dataset Distillation via Inter-Class Feature Compensator"
(INFER), X. Zhang, J. Du, P. Liu, J. T. Zhou. ICLR 2025, arXiv 2408.06927.
Official code: https://github.com/zhangxin-xd/UFC (@83d19f8). Optional DWA weight adjustment from
https://github.com/AngusDujw/Diversity-Driven-Synthesis (@c5b125f, NeurIPS 2024, arXiv 2409.17612).
Citations: UFC = zhangxin-xd/UFC@83d19f8, DWA = AngusDujw/Diversity-Driven-Synthesis@c5b125f, as
`UFC:path:line`. Full notes (stages, presets, matches/differs table, digits figures): docs/infer_ufc.md.

Idea (Sec. 3): a budget of IPC images per class buys K = floor(IPC*C/(C+M)) real images per class
plus K*M UFCs u_{k,m}: one image-shaped tensor each, added to ALL C real images of set k and
optimised against teacher m alone, so one stored "image" makes C new training images. The set is
written as K*(M+1) images per class, plus the compact form the budget counts (ufc.pt + the K real
files) and the teachers' mean logits per image (soft_labels.pt) for static labelling.

  uv run python infer_ufc.py               # digits, IPC 10, teachers conv3+conv4+conv5 (each trained
                                           # on first use): K=7, 28 files/class, 21 UFCs; 269 s wall
                                           # on 2 idle cores with a fresh cache, 3 + 3 students included
  uv run python infer_ufc.py --ipc 50 --eval --eval-protocol dynamic --baseline random
  uv run python infer_ufc.py --dataset cifar100 --data-path data/cifar --ipc 10 --teacher-path \\
      ckpt/r18.pth,ckpt/mbv2.pth,ckpt/effb0.pth,ckpt/shuffle.pth --eval
  uv run torchrun --nproc_per_node 8 infer_ufc.py --dataset imagenet --data-path /data/imagenet --ipc 50

The digits run prints the budget arithmetic, one line per UFC (loss first -> last), "UFCs: IPC 10 -> K=7,
28 files/class, 280 images, 21 UFCs (91/100 image-equivalents); ...", evaluates 3 students on the set and 3
on random real images at IPC 10 (static labels) and ends with the closing line of every script,
"infer_ufc: digits IPC 10 -> runs/infer_ufc_digits_ipc10 | top-1 distilled ... vs random real ... | ...".

Deliberate deviations from the official code (each one a bug or a trap of the official code; docs/infer_ufc.md):
- one script for every dataset; the teachers are loaded once, not reloaded for every ipc_id (UFC:ufc_generation/ufc_cifar.py);
- the batch is always all C classes (the official --batch-size breaks CIFAR-100 and the budget);
  for many classes --class-chunk accumulates gradients over chunks, so u still sees all C: the CE term
  is exact, the BN term is the mean of the per-chunk BN losses (an approximation of the full batch);
- the BN loss sums the hooks that fired (UFC drops one EfficientNet hook by hand);
- the saved composite uses the final u (official: u before the last Adam step); files are
  lossless PNG with rounding by default (official: JPEG q75 of truncated pixels: --format jpg);
- the real init images are sampled here with a seeded generator (official: Google-Drive tensors),
  quantised to 8 bits first so that the saved real files ARE the init images;
- static soft labels are computed once, on the written files, and stored (official: recomputed
  by every evaluation run); K uses exact integer arithmetic (official: float division);
- ImageNet: the released ufc_imgnet.py cannot run (args.init, input_original, no imagenet branch in
  clip_image); this follows the CIFAR index mapping and its own documented augmentation;
- no wandb; DWA weight adjustment (DWA:distillation/perterb.py:19-32) is an option, off by default, as INFER does not use it.
"""
import argparse
import copy
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common

T = common.lazy_module("torchvision.transforms.v2")  # imported on first use: --help stays fast
TF = common.lazy_module("torchvision.transforms.v2.functional")

# INFER/DWA normalise CIFAR-100 with its own statistics (UFC utils.py, DWA squeeze_cifar100.py);
# common.py uses the CIFAR-10 constants for CIFAR-100 like SRe2L/RDED. The teachers must see what
# they were trained on, so --teacher-norm infer (the CIFAR-100 preset) switches to these.
INFER_NORM = {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}

CIFAR_TEACHERS = "resnet18_modified,mobilenet_v2_cifar,efficientnet_b0_cifar,shufflenet_g2"  # UFC:ufc_generation/ufc_cifar.py:136-185
IMAGENET_TEACHERS = "resnet18,mobilenet_v2,efficientnet_b0"  # UFC:ufc_generation/ufc_imgnet.py:208-225
PRESETS = {
    # not published: our choice. Three cheap ConvNets (conv3 ~60 ms, conv4 ~65 ms, conv5 ~70 ms per
    # 10-image step on one core; shufflenet_g2 ~145, mobilenet_v2_cifar ~275) give M=3 different
    # depths, trained on first use; 50 iterations keep the default run at a few minutes on 2 busy cores
    "digits": dict(teacher="conv3,conv4,conv5", iterations=50, lr=0.25, r_bn=1.0, augment="roll", jitter=4),
    # README / sh/ufc_cifar.sh: T 1000, lr 0.25, r_bn 1.0; roll jitter 4 (ufc_cifar.py:64-65)
    "cifar10": dict(teacher=CIFAR_TEACHERS, iterations=1000, lr=0.25, r_bn=1.0, augment="roll", jitter=4),
    "cifar100": dict(teacher=CIFAR_TEACHERS, iterations=1000, lr=0.25, r_bn=1.0, augment="roll", jitter=4,
                     teacher_norm="infer"),
    # not published (no Tiny script in UFC@83d19f8): CIFAR teachers at 64 px and CIFAR settings, M=4 assumed
    "tiny": dict(teacher=CIFAR_TEACHERS, iterations=1000, lr=0.25, r_bn=1.0, augment="roll", jitter=4),
    # README: T 2000, lr 0.25, r_bn 0.01; batch-shared RandomResizedCrop + flip + roll 32 (ufc_imgnet.py:92-102);
    # class chunk 250: not published, our choice to fit 1000 classes at 224 px in ~40 GB
    **{d: dict(teacher=IMAGENET_TEACHERS, iterations=2000, lr=0.25, r_bn=0.01, augment="crop", jitter=32,
               class_chunk=250 if d == "imagenet" else None)
       for d in ("imagenette", "imagewoof", "imagenet100", "imagenet")},
}
DEFAULTS = dict(first_bn_multiplier=10.0, r_var=1.0, dwa_steps=0, rho=0.0, teacher_norm="dataset")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\nWith no flags (digits, IPC 10) and a fresh "
                                "cache it first trains the conv3, conv4 and conv5 teachers, then 21 UFCs and 3 + 3 "
                                "students: 269 s on 2 idle CPU cores (521 s of CPU time; README 'How long it takes').",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_generic_args(p, ipc=10, out="runs/infer_ufc_<dataset>_ipc<ipc>")
    g = p.add_argument_group("teachers (UFC:ufc_generation/ufc_cifar.py:136-185)")
    g.add_argument("--teacher", default=None, help=f"comma list of the M teacher architectures (of {', '.join(common.ARCHS)})")
    g.add_argument("--teacher-path", default=None, help="comma list of teacher checkpoints, one per --teacher")
    g.add_argument("--teacher-norm", default=None, choices=("dataset", "infer"),
                   help="normalisation the teachers expect: common.py's or INFER's own CIFAR-100 statistics")
    g = p.add_argument_group("UFC optimisation (UFC:ufc_generation/ufc_cifar.py)")
    g.add_argument("--iterations", type=int, default=None, help="Adam steps per UFC (T)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate of u (cosine to 0, no warm-up)")
    g.add_argument("--r-bn", type=float, default=None, help="weight of the BN-statistics loss")
    g.add_argument("--first-bn-multiplier", type=float, default=None, help="weight of the first BN layer's term")
    g.add_argument("--augment", default=None, choices=("roll", "crop"),
                   help="batch-shared view: roll jitter (CIFAR) or RandomResizedCrop+flip+roll (ImageNet)")
    g.add_argument("--jitter", type=int, default=None, help="largest roll shift in pixels (0..jitter)")
    g.add_argument("--class-chunk", type=int, default=None,
                   help="classes per forward; gradients accumulate so u still sees all C (default: all)")
    common.add_precision_arg(g)
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run the UFC step eagerly on CUDA instead of as one CUDA graph (same maths)")
    g = p.add_argument_group("DWA directed weight adjustment (DWA:distillation/perterb.py:19-32; off by default, not part of INFER)")
    g.add_argument("--dwa-steps", type=int, default=None, help="K_s normalised gradient-ascent steps on the teacher")
    g.add_argument("--rho", type=float, default=None, help="total length of the weight perturbation")
    g.add_argument("--r-var", type=float, default=None, help="weight of the variance term of the BN loss")
    g = p.add_argument_group("evaluation (validate_fkd.py, UFC:ufc_validation/val_static.py)")
    g.add_argument("--eval-protocol", default="static", choices=("static", "dynamic"),
                   help="static: stored soft labels (UFC:ufc_validation/val_static.py:200-222); dynamic: the teacher "
                        "ensemble online (UFC:ufc_validation/val_dyn.py:243-260)")
    g.add_argument("--eval-epochs", type=int, default=None,
                   help="student epochs (default: validate_fkd's static preset; /(M+1) for dynamic, UFC:ufc_validation/val_dyn.py:243-260)")
    g.add_argument("--eval-repeats", type=int, default=None,
                   help="students on the set and on random real images (default: 3 on digits, else validate_fkd's)")
    g.add_argument("--baseline", default=None, choices=("none", "random"),
                   help="also evaluate random real images at the nominal IPC (same image-equivalent budget; "
                        "default: random on digits, none elsewhere)")
    return common.document_defaults(p, PRESETS, DEFAULTS, (
        "CIFAR-10/100 from zhangxin-xd/UFC@83d19f8:sh/ufc_cifar.sh and ufc_generation/ufc_cifar.py, ImageNet "
        "from the UFC README and ufc_generation/ufc_imgnet.py; Tiny and digits: not published, our choice. "
        "The source of each value is the comment beside it in PRESETS in infer_ufc.py."),
        citations="UFC:path:line is zhangxin-xd/UFC@83d19f8:path:line (the official code), DWA: "
                  "AngusDujw/Diversity-Driven-Synthesis@c5b125f")


# ----------------------------------------------------------------------------------------------
# budget (UFC:ufc_generation/ufc_cifar.py:198)
# ----------------------------------------------------------------------------------------------
def ufc_budget(ipc, num_classes, num_teachers):
    """K real sets and K*M UFCs within IPC*C image-equivalents ("averaging UFC", ufc_cifar.py:251-253)."""
    C, M = num_classes, num_teachers
    K = ipc * C // (C + M)  # = floor(IPC / (M/C + 1)), exactly
    return {"K": K, "files_per_class": K * (M + 1), "ufcs": K * M, "image_equivalents": K * C + K * M,
            "budget": ipc * C, "smallest_ipc": -(-(C + M) // C)}


def ufc_ids(K, M):
    """File order per class (ufc_cifar.py:43-53): ids 0..K-1 are the real sets, id (m+1)K + k the composite
    of real set k with teacher m's UFC. Returns [(k, m or None)] in id order."""
    return [(i, None) for i in range(K)] + [(k, m) for m in range(M) for k in range(K)]


# ----------------------------------------------------------------------------------------------
# init: K seeded real sets, one training image per class each (UFC:ufc_generation/ufc_cifar.py:48)
# ----------------------------------------------------------------------------------------------
def sample_real_sets(dataset, data_path, K, seed, size, workers=0, ipc=None):
    """Returns real [K, C, 3, H, W] as uint8 (8 bits: the saved real file IS the init image; 4x less
    memory than float at ImageNet scale) and real_index [K, C] into the train split."""
    C = common.dataset_info(dataset).num_classes
    resize = [T.Resize((size, size), antialias=True)] if dataset in common.FOLDER_DATASETS else []  # ufc_imgnet.py:62-70
    ds = common.real_dataset(dataset, data_path, "train", T.Compose([common.to_tensor(), *resize]))
    counts = torch.bincount(torch.as_tensor(ds.targets), minlength=C)
    if int(counts.min()) < K:  # speak of the --ipc the user gave, not of the internal K
        c = int(counts.argmin())
        raise common.UserError(f"--ipc {ipc} needs K = floor(IPC*C/(C+M)) = {K} real training images of every class "
                               f"(one per real set), but class {c} has {int(counts[c])}: lower --ipc")
    idx = common.random_subset(ds.targets, K, seed, C)  # grouped by class: idx[c*K + k]
    images, _ = common.stack_images(ds, idx, workers=workers)
    images = (images * 255).round().to(torch.uint8)
    return images.view(C, K, *images.shape[1:]).transpose(0, 1).contiguous(), torch.tensor(idx).view(C, K).t().contiguous()


def compose(real, ufc, mean, std):
    """Saved composite = clamp(denorm(x + u), 0, 1) with x the normalised real image (clip_image, UFC:ufc_generation/ufc_cifar.py).
    Used by generation and by rebuild_set, so the compact form reproduces the files exactly."""
    return common.denormalize(common.normalize(real, mean, std) + ufc, mean, std).clamp(0, 1)


def rebuild_set(compact, real):
    """The whole written set from the compact form: real [K, C, 3, H, W] in [0,1] (the K real files per
    class, or the train images at compact["real_index"]) and compact["ufc"] [K, M, 3, H, W].
    Returns [C, K*(M+1), 3, H, W] in file order."""
    K, M = compact["ufc"].shape[:2]
    rows = [real[k] if m is None else compose(real[k], compact["ufc"][k, m][None].float(), compact["mean"], compact["std"])
            for k, m in ufc_ids(K, M)]
    return torch.stack(rows, 1)


# ----------------------------------------------------------------------------------------------
# the UFC optimisation (UFC:ufc_generation/ufc_cifar.py) and its batch-shared augmentation (UFC:ufc_generation/ufc_cifar.py:64-65)
# ----------------------------------------------------------------------------------------------
def random_resized_box(size, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box, drawn from generator g."""
    for _ in range(10):
        area = size * size * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(torch.rand(1, generator=g)))
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= size and 0 < h <= size:
            return (int(torch.randint(0, size - h + 1, (1,), generator=g)), int(torch.randint(0, size - w + 1, (1,), generator=g)), h, w)
    return 0, 0, size, size


def draw_view(kind, size, jitter, g):
    """ONE view for the whole batch (UFC:ufc_generation/ufc_cifar.py:64-65): a non-negative roll by (0..jitter, 0..jitter), and on
    ImageNet first one RandomResizedCrop box and one flip decision."""
    view = {"roll": tuple(int(s) for s in torch.randint(0, jitter + 1, (2,), generator=g))}
    if kind == "crop":
        view["box"] = random_resized_box(size, g)
        view["flip"] = bool(torch.rand(1, generator=g) < 0.5)
    return view


def dwa_adjust(teacher, x, y, steps, rho, jitter, chunk):
    """DWA (DWA:distillation/perterb.py:19-32): a copy of the teacher moved `steps` times by (rho/steps) * g/||g||,
    g = grad of the CE of the jittered real set (normalised gradient ASCENT), eval mode kept. The
    original stays untouched (DWA reloads it from disk for every batch)."""
    model = copy.deepcopy(teacher)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    off = torch.randint(0, jitter + 1, (2,)).tolist()
    x = torch.roll(x, shifts=off, dims=(2, 3))  # one jitter, reused by every step
    for _ in range(steps):
        grads = [torch.zeros_like(p) for p in params]
        for lo in range(0, len(y), chunk):  # the whole set's gradient (DWA chunks perturb repeatedly: DWA:validation/validation_cifar.py:152-158)
            loss = F.cross_entropy(model(x[lo:lo + chunk]).float(), y[lo:lo + chunk], reduction="sum") / len(y)
            for a, b in zip(grads, torch.autograd.grad(loss, params)):
                a += b
        norm = torch.sqrt(sum((a * a).sum() for a in grads))
        with torch.no_grad():
            for p, a in zip(params, grads):
                p.add_(a, alpha=rho / steps / float(norm + 1e-12))
    return common.freeze(model)


def view_table(kind, size, jitter, g, iterations):
    """Every iteration's view (draw_view, in the loop's order) as rows (top, left, h, w, flip, dy, dx)
    for the device to read step by step; roll-only views are the whole image, unflipped."""
    rows = []
    for _ in range(iterations):
        v = draw_view(kind, size, jitter, g)
        rows.append((*v.get("box", (0, 0, size, size)), v.get("flip", False), *v["roll"]))
    return torch.tensor(rows, dtype=torch.float32)


def ufc_step(teacher, hook, u, opt, real_norm, targets, chunk, t, views, lrs, r_bn, losses, precision):
    """One UFC iteration on the device with fixed shapes (CUDA replays it as a graph): step t's view
    (resized crop, flip, roll as two resampling matrices) on every chunk of x_c + u, gradients
    accumulated over the chunks, the LR of step t, one Adam step; losses[t] += the chunks' losses."""
    v = views.index_select(0, t)[0]
    s = real_norm.shape[-1]
    wy = common.resize_weights(v[0], v[2], s, s, shift=v[5])
    wx = common.resize_weights(v[1], v[3], s, s, flip=v[4], shift=v[6])
    C = len(real_norm)
    opt.zero_grad(set_to_none=True)
    for lo in range(0, C, chunk):
        x = common.apply_views(real_norm[lo:lo + chunk] + u, wy, wx)  # same view for every chunk
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with common.autocast(x.device, precision, cache=False):
            logits = teacher(x)
        n = len(x)
        ce = F.cross_entropy(logits.float(), targets[lo:lo + n], reduction="sum") / C
        loss = ce + r_bn * torch.as_tensor(hook.loss(), dtype=torch.float32, device=x.device) * (n / C)
        loss.backward()
        losses.index_add_(0, t, loss.detach().view(1))
    opt.param_groups[0]["lr"].copy_(lrs.index_select(0, t)[0])  # cosine, no warm-up (utils.py:74-84)
    opt.step()
    with torch.no_grad():
        t.add_(1)


def optimise_ufc(teacher, real_norm, args, g, device, graph=True):
    """One UFC u (1x3xHxW, zeros; ufc_cifar.py:50) added to every row of real_norm [C,3,H,W]:
    L(u) = mean_c CE(f(A(x_c + u)), c) + r_bn * sum_l w_l (||mu_l - mu_l^run|| + r_var ||var_l - var_l^run||),
    Adam(betas 0.5/0.9) on u alone, lr cosine-annealed from args.lr at every step (utils.py:74-84).
    On CUDA the step is one CUDA graph replayed T times (eager if the capture fails: common.StepGraph).
    Returns u and the per-step losses."""
    C = len(real_norm)
    cuda = str(device).startswith("cuda")
    targets = torch.arange(C, device=device)
    u = torch.zeros(1, *real_norm.shape[1:], device=device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=torch.tensor(args.lr, device=device), betas=(0.5, 0.9), eps=1e-8,
                           **({"fused": True, "capturable": True} if cuda else {}))
    views = view_table(args.augment, real_norm.shape[-1], args.jitter, g, args.iterations).to(device)
    T_ = args.iterations
    lrs = torch.tensor([0.5 * args.lr * (1 + math.cos(math.pi * t / T_)) for t in range(T_)], device=device)
    hook = common.BNStatsHook(teacher, args.first_bn_multiplier, args.r_var)
    losses = torch.zeros(T_, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    common.StepGraph(device, graph).run(lambda: ufc_step(teacher, hook, u, opt, real_norm, targets, args.class_chunk or C,
                                                         t, views, lrs, args.r_bn, losses, args.precision), T_)
    hook.remove()
    return u.detach(), losses.cpu()


# ----------------------------------------------------------------------------------------------
# the compact form: per-(k, m) parts while running, merged into ufc.pt (resume reads both)
# ----------------------------------------------------------------------------------------------
def part_path(out, k, m):
    return os.path.join(out, "ufc_parts", f"u_k{k:04d}_m{m}.pt")


def finished_ufcs(out):
    """{(k, m): {"ufc", "losses"}} of every UFC already optimised (merged ufc.pt and loose parts)."""
    done = {}
    path = os.path.join(out, "ufc.pt")
    if os.path.isfile(path):
        c = torch.load(path, map_location="cpu", weights_only=True)
        K, M = c["ufc"].shape[:2]
        done.update({(k, m): {"ufc": c["ufc"][k, m][None], "losses": c["losses"][k, m]} for k in range(K) for m in range(M)})
    parts = os.path.join(out, "ufc_parts")
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        if name.startswith("u_k") and name.endswith(".pt"):
            p = torch.load(os.path.join(parts, name), map_location="cpu", weights_only=True)
            done[(p["k"], p["m"])] = p
    return done


def labels_fit(path, labelled, num_classes):
    """True when soft_labels.pt (of an earlier run on this --out) is this set's: [images, classes] for these images."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    logits = stored.get("logits") if isinstance(stored, dict) else None
    return (torch.is_tensor(logits) and tuple(logits.shape) == (labelled["images"], num_classes)
            and (stored.get("set") or {}).get("digest") == labelled["digest"])


def folder_bytes(paths):
    return sum(os.path.getsize(p) for p in paths)


def main(argv=None):
    # --- stage 0: flags, presets and the budget (UFC:ufc_generation/ufc_cifar.py:198): every user error before any output ---
    args = build_parser().parse_args(argv)
    common.apply_presets(args, PRESETS, DEFAULTS)
    common.eval_on(args)
    common.check_numbers(args, {">= 1": "ipc iterations class_chunk", "> 0": "lr",
                                ">= 0": "r_bn first_bn_multiplier jitter dwa_steps rho r_var workers"})
    args.baseline = args.baseline or ("random" if args.dataset == "digits" else "none")
    info = common.dataset_info(args.dataset)
    C = info.num_classes
    archs = args.teacher.split(",")
    paths = args.teacher_path.split(",") if args.teacher_path else [None] * len(archs)
    if len(paths) != len(archs):
        raise common.UserError(f"--teacher-path lists {len(paths)} checkpoints for {len(archs)} teachers in --teacher")
    M = len(archs)
    b = ufc_budget(args.ipc, C, M)
    if b["K"] < 1:
        raise common.UserError(f"--ipc {args.ipc} is too small for {M} teachers and {C} classes: K = floor(IPC*C/(C+M)) "
                               f"= {b['K']} real sets; the smallest valid IPC is {b['smallest_ipc']}")
    K = b["K"]
    args.out = common.check_out_folder(args.out or os.path.join("runs", f"infer_ufc_{args.dataset}_ipc{args.ipc}"))
    ignore = ("baseline", "cuda_graph")
    # recorded (and resumed) as what runs; resolved before the output's record is compared
    args.precision = common.resolve_precision(args.precision, common.pick_device(args.device))
    common.RunDir.precheck(args.out, args, args.overwrite, ignore)  # before any teacher is trained or loaded
    mean, std = INFER_NORM.get(args.dataset, (info.mean, info.std)) if args.teacher_norm == "infer" else (info.mean, info.std)
    d = common.dist_setup(args.device)
    common.seed_everything(args.seed)
    log = print if d.main else (lambda *a, **k: None)
    log(f"budget: IPC {args.ipc} x {C} classes = {b['budget']} image-equivalents; M = {M} teachers -> "
        f"K = floor({args.ipc}*{C}/({C}+{M})) = {K} real sets; files per class K*(M+1) = {b['files_per_class']}; "
        f"compensators K*M = {b['ufcs']}; stored image-equivalents K*C + K*M = {K * C} + {b['ufcs']} = "
        f"{b['image_equivalents']} <= {b['budget']}")

    # --- stage 1: the M teachers (UFC:ufc_generation/ufc_cifar.py:136-185), loaded once ---
    teachers_reused = all(common.teacher_cached(a, args.dataset, p) for a, p in zip(archs, paths))
    teachers = [common.load_teacher(a, args.dataset, p, args.data_path, device=d.device) for a, p in zip(archs, paths)]
    if str(d.device).startswith("cuda"):
        teachers = [t.to(memory_format=torch.channels_last) for t in teachers]
    if args.dwa_steps == 0:  # bf16 weights once, not per forward (DWA moves fp32 copies: cast after it)
        teachers = [common.cast_teacher(t, args.precision, d.device) for t in teachers]

    # --- stage 2: K real init sets, one training image per class each (UFC:ufc_generation/ufc_cifar.py:48) ---
    classes = common.class_list(args.dataset, args.data_path)
    real, real_index = sample_real_sets(args.dataset, args.data_path, K, args.seed, info.size,
                                        0 if args.dataset == "digits" else args.workers, ipc=args.ipc)
    run = common.RunDir(args.out, args, classes, rank=d.rank, overwrite=args.overwrite,
                        extra_artefacts=("ufc.pt", "ufc_parts", "eval_static.json", "eval_static_teacher.json"),
                        ignore=ignore)
    run.record.update({"budget": b, "teachers": archs, "teacher_norm": {"mean": mean, "std": std}})

    # --- stage 3: the K*M UFCs, each against ONE teacher (UFC:ufc_generation/ufc_cifar.py, DWA:distillation/perterb.py:19-32), sharded over ranks ---
    done = finished_ufcs(args.out)
    todo = [(k, m) for m in range(M) for k in range(K) if (k, m) not in done]
    mine = common.shard(todo, d.rank, d.world)
    log(f"compensators: {len(todo)} to optimise ({len(done)} already done), {len(mine)} on rank {d.rank}, "
        f"{args.iterations} iterations each")
    os.makedirs(os.path.join(args.out, "ufc_parts"), exist_ok=True)
    with run.stage("ufc", items=len(mine) * args.iterations, unit="iterations"):
        for k, m in tqdm(mine, desc="UFCs", disable=not d.main):
            t0 = time.time()
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + k * 1009 + m)  # resumable: per-(k, m) stream
            real_norm = common.normalize(real[k].to(d.device).float() / 255, mean, std)
            teacher = teachers[m]
            if args.dwa_steps > 0:
                with torch.random.fork_rng():
                    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
                    teacher = dwa_adjust(teacher, real_norm, torch.arange(C, device=d.device), args.dwa_steps,
                                         args.rho, args.jitter, args.class_chunk or C)
                teacher = common.cast_teacher(teacher, args.precision, d.device)
            u, losses = optimise_ufc(teacher, real_norm, args, g, d.device, args.cuda_graph)
            common.atomic_torch_save({"k": k, "m": m, "ufc": u.cpu(), "losses": losses}, part_path(args.out, k, m))
            if d.main:
                tqdm.write(f"ufc k={k} m={m} ({archs[m]}): loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.time() - t0:.1f}s")
    common.barrier()

    # --- stage 4: the compact form (ufc.pt) and the written set (K real + K*M composites per class) ---
    if d.main:
        done = finished_ufcs(args.out)
        compact = {"ufc": torch.stack([torch.cat([done[(k, m)]["ufc"] for m in range(M)]) for k in range(K)]),
                   "losses": torch.stack([torch.stack([done[(k, m)]["losses"] for m in range(M)]) for k in range(K)]),
                   "real_index": real_index, "teachers": archs, "mean": list(mean), "std": list(std),
                   "ipc": args.ipc, "K": K, "M": M, "dataset": args.dataset}
        common.atomic_torch_save(compact, os.path.join(args.out, "ufc.pt"))
        shutil.rmtree(os.path.join(args.out, "ufc_parts"), ignore_errors=True)
    common.barrier()
    compact = torch.load(os.path.join(args.out, "ufc.pt"), map_location="cpu", weights_only=True)
    ids = ufc_ids(K, M)
    names = [f"{i:05d}_k{k}_real.{args.format}" if m is None else f"{i:05d}_k{k}_ufc_{archs[m]}.{args.format}"
             for i, (k, m) in enumerate(ids)]
    pending = [c for c in common.shard(range(C), d.rank, d.world) if not run.class_complete(c, len(ids))]
    log(f"classes: {len(pending)} to write on rank {d.rank}, {len(ids)} files each")
    with run.stage("write", items=len(pending) * len(ids)):
        for c in tqdm(pending, desc="classes", disable=not d.main):
            run.write_class(c, rebuild_set(compact, real[:, c:c + 1].float() / 255)[0], names)
    common.barrier()

    # --- stage 5: static soft labels on the written files (UFC:ufc_validation/val_static.py:200-222), ImageFolder order ---
    labels_path = os.path.join(args.out, "soft_labels.pt")
    labelled = common.set_identity(args.out) if d.main else None
    if d.main and os.path.lexists(labels_path) and not labels_fit(labels_path, labelled, C):
        print(f"note: {labels_path} is damaged, another set's or lacks the set's identity; computing it again")
        os.remove(labels_path)
    if d.main and not os.path.isfile(labels_path):
        with run.stage("soft_labels", items=C * len(ids)):
            ensemble, logits = common.Ensemble(teachers).eval(), []
            for c in range(C):  # class by class (ImageNet IPC 50 would not fit in memory at once)
                folder = run.class_dir(c)
                files = sorted(f for f in os.listdir(folder) if f.endswith("." + args.format))
                x = torch.stack([common.to_tensor()(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])
                with torch.no_grad(), common.autocast(d.device, args.precision):  # the unaugmented view of the written file
                    logits += [ensemble(common.normalize(b.to(d.device), mean, std)).float().cpu() for b in x.split(500)]
            # with the identity of the images they label: the validator refuses them for any other set
            common.atomic_torch_save({"logits": torch.cat(logits).half(), "set": labelled}, labels_path)
    losses = compact["losses"]
    files = [os.path.join(r, f) for r, _, fs in os.walk(args.out) for f in fs if f.endswith("." + args.format)
             and os.path.basename(r).isdigit()]
    real_files = [f for f in files if "_real." in f]
    storage = {"written_images_bytes": folder_bytes(files), "compact_bytes": folder_bytes(real_files)
               + os.path.getsize(os.path.join(args.out, "ufc.pt")), "ufc_pt_bytes": os.path.getsize(os.path.join(args.out, "ufc.pt"))}
    tail = max(1, args.iterations // 10)
    summary = {"loss_first": float(losses[..., :tail].mean()), "loss_last": float(losses[..., -tail:].mean()),
               "storage": storage}
    run.finish(device=d.device, **summary)
    log(f"UFCs: IPC {args.ipc} -> K={K}, {b['files_per_class']} files/class, {C * len(ids)} images, "
        f"{b['ufcs']} UFCs ({b['image_equivalents']}/{b['budget']} image-equivalents); loss {summary['loss_first']:.3f} -> "
        f"{summary['loss_last']:.3f}; UFC stage {run.record['stages']['ufc']['seconds']:.0f}s; compact "
        f"{storage['compact_bytes'] / 1024:.0f} KB vs written {storage['written_images_bytes'] / 1024:.0f} KB -> {args.out}")

    # --- stage 6: evaluation with validate_fkd.py (UFC:ufc_validation/val_static.py, val_dyn.py) ---
    result = None
    if args.eval:
        import validate_fkd
        common_flags = ["--syn-data-path", args.out, "--dataset", args.dataset, "--protocol", "static",
                        "--teacher", ",".join(archs), "--seed", str(args.seed),
                        "--device", args.device, "--precision", args.precision, "--mean", *map(str, mean), "--std", *map(str, std)]
        common_flags += ["--data-path", args.data_path] if args.data_path else []
        common_flags += ["--teacher-path", args.teacher_path] if args.teacher_path else []
        common_flags += ["--repeats", str(common.eval_repeats(args))] if common.eval_repeats(args) else []
        epochs = args.eval_epochs
        if args.eval_protocol == "dynamic":  # "epochs reduced by a factor of 1/(M+1)" (UFC README)
            common_flags += ["--label-mode", "teacher"]
            if epochs is None:
                preset = {**validate_fkd.DATASET_PRESETS.get(args.dataset, {}).get("static", {}),
                          **validate_fkd.METHOD_PRESETS["infer"].get(args.dataset, {}).get("static", {})}
                epochs = max(1, preset.get("epochs", validate_fkd.PROTOCOLS["static"]["epochs"]) // (M + 1))
        common_flags += ["--epochs", str(epochs)] if epochs else []
        if args.baseline == "random":  # random real images at the nominal IPC: the same image-equivalent budget
            common_flags += ["--baseline", "random", "--baseline-ipc", str(args.ipc)]
        result = validate_fkd.main(common_flags, closing=False, norm_source=f"the teachers' {args.teacher_norm} statistics")
    if d.main:
        print(common.closing_line("infer_ufc", args.dataset, args.ipc, args.out, result, {"teachers": teachers_reused}))
    return result


if __name__ == "__main__":
    common.run_cli(main)
