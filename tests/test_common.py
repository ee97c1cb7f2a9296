"""common.py against independent computations: the digits split, the model zoo, the BN hook,
checkpoint formats, the on-disk contract writer (atomic, resumable, refusing other runs)."""
import argparse
import fcntl
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common


def test_digits_split_sizes_balance_shape_range():
    x, y = common.digits_split("train")
    xt, yt = common.digits_split("test")
    assert x.shape == (1437, 3, 32, 32) and xt.shape == (360, 3, 32, 32)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.99
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey copied to 3 channels
    # stratified 80/20 split: every class keeps its share of the 1797 images within one image
    from sklearn.datasets import load_digits
    full = np.bincount(load_digits().target)
    assert np.all(np.abs(np.bincount(y.numpy()) - 0.8 * full) <= 1)
    assert np.all(np.abs(np.bincount(yt.numpy()) - 0.2 * full) <= 1)
    # the 8x8 originals, upsampled bilinearly: average-pooling back is close to pixel/16
    d = load_digits()
    assert x.shape[0] + xt.shape[0] == len(d.target)
    assert common.class_list("digits")[3] == {"index": 3, "name": "3", "id": "3"}


@pytest.mark.parametrize("arch", common.ARCHS)
def test_zoo_forward_shape(arch):
    size = 128 if arch in ("conv5", "conv6") else 64 if arch in ("resnet50", "resnet101", "efficientnet_b0", "mobilenet_v2") else 32
    model = common.build_model(arch, 7, size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    import delt
    feats = delt.classifier_input(model, torch.randn(2, 3, size, size))
    assert feats.shape[0] == 2 and feats.shape[1] == [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].in_features


def test_input_size_rules():
    assert common.input_size("imagenet", "conv4") == 64 and common.input_size("imagenette", "conv5") == 128
    assert common.input_size("imagenette", "resnet18") == 224 and common.input_size("tiny", "conv4") == 64
    with pytest.raises(common.UserError):
        common.build_model("conv6", 10, 32)  # 32 px cannot be halved six times
    with pytest.raises(common.UserError):
        common.build_model("vgg99", 10, 32)


def test_bn_hook_matches_independent_computation():
    torch.manual_seed(0)
    model = common.build_model("conv3", 10, 32)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    # independent: walk the Sequential by hand and evaluate the formula on each BN input
    expected, h, first = 0.0, x, True
    with torch.no_grad():
        for layer in model.features:
            if isinstance(layer, torch.nn.BatchNorm2d):
                mean = h.mean(dim=(0, 2, 3))
                var = ((h - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
                r = 2.0 * torch.sqrt(((var - layer.running_var) ** 2).sum()) + torch.sqrt(((mean - layer.running_mean) ** 2).sum())
                expected = expected + (10.0 if first else 1.0) * r
                first = False
            h = layer(h)
    hook = common.BNStatsHook(model, first_bn_multiplier=10.0, r_var=2.0)
    model(x)
    got = hook.loss()
    assert torch.allclose(got, expected, rtol=1e-5)
    assert hook.loss() == 0  # cleared after reading: only what fired in the last forward counts
    hook.remove()
    model(x)
    assert hook.values == {}


def test_checkpoint_formats(tmp_path):
    torch.manual_seed(0)
    ref = common.build_model("conv3", 10, 32)
    sd = ref.state_dict()
    cases = {"bare": sd, "model": {"model": sd}, "state_dict": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "acc": 1.0}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        model = common.load_state(common.build_model("conv3", 10, 32), str(tmp_path / f"{name}.pth"))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), sd.values())), name
    # RDED: a classifier built 1000-way keeps its first C rows
    big = common.build_model("conv3", 1000, 32).state_dict()
    torch.save({"model": big}, tmp_path / "rded.pth")
    model = common.load_state(common.build_model("conv3", 10, 32), str(tmp_path / "rded.pth"))
    assert torch.equal(model.fc.weight, big["fc.weight"][:10])
    # wrong architecture, wrong class count: one sentence each
    with pytest.raises(common.UserError, match="does not fit"):
        common.load_state(common.build_model("resnet18_modified", 10, 32), str(tmp_path / "bare.pth"))
    torch.save(common.build_model("conv3", 5, 32).state_dict(), tmp_path / "five.pth")
    with pytest.raises(common.UserError, match="class count"):
        common.load_state(common.build_model("conv3", 10, 32), str(tmp_path / "five.pth"))
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_state(ref, str(tmp_path / "missing.pth"))


def test_digits_teacher_is_accurate_and_cached(digits_conv3):
    path = os.path.join(common.cache_dir(), "teachers", f"digits_conv3_seed0_ep{common.DIGITS_TEACHER_EPOCHS}.pt")
    record = torch.load(path, weights_only=True)
    assert record["acc"] > 90.0
    val = common.real_dataset("digits", None, "val", common.eval_transform("digits"))
    acc = common.evaluate(digits_conv3, torch.utils.data.DataLoader(val, batch_size=256))
    assert abs(acc - record["acc"]) < 1e-6
    assert not any(p.requires_grad for p in digits_conv3.parameters()) and not digits_conv3.training


def test_a_teacher_another_run_is_training_is_waited_for_then_loaded(digits_conv3, tmp_path, monkeypatch, capsys):
    """Two runs started together on a fresh cache: the second waits on <teacher>.lock while the first trains,
    then loads the first one's file instead of training again."""
    name = f"digits_conv3_seed0_ep{common.DIGITS_TEACHER_EPOCHS}.pt"
    trained = os.path.join(common.cache_dir(), "teachers", name)
    monkeypatch.setenv("DD_CACHE", str(tmp_path))
    path = tmp_path / "teachers" / name
    os.makedirs(path.parent)
    got = {}
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "the first run", training
        waiter = threading.Thread(target=lambda: got.setdefault("model", common.digits_teacher("conv3")))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not path.exists()  # waiting, not training
        shutil.copy(trained, path)  # the first run's file lands, then its lock goes
    waiter.join(60)
    assert not waiter.is_alive() and "trained digits teacher" not in capsys.readouterr().out
    want, have = digits_conv3.state_dict(), got["model"].state_dict()
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)


def _args(**kw):
    return argparse.Namespace(method="test", ipc=2, format="png", **kw)


def test_writer_contract_resume_and_refusal(tmp_path):
    out = str(tmp_path / "set")
    classes = common.class_list("digits")
    run = common.RunDir(out, _args(lr=0.1), classes)
    x, y = common.digits_split("train")
    imgs = {c: x[y == c][:2] for c in range(10)}
    for c in range(10):
        run.write_class(c, imgs[c])
    with run.stage("synthesis", items=20):
        pass
    run.finish(device="cpu", note="ok")
    # the contract: an ImageFolder root with 5-digit class folders, classes.json, run.json, preview.png
    ds = torchvision.datasets.ImageFolder(out)
    assert ds.classes == [f"{c:05d}" for c in range(10)] and len(ds) == 20
    assert json.load(open(os.path.join(out, "classes.json"))) == classes
    rec = json.load(open(os.path.join(out, "run.json")))
    assert rec["status"] == "done" and rec["stages"]["synthesis"]["images"] == 20 and "torch" in rec["versions"]
    assert os.path.isfile(os.path.join(out, "preview.png"))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    # PNG is lossless: files hold the 8-bit rounding of the tensor
    back = torch.from_numpy(np.array(Image.open(os.path.join(out, "00003", "00001.png")))).permute(2, 0, 1)
    assert torch.equal(back, (imgs[3][1] * 255).round().to(torch.uint8))
    # resume: the same run sees complete classes; an incomplete class is not complete
    again = common.RunDir(out, _args(lr=0.1), classes)
    assert all(again.class_complete(c, 2) for c in range(10)) and not again.class_complete(0, 3)
    # a different run is refused and nothing is touched
    before = sorted(os.listdir(out))
    with pytest.raises(common.UserError, match="different run"):
        common.RunDir(out, _args(lr=0.2), classes)
    assert sorted(os.listdir(out)) == before
    # unless --overwrite, which clears the earlier set
    common.RunDir(out, _args(lr=0.2), classes, overwrite=True)
    assert not os.path.isdir(os.path.join(out, "00000"))


def test_interrupted_class_write_leaves_no_partial_class(tmp_path, monkeypatch):
    out = str(tmp_path / "set")
    run = common.RunDir(out, _args(), common.class_list("digits"))

    def boom(images, paths):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(paths[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_images", boom)
    with pytest.raises(KeyboardInterrupt):
        run.write_class(0, torch.zeros(2, 3, 4, 4))
    assert not os.path.isdir(os.path.join(out, "00000")) and not run.class_complete(0, 1)


def test_class_order_mismatch_is_refused(tmp_path):
    classes = common.class_list("digits")
    common.write_classes_json(str(tmp_path), classes[::-1])
    with pytest.raises(common.UserError, match="different class order"):
        common.check_classes_json(str(tmp_path), classes)
    assert common.check_classes_json(str(tmp_path / "nowhere"), classes) is False  # no file: warn, sorted order


def _folder(root, wnids, per_class=2, size=12):
    for w in wnids:
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, w), exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), i * 40, np.uint8)).save(os.path.join(root, split, w, f"{i}.JPEG"))


def test_folder_datasets_and_bad_input(tmp_path):
    nette = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
             "n03425413", "n03445777", "n03888605"]
    root = str(tmp_path / "nette")
    _folder(root, nette)
    classes = common.class_list("imagenette", root)
    assert [c["id"] for c in classes] == nette and classes[0]["name"] == "tench, Tinca tinca"
    ds = common.real_dataset("imagenette", root, "train", common.eval_transform("imagenette", 32))
    assert len(ds) == 20 and ds[0][0].shape == (3, 32, 32)
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.dataset_info("mnist")
    with pytest.raises(common.UserError, match="--data-path is required"):
        common.class_list("imagenette", None)
    with pytest.raises(common.UserError, match="does not exist"):
        common.class_list("imagenette", str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(common.UserError, match="no class folders"):
        common.class_list("imagenette", str(tmp_path / "empty"))
    few = str(tmp_path / "few")
    _folder(few, nette[:3])
    with pytest.raises(common.UserError, match="3 class folders"):
        common.class_list("imagenette", few)
    # a corrupt image is named
    with open(os.path.join(root, "train", nette[0], "0.JPEG"), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(common.UserError, match="0.JPEG"):
        common.real_dataset("imagenette", root, "train", common.to_tensor())[0]
    with pytest.raises(common.UserError, match="--teacher-path"):
        common.load_teacher("resnet18", "imagenette", data_path=root)


def test_tiny_val_is_refoldered(tmp_path):
    root = tmp_path / "tiny"
    wnids = [f"n{i:08d}" for i in range(200)]
    for w in wnids:
        os.makedirs(root / "train" / w)
    os.makedirs(root / "val" / "images")
    with open(root / "val" / "val_annotations.txt", "w") as f:
        for i, w in enumerate(wnids[:3]):
            Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
            f.write(f"val_{i}.JPEG\t{w}\t0\t0\t64\t64\n")
    with pytest.raises(common.UserError):  # 3 of 200 classes have val images: refused, but re-foldered first
        common.real_dataset("tiny", str(root), "val")
    assert (root / "val" / wnids[1] / "val_1.JPEG").is_file() and not (root / "val" / "images").exists()


def test_preview_canvas_fits_its_images(tmp_path):
    """One column per image of the fullest class shown (at most 8): IPC 1 is one column, not 8 with 7 black."""
    x, _ = common.digits_split("train")
    for ipc, width in ((1, 64 + 2 * 2), (3, 3 * (64 + 2) + 2)):
        out = tmp_path / f"ipc{ipc}"
        for c in range(10):
            os.makedirs(out / f"{c:05d}")
            common.save_images(x[:ipc], [str(out / f"{c:05d}" / f"{i:05d}.png") for i in range(ipc)])
        common.save_preview(str(out))
        assert Image.open(out / "preview.png").size == (width, 10 * (64 + 2) + 2)  # make_grid: padding 2


def test_cifar_missing_folder_is_named_not_created(tmp_path):
    missing = tmp_path / "nonexistent"
    with pytest.raises(common.UserError, match="cifar-10-batches-py/ .*cifar-10-python.tar.gz"):
        common.class_list("cifar10", str(missing))  # torchvision's download=True would create it
    assert not missing.exists()
    with pytest.raises(common.UserError, match="required for every dataset but digits|--data-path is required"):
        common.real_dataset("cifar100", None, "train")


def test_closing_line_one_shape():
    rec = {"best_mean": 96.0166, "best_std": 0.3512, "repeats": 3, "student": "conv3", "epochs": 40, "steps": 80,
           "protocol": "rded", "label_mode": "teacher", "preset": "delt",
           "baseline": {"best_mean": 95.4555, "best_std": 0.4722, "epochs": 40, "steps": 80}}
    assert common.closing_line("delt", "digits", 10, "runs/x", rec, {"teacher": True, "ranking": False}) == (
        "delt: digits IPC 10 -> runs/x | top-1 distilled 96.02 ± 0.35 vs random real 95.46 ± 0.47 | 3 students each: "
        "conv3, 40 epochs = 80 optimiser steps | protocol rded (teacher labels), preset delt | reused from cache: teacher")
    rec["baseline"]["steps"] = 40  # INFER: K*(M+1) files per class against IPC random real images
    assert "40 epochs = 80 (distilled) / 40 (random real) optimiser steps" in common.closing_line("m", "digits", 10, "o", rec)
    assert common.closing_line("d4m", "imagenet", 10, "o") == ("d4m: imagenet IPC 10 -> o | top-1 not evaluated (pass "
                                                               "--eval) | reused from cache: nothing")
    assert "top-1 not evaluated (--no-eval)" in common.closing_line("d4m", "digits", 10, "o")


def test_precheck_refuses_a_different_run_without_touching_anything(tmp_path):
    out = str(tmp_path / "set")
    common.RunDir.precheck(out, _args(lr=0.1))  # nothing there: nothing to refuse, nothing created
    assert not os.path.exists(out)
    run = common.RunDir(out, _args(lr=0.1, eval=True), common.class_list("digits"))
    run.write_class(0, common.digits_split("train")[0][:2])
    run.finish()
    before = sorted(os.listdir(out))
    common.RunDir.precheck(out, _args(lr=0.1, eval=False))  # the same run (eval is volatile): resumes
    with pytest.raises(common.UserError, match=r"holds a different run \(differs in lr\)"):
        common.RunDir.precheck(out, _args(lr=0.2))
    common.RunDir.precheck(out, _args(lr=0.2), overwrite=True)
    assert sorted(os.listdir(out)) == before


def test_hub_offline_error_names_the_flag(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    with pytest.raises(common.UserError, match="--model"):
        common.hub_from_pretrained(StableDiffusionImg2ImgPipeline, "nobody/no-such-model-xyz", "--model")


def test_random_subset_is_seeded_and_balanced():
    _, y = common.digits_split("train")
    a = common.random_subset(y.tolist(), 5, seed=1)
    assert a == common.random_subset(y.tolist(), 5, seed=1) and a != common.random_subset(y.tolist(), 5, seed=2)
    assert np.all(np.bincount(y[a].numpy()) == 5)
    with pytest.raises(common.UserError, match="fewer than --ipc"):
        common.random_subset(y.tolist(), 500, seed=0)


def test_shard_and_presets():
    assert common.shard(range(10), 1, 3) == [1, 4, 7]
    args = argparse.Namespace(dataset="digits", lr=None, r_bn=0.5)
    common.apply_presets(args, {"digits": {"lr": 0.1, "r_bn": 0.01}}, {"lr": 0.25})
    assert args.lr == 0.1 and args.r_bn == 0.5  # an explicit flag beats the preset
