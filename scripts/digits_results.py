"""Top-1 against IPC on digits for every method and for random real images, one protocol for all.

For each method and IPC it runs the method's digits recipe (no weights needed: D4M and VLCP use the digits
Stable Diffusion, DM-KD the digits DiT, trained here on first use; with --tiny-models DIR they use the tiny
random generator folders of `uv run python -m tests.tiny_models` instead, whose images are noise), evaluates the set with validate_fkd.py under one
protocol, and prints a markdown table with the device and thread count. It also draws the plot
docs/img/digits_top1_vs_ipc.png (needs the optional extra: `uv sync --extra plots`) and one grid per
method, docs/img/<method>_digits.png (first classes, first images). Every (method, IPC) result is
cached in --work as its set and eval json: rerun the same command to resume, or add --cached-only to print
the table from what is there.

  uv run python scripts/digits_results.py                                  # the full table (hours on 2 cores)
  uv run python scripts/digits_results.py --ipcs 1 --methods random delt --quick   # a minutes-long check
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

METHODS = ("random", "delt", "infer_ufc", "d4m", "vlcp", "dmkd")
LABELS = {"random": "random real", "delt": "DELT", "infer_ufc": "INFER", "d4m": "D4M (digits SD)",
          "vlcp": "VLCP (digits SD, computed captions)", "dmkd": "DM-KD (digits DiT)"}
TINY_LABELS = {"d4m": "D4M (tiny random SD)", "vlcp": "VLCP (tiny random SD + LLaVA)", "dmkd": "DM-KD (tiny random DiT)"}


def method_command(method, ipc, out, tiny, quick):
    """The method's digits recipe as a command line (no evaluation: the protocol is the same for all)."""
    py = [sys.executable]
    if method == "delt":
        return py + ["delt.py", "--ipc", str(ipc), "--out", out, "--no-eval"] + (
            ["--iterations", "20", "--round-itr", "10"] if quick else [])
    if method == "infer_ufc":
        return py + ["infer_ufc.py", "--ipc", str(ipc), "--out", out, "--no-eval"] + (["--iterations", "5"] if quick else [])
    if method in ("d4m", "vlcp", "dmkd") and tiny is None:  # the generators trained here, the scripts' defaults
        return py + {"d4m": ["d4m.py", "--ttm-epochs", "0", "--no-eval"], "vlcp": ["vlcp.py", "--no-eval"],
                     "dmkd": ["dmkd.py", "--stage", "synthesize", "--no-eval"]}[method] + ["--ipc", str(ipc), "--out", out]
    if method == "d4m":
        return py + ["d4m.py", "--model", os.path.join(tiny, "sd"), "--size", "64", "--steps", "4", "--ipc", str(ipc),
                     "--ttm-epochs", "0", "--workers", "0", "--out", out, "--no-eval"]
    if method == "vlcp":
        return py + ["vlcp.py", "--model", os.path.join(tiny, "sd"), "--captioner", os.path.join(tiny, "llava"),
                     "--ipc", str(ipc), "--max-per-class", str(max(ipc, 20)), "--size", "64", "--ft-res", "32",
                     "--caption-max-tokens", "8", "--finetune-epochs", "1", "--ft-batch-size", "4",
                     "--grad-accum", "1", "--ft-max-steps", "2", "--steps", "4", "--workers", "0", "--out", out, "--no-eval"]
    if method == "dmkd":
        return py + ["dmkd.py", "--model", os.path.join(tiny, "dit"), "--steps", "4", "--ipc", str(ipc),
                     "--stage", "synthesize", "--out", out, "--no-eval"]
    raise ValueError(method)


def smallest_infer_ipc(classes=10, teachers=3):
    """INFER needs K = floor(IPC*C/(C+M)) >= 1 real sets (conv3+conv4+conv5 on digits: M = 3)."""
    return -(-(classes + teachers) // classes)


def run(cmd, env, log):
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise common.UserError(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}); see {log}")


def save_grid(folder, path, classes, per_class):
    """A small PNG: the first `per_class` images of the first `classes` classes, one row per class."""
    import torch
    import torchvision
    from PIL import Image
    rows = []
    for c in range(classes):
        d = os.path.join(folder, f"{c:05d}")
        names = sorted(os.listdir(d))[:per_class]
        ims = [torchvision.transforms.functional.pil_to_tensor(Image.open(os.path.join(d, n)).convert("RGB"))
               for n in names]
        ims += [torch.zeros_like(ims[0])] * (per_class - len(ims))
        rows += ims
    grid = torchvision.utils.make_grid(torch.stack(rows).float() / 255, nrow=per_class, padding=2, pad_value=1.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image(torch.nn.functional.interpolate(grid[None], scale_factor=2, mode="nearest")[0], path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods (random = random real)")
    g.add_argument("--ipcs", nargs="+", type=int, default=[1, 10, 50], help="images per class")
    g.add_argument("--quick", action="store_true",
                   help="tiny budgets everywhere (DELT 20 iterations, INFER 5, students 2 epochs): checks the "
                        "script, the figures mean nothing")
    g.add_argument("--work", default="runs/digits_results", help="folder of the sets, eval json and logs (the cache)")
    g.add_argument("--cached-only", action="store_true",
                   help="run nothing: print the table and draw the plot from what --work holds (missing cells: not run)")
    g.add_argument("--tiny-models", default=None,
                   help="D4M, VLCP and DM-KD on the tiny random sd/, dit/, llava/ of `python -m tests.tiny_models DIR` "
                        "(built there if missing) instead of the generators trained here")
    g = p.add_argument_group("evaluation (validate_fkd.py, the same for every set)")
    g.add_argument("--protocol", default="rded", choices=("rded", "fkd", "static", "hard"),
                   help="label protocol for every set and for random real")
    g.add_argument("--repeats", type=int, default=3, help="students per set (mean ± population std)")
    g.add_argument("--epochs", type=int, default=None, help="student epochs (default: validate_fkd's digits preset)")
    g = p.add_argument_group("outputs")
    g.add_argument("--plot", default="docs/img/digits_top1_vs_ipc.png", help="the plot ('' for none)")
    g.add_argument("--grids", default="docs/img", help="folder for <method>_digits.png ('' for none)")
    g.add_argument("--grid-ipc", type=int, default=10, help="the IPC whose sets the grids show")
    g.add_argument("--grid-classes", type=int, default=5, help="classes (rows) per grid")
    g.add_argument("--grid-images", type=int, default=6, help="images (columns) per grid")
    args = common.document_defaults(p).parse_args(argv)

    import torch
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tiny = args.tiny_models
    if tiny:
        LABELS.update(TINY_LABELS)
    if tiny and any(m in ("d4m", "vlcp", "dmkd") for m in args.methods) and not os.path.isdir(os.path.join(tiny, "llava")):
        run([sys.executable, "-m", "tests.tiny_models", tiny], env, os.path.join(work, "tiny_models.log"))
    # one recipe for every set and for random real: no method's own evaluation preset (--preset none)
    eval_flags = ["--protocol", args.protocol, "--preset", "none", "--repeats", str(args.repeats)]
    eval_flags += ["--epochs", str(args.epochs or 2)] if (args.epochs or args.quick) else []
    results = {}
    for method in args.methods:
        for ipc in args.ipcs:
            out = os.path.join(work, f"{method}_ipc{ipc}")
            record = out + f"_eval_{args.protocol}.json" if method == "random" else os.path.join(out, f"eval_{args.protocol}.json")
            log = out + ".log"
            if method == "infer_ufc" and ipc < smallest_infer_ipc():
                results[method, ipc] = None  # K = 0 real sets: INFER has no set at this budget
                continue
            if not os.path.isfile(record) and args.cached_only:
                results[method, ipc] = "not run"
                continue
            if not os.path.isfile(record):
                t0 = time.time()
                if method == "random":
                    run([sys.executable, "validate_fkd.py", "--random-real", str(ipc), *eval_flags, "--out", record], env, log)
                else:
                    if not os.path.isfile(os.path.join(out, "run.json")) or \
                            json.load(open(os.path.join(out, "run.json"))).get("status") != "done":
                        run(method_command(method, ipc, out, tiny, args.quick), env, log)
                    run([sys.executable, "validate_fkd.py", "--syn-data-path", out, *eval_flags, "--out", record], env, log)
                print(f"{method} ipc {ipc}: {time.time() - t0:.0f} s", flush=True)
            rec = json.load(open(record))
            files = None if method == "random" else sum(len(os.listdir(os.path.join(out, d))) for d in os.listdir(out)
                                                         if len(d) == 5 and d.isdigit()) // 10
            results[method, ipc] = (rec["best_mean"], rec["best_std"], files)

    device = common.device_name("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\ndigits, protocol {args.protocol}, {args.repeats} student(s) per set, top-1 % (best, mean ± population "
          f"std); device {device}{' (QUICK: figures mean nothing)' if args.quick else ''}\n")
    print("| method | " + " | ".join(f"IPC {i}" for i in args.ipcs) + " |")
    print("|---|" + "---|" * len(args.ipcs))
    for method in args.methods:
        cells = []
        for ipc in args.ipcs:
            r = results[method, ipc]
            cells.append("n/a" if r is None else r if isinstance(r, str) else
                         f"{r[0]:.2f} ± {r[1]:.2f}" + (f" ({r[2]} img/class)" if r[2] and r[2] != ipc else ""))
        print(f"| {LABELS[method]} | " + " | ".join(cells) + " |")

    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("no plot: matplotlib is an optional extra (uv sync --extra plots)")
        else:
            fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
            for method in args.methods:
                pts = [(ipc, results[method, ipc][0]) for ipc in args.ipcs if isinstance(results[method, ipc], tuple)]
                style = dict(color="black", linestyle="--") if method == "random" else {}
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABELS[method], **style)
            ax.set_xscale("log")
            ax.set_xticks(args.ipcs, [str(i) for i in args.ipcs])
            ax.set_xlabel("images per class (IPC)")
            ax.set_ylabel(f"top-1 % ({args.protocol} protocol)")
            ax.set_title("digits, conv3 student" + (" (QUICK)" if args.quick else ""), fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            fig.savefig(args.plot)
            print(f"wrote {args.plot}")
    if args.grids:
        for method in args.methods:
            folder = os.path.join(work, f"{method}_ipc{args.grid_ipc}")
            if method != "random" and os.path.isfile(os.path.join(folder, "classes.json")):
                path = os.path.join(args.grids, f"{method}_digits.png")
                save_grid(folder, path, args.grid_classes, args.grid_images)
                print(f"wrote {path}")


if __name__ == "__main__":
    common.run_cli(main)
