"""Throughput of the common training step under each label protocol.

Prints images/s of training (student forward/backward, plus the teacher forward for online labels,
plus the FKD batch rebuild for stored labels) and the share of wall time spent waiting on the data
loader. Random images stand in for a distilled set, so any shape can be timed:

  uv run python scripts/bench_train.py                                  # digits-shaped, ConvNet-3, CPU
  uv run python scripts/bench_train.py --size 224 --classes 1000 --arch resnet18 --images 2000 --batch-size 200 --workers 8
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


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
    args = common.document_defaults(p).parse_args()
    device = common.pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    targets = torch.arange(args.images) % args.classes
    mean, std = common.IMAGENET_MEAN, common.IMAGENET_STD
    teacher = common.freeze(common.build_model(args.arch, args.classes, args.size)).to(device)
    static = torch.randn(args.images, args.classes)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, args.size, args.size),
                                                                     torch.zeros(8, dtype=torch.long)), batch_size=8)
    print(f"device {common.device_name(device)}; {args.arch} at {args.size}px, {args.classes} classes, "
          f"batch {args.batch_size}, {args.workers} workers")
    with tempfile.TemporaryDirectory() as tmp:
        common.fkd_generate(images, teacher, tmp, args.epochs + 1, args.batch_size, args.size, mean, std, device=device)
        for protocol, labels, mix in (("rded", "teacher", "cutmix"), ("fkd", "fkd", "cutmix"),
                                      ("static", "static", "mixup"), ("hard", "hard", "cutmix")):
            tf = common.train_transform(args.size, mean, std, crop="rrc")
            ds = common.IndexedDataset(images, targets, tf)
            fkd = {"images": images, "dir": tmp, "size": args.size, "mean": mean, "std": std}
            rates = []
            for epochs in (1, args.epochs + 1):  # the difference removes start-up and warm-up costs
                cfg = common.TrainConfig(labels=labels, epochs=epochs, batch_size=args.batch_size, mix=mix,
                                         eval_every=10**9, workers=args.workers)
                student = common.build_model(args.arch, args.classes, args.size)
                r = common.train_student(student, cfg, val, device, train_set=ds, teacher=teacher,
                                         static_labels=static, fkd=fkd, log=lambda *a: None)
                rates.append(r)
            steady = args.images * args.epochs / max(rates[1]["seconds"] - rates[0]["seconds"], 1e-9)
            print(f"{protocol:7s} {steady:9.1f} images/s   data-loader wait {100 * rates[1]['data_wait_share']:5.1f} % of wall time")


if __name__ == "__main__":
    main()
