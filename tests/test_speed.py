"""The fast paths compute what the plain ones do: the recover and UFC steps (device-side views,
fused BN statistics, tensor-LR Adam; replayed as CUDA graphs on a GPU) against eager references
written here; bf16 weights cast once against autocast; the batched device augmentation against the
per-image torchvision path, in distribution (parameters, fixed seeds) and in pixels (same
parameters); bench_recover.py runs on the CPU and prints its figures."""
import argparse
import math
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T1
import torchvision.transforms.v2.functional as TF
from scipy import stats

import common
import delt
import infer_ufc
from conftest import ROOT


def random_teacher(arch="conv3", size=32, seed=0):
    """A frozen network with non-trivial BN running statistics (the BN loss is then not ~0)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = common.build_model(arch, 10, size)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return common.freeze(model)


class ReferenceBNHook:
    """The official BNFeatureHook: per BN layer, mean and (biased) variance as two separate
    reductions, ||var - running_var||_2 + ||mean - running_mean||_2; first layer x first_bn_multiplier."""

    def __init__(self, model, first=10.0):
        self.bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.r = [None] * len(self.bns)
        self.handles = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(self.bns)]
        self.first = first

    def _hook(self, i):
        def hook(module, inputs, output):
            x = inputs[0]
            mean = x.mean([0, 2, 3])
            var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
            self.r[i] = torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2)
        return hook

    def loss(self):
        return sum((self.first if i == 0 else 1.0) * r for i, r in enumerate(self.r))

    def remove(self):
        for h in self.handles:
            h.remove()


def eager_view(x, view):
    """The plain batch-shared view: slice + F.interpolate, flip, torch.roll (the official transforms)."""
    i, j, h, w, flip, dy, dx = (int(v) for v in view)
    s = x.shape[-1]
    if (h, w) != (s, s):
        x = F.interpolate(x[:, :, i:i + h, j:j + w], size=(s, s), mode="bilinear", align_corners=False)
    if flip:
        x = x.flip(-1)
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


# ------------------------------------------------------------------------------ recover / UFC steps
def test_fused_bn_statistics_equal_per_layer_hook_reference():
    model = random_teacher("resnet18_modified", 16)  # 20 BN layers, downsample BNs included
    x = torch.randn(4, 3, 16, 16)
    ref, fused = ReferenceBNHook(model), common.BNStatsHook(model, first_bn_multiplier=10.0)
    model(x)
    expected, got = ref.loss(), fused.loss()
    assert len(fused.bns) == 20 and all(r is not None for r in ref.r)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    ref.remove()
    fused.remove()


def test_recover_step_loss_gradient_and_trajectory_equal_eager_step():
    teacher = random_teacher()
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 3, 32, 32, generator=g).clamp(-1.4, 1.4)
    y = torch.arange(8) % 10
    active = torch.tensor([0, 2, 3, 5, 6])
    args = argparse.Namespace(crop_schedule="cosine", milestone=1.0, jitter=4, lr=0.1, r_bn=0.01)
    steps, total = 3, 10
    views = delt.draw_views(random.Random(0), total, 32, args)
    assert views[:, 2].min() < 32 and views[:, 4].sum() > 0  # real crops and at least one flip in the table
    lrs = torch.tensor([0.5 * args.lr * (1 + math.cos(math.pi * t / total)) for t in range(total)])
    lo = torch.tensor([(0 - m) / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)

    # eager: the official loop's arithmetic, one Adam with a float LR set every step
    xe = x0.clone().requires_grad_(True)
    opt_e = torch.optim.Adam([xe], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
    ref = ReferenceBNHook(teacher)
    eager = []
    for t in range(steps):
        opt_e.param_groups[0]["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * t / total))
        logits = teacher(eager_view(xe[active], views[t]))
        ce, bn = F.cross_entropy(logits, y[active]), ref.loss()
        opt_e.zero_grad()
        (ce + args.r_bn * bn).backward()
        eager.append((ce.item(), bn.item(), xe.grad.clone()))
        opt_e.step()
        with torch.no_grad():
            for c in range(3):
                xe[:, c].clamp_(lo.flatten()[c], hi.flatten()[c])
    ref.remove()

    # fast: delt.recover_step, as replayed on CUDA
    hook = common.BNStatsHook(teacher)
    xf = x0.clone().requires_grad_(True)
    opt_f = torch.optim.Adam([xf], lr=torch.tensor(args.lr), betas=(0.5, 0.9), eps=1e-8)
    t = torch.zeros(1, dtype=torch.long)
    trace = torch.zeros(total, 2)
    for k in range(steps):
        delt.recover_step(teacher, hook, xf, opt_f, active, y[active], t, views, lrs, args.r_bn, lo, hi, trace, "fp32")
        ce, bn, grad = eager[k]
        assert trace[k, 0].item() == pytest.approx(ce, rel=1e-5) and trace[k, 1].item() == pytest.approx(bn, rel=1e-5)
        assert torch.allclose(xf.grad, grad, rtol=1e-4, atol=1e-7)
    hook.remove()
    assert int(t) == steps
    # Adam divides by sqrt(v): float-rounding differences of ~1e-7 in a gradient give ~1e-5 in a step of ~lr
    assert torch.allclose(xf.detach(), xe.detach(), atol=1e-4)
    inactive = torch.tensor([1, 4, 7])
    assert torch.equal(xf.detach()[inactive], x0[inactive])  # zero gradient: inactive rows never move


def test_ufc_step_equals_eager_step():
    teacher = random_teacher("conv3", 32, seed=3)
    g = torch.Generator().manual_seed(2)
    real = torch.randn(10, 3, 32, 32, generator=g)
    args = argparse.Namespace(augment="crop", jitter=3, iterations=4, lr=0.25, r_bn=1.0, precision="fp32")
    views = infer_ufc.view_table("crop", 32, 3, torch.Generator().manual_seed(5), args.iterations)
    # the same stream as draw_view called step by step
    g2 = torch.Generator().manual_seed(5)
    first = infer_ufc.draw_view("crop", 32, 3, g2)
    assert views[0].tolist() == [*map(float, first["box"]), float(first["flip"]), *map(float, first["roll"])]
    lrs = torch.tensor([0.5 * args.lr * (1 + math.cos(math.pi * t / args.iterations)) for t in range(args.iterations)])
    targets = torch.arange(10)
    # eager: chunks of 4, 4, 2 with accumulated gradients, as optimise_ufc's loop
    ue = torch.zeros(1, 3, 32, 32, requires_grad=True)
    opt_e = torch.optim.Adam([ue], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
    ref = ReferenceBNHook(teacher)
    eager = []
    for t in range(2):
        opt_e.param_groups[0]["lr"] = float(lrs[t])
        opt_e.zero_grad()
        total = 0.0
        for lo in range(0, 10, 4):
            x = eager_view(real[lo:lo + 4] + ue, views[t])
            loss = F.cross_entropy(teacher(x), targets[lo:lo + 4], reduction="sum") / 10 + args.r_bn * ref.loss() * len(x) / 10
            loss.backward()
            total += loss.item()
        eager.append((total, ue.grad.clone()))
        opt_e.step()
    ref.remove()
    hook = common.BNStatsHook(teacher)
    uf = torch.zeros(1, 3, 32, 32, requires_grad=True)
    opt_f = torch.optim.Adam([uf], lr=torch.tensor(args.lr), betas=(0.5, 0.9), eps=1e-8)
    t, losses = torch.zeros(1, dtype=torch.long), torch.zeros(args.iterations)
    for k in range(2):
        infer_ufc.ufc_step(teacher, hook, uf, opt_f, real, targets, 4, t, views, lrs, args.r_bn, losses, "fp32")
        assert losses[k].item() == pytest.approx(eager[k][0], rel=1e-5)
        assert torch.allclose(uf.grad, eager[k][1], rtol=1e-4, atol=1e-7)
    hook.remove()
    assert torch.allclose(uf.detach(), ue.detach(), atol=1e-6)


def test_bf16_weights_cast_once_equal_autocast_casts():
    teacher = random_teacher("conv3")
    cast = common.cast_teacher(random_teacher("conv3"), "bf16", "cpu")
    assert cast.features[0].weight.dtype == torch.bfloat16 and cast.features[1].running_var.dtype == torch.float32
    x = torch.randn(4, 3, 32, 32)
    with common.autocast("cpu", "bf16"):
        a, b = teacher(x), cast(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert common.cast_teacher(teacher, "fp32", "cpu").features[0].weight.dtype == torch.float32
    assert common.resolve_precision("auto", "cpu") == "fp32"  # CUDA: tests/test_gpu_path.py (capability mocked)


# ------------------------------------------------------------------------------ batched augmentation
def test_resize_weights_equal_torchvision_resized_crop():
    x = torch.rand(2, 3, 40, 40)
    for (i, j, h, w, flip) in [(3, 5, 20, 17, True), (0, 0, 40, 40, False), (2, 1, 38, 31, False), (10, 0, 7, 39, True)]:
        for out in (32, 40, 48):  # shrinking (antialiased), same size, enlarging
            ref = TF.resized_crop(x, i, j, h, w, [out, out], antialias=True)
            ref = ref.flip(-1) if flip else ref
            wy = common.resize_weights(torch.tensor(i), torch.tensor(h), 40, out)
            wx = common.resize_weights(torch.tensor(j), torch.tensor(w), 40, out, flip=torch.tensor(flip))
            assert torch.allclose(common.apply_views(x, wy, wx), ref, atol=2e-6)


def reference_view(img, p, n, aug, mean, std):
    """The per-image path of common.train_transform with the parameters of image n given."""
    x = img.float() / 255
    if aug.factor > 1:  # ShufflePatches: strips of tensor_split, taken in the drawn order
        for dim, key in ((-1, "perm_x"), (-2, "perm_y")):
            strips = torch.tensor_split(x, aug.factor, dim=dim)
            x = torch.cat([strips[k] for k in p[key][n].tolist()], dim=dim)
    if aug.crop == "rrc":
        top, left, h, w = p["box"][n].tolist()
        x = TF.resized_crop(x, top, left, h, w, [aug.size, aug.size], antialias=True)
    else:
        x = TF.resize(x, [aug.size, aug.size], antialias=True)
        x = TF.crop(TF.pad(x, [aug.pad]), *p["offset"][n].tolist(), aug.size, aug.size)
    x = x.flip(-1) if p["flip"][n] else x
    return TF.normalize(x, list(mean), list(std))


@pytest.mark.parametrize("crop,factor,src", [("rrc", 1, 32), ("rrc", 3, 40), ("pad", 2, 32), ("pad", 1, 40)])
def test_device_augment_same_pixels_as_per_image_path(crop, factor, src):
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    aug = common.DeviceAugment(32, mean, std, crop=crop, min_scale=0.3, factor=factor, pad=4)
    images = torch.randint(0, 256, (6, 3, src, src), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = aug.draw(6, src, src, torch.Generator().manual_seed(1))
    got = aug(images, None, params=p)
    ref = torch.stack([reference_view(images[n], p, n, aug, mean, std) for n in range(6)])
    assert got.shape == (6, 3, 32, 32) and torch.allclose(got, ref, atol=1e-5)


def ks(a, b):
    return stats.ks_2samp(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).pvalue


# Fixed seeds make every p-value below deterministic. Under "same distribution" p is uniform, so
# p > 1e-3 holds for a random seed with probability 0.999; the "power" lines show that a small
# change of the distribution (RandomResizedCrop scale 0.08 -> 0.2) gives p < 1e-6 at these sizes.
def test_batched_crop_boxes_and_flips_follow_the_per_image_distribution():
    n, h, w = 4000, 40, 40
    torch.manual_seed(0)  # torchvision's get_params draws from the global generator
    ref = np.array([T1.RandomResizedCrop.get_params(torch.zeros(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    got = common.draw_rrc_boxes(n, h, w, torch.Generator().manual_seed(1)).numpy()
    area_r, area_g = ref[:, 2] * ref[:, 3], got[:, 2] * got[:, 3]
    for k in range(4):  # top, left, height, width
        assert ks(ref[:, k], got[:, k]) > 1e-3
    assert ks(area_r, area_g) > 1e-3
    assert ks(ref[:, 0] + ref[:, 2] / 2, got[:, 0] + got[:, 2] / 2) > 1e-3  # crop centres
    assert (got[:, 0] + got[:, 2] <= h).all() and (got[:, 1] + got[:, 3] <= w).all() and (got[:, 2:] > 0).all()
    other = common.draw_rrc_boxes(n, h, w, torch.Generator().manual_seed(2), scale=(0.2, 1.0)).numpy()
    assert ks(area_r, other[:, 2] * other[:, 3]) < 1e-6  # power
    # flips: Bernoulli(1/2) per image; |k - n/2| < 4 sd
    flips = common.DeviceAugment(32, (0.5,) * 3, (0.5,) * 3).draw(n, h, w, torch.Generator().manual_seed(3))["flip"]
    assert abs(int(flips.sum()) - n / 2) < 4 * math.sqrt(n / 4)


def test_batched_pad_offsets_and_patch_orders_follow_the_per_image_distribution():
    n = 3000
    aug = common.DeviceAugment(32, (0.5,) * 3, (0.5,) * 3, crop="pad", factor=3, pad=4)
    p = aug.draw(n, 32, 32, torch.Generator().manual_seed(4))
    torch.manual_seed(5)  # per image: RandomCrop(32, padding=4).get_params on the padded image
    ref = np.array([T1.RandomCrop.get_params(torch.zeros(3, 40, 40), (32, 32)) for _ in range(n)])
    got = p["offset"].numpy()
    for k in range(2):  # 9 categories each: chi-square test of homogeneity of the two samples
        table = np.stack([np.bincount(ref[:, k], minlength=9), np.bincount(got[:, k], minlength=9)])
        assert stats.chi2_contingency(table).pvalue > 1e-3
    # ShufflePatches: common.ShufflePatches (python's random.shuffle) on an image whose pixels are
    # their column index gives the per-image permutation; 3! = 6 orders, compared by chi-square
    random.seed(6)
    cols = torch.arange(32).float().expand(1, 32, 32)
    ref_perm = [tuple(common.ShufflePatches(3)(cols)[0, 0, [0, 11, 22]].long().div(11, rounding_mode="floor").tolist())
                for _ in range(n)]
    got_perm = [tuple(r) for r in p["perm_x"].tolist()]
    orders = sorted(set(ref_perm) | set(got_perm))
    assert len(orders) == 6
    table = np.array([[ref_perm.count(o) for o in orders], [got_perm.count(o) for o in orders]])
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_cutmix_boxes_follow_the_official_rand_bbox_distribution():
    """Mix parameters are batch-level and drawn by common.draw_mix on either path (the device path
    calls it too); checked against an independent numpy CutMix (lam ~ Beta(1,1), side sqrt(1-lam),
    uniform centre, clipped): box area and centre."""
    n, s = 3000, 32
    g = torch.Generator().manual_seed(7)
    got = np.array([common.draw_mix("cutmix", 1.0, 4, s, s, g)["box"] for _ in range(n)])
    rng = np.random.default_rng(8)
    lam = rng.beta(1.0, 1.0, n)
    cut = np.sqrt(1.0 - lam)
    ch, cw = (s * cut).astype(int), (s * cut).astype(int)
    cy, cx = rng.integers(0, s, n), rng.integers(0, s, n)
    ref = np.stack([np.clip(cy - ch // 2, 0, s), np.clip(cy + ch // 2, 0, s), np.clip(cx - cw // 2, 0, s), np.clip(cx + cw // 2, 0, s)], 1)
    area = lambda b: (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])
    assert ks(area(ref), area(got)) > 1e-3
    assert ks(ref[:, 0] + ref[:, 1], got[:, 0] + got[:, 1]) > 1e-3 and ks(ref[:, 2] + ref[:, 3], got[:, 2] + got[:, 3]) > 1e-3


def test_train_student_on_device_set_runs_and_learns():
    """The DeviceImageSet path of train_student end to end on the CPU (what CUDA runs without a loader)."""
    x, y = common.digits_split("train")
    idx = common.random_subset(y, 10, 0, 10)
    images, targets = (x[idx] * 255).round().to(torch.uint8), y[idx]
    mean, std = common.DATASETS["digits"].mean, common.DATASETS["digits"].std
    ds = common.DeviceImageSet(images, targets, common.DeviceAugment(32, mean, std, crop="rrc", min_scale=0.5, flip=False))
    xv, yv = common.digits_split("test")
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(common.normalize(xv, mean, std), yv), batch_size=256)
    cfg = common.TrainConfig(labels="hard", epochs=8, batch_size=20, lr=3e-3, mix="cutmix", eval_every=100, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = common.build_model("conv3", 10, 32)
    res = common.train_student(student, cfg, val, "cpu", train_set=ds)
    assert res["last"] > 30.0  # chance is 10 %; 100 images, 8 epochs
    assert res["data_wait_share"] < 0.5


# ------------------------------------------------------------------------------ benchmark
def test_bench_recover_runs_on_cpu_and_prints_figures():
    proc = subprocess.run([sys.executable, "scripts/bench_recover.py", "--device", "cpu", "--arch", "conv3",
                           "--batch-size", "8", "--size", "32", "--classes", "10", "--iterations", "6", "--steps", "3",
                           "--round-itr", "2", "--ipc", "4", "--threads", "1", "--repeats", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"device cpu .*threads 1", out)
    ours = float(re.search(r"project recover step +([\d.]+) ms/iteration", out).group(1))
    official = float(re.search(r"official SRe2L/DELT loop +([\d.]+) ms/iteration", out).group(1))
    ratio = float(re.search(r"speed-up +([\d.]+)x", out).group(1))
    assert ours > 0 and official > 0 and ratio == pytest.approx(official / ours, rel=0.02, abs=0.01)
    for name in ("project recover step", "official SRe2L/DELT loop"):  # median and spread of the interleaved repeats
        med, lo, hi = map(float, re.search(name + r" +([\d.]+) ms/iteration median \(min ([\d.]+), max ([\d.]+) over 2 "
                                           r"interleaved repeats\)", out).groups())
        assert lo <= med <= hi
    assert re.search(r"load average \(1 min\) [\d.]+ at the start, [\d.]+ at the end", out)
    m = re.search(r"EarlyLate +([\d.]+) s vs all-at-T +([\d.]+) s = ([\d.]+) of the time for ([\d.]+) of the image-iterations", out)
    assert m and float(m.group(4)) == pytest.approx(delt.early_late_schedule(4, 6, 2)["fraction_of_all_at_T"], abs=1e-3)
