"""Run every CUDA-only path of the collection once on one GPU, check it, and print one table (under 3 minutes).

  uv run python scripts/gpu_check.py                  # the current CUDA device
  uv run python scripts/gpu_check.py --device cuda:1

What it checks, each on identical inputs: delt.py's recover step and infer_ufc.py's UFC step as CUDA graphs
against the same steps run eagerly, at fp32 and bf16 (and that a graph was captured, with no eager fallback);
common.DeviceAugment's views on the GPU against the CPU's for the same parameters; validate_fkd.py on a tiny
digits set with --augment-on device and loader (both train, the record says which ran, host syncs per
training batch counted with torch.cuda.set_sync_debug_mode); the DD-Ranking export (the teacher's fp32
weights whatever the precision); scripts/bench_recover.py and scripts/bench_train.py at small shapes (they
run and print their figures). A failed check makes the exit status 1. Without CUDA it says so in one line
and exits 0: the CPU paths are covered by `uv run pytest`.
"""
import argparse
import contextlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import delt  # noqa: E402
import infer_ufc  # noqa: E402
import validate_fkd  # noqa: E402

ROWS = []


def row(check, precision, figure, limit, syncs, ok):
    ROWS.append((check, precision, figure, limit, "-" if syncs is None else syncs, "ok" if ok else "FAIL"))
    print(f"{'ok  ' if ok else 'FAIL'} {check} [{precision}] {figure} (limit {limit}; host syncs {ROWS[-1][4]})", flush=True)


@contextlib.contextmanager
def count_syncs():
    """Host syncs (torch.cuda.set_sync_debug_mode("warn")) of the block: box[0] once it ends."""
    box = [0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    box[0] = sum("synchroniz" in str(w.message) for w in seen)


@contextlib.contextmanager
def counting_captures():
    """Counts common.capture_graph calls; resets the process-wide fallback flag first."""
    box, capture = [0], common.capture_graph
    common.StepGraph.failed = False

    def counted(step, device):
        box[0] += 1
        return capture(step, device)

    common.capture_graph = counted
    try:
        yield box
    finally:
        common.capture_graph = capture


def teacher_on(device, precision, arch="resnet18_modified"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        t = common.freeze(common.build_model(arch, 10, 32)).to(device).to(memory_format=torch.channels_last)
    return common.cast_teacher(t, precision, device)


def check_recover(device, precision):
    teacher = teacher_on(device, precision)
    args = argparse.Namespace(lr=0.1, r_bn=0.01, first_bn_multiplier=10.0, crop_schedule="cosine", milestone=1.0,
                              jitter=2, precision=precision)
    x0 = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)).clamp(-1.5, 1.5)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], device=device)
    sched = delt.early_late_schedule(4, 40, 8)  # 5 rounds of 8: active 2, 4, 6, 8, 8 images (the last replays)
    group = torch.tensor(sched["group_of_rank"])[torch.arange(8) % 4]
    out = {}
    for graphs in (False, True):
        hook = common.BNStatsHook(teacher, args.first_bn_multiplier)
        with counting_captures() as captures, count_syncs() as syncs:
            x, rec = delt.early_late_recover(teacher, hook, x0, y, group, sched, args, random.Random(0), (0.5,) * 3,
                                             (0.25,) * 3, device, graphs)
            torch.cuda.synchronize(device)
        hook.remove()
        out[graphs] = (x.float().cpu(), rec, captures[0], syncs[0])
    diff = float((out[True][0] - out[False][0]).abs().max())
    moved = float((out[True][0] - x0).abs().max())
    limit = 1e-3 if precision == "fp32" else 5e-2
    captured = out[True][2] == 4 and not common.StepGraph.failed  # rounds 0-3 captured, round 4 replays round 3's graph
    row("delt recover: graph vs eager", precision, f"max |dx| {diff:.2e}, pixels moved {moved:.2f}, "
        f"{out[True][2]} captures", f"{limit:g}, 4 captures", f"{out[True][3]} per 40 steps",
        diff <= limit and moved > 0.05 and captured)


def check_ufc(device, precision):
    teacher = teacher_on(device, precision)
    args = argparse.Namespace(lr=0.05, augment="crop", jitter=2, iterations=30, first_bn_multiplier=1.0, r_var=1.0,
                              r_bn=0.01, class_chunk=None, precision=precision)
    real = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(device)
    out = {}
    for graph in (False, True):
        with counting_captures() as captures, count_syncs() as syncs:
            u, losses = infer_ufc.optimise_ufc(teacher, real, args, torch.Generator().manual_seed(1), device, graph)
        out[graph] = (u.float().cpu(), losses, captures[0], syncs[0])
    diff = float((out[True][0] - out[False][0]).abs().max())
    limit = 1e-3 if precision == "fp32" else 5e-2
    ok = diff <= limit and out[True][2] == 1 and not common.StepGraph.failed and float(out[True][0].abs().max()) > 0
    row("infer_ufc UFC step: graph vs eager", precision, f"max |du| {diff:.2e}, loss {float(out[True][1][0]):.3f} -> "
        f"{float(out[True][1][-1]):.3f}", f"{limit:g}, 1 capture", f"{out[True][3]} per 30 steps", ok)


def check_device_views(device):
    mean, std = common.DATASETS["digits"].mean, common.DATASETS["digits"].std
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for crop, factor in (("rrc", 1), ("rrc", 2), ("pad", 1)):
        aug = common.DeviceAugment(32, mean, std, crop=crop, factor=factor)
        p = aug.draw(16, 32, 32, torch.Generator().manual_seed(1))
        worst = max(worst, float((aug(images.to(device), None, p).cpu() - aug(images, None, p)).abs().max()))
    row("DeviceAugment views: GPU vs CPU, same parameters", "fp32", f"max |diff| {worst:.2e}", "1e-4", None, worst <= 1e-4)


def check_validator(device, folder):
    for where in ("device", "loader"):
        rec = validate_fkd.main(["--syn-data-path", folder, "--device", device, "--augment-on", where, "--epochs", "4",
                                 "--eval-every", "2", "--out", os.path.join(folder, f"{where}.json")])
        row(f"validate_fkd --augment-on {where}", rec["recipe"]["precision"], f"top-1 {rec['best_mean']:.1f} after 4 "
            f"epochs (chance 10), recorded augment_on {rec['recipe']['augment_on']}", "> 10", None,
            rec["recipe"]["augment_on"] == where and rec["best_mean"] > 10)


def check_training_syncs(device):
    """Host syncs per training batch of common.train_student (online teacher labels, cutmix): the difference
    of a 1-epoch and a 4-epoch run (both evaluate twice) over the extra batches."""
    mean, std = common.DATASETS["digits"].mean, common.DATASETS["digits"].std
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(200) % 10
    precision = common.resolve_precision("auto", device)
    teacher = teacher_on(device, precision, "conv3")
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 3, 32, 32),
                                                                     torch.zeros(20, dtype=torch.long)), batch_size=20)
    for where in ("device", "loader"):
        if where == "device":
            ds = common.DeviceImageSet(images, targets, common.DeviceAugment(32, mean, std, crop="rrc"))
        else:
            ds = validate_fkd.IndexedDataset(images, targets, common.train_transform(32, mean, std, crop="rrc"))
        counts = []
        for epochs in (1, 4):
            cfg = common.TrainConfig(labels="teacher", epochs=epochs, batch_size=50, mix="cutmix", eval_every=10**6,
                                     precision=precision)
            with count_syncs() as syncs:
                common.train_student(common.build_model("conv3", 10, 32), cfg, val, device, train_set=ds, teacher=teacher,
                                     log=lambda *a: None)
            counts.append(syncs[0])
        per_batch = (counts[1] - counts[0]) / (3 * 4)
        limit = 0 if where == "device" else None
        row(f"training step, views on the {where}", precision, f"{counts[0]} syncs in 1 epoch, {counts[1]} in 4",
            "0 per batch" if limit == 0 else "reported", f"{per_batch:.2f} per batch", limit is None or per_batch <= limit)


def check_export(device, folder, tmp):
    out = os.path.join(tmp, "ddranking")
    spec = validate_fkd.main(["--syn-data-path", folder, "--export-ddranking", out, "--device", device])
    state = torch.load(os.path.join(out, "teacher_models", spec["dataset"], spec["teacher_model_name"], "ckpt_best.pt"),
                       weights_only=True)
    ref = validate_fkd.ddranking_state_dict(common.load_teacher("conv3", "digits"), "conv3")
    ok = state.keys() == ref.keys() and all(v.dtype == ref[k].dtype and torch.equal(v, ref[k]) for k, v in state.items())
    row("DD-Ranking export: teacher weights", common.resolve_precision("auto", device),
        f"{len(state)} tensors, all {'equal to the fp32 checkpoint' if ok else 'NOT equal'}", "bitwise", None, ok)


def check_bench(device, script, flags, pattern, what):
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--device", device, *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)
    found = re.findall(pattern, proc.stdout)
    print(proc.stdout, end="", flush=True)
    row(f"{script} at small shapes", "auto", f"{what} {', '.join(found) or 'missing'} ({time.time() - t0:.0f} s)",
        "exit 0", None, proc.returncode == 0 and bool(found))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the CUDA device to check: cuda (the current one; the default) or cuda:N")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch on this machine; nothing to check (the CPU paths are "
              "covered by `uv run pytest`)")
        return 0
    device = common.pick_device(args.device)
    device = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
    torch.cuda.set_device(torch.device(device))
    t0 = time.time()
    print(f"gpu_check on {common.device_name(device)} ({device}, compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}; auto precision = "
          f"{common.resolve_precision('auto', device)}); torch {torch.__version__}")
    deterministic = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # graph vs eager: same kernels
    for precision in ("fp32", "bf16"):
        check_recover(device, precision)
        check_ufc(device, precision)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic
    check_device_views(device)
    with tempfile.TemporaryDirectory() as tmp:
        x, y = common.digits_split("train")
        idx = common.random_subset(y.tolist(), 3, 123)
        folder = os.path.join(tmp, "set")
        run = common.RunDir(folder, argparse.Namespace(method="random", ipc=3, seed=123), common.class_list("digits"),
                            argv=["gpu_check"])
        for c in range(10):
            run.write_class(c, x[idx][y[idx] == c])
        run.finish()
        check_validator(device, folder)
        check_export(device, folder, tmp)
    check_training_syncs(device)
    check_bench(device, "bench_recover.py", ["--arch", "resnet18_modified", "--size", "32", "--classes", "100",
                                             "--batch-size", "20", "--ipc", "10", "--iterations", "40", "--round-itr",
                                             "10", "--steps", "20", "--repeats", "2"], r"speed-up +([\d.]+x)", "speed-up")
    check_bench(device, "bench_train.py", ["--images", "400", "--batch-size", "100", "--epochs", "1"],
                r"(\d+\.\d) % of the limit", "% of the compute-bound limit:")

    widths = [max(len(str(r[i])) for r in ROWS + [("check", "precision", "figure", "limit", "host syncs", "")])
              for i in range(6)]
    print()
    for r in [("check", "precision", "figure", "limit", "host syncs", "status")] + ROWS:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    failed = sum(r[5] != "ok" for r in ROWS)
    print(f"gpu_check: {len(ROWS) - failed}/{len(ROWS)} checks passed in {time.time() - t0:.0f} s on {device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
