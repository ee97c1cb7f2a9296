"""Failures as a user meets them: each command runs as a script (subprocess, real exit code), ends with
one sentence as the last line of stderr and no traceback, and leaves earlier files unchanged (by hash)
and a fresh --out absent. Also: the --out lock, and SIGINT/SIGTERM sent to a real run that a rerun
completes to the same files as an uninterrupted run."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, run_script, script_env

UFC = ("--teacher", "conv3,conv3", "--ipc", "2", "--iterations", "30", "--seed", "1", "--no-eval")


def fails_with(proc, start, code=2):
    """The run failed with exit `code` and stderr's last line starts with `start`, without a traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert lines and lines[-1].startswith(start), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def hashes(folder):
    return {os.path.relpath(os.path.join(r, f), folder): hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, fs in os.walk(folder) for f in fs}


def digits_folder(root, corrupt=None):
    """A tiny ImageFolder dataset (train/ and val/, 10 classes x 2 digits images); `corrupt` = (class, i)
    gets a file that is not an image."""
    x, y = common.digits_split("train")
    for split in ("train", "val"):
        for c in range(10):
            os.makedirs(root / split / f"n{c:08d}")
            for i, j in enumerate((y == c).nonzero().flatten()[:2].tolist()):
                path = root / split / f"n{c:08d}" / f"{i}.png"
                if split == "train" and (c, i) == corrupt:
                    path.write_bytes(b"not an image")
                else:
                    Image.fromarray((x[j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return root


def tiny_set(folder, classes=10):
    for c in range(classes):
        os.makedirs(folder / f"{c:05d}")
        Image.fromarray(np.full((32, 32, 3), 20 * c, np.uint8)).save(folder / f"{c:05d}" / "00000.png")
    common.write_classes_json(str(folder), [{"index": c, "name": str(c), "id": str(c)} for c in range(classes)])
    return folder


# ------------------------------------------------------------------- errors: one sentence, nothing written
def test_error_in_a_dataloader_worker_is_one_sentence_and_a_fresh_out_stays_absent(tmp_path):
    data = digits_folder(tmp_path / "data", corrupt=(3, 1))
    teacher = tmp_path / "conv3.pt"
    torch.save(common.build_model("conv3", 10, common.input_size("imagenette", "conv3")).state_dict(), teacher)
    out = tmp_path / "out"
    args = ("--dataset", "imagenette", "--data-path", data, "--teacher", "conv3", "--teacher-path", teacher,
            "--ipc", "1", "--iterations", "2", "--round-itr", "1", "--no-eval", "--workers", "1", "--out", out)
    proc = run_script("delt.py", *args, check=False)
    last = fails_with(proc, "error: cannot read image ")
    assert "n00000003/1.png" in last and "Caught" not in proc.stderr
    assert not out.exists()  # the failed start left nothing: the corrected command is not refused


def test_out_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = run_script("infer_ufc.py", *UFC, "--out", tmp_path / "a_file" / "set", check=False)
    fails_with(proc, f"error: cannot create --out {tmp_path / 'a_file' / 'set'}: ")


@pytest.mark.parametrize("content,message", [
    (torch.zeros(3), "holds a Tensor, not a state dict of named tensors"),
    (b"hello", "is not a torch checkpoint (neither the zip archive"),
])
def test_bad_checkpoints(tmp_path, content, message):
    path = tmp_path / "teacher.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    out = tmp_path / "out"
    proc = run_script("infer_ufc.py", *UFC, "--teacher-path", f"{path},{path}", "--out", out, check=False)
    assert message in fails_with(proc, f"error: teacher checkpoint {path} ")
    assert not out.exists()


def test_damaged_run_json_and_classes_json_are_one_sentence_and_left_unchanged(tmp_path):
    out = tiny_set(tmp_path / "run")
    (out / "run.json").write_text('{"status": "running", "ident')
    before = hashes(out)
    proc = run_script("infer_ufc.py", *UFC, "--out", out, check=False)
    assert "--overwrite" in fails_with(proc, f"error: {out / 'run.json'} is damaged (")
    (out / "classes.json").write_text("[{]")
    before = hashes(out)
    proc = run_script("validate_fkd.py", "--syn-data-path", out, "--epochs", "1", "--workers", "0", check=False)
    fails_with(proc, f"error: {out / 'classes.json'} is damaged (")
    assert hashes(out) == before


def test_wording_of_a_missing_fkd_store_and_a_bad_flag(tmp_path):
    out = tiny_set(tmp_path / "set")
    before = hashes(out)
    proc = run_script("validate_fkd.py", "--syn-data-path", out, "--protocol", "fkd", "--epochs", "1", "--workers", "0",
                      check=False)
    assert "validate_fkd.py --relabel-epochs N" in fails_with(proc, "error: ")
    assert hashes(out) == before
    proc = run_script("delt.py", "--lr", "0", "--out", tmp_path / "never", check=False)
    assert fails_with(proc, "error: ") == "error: --lr must be > 0, not 0.0"


def test_numbers_out_of_range_are_refused_before_any_work(tmp_path):
    """A zero or negative budget is a typo, not "the preset's": refused in one sentence, the set untouched."""
    import argparse
    import validate_fkd
    out = tiny_set(tmp_path / "set")
    before = hashes(out)
    for flags, message in [(["--epochs", "0"], "--epochs must be >= 1, not 0"),
                           (["--repeats", "-2"], "--repeats must be >= 1, not -2"),
                           (["--lr", "-1"], "--lr must be > 0, not -1.0"),
                           (["--min-scale", "1.5"], "--min-scale must be in (0, 1], not 1.5"),
                           (["--eval-from", "nan"], "--eval-from must be in [0, 1], not nan"),
                           (["--std", "0.3", "0", "0.3"], "--std must be > 0, not 0.3 0.0 0.3"),
                           (["--full-top1", "101"], "--full-top1 is a top-1 % in [0, 100], not 101.0")]:
        with pytest.raises(common.UserError) as e:
            validate_fkd.main(["--syn-data-path", str(out), *flags])
        assert str(e.value) == message
    assert hashes(out) == before
    for name in ("eval_epochs", "eval_repeats"):  # every method script asks common.eval_on first
        with pytest.raises(common.UserError, match=f"^--{name.replace('_', '-')} must be >= 1, not 0$"):
            common.eval_on(argparse.Namespace(dataset="digits", eval=None, **{name: 0}))
    assert common.eval_on(argparse.Namespace(dataset="digits", eval=None, eval_epochs=None, eval_repeats=2)) is True
    (tmp_path / "empty").mkdir()
    proc = run_script("validate_fkd.py", "--syn-data-path", tmp_path / "empty", check=False)
    fails_with(proc, f"error: {tmp_path / 'empty'} holds no class folders: a set is one folder per class")
    assert "classes.json" not in proc.stdout + proc.stderr and os.listdir(tmp_path / "empty") == []


@pytest.mark.parametrize("script,flags,message", [
    ("delt", ["--r-bn", "-1"], "--r-bn must be >= 0, not -1.0"),
    ("infer_ufc", ["--iterations", "0"], "--iterations must be >= 1, not 0"),
    ("d4m", ["--guidance-scale", "-1"], "--guidance-scale must be >= 0, not -1.0"),
    ("d4m", ["--strength", "0"], "--strength must be in (0, 1], not 0.0"),
    ("vlcp", ["--contamination", "0.7"], "--contamination must be in [0, 0.5], not 0.7"),
    ("vlcp", ["--eval-epochs", "0"], "--eval-epochs must be >= 1, not 0"),
    ("vlcp", ["--ipc", "0"], "--ipc must be >= 1, not 0"),
    ("vlcp", ["--ipc", "5", "--max-per-class", "4"], "--ipc 5 must be <= --max-per-class 4"),
    ("dmkd", ["--momentum", "1"], "--momentum must be in [0, 1), not 1.0"),
    ("dmkd", ["--lr", "inf"], "--lr must be > 0, not inf")])
def test_a_method_flag_out_of_range_is_refused_before_any_work(tmp_path, script, flags, message):
    import importlib
    out = tmp_path / "out"
    with pytest.raises(common.UserError) as e:
        importlib.import_module(script).main([*flags, "--out", str(out)])
    assert str(e.value) == message and not out.exists() and os.listdir(tmp_path) == []


def test_captions_file_lacking_images_says_how_many_and_the_first(tmp_path):
    x, y = common.digits_split("train")
    captions = tmp_path / "captions.jsonl"
    first_zero = int((y == 0).nonzero()[0])
    captions.write_text(json.dumps({f"0/{first_zero:05d}.png": "a zero"}) + "\n")  # 1 of the 20 selected images
    out = tmp_path / "out"
    proc = run_script("vlcp.py", "--ipc", "1", "--max-per-class", "2", "--out", out, "--captions", captions,
                      "--captioner", tmp_path / "no-llava", check=False)
    last = fails_with(proc, f"error: --captions {captions} has no caption for 19 of the 20 training images (the first: ")
    assert "--captioner" in last and not out.exists()


# ------------------------------------------------------------------- lock, signals, resume
def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def lock_pid(out):
    try:
        return json.load(open(out / ".lock"))["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_lock_and_signals_then_the_rerun_gives_the_same_files(tmp_path):
    ref = tmp_path / "ref"
    run_script("infer_ufc.py", *UFC, "--out", ref)
    assert not (ref / ".lock").exists()
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "infer_ufc.py"), *UFC, "--out", str(out)]
    popen = lambda: subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,  # noqa: E731
                                     stderr=subprocess.PIPE, text=True)

    # 1. the first UFC is done and the second under way: the run is paused (SIGSTOP) so that a second run
    # started now surely meets it, the second refuses, then SIGINT stops the first
    first = popen()
    wait_for(lambda: (out / "ufc_parts" / "u_k0000_m0.pt").exists(), first)
    first.send_signal(signal.SIGSTOP)
    second = run_script("infer_ufc.py", *UFC, "--out", out, check=False)
    assert f"process {first.pid} on host {socket.gethostname()}" in fails_with(second, f"error: {out} is in use by another run")
    first.send_signal(signal.SIGINT)
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)  # it stops at once; the bound only keeps a hang from blocking CI
    fails_with(subprocess.CompletedProcess(cmd, first.returncode, "", err), "interrupted: rerun the same command to resume", 130)
    assert not (out / "ufc.pt").exists() and not (out / ".lock").exists()
    assert not [f for f in hashes(out) if ".tmp" in f]

    # 2. SIGTERM as soon as the rerun holds the folder
    again = popen()
    wait_for(lambda: lock_pid(out) == again.pid, again)
    again.send_signal(signal.SIGTERM)
    _, err = again.communicate(timeout=120)
    fails_with(subprocess.CompletedProcess(cmd, again.returncode, "", err), "interrupted: rerun the same command to resume", 143)

    # 3. a stale lock (its process is gone) is taken over, and the rerun ends with the reference's files
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    proc = run_script("infer_ufc.py", *UFC, "--out", out)
    assert "compensators: 1 to optimise (1 already done)" in proc.stdout or "(2 already done)" in proc.stdout
    assert "removing the stale lock" in proc.stdout
    want = {k: v for k, v in hashes(ref).items() if k != "run.json"}
    assert {k: v for k, v in hashes(out).items() if k != "run.json"} == want
    assert json.load(open(out / "run.json"))["status"] == "done"
