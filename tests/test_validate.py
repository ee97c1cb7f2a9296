"""validate_fkd.py and the common training loop: losses, schedules, mixing and FKD replay against
independent computations; every protocol end to end on digits; torchrun; bad sets."""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import ROOT, run_script


def test_kd_loss_matches_formula():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    for T in (1.0, 4.0, 20.0):
        ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
        expected = (pt * (pt.log() - ps.log())).sum() / 5  # KL(p_t || p_s), batch mean
        assert torch.allclose(common.kd_loss(s, t, T), expected, atol=1e-6)
        assert torch.allclose(common.kd_loss(s, t, T, t_squared=True), expected * T * T, atol=1e-5)


def test_lr_schedules():
    E = 300
    assert common.lr_factor("quarter", 0, E) == 1.0
    assert math.isclose(common.lr_factor("quarter", 150, E), 0.5 * (1 + math.cos(math.pi / 4)))
    assert math.isclose(common.lr_factor("quarter", E, E), 0.5)  # RDED's quarter cosine ends at half the LR
    assert math.isclose(common.lr_factor("cosine", E, E), 0.0, abs_tol=1e-12)
    assert math.isclose(common.lr_factor("cosine", 100, E), 0.75)
    assert [common.lr_factor("step", e, 240, (150, 180, 210)) for e in (149, 150, 180, 239)] == pytest.approx([1, 0.1, 0.01, 0.001])


def test_cutmix_box_area_matches_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 3, 32, 32)
    x[1:] = 1.0
    for _ in range(50):
        p = common.draw_mix("cutmix", 1.0, 4, 32, 32, g)
        y1, y2, x1, x2 = p["box"]
        area = (y2 - y1) * (x2 - x1)
        assert math.isclose(p["lam"], 1 - area / 1024)  # the label weight is the kept area
        mixed = common.apply_mix(x, p)
        src = p["perm"][0].item()
        changed = int((mixed[0, 0] != x[0, 0]).sum())
        assert changed == (area if src != 0 else 0)
    # unclipped boxes: side = sqrt(1 - lam) * size up to int truncation
    assert all(0.0 <= common.draw_mix("cutmix", 1.0, 2, 32, 32, g)["lam"] <= 1.0 for _ in range(20))


def test_static_label_interpolation():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 10)
    p = common.draw_mix("mixup", 0.8, 6, 32, 32, g)
    lam, perm = p["lam"], p["perm"]
    assert torch.allclose(common.mix_targets(z, p), torch.stack([lam * z[i] + (1 - lam) * z[perm[i]] for i in range(6)]))
    x = torch.randn(6, 3, 4, 4)
    assert torch.allclose(common.apply_mix(x, p), lam * x + (1 - lam) * x[perm])


class Recorder(torch.nn.Module):
    """A teacher that remembers every batch it labelled."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x.mean(dim=(2, 3)) @ torch.ones(3, 10)


def test_fkd_replay_is_pixel_exact(tmp_path):
    x, y = common.digits_split("train")
    images = (x[:37] * 255).round().to(torch.uint8)
    teacher = Recorder()
    mean, std = common.DATASETS["digits"].mean, common.DATASETS["digits"].std
    common.fkd_generate(images, teacher, str(tmp_path), epochs=2, batch_size=10, size=24, mean=mean, std=std,
                        mix="cutmix", seed=5)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0000.pt", "epoch_0001.pt", "meta.json"]
    replayed = [b for e in range(2) for b in common.FKDReplay(images, str(tmp_path), e, 24, mean, std)]
    assert len(replayed) == len(teacher.seen) == 8  # 4 batches (10, 10, 10, 7) per epoch
    for (xb, logits), seen in zip(replayed, teacher.seen):
        assert torch.equal(xb, seen)  # the very same pixels
        assert torch.allclose(logits.float(), teacher(seen).half().float())
    e0 = torch.load(tmp_path / "epoch_0000.pt", weights_only=True)
    e1 = torch.load(tmp_path / "epoch_0001.pt", weights_only=True)
    assert not torch.equal(torch.cat(e0["index"]), torch.cat(e1["index"]))  # a new order every epoch
    assert sorted(torch.cat(e0["index"]).tolist()) == list(range(37))
    # an interrupted generation resumes: complete epochs are not redone
    mtime = os.path.getmtime(tmp_path / "epoch_0000.pt")
    common.fkd_generate(images, teacher, str(tmp_path), epochs=3, batch_size=10, size=24, mean=mean, std=std, seed=5)
    assert os.path.getmtime(tmp_path / "epoch_0000.pt") == mtime and (tmp_path / "epoch_0002.pt").is_file()


def _random_set(out, ipc, seed=123):
    x, y = common.digits_split("train")
    idx = common.random_subset(y.tolist(), ipc, seed)
    run = common.RunDir(out, argparse.Namespace(method="random", ipc=ipc, seed=seed), common.class_list("digits"))
    for c in range(10):
        run.write_class(c, x[idx][y[idx] == c])
    run.finish()
    return out


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory):
    return _random_set(str(tmp_path_factory.mktemp("sets") / "r3"), 3)


@pytest.mark.parametrize("protocol,extra", [
    ("rded", ["--rand-augment", "rand-m6-n2-mstd1.0", "--min-scale", "0.25"]),
    ("static", []),
    ("hard", []),
    ("fkd", ["--relabel-epochs", "2"]),
])
def test_each_protocol_end_to_end(digits_set, digits_conv3, protocol, extra):
    repeats = 2 if protocol == "rded" else 1
    proc = run_script("validate_fkd.py", "--syn-data-path", digits_set, "--protocol", protocol, "--epochs", "2",
                      "--eval-every", "1", "--repeats", repeats, *extra)
    assert "result: digits protocol " + protocol in proc.stdout
    rec = json.load(open(os.path.join(digits_set, f"eval_{protocol}.json")))
    assert rec["protocol"] == protocol and rec["images"] == 30 and rec["ipc"] == 3 and rec["repeats"] == repeats
    assert [r["seed"] for r in rec["runs"]] == list(range(repeats))
    best = [r["best"] for r in rec["runs"]]
    assert math.isclose(rec["best_mean"], sum(best) / repeats)
    if repeats == 2:
        assert math.isclose(rec["best_std"], abs(best[0] - best[1]) / 2)  # population std of two values
    assert all(len(r["history"]) == 2 for r in rec["runs"])  # evaluated at epochs 0 and 1
    assert rec["recipe"]["epochs"] == 2 and rec["student"] == "conv3"
    want = {"rded": (20.0, "quarter", "teacher"), "static": (30.0, "cosine", "static"),
            "hard": (1.0, "step", "hard"), "fkd": (20.0, "cosine", "fkd")}[protocol]
    assert (rec["recipe"]["temperature"], rec["recipe"]["schedule"], rec["label_mode"]) == want


def test_baseline_random_and_training_learns(tmp_path, digits_conv3):
    out = _random_set(str(tmp_path / "r5"), 5, seed=7)
    proc = run_script("validate_fkd.py", "--syn-data-path", out, "--protocol", "hard", "--epochs", "8", "--eval-every", "4",
                      "--baseline", "random", "--lr", "0.05")
    rec = json.load(open(os.path.join(out, "eval_hard.json")))
    assert rec["baseline"]["ipc"] == 5 and len(rec["baseline"]["runs"]) == 1
    assert math.isclose(rec["improvement_over_random"], rec["best_mean"] - rec["baseline"]["best_mean"])
    assert rec["best_mean"] > 30.0  # 50 real digits and 12 epochs beat chance (10 %) clearly
    assert "random real (5 images/class):" in proc.stdout  # the per-class figure named as such


def test_torchrun_two_processes_train(digits_set, digits_conv3, tmp_path):
    out = str(tmp_path / "ddp.json")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                           os.path.join(ROOT, "validate_fkd.py"), "--syn-data-path", digits_set, "--protocol", "rded",
                           "--epochs", "2", "--eval-every", "1", "--device", "cpu", "--out", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.load(open(out))
    assert len(rec["runs"][0]["history"]) == 2 and proc.stdout.count("result:") == 1  # rank 0 alone reports


def _expect_error(args, match):
    proc = run_script("validate_fkd.py", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]


def test_bad_sets_are_refused(digits_set, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(digits_set, bad)
    for f in os.listdir(bad):
        if f.startswith("eval_"):
            os.remove(os.path.join(bad, f))
    if os.path.isdir(os.path.join(bad, "fkd")):  # labels stored by the fkd protocol test: too few epochs
        _expect_error(["--syn-data-path", bad, "--protocol", "fkd", "--epochs", "5"], "exceeds the 2 epochs")
        shutil.rmtree(os.path.join(bad, "fkd"))
    _expect_error(["--syn-data-path", bad, "--protocol", "fkd"], "no stored FKD soft labels")
    _expect_error(["--syn-data-path", bad, "--ipc", "5"], "fewer than --ipc 5")
    for f in os.listdir(os.path.join(bad, "00004")):
        os.remove(os.path.join(bad, "00004", f))
    _expect_error(["--syn-data-path", bad], "holds no images")
    shutil.rmtree(os.path.join(bad, "00004"))
    _expect_error(["--syn-data-path", bad], "9 class folders")
    classes = common.class_list("digits")
    common.write_classes_json(bad, classes[1:] + classes[:1])
    _expect_error(["--syn-data-path", bad], "different class order")
    _expect_error(["--syn-data-path", str(tmp_path / "nowhere")], "does not exist")
