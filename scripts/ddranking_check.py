"""scripts/ddranking_check.py: DD-Ranking 0.2.0 itself beside `validate_fkd.py --preset ddranking`, on one set.

For each mode (S, M): exports the set (`validate_fkd.py --export-ddranking`), runs DD-Ranking's
LabelRobustScoreSoft(**kwargs).compute_metrics(...) from that export in DD-Ranking's own environment, runs our
validator with `--preset ddranking` on the same set, and prints both side by side: soft-label, random, hard-label
and full-data top-1, IOR, HLR and LRS (percentage points, as DD-Ranking computes it), each as mean ± population
std over the repeats. DD-Ranking seeds every repeat from the clock (ddranking/utils/misc.py:9-11), so the two are
compared as distributions: a row is "within spread" when the means differ by no more than the two stds added.

DD-Ranking's environment is made beside ours with uv and its pins (`--env`, default .venv-ddranking; reused when
present): ddranking 0.2.0 requires numpy < 2. Nothing in its installed files is edited: its defects are worked
around from the driver process (monkeypatching; each is printed as it is applied):
  - digits: DD-Ranking 0.2.0 has no such dataset (get_dataset leaves `channel` unbound); the dataset is supplied
    from outside (its train split as an ImageFolder of PNGs, its test split as tensors) and its full-data config
    table gets our digits entry (its CIFAR10-ConvNet-3-BN one);
  - get_random_data_tensors is called without class_map (metrics/soft_label.py:461 against utils/data.py:215:
    "'int' object is not subscriptable"): called with the identity class map;
  - mode S: _generate_soft_labels reads self.teacher_model, which the constructor never sets (soft_label.py:451
    against :158): set to its (single) teacher.
Not part of the test suite (it builds a second environment and trains a few hundred students).

  uv run python scripts/ddranking_check.py --syn-data-path runs/delt_digits_ipc10 --ipc 2 --full-data once --repeats 3
  uv run python scripts/ddranking_check.py --syn-data-path runs/delt_digits_ipc10 --ipc 2 --out DIR --reuse  # table again
The measured table and its settings: docs/validate.md ("Agreement with DD-Ranking itself").
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = ["ddranking==0.2.0", "numpy<2", "torch==2.13.0", "torchvision==0.28.0"]
ROWS = [("soft", "soft-label top-1 (%)"), ("random", "random real top-1 (%)"), ("hard", "hard-label top-1 (%)"),
        ("full", "full-data top-1 (%)"), ("ior", "IOR (pp)"), ("hlr", "HLR (pp)"), ("lrs", "LRS (pp scale)")]


# ----------------------------------------------------------------------------------------------
# the child: runs inside DD-Ranking's environment (stdlib, torch, torchvision, ddranking only)
# ----------------------------------------------------------------------------------------------
def child(spec_path, digits_root, out_path):
    import torch
    import torchvision
    import ddranking
    import ddranking.metrics.soft_label as soft_label
    from ddranking.utils import data as dd_data
    from ddranking.utils import train_and_eval
    kw = json.load(open(spec_path))
    init, call = kw["LabelRobustScoreSoft"], kw["compute_metrics"]
    patches = []
    if init["dataset"] == "digits":
        if not digits_root:
            raise SystemExit("DD-Ranking 0.2.0 has no digits: run this script without --run (it supplies the dataset)")
        stats = json.load(open(os.path.join(digits_root, "stats.json")))
        norm = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                               torchvision.transforms.Normalize(stats["mean"], stats["std"])])

        def get_dataset(dataset, data_path, im_size, use_zca, custom_val_trans, device):
            train = torchvision.datasets.ImageFolder(os.path.join(digits_root, "train"), transform=norm)
            test = torch.load(os.path.join(digits_root, "test.pt"), weights_only=True)
            test = dd_data.TensorDataset(test["images"], test["labels"])
            ident = {c: c for c in range(10)}
            return 3, tuple(im_size or (32, 32)), stats["mean"], stats["std"], 10, train, test, test, ident, ident
        soft_label.get_dataset = get_dataset
        key = f"digits-{init['model_name']}"
        train_and_eval.REAL_DATA_TRAINING_CONFIG[key] = dict(train_and_eval.REAL_DATA_TRAINING_CONFIG["CIFAR10-ConvNet-3-BN"])
        patches.append("dataset 'digits' supplied from outside (DD-Ranking 0.2.0 rejects it: get_dataset leaves 'channel' "
                       f"unbound); full-data config {key} = its CIFAR10-ConvNet-3-BN entry")
    original = dd_data.get_random_data_tensors

    def get_random_data_tensors(dataset_name, dataset, class_to_indices, ipc, eval_iter, saved_path=None):
        return original(dataset_name, dataset, class_to_indices, ipc, {c: c for c in range(len(class_to_indices))},
                        eval_iter, saved_path)
    soft_label.get_random_data_tensors = get_random_data_tensors
    patches.append("get_random_data_tensors called with the identity class_map (0.2.0 omits it: metrics/soft_label.py:461 "
                   "vs utils/data.py:215, \"'int' object is not subscriptable\")")

    metric = soft_label.LabelRobustScoreSoft(**init)
    if init["soft_label_mode"] == "S":
        if len(metric.teacher_models) != 1:
            raise SystemExit("this check exports one teacher")
        metric.teacher_model = metric.teacher_models[0]
        patches.append("mode S: self.teacher_model set to its teacher (0.2.0's _generate_soft_labels reads it, the "
                       "constructor sets only teacher_models: metrics/soft_label.py:451 vs :158)")
    given = json.load(open(os.path.join(os.path.dirname(spec_path), "export.json"))).get("full_data_top1")
    key = f"{init['dataset']}-{init['model_name']}"
    if not init["eval_full_data"] and key not in soft_label.REAL_DATA_ACC_CACHE:  # its path for a known figure (:536-540)
        soft_label.REAL_DATA_ACC_CACHE[key] = given  # the same dict as ddranking.utils.train_and_eval's
        print(f"[ddranking] setting: eval_full_data=False, REAL_DATA_ACC_CACHE[{key!r}] = {given:.2f} (our full-data "
              f"student, trained once with DD-Ranking's full-data recipe)", flush=True)
    for p in patches:
        print(f"[ddranking] workaround: {p}", flush=True)

    args = {k: torch.load(v, weights_only=True) if k in ("image_tensor", "soft_labels") else v for k, v in call.items()}
    record = {"hard": [], "full": [], "soft": [], "random": [], "lr": {"hard": [], "soft": [], "random": []}}

    def wrap(name):
        fn = getattr(metric, name)

        def inner(**kwargs):
            acc, lr = fn(**kwargs)
            if name.startswith("_compute_hard"):
                kind = "full" if kwargs["mode"] == "real" else "hard"
            else:
                kind = "soft" if kwargs["image_tensor"] is args["image_tensor"] else "random"
            record[kind].append(float(acc))
            if kind in record["lr"]:
                record["lr"][kind].append(lr)
            print(f"[ddranking] {kind} top-1 {float(acc):.2f} (lr {lr})", flush=True)
            return acc, lr
        setattr(metric, name, inner)
    wrap("_compute_hard_label_metrics_helper")
    wrap("_compute_soft_label_metrics_helper")
    t0 = time.time()
    res = metric.compute_metrics(**args)
    import csv
    rows = list(csv.DictReader(open(init["save_path"])))
    if not record["full"]:  # eval_full_data=False: the figure it read (soft_label.py:536-540)
        record["full"] = [float(soft_label.REAL_DATA_ACC_CACHE[key])] * len(rows)
    record.update({"ior": [float(r["improvement_over_random"]) for r in rows],
                   "hlr": [float(r["hard_label_recovery"]) for r in rows], "lrs": [float(r["lrs"]) for r in rows],
                   "returned": {k: float(v) for k, v in res.items()}, "seconds": round(time.time() - t0, 1),
                   "workarounds": patches, "ddranking_file": ddranking.__file__, "torch": torch.__version__})
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1)


# ----------------------------------------------------------------------------------------------
# the driver: runs in this project's environment
# ----------------------------------------------------------------------------------------------
def ensure_env(path):
    """DD-Ranking's environment: uv venv + its pins; reused when it already imports ddranking 0.2.0."""
    py = os.path.join(path, "bin", "python")
    probe = [py, "-c", "import importlib.metadata as m; print(m.version('ddranking'), m.version('numpy'), m.version('torch'))"]
    if os.path.isfile(py):
        r = subprocess.run(probe, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.split()[0] == "0.2.0":
            print(f"DD-Ranking environment {path} (reused): ddranking, numpy, torch = {r.stdout.strip()}")
            return py
    uv = shutil.which("uv")
    if not uv:
        raise SystemExit("uv is needed to make DD-Ranking's environment (https://docs.astral.sh/uv/)")
    # --no-config: this project's pyproject.toml pins numpy 2 for its own environment, not for DD-Ranking's
    subprocess.run([uv, "venv", "--no-config", "--allow-existing", path], check=True)
    subprocess.run([uv, "pip", "install", "--no-config", "--python", py, *PINS], check=True)
    r = subprocess.run(probe, capture_output=True, text=True, check=True)
    print(f"DD-Ranking environment {path} (made: {' '.join(PINS)}): ddranking, numpy, torch = {r.stdout.strip()}")
    return py


def write_digits(root):
    """digits for DD-Ranking: the train split as an ImageFolder of PNGs (uint8, as our random subsets are), the
    test split as normalised float tensors (as our test loader), and the statistics."""
    if os.path.isfile(os.path.join(root, "stats.json")):
        return
    sys.path.insert(0, ROOT)
    import torch
    import common
    from PIL import Image
    info = common.dataset_info("digits")
    x, y = common.digits_split("train")
    for i, (img, c) in enumerate(zip((x * 255).round().to(torch.uint8), y.tolist())):
        os.makedirs(os.path.join(root, "train", f"{c:05d}"), exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(root, "train", f"{c:05d}", f"{i:05d}.png"))
    xt, yt = common.digits_split("test")
    torch.save({"images": common.normalize(xt, info.mean, info.std).contiguous(), "labels": yt.long()},
               os.path.join(root, "test.pt"))
    with open(os.path.join(root, "stats.json"), "w") as f:
        json.dump({"mean": list(info.mean), "std": list(info.std)}, f)


def full_data_once(syn, extra, threads):
    """Our full-data student under the ddranking preset's full-data recipe, trained once (cached in $DD_CACHE)."""
    sys.path.insert(0, ROOT)
    import torch
    import common
    import validate_fkd
    torch.set_num_threads(threads)
    args = validate_fkd.build_parser().parse_args(["--syn-data-path", syn, "--preset", "ddranking", *extra])
    method, _ = validate_fkd.choose_preset(args)
    args = validate_fkd.resolve(args, method)
    h = validate_fkd.hard_label_args(args)
    d = common.dist_setup(args.device)
    val = common.real_dataset(h.dataset, h.data_path, "val", validate_fkd.val_transform(h))
    loader = torch.utils.data.DataLoader(val, batch_size=256, num_workers=h.workers)
    full = validate_fkd.full_data_top1(h, loader, d, args.full_epochs or h.epochs)
    print(f"full-data student (once, DD-Ranking's full-data recipe, {args.full_epochs or h.epochs} epochs): top-1 "
          f"{full['top1']:.2f}", flush=True)
    return full["top1"]


def ours(record):
    """Per-repeat figures from our eval json."""
    m = record["metrics"]
    return {"soft": [r["best"] for r in record["runs"]], "random": [r["best"] for r in record["baseline"]["runs"]],
            "hard": [r["best"] for r in m["hard_label"]["runs"]], "full": m["full_data"]["per_repeat"],
            "ior": m["ior"]["per_repeat"], "hlr": m["hlr"]["per_repeat"], "lrs": m["lrs_ddranking_code"]["per_repeat"]}


def stats(v):
    n = len(v)
    mean = sum(v) / n
    return mean, (sum((a - mean) ** 2 for a in v) / n) ** 0.5


def table(mode, theirs, mine):
    lines = [f"mode {mode}: DD-Ranking 0.2.0 vs validate_fkd.py --preset ddranking ({len(theirs['soft'])} vs "
             f"{len(mine['soft'])} repeats; mean ± population std; within spread: |difference| <= std + std)",
             f"| {'figure':22s} | {'DD-Ranking 0.2.0':18s} | {'ours':18s} | difference | within spread |",
             "|---|---|---|---|---|"]
    verdicts = {}
    for key, name in ROWS:
        (a, sa), (b, sb) = stats(theirs[key]), stats(mine[key])
        digits = 4 if key == "lrs" else 2
        ok = abs(a - b) <= sa + sb
        verdicts[key] = ok
        lines.append(f"| {name:22s} | {a:8.{digits}f} ± {sa:.{digits}f} | {b:8.{digits}f} ± {sb:.{digits}f} | "
                     f"{b - a:+.{digits}f} | {'yes' if ok else 'NO'} |")
    for key, name in ROWS:
        lines.append(f"  {name}: DD-Ranking {[round(v, 2) for v in theirs[key]]}  ours {[round(v, 2) for v in mine[key]]}")
    return "\n".join(lines), verdicts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--syn-data-path", help="the set (ImageFolder layout, same IPC per class)")
    p.add_argument("--modes", nargs="+", default=["S", "M"], choices=("S", "M"), help="DD-Ranking soft-label modes to check (default: S M)")
    p.add_argument("--repeats", type=int, default=3, help="repeats on each side (DD-Ranking's num_eval; default 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every student (default: the ddranking preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="syn_batch_size (default: the preset's)")
    p.add_argument("--temperature", type=float, default=None, help="KL temperature (default: the preset's)")
    p.add_argument("--ipc", type=int, default=None, help="use the first K images of every class of the set")
    p.add_argument("--full-data", default="every", choices=("every", "once"),
                   help="every: both sides retrain the full-data student every repeat (DD-Ranking's eval_full_data); "
                        "once: we train it once with DD-Ranking's full-data recipe and both sides take that top-1 "
                        "(its eval_full_data=False path): the full-data row is then equal by construction (default: every)")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads of each run (default 1, for a shared 2-core box)")
    p.add_argument("--env", default=os.path.join(ROOT, ".venv-ddranking"), help="DD-Ranking's environment, made if absent (default: .venv-ddranking in the repository)")
    p.add_argument("--out", default=None, help="work folder (default runs/ddranking_check_<set name>)")
    p.add_argument("--reuse", action="store_true",
                   help="print the table from the results already in --out (ddranking_<mode>.json, ours_<mode>.json) "
                        "instead of running both sides again")
    p.add_argument("--run", default=None, metavar="EXPORT",
                   help="in DD-Ranking's environment: run it on an export (validate_fkd.py --export-ddranking EXPORT) of a "
                        "dataset it supports, with the mode-S workarounds; prints its figures, writes EXPORT/ddranking_result.json")
    p.add_argument("--child", nargs=3, metavar=("KWARGS", "DIGITS", "OUT"), help="internal: the DD-Ranking side of one mode, run by this script in DD-Ranking's environment")
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    if a.run:
        out = os.path.join(a.run, "ddranking_result.json")
        child(os.path.join(a.run, "ddranking.json"), None, out)
        return print(open(out).read())
    if not a.syn_data_path:
        p.error("give --syn-data-path")
    out = os.path.abspath(a.out or os.path.join(ROOT, "runs", "ddranking_check_" + os.path.basename(a.syn_data_path.rstrip("/"))))
    os.makedirs(out, exist_ok=True)
    py = None if a.reuse else ensure_env(a.env)
    extra = [f for k, v in (("--epochs", a.epochs), ("--batch-size", a.batch_size), ("--temperature", a.temperature),
                            ("--ipc", a.ipc)) if v is not None for f in (k, str(v))]
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if a.full_data == "once" and not a.reuse:
        top1 = full_data_once(a.syn_data_path, extra, a.threads)
        extra += ["--full-top1", f"{top1:.4f}"]
    digits = os.path.join(out, "digits")
    reports = []
    for mode in a.modes:
        theirs_json, ours_json = os.path.join(out, f"ddranking_{mode}.json"), os.path.join(out, f"ours_{mode}.json")
        if a.reuse:
            theirs = json.load(open(theirs_json))
            if not theirs["full"]:  # written before the full-data figure was recorded: the one it read
                given = json.load(open(os.path.join(out, f"export_{mode}", "export.json")))["full_data_top1"]
                theirs["full"] = [given] * len(theirs["ior"])
            text, _ = table(mode, theirs, ours(json.load(open(ours_json))))
            reports.append(text)
            continue
        export = os.path.join(out, f"export_{mode}")
        base = [sys.executable, os.path.join(ROOT, "validate_fkd.py"), "--syn-data-path", a.syn_data_path,
                "--ddranking-mode", mode, "--repeats", str(a.repeats), *extra]
        subprocess.run(base + ["--export-ddranking", export], check=True, cwd=ROOT)
        spec = json.load(open(os.path.join(export, "ddranking.json")))
        if spec["LabelRobustScoreSoft"]["dataset"] == "digits":
            write_digits(digits)
        if os.path.exists(spec["LabelRobustScoreSoft"]["save_path"]):
            os.remove(spec["LabelRobustScoreSoft"]["save_path"])
        log = os.path.join(out, f"ddranking_{mode}.log")
        ours_log = os.path.join(out, f"ours_{mode}.log")
        print(f"mode {mode}: DD-Ranking 0.2.0 in {a.env} (log {log}) and validate_fkd.py --preset ddranking (log "
              f"{ours_log}), side by side", flush=True)
        t0 = time.time()
        with open(log, "w") as f, open(ours_log, "w") as g:
            theirs_p = subprocess.Popen([py, os.path.abspath(__file__), "--child", os.path.join(export, "ddranking.json"),
                                         digits, theirs_json], cwd=export, stdout=f, stderr=subprocess.STDOUT)
            ours_p = subprocess.Popen(base + ["--preset", "ddranking", "--out", ours_json], cwd=ROOT, stdout=g,
                                      stderr=subprocess.STDOUT)
            rc = theirs_p.wait(), ours_p.wait()
        with open(log) as f:
            for line in f:
                if line.startswith("[ddranking] workaround") or line.startswith("[ddranking] setting"):
                    print("  " + line.rstrip())
        if rc[0]:
            raise SystemExit(f"DD-Ranking failed (exit {rc[0]}); see {log}")
        if rc[1]:
            raise SystemExit(f"validate_fkd.py failed (exit {rc[1]}); see {ours_log}")
        print(f"  both took {time.time() - t0:.0f} s", flush=True)
        text, verdicts = table(mode, json.load(open(theirs_json)), ours(json.load(open(ours_json))))
        reports.append(text)
        print(text, flush=True)
    print("\n" + "\n\n".join(reports))


if __name__ == "__main__":
    main()
