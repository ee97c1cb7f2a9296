"""delt.py: EarlyLate schedule and medium selection against independent computations, the Adam
late-joiner step, then CLI runs on digits with the conv3 teacher (contract, BN loss falls, early
groups move more, 2-process torchrun == 1 process, resume, evaluation) and bad input."""
import filecmp
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import delt
from conftest import ROOT, run_script, script_env, unexpected_stderr

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--ipc", "2", "--iterations", "20", "--round-itr", "10", "--batch-size", "4", "--no-eval"]


# ------------------------------------------------------------------------------ unit tests
@pytest.mark.parametrize("ipc", [1, 10, 50, 100])
def test_schedule_matches_independent_computation(ipc):
    T, R = 4000, 500
    s = delt.early_late_schedule(ipc, T, R)
    # independent: numpy's array_split also makes the first (n mod M) parts one larger
    parts = np.array_split(np.arange(ipc), T // R)
    expected = [0] * ipc
    for r, part in enumerate(parts):
        for k in part:
            expected[k] = (T // R - r) * R  # joins at round r, runs to the end
    assert s["iterations_by_rank"] == expected
    assert s["group_sizes"] == [len(p) for p in parts]
    assert s["image_iterations"] == sum(expected) and s["all_at_T"] == ipc * T
    # a step-by-step simulation of the rounds gives the same per-image counts
    sim = [sum(R for r in range(T // R) if k < sum(len(p) for p in parts[:r + 1])) for k in range(ipc)]
    assert sim == expected


def test_schedule_paper_figures():
    s = delt.early_late_schedule(50, 4000, 500)
    its = s["iterations_by_rank"]
    assert its[:7] == [4000] * 7 and its[7] == 3500 and its[44:] == [500] * 6
    assert round(100 * s["fraction_of_all_at_T"], 1) == 57.8
    assert delt.early_late_schedule(10, 4000, 500)["fraction_of_all_at_T"] == pytest.approx(0.6375)  # 63.8 %
    assert delt.early_late_schedule(100, 4000, 500)["fraction_of_all_at_T"] == pytest.approx(0.5725)  # 57.3 %
    assert delt.early_late_schedule(1, 4000, 500)["iterations_by_rank"] == [4000]  # IPC 1 == no EarlyLate
    assert delt.early_late_schedule(10, 4000, 500, early_late=False)["iterations_by_rank"] == [4000] * 10


def test_medium_order_on_hand_made_scores():
    # dataset index:   0     1     2     3     4     5     6
    scored = [(0.9, 0), (0.1, 1), (0.5, 2), (0.3, 3), (0.7, 4), (0.2, 5), (0.8, 6)]
    # ascending: 0.1(1) 0.2(5) 0.3(3) 0.5(2) 0.7(4) 0.8(6) 0.9(0); mid = ceil(7/2) = 4 -> 0.7;
    # then positions 5, 3, 6, 2, (7: past the end, skipped), 1, (8 skipped), 0
    assert delt.medium_order(7, 7) == [4, 5, 3, 6, 2, 1, 0]
    assert delt.select(scored, 5, "medium", 0) == [4, 6, 2, 0, 3]
    assert delt.select(scored, 7, "medium", 0) == [4, 6, 2, 0, 3, 5, 1]
    assert delt.medium_order(10, 4) == [5, 6, 4, 7]  # even n: mid = 5
    assert delt.select(scored, 2, "top", 0) == [0, 6]
    assert delt.select(scored, 2, "min", 0) == [1, 5]
    r = delt.select(scored, 3, "random", 7)
    assert r == delt.select(scored, 3, "random", 7) and len(set(r)) == 3


def test_batches_are_class_contiguous_and_chains_hold_whole_classes():
    batches, chains = delt.plan_batches(10, 30, 100)  # class 3 straddles batches 0 and 1, ...
    assert batches[0][-1] == (3, 9) and batches[1][0] == (3, 10)  # a split class keeps its ranks
    assert chains == [[0, 1, 2]]
    batches, chains = delt.plan_batches(10, 50, 100)
    assert chains == [[b] for b in range(5)]
    for chain in delt.plan_batches(7, 3, 4)[1]:
        for other in delt.plan_batches(7, 3, 4)[1]:
            if chain != other:  # no class in two chains
                a = {c for b in chain for c, _ in delt.plan_batches(7, 3, 4)[0][b]}
                assert not a & {c for b in other for c, _ in delt.plan_batches(7, 3, 4)[0][b]}


def test_crop_curriculum():
    assert delt.crop_min_scale(0, 100, "cosine", 1.0) == pytest.approx(1.0)
    assert delt.crop_min_scale(50, 100, "cosine", 1.0) == pytest.approx(0.54)
    assert delt.crop_min_scale(50, 100, "linear", 0.5) == pytest.approx(0.08)
    assert delt.crop_min_scale(0, 100, "cosine", 0.0) == pytest.approx(0.08)  # SRe2L
    assert delt.crop_min_scale(10, 100, "step", 0.5) == 1.0


def test_late_joiner_first_adam_step_is_about_1_58_lr():
    x = torch.zeros(2, 4, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9), eps=1e-8)
    for t in range(60):
        opt.zero_grad()
        (x[0].sum() + (x[1].sum() if t == 59 else 0)).backward()
        before = x[1].detach().clone()
        opt.step()
    assert (before == 0).all()  # an inactive row never moved
    assert (before - x[1].detach()).abs().mean().item() == pytest.approx(0.1 * 0.5 / 0.1 ** 0.5, rel=1e-3)


# ------------------------------------------------------------------------------ CLI runs
def image_files(out):
    return sorted(os.path.join(d, f) for d in os.listdir(out) if len(d) == 5 and d.isdigit()
                  for f in os.listdir(os.path.join(out, d)))


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    out = tmp_path_factory.mktemp("delt") / "one"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        proc = run_script("delt.py", "--out", out, *SMALL)
    return out, proc


def test_contract_bn_loss_and_early_late_effect(one_proc):
    out, proc = one_proc
    assert not unexpected_stderr(proc.stderr)
    closing = proc.stdout.splitlines()[-1]  # common.closing_line: one shape in every script
    assert closing.startswith(f"delt: digits IPC 2 -> {out} | top-1 not evaluated (--no-eval) | reused from cache: ")
    classes = json.load(open(out / "classes.json"))
    assert [c["id"] for c in classes] == [str(i) for i in range(10)]
    files = image_files(out)
    assert len(files) == 20 and all(f.endswith(".png") for f in files)
    images, targets = common.load_image_set(str(out), classes)
    assert images.shape == (20, 3, 32, 32) and targets.bincount().tolist() == [2] * 10
    rec = json.load(open(out / "run.json"))
    assert rec["status"] == "done" and {"selection", "recover"} <= set(rec["stages"])
    dl = rec["delt"]
    assert dl["schedule"]["iterations_by_rank"] == [20, 10]
    assert dl["image_iterations"] == 10 * 30  # 10 classes x (20 + 10)
    assert dl["bn_loss_after"] < 0.9 * dl["bn_loss_before"]  # BN loss falls during recover
    # the objective recover optimises, on the same augmented views for initial and final images
    views = dl["objective_on_recover_views"]
    assert views["after"] < 0.9 * views["before"]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("recover "))
    assert (f"objective (CE + r_bn*BN) on the recover views {views['before']:.3f} -> {views['after']:.3f}" in line
            and "| unaugmented BN loss" in line and "| BN loss" not in line)
    assert rec["normalisation"] == {"mean": list(common.DATASETS["digits"].mean), "std": list(common.DATASETS["digits"].std),
                                    "source": "digits statistics"}
    first, last = dl["rms_pixel_change_by_rank"]
    assert first > 1.2 * last > 0  # the early group moved further from its real initialisation
    stats = delt.load_stats(str(out), rec["identity"])
    for b in range(5):  # every batch: the round-0 subset is the rank-0 images only
        bs = stats["batch"][b]
        # the objective on the recover views falls in every batch (the unaugmented BN loss need not:
        # measured 4.055 -> 4.358 in batch 3, as recover optimises crops, not the whole images)
        assert bs["active_per_round"] == [2, 4] and bs["objective_views_after"] < bs["objective_views_before"]
    assert 0 < dl["diversity"]["final_mean"] <= 1 and 0 < dl["diversity"]["initial_mean"] <= 1
    assert sorted(stats["batch"]) == list(range(5)) and sorted(stats["class"]) == list(range(10))
    rows = open(out / "ranking.csv").read().splitlines()
    assert rows[0] == "score,img_path,class,index" and len(rows) == 1 + 1437


def test_two_process_torchrun_writes_the_same_files(one_proc, tmp_path):
    out, _ = one_proc
    two = tmp_path / "two"
    env = script_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "delt.py", "--out", str(two), *SMALL, "--ranking-file", str(tmp_path / "ranking.csv")],
                          cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[rank 1]" in proc.stdout
    files = image_files(out)
    assert image_files(two) == files
    match, mismatch, errors = filecmp.cmpfiles(out, two, files + ["ranking.csv", "classes.json"], shallow=False)
    assert not mismatch and not errors
    assert json.load(open(two / "run.json"))["delt"]["image_iterations"] == 300


def test_resume_after_an_interrupted_run(one_proc, tmp_path):
    out0, _ = one_proc
    out = tmp_path / "resume"
    shutil.copytree(out0, out)
    # what an interruption leaves: finished classes, a half-written temp folder, status "running"
    for c in (3, 7):
        shutil.rmtree(out / f"{c:05d}")
    os.makedirs(out / ".tmp-00003-999")
    rec = json.load(open(out / "run.json"))
    rec["status"] = "running"
    json.dump(rec, open(out / "run.json", "w"))
    kept = {f: os.stat(out / f).st_mtime_ns for f in image_files(out)}
    proc = run_script("delt.py", "--out", out, *SMALL[:-1], "--eval", "--eval-epochs", "1")
    assert "2/5 batches to do" in proc.stdout  # only the batches of classes 3 and 7
    assert all(os.stat(out / f).st_mtime_ns == t for f, t in kept.items())  # finished classes untouched
    assert not filecmp.cmpfiles(out0, out, image_files(out0), shallow=False)[1]  # redone identically
    rec = json.load(open(out / "run.json"))
    assert rec["status"] == "done" and "best_mean" in rec["eval"] and "best_mean" in rec["eval"]["random_real"]
    assert json.load(open(out / "eval_rded.json"))["recipe"]["rand_augment"] == "rand-m6-n2-mstd1.0"
    closing = proc.stdout.splitlines()[-1]
    e, b = rec["eval"], rec["eval"]["random_real"]
    assert (f"top-1 distilled {e['best_mean']:.2f} ± {e['best_std']:.2f} vs random real {b['best_mean']:.2f} ± "
            f"{b['best_std']:.2f} | 3 students each: conv3, 1 epoch = 2 optimiser steps | protocol rded (teacher "
            f"labels), preset delt | reused from cache: teacher, ranking") in closing  # 20 images, batch 10
    assert "(--mean/--std)" not in proc.stdout  # the user passed neither: the eval names where they come from


def test_ranking_is_cached_by_data_and_teacher_so_an_ipc_loop_ranks_once(tmp_path):
    cache = tmp_path / "cache"  # a fresh $DD_CACHE holding only the digits teachers
    shutil.copytree(os.path.join(common.cache_dir(), "teachers"), cache / "teachers")
    env = script_env(OMP_NUM_THREADS="1", DD_CACHE=str(cache))
    small = ["--iterations", "10", "--round-itr", "10", "--batch-size", "10", "--no-eval"]
    records = []
    for ipc in (1, 2):
        out = tmp_path / f"ipc{ipc}"
        proc = subprocess.run([sys.executable, "delt.py", "--out", str(out), "--ipc", str(ipc), *small], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rec = json.load(open(out / "run.json"))["ranking"]
        records.append((rec, os.stat(rec["path"]).st_mtime_ns))
        assert filecmp.cmp(rec["path"], out / "ranking.csv", shallow=False)  # the copy beside the set
    (first, t1), (second, t2) = records
    assert first["path"] == second["path"] and first["path"].startswith(str(cache / "delt_ranking"))
    assert (first["reused"], second["reused"]) == (False, True) and t1 == t2  # ranked once, not rewritten
    assert len(os.listdir(cache / "delt_ranking")) == 1


@pytest.mark.parametrize("flags,message", [
    (["--iterations", "25", "--round-itr", "10"], "positive multiple of --round-itr"),
    (["--round-itr", "0"], "positive multiple of --round-itr"),
    (["--ipc", "500"], "exceeds the"),
])
def test_bad_input_stops_before_touching_output(tmp_path, flags, message):
    out = tmp_path / "never"
    with pytest.raises(common.UserError, match=message):
        delt.main(["--out", str(out), *SMALL, *flags])
    assert not out.exists()


def test_refuses_a_folder_holding_a_different_run(one_proc, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(one_proc[0], out)
    before = {f: os.stat(out / f).st_mtime_ns for f in image_files(out) + ["run.json"]}
    with pytest.raises(common.UserError, match="holds a different run"):
        delt.main(["--out", str(out), *SMALL, "--lr", "0.05"])
    assert {f: os.stat(out / f).st_mtime_ns for f in before} == before
    # refused before the teacher is trained: with an empty $DD_CACHE nothing is trained or cached
    cache = tmp_path / "empty_cache"
    proc = run_script("delt.py", "--out", out, *SMALL, "--lr", "0.05", check=False, env={"DD_CACHE": str(cache)})
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {out} holds a different run")
    assert proc.stdout == "" and not cache.exists()
