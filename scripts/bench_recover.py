"""Speed of the BN-matching recover step: the project's (delt.py) against the official loop.

In one process, at the same shapes: (1) ms/iteration of delt.py's recover step (device-side views,
fused BN statistics, bf16 weights cast once, one CUDA graph per EarlyLate round on CUDA); (2)
ms/iteration of a faithful re-implementation of the official SRe2L/CDA/DELT loop (VILA-Lab/DELT@f2f81ca
recover/recover.py: fp32, torchvision RandomResizedCrop + flip applied to the batch tensor, per-layer
BN forward hooks computing mean and variance, Adam on the pixels, the per-step `loss.item()` and clone
of its "best image" bookkeeping); (3) EarlyLate's wall time against all images for all T under
delt.py's schedule. Each ms/iteration is a difference of two runs (long - short) / (extra steps),
which removes set-up, graph capture and cuDNN's first-shape benchmarking. Random weights: the cost
does not depend on them.

  uv run python scripts/bench_recover.py                       # CUDA: ImageNet ResNet-18, batch 100 at 224 px
  uv run python scripts/bench_recover.py --arch resnet18_modified --size 32 --classes 100   # CIFAR-100 shapes
  uv run python scripts/bench_recover.py --arch resnet18_modified --size 64 --classes 200   # Tiny-ImageNet shapes
  uv run python scripts/bench_recover.py --device cpu          # small CPU shapes (conv3, batch 8, 32 px)
"""
import argparse
import copy
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T1

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import delt  # noqa: E402

CUDA_DEFAULTS = dict(arch="resnet18", size=224, classes=1000, batch_size=100, ipc=10, iterations=1000,
                     round_itr=250, steps=100, repeats=3)  # the ImageNet setting: IPC 10 -> 10 classes per batch
CPU_DEFAULTS = dict(arch="conv3", size=32, classes=10, batch_size=8, ipc=4, iterations=8, round_itr=2, steps=10,
                    repeats=5)


class OfficialBNHook:
    """VILA-Lab/DELT@f2f81ca recover/utils.py BNFeatureHook: mean, then variance of a contiguous copy."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def official_recover(model, hooks, x0, y, iterations, args, mean, std):
    """The official get_images loop for one batch, all images active (fp32, no autocast)."""
    inputs = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([inputs], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
    rescale = [args.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    best_cost = 1e4
    for it in range(iterations):
        min_scale = delt.crop_min_scale(it, iterations, "cosine", 1.0)
        aug = T1.Compose([T1.RandomResizedCrop(x0.shape[-1], scale=(min_scale, 1.0), antialias=True),
                          T1.RandomHorizontalFlip()])
        optimizer.param_groups[0]["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * it / iterations))
        outputs = model(aug(inputs))
        loss_ce = F.cross_entropy(outputs, y)
        loss_bn = sum(h.r_feature * r for h, r in zip(hooks, rescale))
        loss = loss_ce + args.r_bn * loss_bn
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for c in range(3):
                inputs.data[:, c] = torch.clamp(inputs.data[:, c], (0 - mean[c]) / std[c], (1 - mean[c]) / std[c])
        if best_cost > loss.item() or it == 1:  # the official "best image" bookkeeping (a sync per step)
            best_inputs = inputs.data.clone()  # noqa: F841
    return inputs.detach()


def timed(fn, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--arch", default=None, help="teacher architecture (common.ARCHS)")
    p.add_argument("--size", type=int, default=None, help="image resolution")
    p.add_argument("--classes", type=int, default=None, help="classes of the teacher")
    p.add_argument("--batch-size", type=int, default=None, help="images optimised jointly")
    p.add_argument("--ipc", type=int, default=None, help="images per class (sets classes per batch and the EarlyLate groups)")
    p.add_argument("--iterations", type=int, default=None, help="T of the EarlyLate comparison")
    p.add_argument("--round-itr", type=int, default=None, help="EarlyLate round length R")
    p.add_argument("--steps", type=int, default=None, help="extra iterations of the long run of each ms/iteration figure")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats of every timing; medians and min/max are printed (default 5 CPU, 3 CUDA)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="project step without CUDA graphs")
    common.add_precision_arg(p)
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    device = common.pick_device(args.device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # a bare "cuda" is the current device; cuda:N becomes it
    args.precision = common.resolve_precision(args.precision, device)
    cuda = device.startswith("cuda")
    for k, v in (CUDA_DEFAULTS if cuda else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.iterations % args.round_itr or args.batch_size % args.ipc and args.ipc % args.batch_size:
        raise SystemExit("--iterations must be a multiple of --round-itr and --ipc must divide or be a multiple of --batch-size")
    if cuda:
        torch.backends.cudnn.benchmark = True
    rargs = argparse.Namespace(lr=0.25, r_bn=0.01, first_bn_multiplier=10.0, crop_schedule="cosine", milestone=1.0,
                               jitter=0, precision=args.precision)  # DELT's ImageNet-1K script values
    mean, std = common.IMAGENET_MEAN, common.IMAGENET_STD
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fp32_teacher = common.freeze(common.build_model(args.arch, args.classes, args.size)).to(device)
    teacher = copy.deepcopy(fp32_teacher)
    if cuda:
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher = common.cast_teacher(teacher, args.precision, device)
    hook = common.BNStatsHook(teacher, rargs.first_bn_multiplier)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch_size, 3, args.size, args.size, generator=g).clamp(-2, 2).to(device)
    y = (torch.arange(args.batch_size) // args.ipc % args.classes).to(device)
    print(f"device {common.device_name(device)}, torch threads {torch.get_num_threads()}; teacher {args.arch} "
          f"({args.classes} classes), batch {args.batch_size} at {args.size}px, project precision "
          f"{args.precision}, CUDA graphs {'on' if cuda and args.cuda_graph else 'off'}; load average {load0:.2f}")

    def ours(iterations, early_late=False, graphs=args.cuda_graph):
        """delt.py's recover of the batch; with early_late, image i has in-class rank i mod IPC."""
        sched = delt.early_late_schedule(args.ipc, iterations, args.round_itr, early_late)
        grp = torch.tensor(sched["group_of_rank"])[torch.arange(args.batch_size) % args.ipc]
        return timed(lambda: delt.early_late_recover(teacher, hook, x0, y, grp, sched, rargs, random.Random(0),
                                                     mean, std, device, graphs), device)

    def per_iteration(run, short):
        run(short)  # warm-up: cuDNN benchmarks this shape, kernels load
        return (run(short + args.steps) - run(short)) / args.steps * 1000

    short = max(4, args.steps // 5)
    hooks = [OfficialBNHook(m) for m in fp32_teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    runs = {"project recover step": ours,
            "official SRe2L/DELT loop": lambda n: timed(lambda: official_recover(fp32_teacher, hooks, x0, y, n, rargs, mean,
                                                                                std), device)}
    if cuda and args.cuda_graph:
        runs["project step, no CUDA graph"] = lambda n: ours(n, graphs=False)
    for run in runs.values():
        run(short)  # warm-up: cuDNN benchmarks this shape, kernels load
    ms = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that a change of load hits every contender alike
        for name, run in runs.items():
            ms[name].append((run(short + args.steps) - run(short)) / args.steps * 1000)
    for h in hooks:
        h.hook.remove()
    for name, values in ms.items():
        note = " (fp32, torchvision transforms, per-layer hooks)" if name.startswith("official") else ""
        print(f"{name:27s} {statistics.median(values):9.3f} ms/iteration median (min {min(values):.3f}, max "
              f"{max(values):.3f} over {args.repeats} interleaved repeats){note}")
    ours_ms, official_ms = ms["project recover step"], ms["official SRe2L/DELT loop"]
    paired = [o / p for o, p in zip(official_ms, ours_ms)]
    print(f"speed-up                   {statistics.median(official_ms) / statistics.median(ours_ms):9.2f}x "
          f"(ratio of the medians; per repeat {min(paired):.2f}x to {max(paired):.2f}x)")

    sched = delt.early_late_schedule(args.ipc, args.iterations, args.round_itr)
    t_cold = ours(args.iterations, early_late=True)  # first run: cuDNN meets each active-set size once
    t_el, t_all = [], []
    for _ in range(args.repeats):
        t_el.append(ours(args.iterations, early_late=True))
        t_all.append(ours(args.iterations))
    el, al = statistics.median(t_el), statistics.median(t_all)
    print(f"EarlyLate {el:9.3f} s vs all-at-T {al:9.3f} s = {el / al:.3f} of the time for "
          f"{sched['fraction_of_all_at_T']:.3f} of the image-iterations (IPC {args.ipc}, T {args.iterations}, "
          f"rounds of {args.round_itr}; groups {sched['group_sizes']}; medians of {args.repeats})")
    print(f"EarlyLate first run {t_cold:9.3f} s (includes cuDNN's one-time algorithm search for each new active-set "
          f"size; cached for the process)")
    print(f"load average (1 min) {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end, {os.cpu_count()} cores")
    hook.remove()


if __name__ == "__main__":
    main()
