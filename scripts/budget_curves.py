"""Top-1 against the student's training budget on digits, every method beside random real images, and
each paper's key claim in miniature.

What a method adds on digits depends on how long the student trains: with a few dozen optimiser steps a
set that is easy to fit can win by far, at convergence real images catch up. For each method, IPC,
protocol and number of student epochs this trains --repeats students on the method's digits set and
--repeats on random real subsets at the same IPC, and prints one row with the optimiser steps per
student and both means ± population std.

Protocols: `own` is the method's own evaluation (validate_fkd's --preset auto: DELT rded + RandAugment,
INFER static labels of its three teachers, D4M its stored TTM labels, VLCP rded, DM-KD its KD recipe with
the step milestones scaled to the budget); `hard` is class labels with cutmix (--preset none), which no
teacher helps. Random real under `hard` is the same for every method and is trained once per (IPC, epochs).
INFER has no set at IPC 1 on digits (K = 0 real images): its curve is at IPC 2, its smallest.

--claims adds each paper's ablation under the own protocol at the default budget and a converged one
(--claims-epochs; IPC 10 for DELT, whose EarlyLate needs more images per class than rounds, IPC 2 for INFER,
IPC 1 for the others): DELT's EarlyLate against all-at-T (--no-early-late) and against its selection alone (the
same selected real images, not recovered); D4M's prototypes against random latents of the class through
the same img2img (--kmeans random); VLCP's text prototypes against the plain class name (--text-prompt
class-name); INFER's UFCs against none (its K real images per class with the same static labels); DM-KD's
synthetic images against as many real ones (the random-real row).

The sets are the methods' digits defaults, made with scripts/digits_results.py's commands in --sets (so
both scripts share them; D4M's also get TTM labels for the longest budget); evaluations are cached per
row in --work: rerun the same command to resume or to print the tables. --plot draws
docs/img/digits_budget_curves.png (needs `uv sync --extra plots`).

  uv run python scripts/budget_curves.py --methods delt --ipcs 1 --epochs 10 40    # minutes on 2 CPU cores
  uv run python scripts/budget_curves.py --ipcs 1 --plot --claims                 # docs/results.md (hours)
  uv run python scripts/budget_curves.py --ipcs 10                                # IPC 10 too (many hours)
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import common  # noqa: E402
from digits_results import method_command, smallest_infer_ipc  # noqa: E402

METHODS = ("delt", "infer_ufc", "d4m", "vlcp", "dmkd")
# each paper's ablation: (set variant, extra method flags, what it tests)
VARIANTS = {
    "delt": [("all_at_T", ["--no-early-late"], "EarlyLate vs all-at-T"),
             ("selection", None, "EarlyLate vs its selection alone (no recover)")],
    "d4m": [("random_latents", ["--kmeans", "random"], "prototypes vs random latents, same img2img")],
    "vlcp": [("class_name", ["--text-prompt", "class-name"], "text prototypes vs the plain class name")],
}
# the IPC of each claim: the smallest where the ablation means something (EarlyLate needs more images per class
# than rounds; INFER needs K >= 1), so that the converged budget fits on 2 CPU cores
CLAIM_IPC = {"delt": 10, "infer_ufc": 2, "d4m": 1, "vlcp": 1, "dmkd": 1}
# D4M's own protocol replays TTM labels in batches of 100 (its ttm-batch-size): one optimiser step per epoch at IPC 10,
# half the others' (batch 50), so its IPC-10 curve gets one more budget to reach convergence
LONG_CELL = {("d4m", "own"): 400}
IPC10_EPOCHS = [10, 40, 80]
DMKD_MILESTONES = (2 / 3, 5 / 6)  # validate_fkd's digits DM-KD preset: 30 epochs, drops at 20 and 25


def run(cmd, log):
    """One subprocess, its output appended to `log`; a failure stops the script with the log's name."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise common.UserError(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}); see {log}")


def done(folder):
    path = os.path.join(folder, "run.json")
    return os.path.isfile(path) and json.load(open(path)).get("status") == "done"


def make_set(method, ipc, sets, variant=None, ttm_epochs=0):
    """The method's digits set (digits_results.py's command) or one of its ablations; resumes."""
    out = os.path.join(sets, f"{method}_ipc{ipc}" + (f"_{variant}" if variant else ""))
    flags = dict((v, f) for v, f, _ in VARIANTS.get(method, []))
    if variant == "selection":
        if not done(out):
            selection_set(make_set("delt", ipc, sets), out)
        return out
    cmd = method_command(method, ipc, out, None, False) + (flags[variant] if variant else [])
    if method == "d4m" and ttm_epochs:  # TTM labels for the longest budget (d4m resumes: only the labels are added)
        cmd += ["--ttm-epochs", str(ttm_epochs)]
    ttm_ok = method != "d4m" or not ttm_epochs or (os.path.isfile(common.fkd_path(out, "meta.json")) and
                                                   common.fkd_meta(out)["epochs"] >= ttm_epochs)
    if not done(out) or not ttm_ok:
        t0 = time.time()
        run(cmd, out + ".log")
        print(f"made {out} in {time.time() - t0:.0f} s", flush=True)
    return out


def selection_set(delt_set, out):
    """DELT's stage 1 alone: the images its ranking selects (the same picks as `delt_set`), written unrecovered."""
    import torch
    import delt
    rec = json.load(open(os.path.join(delt_set, "run.json")))
    a = rec["args"]
    classes = common.class_list("digits")
    train = common.real_dataset("digits", None, "train", common.eval_transform("digits", 32, normalize=False))
    targets = [int(t) for t in train.targets]
    counts = torch.bincount(torch.tensor(targets), minlength=len(classes))
    scored = delt.read_ranking(os.path.join(delt_set, "ranking.csv"), classes, targets, None, counts)
    args = argparse.Namespace(method="delt_selection", dataset="digits", ipc=a["ipc"], seed=a["seed"],
                              selection=a["selection"], source=delt_set)
    run_dir = common.RunDir(out, args, classes)
    for c in range(len(classes)):
        picks = delt.select(scored[c], a["ipc"], a["selection"], a["seed"] * 1000003 + c)
        run_dir.write_class(c, common.stack_images(train, picks)[0])
    run_dir.finish()


def evaluate(path, argv, log):
    if not os.path.isfile(path):
        t0 = time.time()
        run([sys.executable, "validate_fkd.py", *argv, "--out", path], log)
        print(f"{os.path.basename(path)}: {time.time() - t0:.0f} s", flush=True)
    with open(path) as f:
        return json.load(f)


def budget_flags(method, protocol, epochs):
    # long budgets are evaluated 10 times (every epochs/10), not every 10 epochs: the test set costs as much as training
    flags = ["--epochs", str(epochs)] + (["--eval-every", str(epochs // 10)] if epochs > 100 else [])
    if protocol == "hard":
        return flags + ["--protocol", "hard", "--preset", "none"]
    if method == "dmkd":  # its step schedule's milestones scale with the budget
        flags += ["--milestones", ",".join(str(max(1, round(epochs * f))) for f in DMKD_MILESTONES)]
    return flags


def row(method, ipc, protocol, epochs, args, variant=None, baseline=True):
    """One (set, protocol, epochs) evaluation; its random-real baseline unless `baseline` is False."""
    ev = os.path.join(args.work, "evals")
    os.makedirs(ev, exist_ok=True)
    name = f"{method}{'_' + variant if variant else ''}_ipc{ipc}_{protocol}_ep{epochs}_r{args.repeats}"
    folder = make_set(method, ipc, args.sets, variant, max(args.epochs + args.claims_epochs) if method == "d4m" else 0)
    argv = ["--syn-data-path", folder, "--repeats", str(args.repeats), *budget_flags(method, protocol, epochs)]
    argv += ["--preset", "delt"] if variant == "selection" and protocol == "own" else []
    with_base = baseline and protocol == "own"
    argv += ["--baseline", "random"] if with_base else []
    name += "" if baseline else "_nobase"
    rec = evaluate(os.path.join(ev, name + ".json"), argv, os.path.join(ev, name + ".log"))
    out = {"method": method, "variant": variant, "ipc": ipc, "protocol": protocol, "label_mode": rec["label_mode"],
           "epochs": epochs, "steps": rec.get("steps"), "distilled": (rec["best_mean"], rec["best_std"]),
           "files": rec.get("images"), "runs": [r["best"] for r in rec["runs"]]}
    if with_base:
        b = rec["baseline"]
        out.update(random=(b["best_mean"], b["best_std"]), random_steps=b.get("steps"), ior=rec["metrics"]["ior"]["mean"])
    elif baseline:  # hard: one random-real evaluation per (IPC, epochs), shared by every method
        name = f"random_ipc{ipc}_hard_ep{epochs}_r{args.repeats}"
        b = evaluate(os.path.join(ev, name + ".json"), ["--random-real", str(ipc), "--repeats", str(args.repeats),
                                                        *budget_flags(method, protocol, epochs)], os.path.join(ev, name + ".log"))
        out.update(random=(b["best_mean"], b["best_std"]), random_steps=b.get("steps"),
                   ior=sum(x - y for x, y in zip(out["runs"], [r["best"] for r in b["runs"]])) / len(b["runs"]))
    return out


def fmt(m):
    return f"{m[0]:.2f} ± {m[1]:.2f}"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    # one row for the smallest sets (IPC 1, INFER's IPC 2), one for IPC 10, ...
    keys = sorted({(r["method"], r["ipc"]) for r in rows}, key=lambda k: (k[1] > smallest_infer_ipc(), k[1] if k[1] > 2 else 0,
                                                                        METHODS.index(k[0])))
    cols = min(5, len(keys))
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(3.2 * cols, 2.9 * -(-len(keys) // cols)), squeeze=False)
    colours = {"own": "tab:blue", "hard": "tab:red"}
    for ax, (m, ipc) in zip(axes.flat, keys):
        for proto in ("own", "hard"):
            rs = sorted((r for r in rows if (r["method"], r["ipc"], r["protocol"]) == (m, ipc, proto)), key=lambda r: r["epochs"])
            if not rs:
                continue
            ax.errorbar([r["steps"] for r in rs], [r["distilled"][0] for r in rs], yerr=[r["distilled"][1] for r in rs],
                        fmt="o-", color=colours[proto], capsize=2, label=f"{m}, {proto}")
            ax.errorbar([r["random_steps"] for r in rs], [r["random"][0] for r in rs], yerr=[r["random"][1] for r in rs],
                        fmt="s--", color=colours[proto], alpha=0.6, capsize=2, label=f"random real, {proto}")
        ax.set_xscale("log")
        ax.set_xlim(7, 600)
        ax.set_xticks([10, 20, 50, 100, 200, 400])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 100)
        ax.set_title(f"{m}, IPC {ipc}", fontsize=9)
        ax.set_xlabel("optimiser steps per student", fontsize=8)
        ax.set_ylabel("top-1 % (digits test)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods")
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10], help="IPCs (INFER needs IPC >= 2 on digits)")
    p.add_argument("--protocols", nargs="+", default=["own", "hard"], choices=("own", "hard"),
                   help="own: the method's evaluation preset; hard: class labels with cutmix, --preset none")
    p.add_argument("--epochs", nargs="+", type=int, default=[10, 40, 400], help="student epochs at IPC 1")
    p.add_argument("--epochs-ipc10", nargs="+", type=int, default=None,
                   help=f"student epochs at every IPC above 1 (an epoch there is more optimiser steps); default "
                        f"{IPC10_EPOCHS}, and 400 more for D4M's own protocol (its TTM batch of 100 is one step per epoch)")
    p.add_argument("--claims", action="store_true", help="also each paper's ablation (see the header)")
    p.add_argument("--claims-epochs", nargs="+", type=int, default=[40, 400],
                   help="the default student budget and a converged one, at IPC 1 and 2")
    p.add_argument("--claims-epochs-ipc10", nargs="+", type=int, default=[40, 80],
                   help="the default student budget and a converged one, at IPC 10 (DELT)")
    p.add_argument("--repeats", type=int, default=3, help="students per cell, for the set and for random real")
    p.add_argument("--sets", default=os.path.join("runs", "digits_results"), help="the methods' sets (shared with digits_results.py)")
    p.add_argument("--work", default=os.path.join("runs", "budget_curves"), help="cached evaluations and their logs")
    p.add_argument("--plot", action="store_true", help="draw docs/img/digits_budget_curves.png")
    args = common.document_defaults(p).parse_args(argv)
    import torch
    args.sets, args.work = os.path.abspath(args.sets), os.path.abspath(args.work)
    os.makedirs(args.sets, exist_ok=True)
    rows = []
    for ipc in args.ipcs:
        for m in args.methods:
            ipc_m = ipc
            if m == "infer_ufc" and ipc < smallest_infer_ipc():  # K = 0: INFER at its smallest IPC
                ipc_m = smallest_infer_ipc()
            for proto in args.protocols:
                long = [LONG_CELL[m, proto]] if ipc > 1 and (m, proto) in LONG_CELL and args.epochs_ipc10 is None else []
                for e in (args.epochs if ipc == 1 else (args.epochs_ipc10 or IPC10_EPOCHS) + long):
                    rows.append(row(m, ipc_m, proto, e, args))
    device = f"cpu, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"\ndigits, conv3 students and teacher, {args.repeats} students per cell, best top-1 % (mean ± population std); "
          f"IOR = distilled - random real, paired by repeat; {device}\n")
    print("| method | IPC | protocol | epochs | optimiser steps (set / random) | distilled | random real | IOR |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ipc']} | {r['protocol']} ({r['label_mode']} labels) | {r['epochs']} | {r['steps']} / "
              f"{r['random_steps']} | {fmt(r['distilled'])} | {fmt(r['random'])} | {r['ior']:+.2f} |")
    if args.plot and rows:
        plot(rows, os.path.join(ROOT, "docs", "img", "digits_budget_curves.png"))
    if not args.claims:
        return rows
    claims = []
    for m in args.methods:
        ipc = CLAIM_IPC[m]
        for e in (args.claims_epochs if ipc <= 2 else args.claims_epochs_ipc10):
            full = row(m, ipc, "own", e, args, baseline=m != "delt")  # these share the curves' cells
            if m == "infer_ufc":  # none: K random real images per class with the same ensemble's static labels
                rec = json.load(open(os.path.join(args.sets, f"infer_ufc_ipc{ipc}", "run.json")))
                k, name = rec["budget"]["K"], f"random_ipc{rec['budget']['K']}_infer_ep{e}_r{args.repeats}"
                none = evaluate(os.path.join(args.work, "evals", name + ".json"),
                                ["--random-real", str(k), "--preset", "infer", "--teacher", ",".join(rec["teachers"]),
                                 "--repeats", str(args.repeats), *budget_flags(m, "own", e)],
                                os.path.join(args.work, "evals", name + ".log"))
                claims.append((m, ipc, e, "UFCs vs none: its K real images, same labels", full,
                               (none["best_mean"], none["best_std"]), f"{k} real/class", none.get("steps")))
            elif m == "dmkd":
                claims.append((m, ipc, e, "synthetic vs as many real images", full, full["random"], "random real",
                               full["random_steps"]))
            for variant, _, what in VARIANTS.get(m, []):
                ab = row(m, ipc, "own", e, args, variant=variant, baseline=False)
                claims.append((m, ipc, e, what, full, ab["distilled"], variant.replace("_", " "), ab["steps"]))
    print(f"\neach paper's claim in miniature on digits, own protocol, {args.repeats} students each, best top-1 % "
          f"(mean ± population std); {device}\n")
    print("| method | IPC | claim | epochs | the method's set (steps) | ablation (steps) | difference |")
    print("|---|---|---|---|---|---|---|")
    for m, ipc, e, what, full, ab, label, ab_steps in claims:
        print(f"| {m} | {ipc} | {what} | {e} | {fmt(full['distilled'])} ({full['steps']}) | {label}: {fmt(ab)} "
              f"({ab_steps}) | {full['distilled'][0] - ab[0]:+.2f} |")
    return rows, claims


if __name__ == "__main__":
    common.run_cli(main)
