"""Top-1 against the student's training budget on digits: a distilled set beside random real images.

What a method adds on digits depends on how long the student trains: with a few dozen optimiser steps
a set that is easy to fit can win by far, at convergence real images catch up. For each method, IPC,
protocol and number of student epochs this trains --repeats students on the method's digits set and on
random real subsets at the same IPC (validate_fkd.py --baseline random), and prints one row with the
optimiser steps per student and both means ± population std. Protocols: `own` is the method's own
evaluation (validate_fkd's --preset auto: DELT = rded + RandAugment, INFER = static labels), `hard` is
class labels with cutmix (--preset none), which no teacher helps. Results are cached per row in --work
(rerun to resume); --plot draws docs/img/digits_budget_curves.png (needs `uv sync --extra plots`).

  uv run python scripts/budget_curves.py --methods delt --ipcs 1            # minutes on 2 CPU cores
  uv run python scripts/budget_curves.py --methods delt infer_ufc --ipcs 1 10 --plot
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


def make_set(method, ipc, work):
    """The method's digits set at `ipc` (its default recipe, no evaluation); resumes."""
    out = os.path.join(work, f"{method}_ipc{ipc}")
    if method == "delt":
        import delt
        delt.main(["--ipc", str(ipc), "--out", out, "--no-eval"])
    elif method == "infer_ufc":
        import infer_ufc
        infer_ufc.main(["--ipc", str(ipc), "--out", out, "--no-eval"])
    else:
        raise common.UserError(f"--methods: delt or infer_ufc, not {method}")
    return out


def row(method, ipc, protocol, epochs, repeats, work):
    """One (set, protocol, epochs) evaluation with its random-real baseline, cached as json."""
    path = os.path.join(work, "evals", f"{method}_ipc{ipc}_{protocol}_ep{epochs}_r{repeats}.json")
    if not os.path.isfile(path):
        import validate_fkd
        argv = ["--syn-data-path", make_set(method, ipc, work), "--epochs", str(epochs), "--repeats", str(repeats),
                "--baseline", "random", "--baseline-ipc", str(ipc), "--out", path]
        argv += ["--protocol", "hard", "--preset", "none"] if protocol == "hard" else []
        validate_fkd.main(argv, closing=False)
    with open(path) as f:
        rec = json.load(f)
    b = rec["baseline"]
    return {"method": method, "ipc": ipc, "protocol": protocol, "label_mode": rec["label_mode"], "epochs": epochs,
            "steps": rec.get("steps"), "random_steps": b.get("steps"), "distilled": (rec["best_mean"], rec["best_std"]),
            "random": (b["best_mean"], b["best_std"]), "ior": rec["metrics"]["ior"]["mean"]}


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["method"], r["ipc"], r["protocol"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, (m, ipc, proto) in zip(axes[0], keys):
        rs = sorted((r for r in rows if (r["method"], r["ipc"], r["protocol"]) == (m, ipc, proto)), key=lambda r: r["epochs"])
        for what, style in (("distilled", "o-"), ("random", "s--")):
            x = [r["steps"] if what == "distilled" else r["random_steps"] for r in rs]
            ax.errorbar(x, [r[what][0] for r in rs], yerr=[r[what][1] for r in rs], fmt=style, capsize=3,
                        label=m if what == "distilled" else "random real")
        ax.set_xscale("log")
        ax.set_title(f"{m}, IPC {ipc}, {proto}", fontsize=9)
        ax.set_xlabel("optimiser steps per student")
        ax.set_ylabel("top-1 % (digits test)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["delt"], help="delt and/or infer_ufc")
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10], help="IPCs (INFER needs IPC >= 2)")
    p.add_argument("--protocols", nargs="+", default=["own", "hard"], choices=("own", "hard"),
                   help="own: the method's evaluation preset; hard: class labels with cutmix, --preset none")
    p.add_argument("--epochs", nargs="+", type=int, default=[10, 40, 100, 400], help="student epochs, one row each")
    p.add_argument("--repeats", type=int, default=3, help="students per row, for the set and for random real")
    p.add_argument("--work", default=os.path.join("runs", "budget_curves"), help="sets and cached evaluations")
    p.add_argument("--plot", action="store_true", help="draw docs/img/digits_budget_curves.png")
    args = common.document_defaults(p).parse_args(argv)
    import torch
    rows = [row(m, ipc, proto, e, args.repeats, args.work) for m in args.methods for ipc in args.ipcs
            for proto in args.protocols for e in args.epochs]
    print(f"digits, students conv3 (teacher conv3), {args.repeats} students per cell, best top-1 mean ± population std; "
          f"device cpu, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print("| method | IPC | protocol | epochs | optimiser steps (set / random) | distilled | random real | IOR |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ipc']} | {r['protocol']} ({r['label_mode']} labels) | {r['epochs']} | {r['steps']} / "
              f"{r['random_steps']} | {r['distilled'][0]:.2f} ± {r['distilled'][1]:.2f} | {r['random'][0]:.2f} ± "
              f"{r['random'][1]:.2f} | {r['ior']:+.2f} |")
    if args.plot:
        plot(rows, os.path.join(ROOT, "docs", "img", "digits_budget_curves.png"))


if __name__ == "__main__":
    common.run_cli(main)
