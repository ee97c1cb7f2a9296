"""Evaluating one of our sets with DD-Ranking (ddranking 0.2.0, arXiv 2505.13300).

ddranking 0.2.0 cannot be installed next to this project (it pins numpy<2; scripts/ddranking_check.py runs
the real package in its own environment), so the test holds its API as data (the signatures below, from
NUS-HPC-AI-Lab/DD-Ranking@b8b0966:ddranking/metrics/soft_label.py:24-30 and :495) and follows its formats: LabelRobustScoreSoft.compute_metrics(image_tensor=[N,3,H,W] normalised
images in class-major order with IPC per class, soft_labels=[N,C] teacher logits), or image_path=an
ImageFolder root; teachers at <teacher_dir>/<dataset>/<model_name>/ckpt_best.pt, a plain state dict loaded
with load_state_dict (strict) into its ConvNet (features = [conv, norm, ReLU, AvgPool] x depth, classifier)."""
import inspect
import json
import os

import torch
import torch.nn as nn
import torchvision

import common
from conftest import random_digits_set, run_script


_ = inspect.Parameter.empty
# LabelRobustScoreSoft.__init__ and .compute_metrics of ddranking 0.2.0, parameter: default (soft_label.py:24-30, 495)
SOFT_INIT = {"config": None, "dataset": "CIFAR10", "real_data_path": "./dataset/", "ipc": 10, "model_name": "ConvNet-3",
             "soft_label_criterion": "kl", "loss_fn_kwargs": None, "data_aug_func": "cutmix", "aug_params": {"beta": 1.0},
             "soft_label_mode": "S", "optimizer": "sgd", "lr_scheduler": "step", "step_size": None, "weight_decay": 0.0005,
             "momentum": 0.9, "num_eval": 5, "im_size": (32, 32), "num_epochs": 300, "use_zca": False,
             "use_aug_for_hard": False, "random_data_format": "tensors", "random_data_path": None, "real_batch_size": 256,
             "syn_batch_size": 256, "save_path": None, "eval_full_data": False, "stu_use_torchvision": False,
             "tea_use_torchvision": False, "num_workers": 4, "teacher_dir": "./teacher_models", "teacher_model_names": None,
             "custom_train_trans": None, "custom_val_trans": None, "device": "cuda", "dist": False}
SOFT_CALL = {"image_tensor": None, "image_path": None, "soft_labels": None, "syn_lr": None, "lrs_lambda": 0.5}


def ddranking_signature(params):
    return inspect.Signature([inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v) for k, v in params.items()])


class DDRankingConvNet(nn.Module):
    """DD-Ranking's ConvNet-D-BN as its documentation describes it: width 128, BatchNorm, ReLU, AvgPool 2."""

    def __init__(self, depth, num_classes, size=32, width=128):
        super().__init__()
        layers, c = [], 3
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width, affine=True), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2, 2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * (size // 2 ** depth) ** 2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).view(len(x), -1))


def test_export_for_ddranking(tmp_path, digits_conv3):
    out = random_digits_set(tmp_path / "set", 4, 11)
    export = str(tmp_path / "for_ddranking")
    proc = run_script("validate_fkd.py", "--syn-data-path", out, "--export-ddranking", export, "--repeats", "3")
    assert "DD-Ranking ConvNet-3-BN" in proc.stdout and not any(n.startswith("eval_") for n in os.listdir(out))
    spec = json.load(open(os.path.join(export, "export.json")))
    assert (spec["dataset"], spec["ipc"], spec["model_name"], spec["im_size"]) == ("digits", 4, "ConvNet-3-BN", [32, 32])

    # ddranking.json: exactly keyword arguments of the constructor and of compute_metrics, binding to their signatures
    kw = json.load(open(os.path.join(export, "ddranking.json")))
    assert set(kw) == {"LabelRobustScoreSoft", "compute_metrics"}
    init, call = kw["LabelRobustScoreSoft"], kw["compute_metrics"]
    bound = ddranking_signature(SOFT_INIT).bind(**init)
    bound.apply_defaults()
    ddranking_signature(SOFT_CALL).bind(**call)
    a = bound.arguments  # what DD-Ranking will see, defaults included: none of the 0.2.0 defaults that fail
    assert a["random_data_format"] in ("tensor", "image") and a["loss_fn_kwargs"] is not None
    assert a["lr_scheduler"] != "step" or a["step_size"] is not None
    assert a["im_size"] == (32, 32) and "im_size" not in init  # a JSON list would not equal its tuple checks
    assert (a["dataset"], a["ipc"], a["model_name"], a["soft_label_mode"]) == ("digits", 4, "ConvNet-3-BN", "S")
    assert a["teacher_model_names"] == ["ConvNet-3-BN"] and a["num_eval"] == 3 and a["eval_full_data"] is True
    # the ddranking preset's recipe (validate_fkd.DDRANKING_RECIPE, digits: 20 epochs, batch 64)
    assert (a["optimizer"], a["lr_scheduler"], a["weight_decay"], a["num_epochs"], a["syn_batch_size"]) == (
        "adamw", "cosine", 0.01, 20, 64)
    assert a["loss_fn_kwargs"] == {"temperature": 1.0, "scale_loss": False} and a["aug_params"] == {"beta": 1.0}
    assert set(call) == {"image_tensor", "soft_labels", "lrs_lambda"}  # mode S: its soft labels are required
    assert call["image_tensor"] == os.path.join(export, "images.pt") and call["soft_labels"] == os.path.join(export, "soft_labels.pt")

    # the teacher: <teacher_dir>/<dataset>/<model_name>/ckpt_best.pt loads strictly into its ConvNet, same outputs
    ckpt = os.path.join(init["teacher_dir"], init["dataset"], init["teacher_model_names"][0], "ckpt_best.pt")
    theirs = DDRankingConvNet(3, 10)
    theirs.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    theirs.eval()

    # image_path: torchvision's ImageFolder sees exactly the 10 classes; image_tensor: those images, class-major
    folder = torchvision.datasets.ImageFolder(spec["image_path"], transform=torchvision.transforms.ToTensor())
    assert folder.classes == [f"{c:05d}" for c in range(10)] and len(folder) == 40
    mean, std = spec["images_normalised_with"]["mean"], spec["images_normalised_with"]["std"]
    pixels = torch.stack([folder[i][0] for i in range(len(folder))])
    images = torch.load(call["image_tensor"], weights_only=True)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.float32
    torch.testing.assert_close(images, torchvision.transforms.Normalize(mean, std)(pixels))
    hard = torch.arange(10).repeat_interleave(spec["ipc"])  # DD-Ranking's hard labels: IPC copies per class
    assert torch.equal(torch.tensor([t for _, t in folder.samples]), hard)

    # static soft labels: the teacher's logits on the unaugmented images, row i = image i
    soft = torch.load(call["soft_labels"], weights_only=True)
    with torch.no_grad():
        ours = digits_conv3(common.normalize(pixels, *spec_norm(spec)))
        assert torch.allclose(theirs(common.normalize(pixels, *spec_norm(spec))), ours, atol=1e-5)
    assert soft.shape == (40, 10) and torch.allclose(soft, ours, atol=1e-3)
    assert (soft.argmax(1) == hard).float().mean() > 0.8  # a real teacher's labels, in the images' order


def spec_norm(spec):
    return spec["teacher_expects"]["mean"], spec["teacher_expects"]["std"]


def test_export_refuses_what_ddranking_cannot_read(tmp_path):
    import pytest
    import validate_fkd
    with pytest.raises(common.UserError, match="no architecture matching"):
        validate_fkd.ddranking_model("mobilenet_v2_cifar")
    assert validate_fkd.ddranking_model("conv5") == ("ConvNet-5-BN", False)
    assert validate_fkd.ddranking_model("resnet18_modified") == ("ResNet-18-BN", True)
    net = common.build_model("resnet18_modified", 10)  # torchvision ResNet-18 keys are DD-Ranking's as they are
    sd = validate_fkd.ddranking_state_dict(net, "resnet18_modified")
    assert sd.keys() == net.state_dict().keys()
    sd = validate_fkd.ddranking_state_dict(common.build_model("conv3", 10), "conv3")
    assert sd.keys() == DDRankingConvNet(3, 10).state_dict().keys()


def test_ddranking_training_quirks(monkeypatch):
    """--preset ddranking's training loop settings: tested only when (epoch + 1) % 20 == 0 (DD-Ranking's
    soft_label.py:374); mode S's CutMix keeps each image's own soft label (train_and_eval.py:174-187), where our
    static protocol interpolates; AdamW decays every parameter (train_and_eval.py:109-110)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=g)
    targets = torch.arange(8) % 4
    soft = torch.randn(8, 4, generator=g)
    val = [(images.float() / 255, targets)]
    seen = []
    real_kd = common.kd_loss

    def spy(out, target, *a, **k):
        seen.append(target.detach().clone())
        return real_kd(out, target, *a, **k)
    monkeypatch.setattr(common, "kd_loss", spy)

    def run(mix_labels, epochs, **extra):
        seen.clear()
        net = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        cfg = common.TrainConfig(labels="static", epochs=epochs, batch_size=8, optimizer="adamw_all", lr=1e-3,
                                 mix="cutmix", eval_every=20, mix_labels=mix_labels, temperature=1.0, **extra)
        import validate_fkd
        data = validate_fkd.IndexedDataset(images, targets, lambda t: t.float() / 255)
        return common.train_student(net, cfg, val, "cpu", train_set=data, static_labels=soft, log=lambda *_: None)

    res = run(False, 40, eval_phase=19)
    assert [e for e, _ in res["history"]] == [19, 39]
    own = [any(torch.equal(row, s) for s in soft) for t in seen for row in t]
    assert len(own) == 8 * 40 and all(own)  # every target is some image's own label, never a mix
    res = run(True, 3)
    assert [e for e, _ in res["history"]] == [0, 2]  # the default phase: every eval_every epochs from 0, and the last
    assert not all(any(torch.allclose(row, s) for s in soft) for t in seen for row in t)

    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    groups = common.make_optimizer(net, "adamw_all", 1e-3, 0.01).param_groups
    assert all(gr["weight_decay"] == 0.01 for gr in groups) and sum(len(gr["params"]) for gr in groups) == 4
    assert [gr["weight_decay"] for gr in common.make_optimizer(net, "adamw", 1e-3, 0.01).param_groups] == [0.01, 0.0]


def test_ddranking_preset_resolves_its_recipe():
    import validate_fkd
    for mode, protocol, labels in (("S", "static", "static"), ("M", "rded", "teacher")):
        r = validate_fkd.main(["--random-real", "10", "--preset", "ddranking", "--ddranking-mode", mode, "--dry-run"])
        assert (r["protocol"], r["label_mode"], r["student"]) == (protocol, labels, "conv3")
        rec = r["recipe"]
        assert (rec["optimizer"], rec["schedule"], rec["weight_decay"], rec["temperature"], rec["mix"]) == (
            "adamw_all", "quarter", 0.01, 1.0, "cutmix")
        assert (rec["crop"], rec["flip"], rec["eval_every"], rec["eval_phase"], rec["test_view"]) == ("none", False, 20, 19, "full")
        assert rec["mix_labels"] is False and rec["lr_search"] == [0.001, 0.005, 0.01, 0.05, 0.1]
        assert (rec["epochs"], rec["batch_size"], rec["repeats"]) == (20, 64, 5)  # digits; elsewhere 300, 256, 5
    r = validate_fkd.main(["--random-real", "10", "--preset", "none", "--protocol", "static", "--dry-run"])
    assert "eval_phase" not in r["recipe"] and "mix_labels" not in r["recipe"]  # other recipes record as before
    import pytest
    with pytest.raises(common.UserError, match="neither a full-data figure nor a full-data recipe"):
        validate_fkd.main(["--dataset", "cifar10", "--random-real", "10", "--preset", "ddranking", "--dry-run"])
