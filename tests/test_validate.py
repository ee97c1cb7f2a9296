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

import common
from conftest import ROOT, run_script, script_env, unexpected_stderr


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
    assert sorted(os.listdir(tmp_path)) == ["fkd_epoch_0000.pt", "fkd_epoch_0001.pt", "fkd_meta.json"]  # files, no folder
    replayed = [b for e in range(2) for b in common.FKDReplay(images, str(tmp_path), e, 24, mean, std)]
    assert len(replayed) == len(teacher.seen) == 8  # 4 batches (10, 10, 10, 7) per epoch
    for (xb, logits), seen in zip(replayed, teacher.seen):
        assert torch.equal(xb, seen)  # the very same pixels
        assert torch.allclose(logits.float(), teacher(seen).half().float())
    e0 = torch.load(tmp_path / "fkd_epoch_0000.pt", weights_only=True)
    e1 = torch.load(tmp_path / "fkd_epoch_0001.pt", weights_only=True)
    assert not torch.equal(torch.cat(e0["index"]), torch.cat(e1["index"]))  # a new order every epoch
    assert sorted(torch.cat(e0["index"]).tolist()) == list(range(37))
    # an interrupted generation resumes: complete epochs are not redone
    mtime = os.path.getmtime(tmp_path / "fkd_epoch_0000.pt")
    common.fkd_generate(images, teacher, str(tmp_path), epochs=3, batch_size=10, size=24, mean=mean, std=std, seed=5)
    assert os.path.getmtime(tmp_path / "fkd_epoch_0000.pt") == mtime and (tmp_path / "fkd_epoch_0002.pt").is_file()


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
    assert not unexpected_stderr(proc.stderr)
    assert proc.stdout.splitlines()[-1].startswith(f"validate_fkd: digits IPC 3 -> {digits_set}/eval_{protocol}.json | "
                                                   f"top-1 distilled ")  # common.closing_line
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


def test_fkd_baseline_relabels_random_real_with_the_sets_recipe(tmp_path, digits_conv3):
    """Random real images under `fkd` get labels stored as the set's were (batch size, mix, crop scale,
    flip), so both sides train for the same number of optimiser steps (D4M's TTM batch is not the
    validator's batch size)."""
    out = _random_set(str(tmp_path / "r3"), 3, seed=5)
    images, _ = common.load_image_set(out, common.class_list("digits"))
    teacher = common.load_teacher("conv3", "digits")
    mean, std, _ = common.resolve_norm("digits", [None])
    common.fkd_generate(images, teacher, out, 2, 8, 32, mean, std, mix="mixup", alpha=0.4, min_scale=0.5, flip=True)
    run_script("validate_fkd.py", "--syn-data-path", out, "--protocol", "fkd", "--epochs", "2", "--eval-every", "1",
               "--baseline", "random", "--repeats", "1")
    rec = json.load(open(os.path.join(out, "eval_fkd.json")))
    assert rec["steps"] == rec["baseline"]["steps"] == 2 * 4  # 30 images in batches of 8: 3 full + 6
    assert rec["baseline"]["epochs"] == 2


def test_torchrun_two_processes_train(digits_set, digits_conv3, tmp_path):
    out = str(tmp_path / "ddp.json")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                           os.path.join(ROOT, "validate_fkd.py"), "--syn-data-path", digits_set, "--protocol", "rded",
                           "--epochs", "2", "--eval-every", "1", "--device", "cpu", "--out", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=script_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.load(open(out))
    assert len(rec["runs"][0]["history"]) == 2 and proc.stdout.count("result:") == 1  # rank 0 alone reports


def _expect_error(args, match):
    """validate_fkd refuses with one sentence naming the problem; in-process (how the CLI prints a
    UserError, one line and exit 2, is tested on script runs in tests/test_reliability.py)."""
    import validate_fkd
    with pytest.raises(common.UserError) as refused:
        validate_fkd.main(list(args))
    sentence = common.user_sentence(refused.value)
    assert match in sentence and "\n" not in sentence, sentence


def test_a_missing_set_is_refused_before_any_output(tmp_path, capsys):
    _expect_error(["--syn-data-path", str(tmp_path / "nope")], f"the set {tmp_path / 'nope'} does not exist")
    assert capsys.readouterr().out == ""  # not even the preset line


def test_bad_sets_are_refused(digits_set, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(digits_set, bad)
    for f in os.listdir(bad):
        if f.startswith("eval_"):
            os.remove(os.path.join(bad, f))
    if os.path.isfile(os.path.join(bad, "fkd_meta.json")):  # labels stored by the fkd protocol test: too few epochs
        _expect_error(["--syn-data-path", bad, "--protocol", "fkd", "--epochs", "5"], "exceeds the 2 epochs")
        for f in os.listdir(bad):
            if f.startswith("fkd_"):
                os.remove(os.path.join(bad, f))
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


# ---------------------------------------------------------------------------------------------
# the stored-FKD layout of old sets; presets per method; DD-Ranking's metrics; --lr-search
# ---------------------------------------------------------------------------------------------
def test_old_fkd_folder_layout_still_replays(digits_set, digits_conv3, tmp_path):
    """Sets written before the labels moved to the root keep <set>/fkd/{meta.json,epoch_XXXX.pt}: still read."""
    old = str(tmp_path / "old")
    shutil.copytree(digits_set, old, ignore=shutil.ignore_patterns("eval_*", "fkd_*"))
    images, _ = common.load_image_set(old, common.class_list("digits"))
    mean, std = common.DATASETS["digits"].mean, common.DATASETS["digits"].std
    common.fkd_generate(images, digits_conv3, old, epochs=1, batch_size=16, size=32, mean=mean, std=std, seed=3)
    new = [b for b in common.FKDReplay(images, old, 0, 32, mean, std)]
    os.makedirs(os.path.join(old, "fkd"))
    for f in ("meta.json", "epoch_0000.pt"):
        os.replace(os.path.join(old, "fkd_" + f), os.path.join(old, "fkd", f))
    assert common.fkd_path(old, "meta.json") == os.path.join(old, "fkd", "meta.json")
    assert common.fkd_meta(old)["epochs"] == 1
    replayed = [b for b in common.FKDReplay(images, old, 0, 32, mean, std)]
    assert len(replayed) == len(new) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                  for a, b in zip(replayed, new))
    proc = run_script("validate_fkd.py", "--syn-data-path", old, "--protocol", "fkd", "--epochs", "1")
    assert "result: digits protocol fkd" in proc.stdout
    assert json.load(open(os.path.join(old, "eval_fkd.json")))["images"] == 30  # the fkd/ folder is not a class


def _fake_set(root, method, dataset, ipc=2, fkd=False):
    """A set's folder as the dry run reads it: run.json naming the script that made it, class folders of files."""
    os.makedirs(root)
    json.dump({"argv": [f"/somewhere/{method}.py", "--dataset", dataset], "args": {"dataset": dataset}},
              open(os.path.join(root, "run.json"), "w"))
    for c in range(common.DATASETS[dataset].num_classes):
        os.makedirs(os.path.join(root, f"{c:05d}"))
        for i in range(ipc):
            open(os.path.join(root, f"{c:05d}", f"{i:05d}.png"), "w").close()
    if fkd:
        json.dump({"epochs": 300}, open(os.path.join(root, "fkd_meta.json"), "w"))
    return root


def test_each_method_gets_its_official_evaluation(tmp_path, capsys):
    """--preset auto reads the method from the set's run.json; the dry run prints what its scripts run."""
    import validate_fkd

    def dry(method, dataset, *flags, fkd=False, ipc=2):
        root = _fake_set(str(tmp_path / f"{method}_{dataset}_{len(os.listdir(tmp_path))}"), method, dataset, ipc, fkd)
        r = validate_fkd.main(["--syn-data-path", root, "--dry-run", *flags])
        return {**r, **r["recipe"]}

    imagenet = [list(common.IMAGENET_MEAN), list(common.IMAGENET_STD)]
    r = dry("vlcp", "cifar10")  # VLCP's RDED scripts: 500 epochs, factor 1, ImageNet statistics
    assert (r["preset"], r["protocol"], r["epochs"], r["factor"], r["min_scale"]) == ("vlcp", "rded", 500, 1, 1.0)
    assert r["dataset"] == "cifar10" and [r["mean"], r["std"]] == imagenet and r["student"] == "resnet18_modified"
    assert "made by vlcp" in capsys.readouterr().out
    r = dry("vlcp", "tiny")  # factor 2: 2x2 ShufflePatches, RandomResizedCrop scale (0.5, 1)
    assert (r["protocol"], r["epochs"], r["factor"], r["min_scale"], r["batch_size"]) == ("rded", 500, 2, 0.5, 100)
    r = dry("vlcp", "imagenette")  # Minimax: hard labels, ResNetAP-10, 3 repeats, Resize(224)+CenterCrop(224)
    assert (r["protocol"], r["student"], r["repeats"], r["test_view"], r["epochs"]) == ("hard", "resnet_ap10", 3, "full", 2000)
    assert (r["optimizer"], r["lr"], r["batch_size"], r["milestones"]) == ("sgd", 0.01, 20, [1333, 1666])
    r = dry("vlcp", "imagenet", ipc=10)
    assert (r["protocol"], r["epochs"], r["factor"], r["batch_size"]) == ("rded", 500, 2, 100)
    r = dry("delt", "imagenet", ipc=10)  # DELT's scripts: RandAugment, RRC (0.25, 1), no ShufflePatches, 3 seeds
    assert (r["protocol"], r["epochs"], r["rand_augment"], r["min_scale"], r["factor"], r["repeats"]) == \
        ("rded", 300, "rand-m6-n2-mstd1.0", 0.25, 1, 3)
    assert [r["mean"], r["std"]] == imagenet and r["schedule"] == "quarter" and r["temperature"] == 20.0
    r = dry("random", "tiny", "--preset", "rded")  # RDED's own scripts: 300 epochs, factor 1 on Tiny
    assert (r["preset"], r["epochs"], r["factor"], r["min_scale"]) == ("rded", 300, 1, 1.0)
    r = dry("infer_ufc", "cifar100")  # INFER static: 400 epochs, batch 64, padded crop, mixup 0.8, T 30
    assert (r["preset"], r["protocol"], r["epochs"], r["batch_size"], r["crop"], r["mix"], r["temperature"]) == \
        ("infer", "static", 400, 64, "pad", "mixup", 30.0)
    r = dry("infer_ufc", "imagenet")  # not published: DWA's ImageNet recipe with INFER's static labels
    assert (r["protocol"], r["epochs"], r["batch_size"], r["crop"], r["min_scale"], r["schedule"]) == \
        ("static", 300, 128, "rrc", 0.08, "cosine")
    assert dry("d4m", "imagenet")["protocol"] == "rded"  # no stored labels: the online-teacher alternative
    r = dry("d4m", "imagenet", fkd=True)
    assert (r["protocol"], r["epochs"], r["schedule"], r["temperature"]) == ("fkd", 300, "cosine", 20.0)
    r = dry("delt", "digits")  # digits keeps its CPU budget and its teachers' statistics; DELT's augmentation applies
    assert (r["epochs"], r["rand_augment"], r["min_scale"], r["norm"]) == (40, "rand-m6-n2-mstd1.0", 0.25, "dataset")
    r = dry("vlcp", "cifar10", "--epochs", "7", "--norm", "dataset")  # explicit flags beat the preset
    assert (r["epochs"], r["mean"]) == (7, list(common.CIFAR_MEAN))
    r = dry("vlcp", "cifar10", "--preset", "none")  # the generic RDED protocol
    assert (r["preset"], r["epochs"], r["preset_source"]) == (None, 300, "--preset none")
    r = dry("dmkd", "cifar100")  # DM-KD's own KD recipe (train_student.py defaults) and CIFAR-100 statistics
    assert (r["preset"], r["protocol"], r["optimizer"], r["schedule"], r["milestones"], r["t_squared"]) == \
        ("dmkd", "rded", "sgd", "step", [150, 180, 210], True)
    assert "made by dmkd" in r["preset_source"] and r["mean"] == [0.5071, 0.4867, 0.4408]


def test_minimax_test_view_is_the_whole_image():
    """Minimax tests on Resize(s)+CenterCrop(s); RDED/SRe2L on Resize(s//7*8)+CenterCrop(s)."""
    from torchvision.transforms import v2 as T
    import validate_fkd
    args = validate_fkd.resolve(validate_fkd.build_parser().parse_args(["--dataset", "imagenette", "--protocol", "hard"]))
    x = torch.rand(3, 240, 300)
    ref = T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)(T.CenterCrop(224)(T.Resize(224, antialias=True)(x)))
    assert args.test_view == "full" and torch.allclose(validate_fkd.val_transform(args)(x), ref, atol=1e-6)
    args = validate_fkd.resolve(validate_fkd.build_parser().parse_args(["--dataset", "imagenette", "--protocol", "rded"]))
    ref = T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)(T.CenterCrop(224)(T.Resize(256, antialias=True)(x)))
    assert args.test_view == "ratio" and torch.allclose(validate_fkd.val_transform(args)(x), ref, atol=1e-6)


def test_lrs_and_paired_ior_match_an_independent_computation():
    import statistics
    import validate_fkd
    e = math.e

    def lrs(ior, hlr, lam):  # DD-Ranking's Eq.: (e^a - e^-1) / (e - e^-1), a = lam IOR - (1 - lam) HLR
        a = lam * ior - (1 - lam) * hlr
        return (e ** a - 1 / e) / (e - 1 / e)

    assert math.isclose(validate_fkd.label_robust_score(1.0, 0.0, 1.0), 1.0)  # a = 1: the top
    assert math.isclose(validate_fkd.label_robust_score(0.0, 1.0, 0.0), 0.0, abs_tol=1e-12)  # a = -1: the floor
    assert math.isclose(validate_fkd.label_robust_score(0.05, 0.2, 0.5), lrs(0.05, 0.2, 0.5))
    syn, rand, syn_hard, full = [60.0, 62.0, 58.0], [50.0, 55.0, 59.0], [30.0, 34.0, 33.0], 80.0
    m = validate_fkd.ddranking_metrics(syn, rand, syn_hard, full, lam=0.3)
    ior = [10.0, 7.0, -1.0]
    hlr = [50.0, 46.0, 47.0]
    assert m["ior"]["per_repeat"] == ior and math.isclose(m["ior"]["std"], statistics.pstdev(ior))
    assert math.isclose(m["ior"]["mean"], statistics.mean(syn) - statistics.mean(rand))
    assert m["hlr"]["per_repeat"] == hlr and math.isclose(m["hlr"]["std"], statistics.pstdev(hlr))
    fractions = [lrs(i / 100, h / 100, 0.3) for i, h in zip(ior, hlr)]
    assert m["lrs"]["per_repeat"] == pytest.approx(fractions) and 0 < m["lrs"]["mean"] < 1
    assert math.isclose(m["lrs"]["std"], statistics.pstdev(fractions))
    points = [lrs(i, h, 0.3) for i, h in zip(ior, hlr)]  # what DD-Ranking 0.2.0's code computes
    assert m["lrs_ddranking_code"]["per_repeat"] == pytest.approx(points)
    assert all(abs(p + 1 / e / (e - 1 / e)) < 1e-6 for p in points)  # pinned at its floor, -e^-1/(e - e^-1)
    assert set(validate_fkd.ddranking_metrics(syn, rand)) == {"ior"}  # without --lrs: IOR only


def test_lrs_json_on_digits(digits_set, digits_conv3, tmp_path, monkeypatch):
    """--lrs end to end: paired IOR, HLR from hard-label students and the full-data student (trained once,
    cached with its recipe under $DD_CACHE/full_data), LRS both ways, the definitions, all in the JSON."""
    cache = tmp_path / "cache"
    teachers = os.path.join(common.cache_dir(), "teachers")
    shutil.copytree(teachers, cache / "teachers")  # the digits teachers; an empty full_data cache
    out = str(tmp_path / "lrs.json")
    cmd = [sys.executable, os.path.join(ROOT, "validate_fkd.py"), "--syn-data-path", digits_set, "--epochs", "1",
           "--eval-every", "1", "--repeats", "2", "--lrs", "--hard-epochs", "1", "--full-epochs", "1", "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=script_env(DD_CACHE=str(cache)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.load(open(out))
    m = rec["metrics"]
    assert set(m["definitions"]) >= {"ior", "hlr", "lrs", "lrs_ddranking_code"} and m["lambda"] == 0.5
    syn, rand = [r["best"] for r in rec["runs"]], [r["best"] for r in rec["baseline"]["runs"]]
    assert [r["seed"] for r in rec["runs"]] == [r["seed"] for r in rec["baseline"]["runs"]] == [0, 1]  # paired seeds
    assert m["ior"]["per_repeat"] == pytest.approx([s - r for s, r in zip(syn, rand)])
    hard = [r["best"] for r in m["hard_label"]["runs"]]
    assert m["hard_label"]["recipe"]["labels"] == "hard" and m["hard_label"]["recipe"]["epochs"] == 1
    full = m["full_data"]
    assert full["cached"] is False and full["recipe"]["epochs"] == 1 and full["recipe"]["labels"] == "hard"
    assert m["hlr"]["per_repeat"] == pytest.approx([full["top1"] - h for h in hard])
    assert m["lrs"]["mean"] == pytest.approx(sum(validate_fkd_lrs((s - r) / 100, (full["top1"] - h) / 100)
                                                 for s, r, h in zip(syn, rand, hard)) / 2)
    cached = json.load(open(full["cache"]))
    assert str(cache) in full["cache"] and cached["top1"] == full["top1"] and cached["recipe"] == full["recipe"]
    assert "LRS" in proc.stdout and "DD-Ranking 0.2.0's code would give" in proc.stdout
    import validate_fkd  # the same dataset, student and recipe again: read from the cache, not trained
    monkeypatch.setenv("DD_CACHE", str(cache))
    args = validate_fkd.build_parser().parse_args(["--syn-data-path", digits_set, "--epochs", "1", "--hard-epochs", "1"])
    h = validate_fkd.hard_label_args(validate_fkd.resolve(args, validate_fkd.choose_preset(args)[0]))
    again = validate_fkd.full_data_top1(h, None, common.Dist(device="cpu"), 1)  # no test loader: it must not train
    assert again["cached"] is True and again["top1"] == full["top1"] and again["cache"] == full["cache"]


def validate_fkd_lrs(ior, hlr, lam=0.5):
    return (math.exp(lam * ior - (1 - lam) * hlr) - math.exp(-1)) / (math.e - math.exp(-1))


def test_lr_search_selects_on_the_test_set_and_reports_the_winner(digits_set, digits_conv3, tmp_path):
    out = str(tmp_path / "search.json")
    proc = run_script("validate_fkd.py", "--syn-data-path", digits_set, "--protocol", "hard", "--epochs", "1",
                      "--eval-every", "1", "--lr-search", "--baseline", "random", "--out", out)
    rec = json.load(open(out))
    import validate_fkd
    for run in (rec["runs"][0], rec["baseline"]["runs"][0]):
        tried = run["lr_search"]
        assert [t["lr"] for t in tried] == list(validate_fkd.LR_GRID)
        top = max(t["best"] for t in tried)
        assert run["lr"] == next(t["lr"] for t in tried if t["best"] == top) and run["best"] == top
    assert rec["lr_search"]["distilled"] == [rec["runs"][0]["lr"]] and rec["lr_search"]["random"] == [rec["baseline"]["runs"][0]["lr"]]
    assert "test set" in rec["lr_search"]["selected_on"] and rec["recipe"]["lr_search"] == list(validate_fkd.LR_GRID)
    assert "lr search (selected on the test set)" in proc.stdout


def test_teacher_checkpoint_normalisation_beats_the_preset_and_norm_flag_beats_both(tmp_path, digits_conv3):
    """A teacher in RDED's ConvNet layout was trained on ImageNet statistics (LINs-lab/RDED@3f6453d:
    validation/main.py): the validator normalises with them unless --norm or --mean/--std say otherwise."""
    import common
    import validate_fkd
    rded = {}
    for k, v in digits_conv3.state_dict().items():
        parts = k.split(".")
        if parts[0] == "features":
            n = int(parts[1])
            k = f"layers.{'conv' if n % 4 == 0 else 'norm'}.{n // 4}." + ".".join(parts[2:])
        elif parts[0] == "fc":
            k = "classifier." + ".".join(parts[1:])
        rded[k] = v
    path = tmp_path / "rded_conv3.pt"
    torch.save({"model": rded}, path)
    base = ["--random-real", "1", "--dry-run", "--protocol", "rded", "--teacher", "conv3", "--student", "conv3"]
    plain = validate_fkd.main(base)["recipe"]
    assert plain["mean"] == list(common.dataset_info("digits").mean)
    from_ckpt = validate_fkd.main(base + ["--teacher-path", str(path)])["recipe"]
    assert from_ckpt["mean"] == list(common.IMAGENET_MEAN) and from_ckpt["std"] == list(common.IMAGENET_STD)
    assert "RDED" in from_ckpt["norm_source"]
    forced = validate_fkd.main(base + ["--teacher-path", str(path), "--norm", "dataset"])["recipe"]
    assert forced["mean"] == list(common.dataset_info("digits").mean)
    explicit = validate_fkd.main(base + ["--teacher-path", str(path), "--mean", "0.1", "0.2", "0.3"])["recipe"]
    assert explicit["mean"] == [0.1, 0.2, 0.3] and explicit["std"] == list(common.IMAGENET_STD)
