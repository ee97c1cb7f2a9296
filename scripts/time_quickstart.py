"""Wall time of the README's quick-start commands, with the device, thread and core count.

Runs each command as a new user would (a fresh, empty $DD_CACHE unless --keep-cache, so the digits
teacher is trained too), prints its last output line and its wall time. The README's figures come
from this script; rerun it when the code they measure changes.

  uv run python scripts/time_quickstart.py                        # `uv run python delt.py` (minutes)
  uv run python scripts/time_quickstart.py --also infer_ufc.py     # and `uv run python infer_ufc.py` (fresh cache each)
  uv run python scripts/time_quickstart.py --suite                # also `uv run pytest -q` (about 10 minutes or more)
  uv run python scripts/time_quickstart.py --help-times --no-delt  # `<script> --help` against `import torch` alone
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


SCRIPTS = ("delt.py", "infer_ufc.py", "d4m.py", "vlcp.py", "dmkd.py", "validate_fkd.py")


def timed(cmd):
    """Wall seconds of one run of `cmd` (output discarded; a failure stops the script)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="store_true", help="also time the whole test suite (`uv run pytest -q`)")
    p.add_argument("--keep-cache", action="store_true",
                   help="use the current $DD_CACHE instead of a fresh one (the digits teacher is then not trained)")
    p.add_argument("--help-times", action="store_true",
                   help="time every script's --help (best of 3) against `python -c 'import torch'`")
    p.add_argument("--no-delt", action="store_true", help="skip `uv run python delt.py`")
    p.add_argument("--also", action="append", default=[], metavar="SCRIPT",
                   help="also time `uv run python SCRIPT` with no flags (repeatable), each with its own fresh cache")
    args = common.document_defaults(p).parse_args(argv)
    import torch
    if args.help_times:
        best = lambda cmd: min(timed(cmd) for _ in range(3))  # noqa: E731
        print(f"python -c 'import torch': {best([sys.executable, '-c', 'import torch']):.2f} s (best of 3)")
        for script in SCRIPTS:
            print(f"python {script} --help: {best([sys.executable, script, '--help']):.2f} s (best of 3)")
    with tempfile.TemporaryDirectory() as fresh:
        # a new output folder every time: an existing one holding the same run would resume and skip the work
        commands = [] if args.no_delt else [["uv", "run", "python", "delt.py", "--out", os.path.join(fresh, "delt")]]
        commands += [["uv", "run", "python", s, "--out", os.path.join(fresh, s[:-3])] for s in args.also]
        if args.suite:
            commands.append(["uv", "run", "pytest", "-q"])
        env = dict(os.environ)
        for n, cmd in enumerate(commands):
            if not args.keep_cache:
                env["DD_CACHE"] = os.path.join(fresh, f"cache{n}")
            t0, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
            load0 = os.getloadavg()[0]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            lines = (proc.stdout.strip() or proc.stderr.strip() or "(no output)").splitlines()
            # the load average says how much other work shared the cores (a wall time on a busy box is not
            # the idle figure); CPU time is user + system of the command and its children
            print(f"$ {' '.join(cmd)}\n  exit {proc.returncode}, {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU; load "
                  f"average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; last line: {lines[-1]}")
    threads = os.environ.get("OMP_NUM_THREADS", f"torch default {torch.get_num_threads()}")
    print(f"device {common.device_name('cuda' if torch.cuda.is_available() else 'cpu')}, threads {threads}, "
          f"{os.cpu_count()} cores, fresh cache: {not args.keep_cache}")


if __name__ == "__main__":
    common.run_cli(main)
