"""Throughput of the common training step under each label protocol.

Prints images/s of training (student forward/backward, plus the teacher forward for online labels,
plus the FKD batch rebuild for stored labels), the share of wall time spent waiting on the data
loader, and the fraction of the compute-bound limit: the same step on data already on the device
(random normalised batches, no loader, no augmentation; student forward/backward + AdamW step, plus
the teacher forward for the online-label limit). Views are made per image in loader processes
("loader") or batched on the device from a uint8 copy of the set ("device", common.DeviceAugment).
Random images stand in for a distilled set, so any shape can be timed:

  uv run python scripts/bench_train.py                                  # digits-shaped, ConvNet-3, CPU
  uv run python scripts/bench_train.py --size 224 --classes 1000 --arch resnet18 --images 2000 --batch-size 200 --workers 16
"""
import argparse
import os
import sys
import tempfile

import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import validate_fkd  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="image resolution")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--arch", default="conv3", help="student and teacher architecture")
    p.add_argument("--images", type=int, default=500, help="images in the stand-in set")
    p.add_argument("--batch-size", type=int, default=100, help="batch size")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--augment-on", default="both", choices=("loader", "device", "both"), help="where views are made")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    common.add_precision_arg(p)
    args = common.document_defaults(p).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # cuda:N: streams and syncs act on it
    args.precision = common.resolve_precision(args.precision, device)  # one arithmetic for every call below
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    targets = torch.arange(args.images) % args.classes
    mean, std = common.IMAGENET_MEAN, common.IMAGENET_STD
    teacher = common.freeze(common.build_model(args.arch, args.classes, args.size)).to(device)
    if cuda:
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher = common.cast_teacher(teacher, args.precision, device)
    static = torch.randn(args.images, args.classes)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, args.size, args.size),
                                                                     torch.zeros(8, dtype=torch.long)), batch_size=8)
    print(f"device {common.device_name(device)}, torch threads {torch.get_num_threads()}; {args.arch} at {args.size}px, "
          f"{args.classes} classes, batch {args.batch_size}, {args.workers} workers, precision "
          f"{args.precision}")
    limit = {with_teacher: compute_bound(args, teacher if with_teacher else None, device) for with_teacher in (True, False)}
    print(f"limit   {limit[True]:9.1f} images/s   compute-bound: student fwd+bwd+AdamW + teacher fwd, data on the device")
    print(f"limit   {limit[False]:9.1f} images/s   compute-bound without the teacher (stored/static/hard labels)")
    wheres = ("loader", "device") if args.augment_on == "both" else (args.augment_on,)
    with tempfile.TemporaryDirectory() as tmp:
        common.fkd_generate(images, teacher, tmp, args.epochs + 1, args.batch_size, args.size, mean, std, device=device,
                            precision=args.precision)
        for protocol, labels, mix in (("rded", "teacher", "cutmix"), ("fkd", "fkd", "cutmix"),
                                      ("static", "static", "mixup"), ("hard", "hard", "cutmix")):
            for where in wheres if labels != "fkd" else ("loader",):  # FKD replay rebuilds stored views exactly
                if where == "device":
                    ds = common.DeviceImageSet(images, targets, common.DeviceAugment(args.size, mean, std, crop="rrc"))
                else:
                    ds = validate_fkd.IndexedDataset(images, targets, common.train_transform(args.size, mean, std, crop="rrc"))
                fkd = {"images": images, "dir": tmp, "size": args.size, "mean": mean, "std": std}
                rates = []
                for epochs in (1, args.epochs + 1):  # the difference removes start-up and warm-up costs
                    cfg = common.TrainConfig(labels=labels, epochs=epochs, batch_size=args.batch_size, mix=mix,
                                             eval_every=10**9, workers=args.workers, precision=args.precision)
                    student = common.build_model(args.arch, args.classes, args.size)
                    r = common.train_student(student, cfg, val, device, train_set=ds, teacher=teacher,
                                             static_labels=static, fkd=fkd, log=lambda *a: None)
                    rates.append(r)
                steady = args.images * args.epochs / max(rates[1]["seconds"] - rates[0]["seconds"], 1e-9)
                share = steady / limit[labels == "teacher"]
                print(f"{protocol:7s} {steady:9.1f} images/s   views on {where:6s}  loader wait "
                      f"{100 * rates[1]['data_wait_share']:5.1f} % of wall time   {100 * share:5.1f} % of the limit")


def compute_bound(args, teacher, device, steps=None):
    """images/s of the bare training step on random batches already on the device."""
    cuda = str(device).startswith("cuda")
    student = common.build_model(args.arch, args.classes, args.size).to(device)
    if cuda:
        student = student.to(memory_format=torch.channels_last)
    opt = common.make_optimizer(student, "adamw", 1e-3, 0.01)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cuda else x
    target = torch.randn(args.batch_size, args.classes, device=device)
    steps = steps or max(3, args.epochs * args.images // args.batch_size)

    def run(n):
        for _ in range(n):
            with common.autocast(device, args.precision):
                t = teacher(x) if teacher is not None else target
                loss = common.kd_loss(student(x), t, 20.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize(device)

    run(2)  # warm-up
    t0 = time.perf_counter()
    run(steps)
    return steps * args.batch_size / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
