"""Fidelity to the official code where a researcher reproduces a table: official checkpoints load
with equal outputs (UFC's kuangliu-style CIFAR nets, RDED/DELT's and DD-Ranking's ConvNet), the
torchvision weights each script names, the input normalisation a checkpoint expects, class names
for prompts, and the official JPEG saving. Each reference below is written here from the official
definitions, independently of common.py."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import common
from conftest import randomise_bn


# ---------------------------------------------------------------- references: official layouts
class RefMBV2Block(nn.Module):  # UFC@83d19f8:models/mobilenetv2.py Block
    def __init__(self, i, o, e, s):
        super().__init__()
        p = e * i
        self.s = s
        self.conv1, self.bn1 = nn.Conv2d(i, p, 1, bias=False), nn.BatchNorm2d(p)
        self.conv2, self.bn2 = nn.Conv2d(p, p, 3, s, 1, groups=p, bias=False), nn.BatchNorm2d(p)
        self.conv3, self.bn3 = nn.Conv2d(p, o, 1, bias=False), nn.BatchNorm2d(o)
        self.shortcut = nn.Sequential()
        if s == 1 and i != o:
            self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        return y + self.shortcut(x) if self.s == 1 else y


class RefMBV2(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        blocks, i = [], 32
        for e, o, k, s in [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)]:
            for st in [s] + [1] * (k - 1):
                blocks.append(RefMBV2Block(i, o, e, st))
                i = o
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, n)

    def forward(self, x):
        y = F.relu(self.bn2(self.conv2(self.layers(F.relu(self.bn1(self.conv1(x)))))))
        return self.linear(F.avg_pool2d(y, 4).view(len(x), -1))


class RefSE(nn.Module):
    def __init__(self, c, s):
        super().__init__()
        self.se1, self.se2 = nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)

    def forward(self, x):
        w = F.adaptive_avg_pool2d(x, 1)
        w = self.se1(w) * torch.sigmoid(self.se1(w))
        return x * torch.sigmoid(self.se2(w))


class RefEffBlock(nn.Module):  # UFC@83d19f8:models/efficientnet.py Block (expand conv built even when ratio 1)
    def __init__(self, i, o, k, s, e):
        super().__init__()
        c = e * i
        self.e, self.skip = e, s == 1 and i == o
        self.conv1, self.bn1 = nn.Conv2d(i, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, k, s, 1 if k == 3 else 2, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = RefSE(c, int(i * 0.25))
        self.conv3, self.bn3 = nn.Conv2d(c, o, 1, bias=False), nn.BatchNorm2d(o)

    def forward(self, x):
        swish = lambda t: t * torch.sigmoid(t)  # noqa: E731
        y = x if self.e == 1 else swish(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(self.se(swish(self.bn2(self.conv2(y))))))
        return y + x if self.skip else y


class RefEff(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        blocks, i = [], 32
        for k_blocks, e, o, k, s in zip([1, 2, 2, 3, 3, 4, 1], [1, 6, 6, 6, 6, 6, 6], [16, 24, 40, 80, 112, 192, 320],
                                        [3, 3, 5, 3, 5, 5, 3], [1, 2, 2, 2, 1, 2, 1]):
            for st in [s] + [1] * (k_blocks - 1):
                blocks.append(RefEffBlock(i, o, k, st, e))
                i = o
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(320, n)

    def forward(self, x):
        y = self.conv1(x)
        y = self.bn1(y)
        y = self.layers(y * torch.sigmoid(y))
        return self.linear(F.adaptive_avg_pool2d(y, 1).view(len(x), -1))


class RefShuffleBlock(nn.Module):  # UFC@83d19f8:models/shufflenet.py Bottleneck
    def __init__(self, i, o, s, g):
        super().__init__()
        m, gg = o // 4, (1 if i == 24 else g)
        self.s, self.gg = s, gg
        self.conv1, self.bn1 = nn.Conv2d(i, m, 1, groups=gg, bias=False), nn.BatchNorm2d(m)
        self.conv2, self.bn2 = nn.Conv2d(m, m, 3, s, 1, groups=m, bias=False), nn.BatchNorm2d(m)
        self.conv3, self.bn3 = nn.Conv2d(m, o, 1, groups=g, bias=False), nn.BatchNorm2d(o)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if s == 2 else nn.Sequential()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        n, c, h, w = y.shape
        y = y.view(n, self.gg, c // self.gg, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        r = self.shortcut(x)
        return F.relu(torch.cat([y, r], 1)) if self.s == 2 else F.relu(y + r)


class RefShuffle(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        i = 24
        for name, o, k in (("layer1", 200, 4), ("layer2", 400, 8), ("layer3", 800, 4)):
            blocks = []
            for b in range(k):
                blocks.append(RefShuffleBlock(i, o - (i if b == 0 else 0), 2 if b == 0 else 1, 2))
                i = o
            setattr(self, name, nn.Sequential(*blocks))
        self.linear = nn.Linear(800, n)

    def forward(self, x):
        y = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(y, 4).view(len(x), -1))


class RefRDEDConvNet(nn.Module):  # LINs-lab/RDED@31f9117:synthesize/models.py ConvNet, batch norm
    def __init__(self, n, depth=3, size=32):
        super().__init__()
        convs, norms, c = [], [], 3
        for _ in range(depth):
            convs.append(nn.Conv2d(c, 128, 3, padding=1))
            norms.append(nn.BatchNorm2d(128))
            c = 128
        self.layers = nn.ModuleDict({"conv": nn.ModuleList(convs), "norm": nn.ModuleList(norms),
                                     "act": nn.ModuleList([nn.ReLU()] * depth),
                                     "pool": nn.ModuleList([nn.AvgPool2d(2, 2)] * depth)})
        self.depth = depth
        self.classifier = nn.Linear(128 * (size // 2 ** depth) ** 2, n)

    def forward(self, x):
        for d in range(self.depth):
            x = self.layers["pool"][d](self.layers["act"][d](self.layers["norm"][d](self.layers["conv"][d](x))))
        return self.classifier(x.view(len(x), -1))


@pytest.mark.parametrize("arch,ref", [("mobilenet_v2_cifar", RefMBV2), ("efficientnet_b0_cifar", RefEff),
                                      ("shufflenet_g2", RefShuffle)])
def test_ufc_cifar_checkpoints_load_as_released(tmp_path, arch, ref):
    """A DataParallel checkpoint in the official key layout (module.conv1.weight, module.layers.0...,
    module.linear.weight; EfficientNet's unused first-block expand conv/BN included) loads through
    load_teacher and gives the reference's logits."""
    torch.manual_seed(0)
    official = randomise_bn(ref(100), 1)
    sd = nn.DataParallel(official).state_dict()
    assert "module.linear.weight" in sd and "module.conv1.weight" in sd
    if arch == "efficientnet_b0_cifar":
        assert "module.layers.0.conv1.weight" in sd and "module.layers.0.bn1.running_var" in sd
    torch.save({"state_dict": sd, "acc": 0.0, "epoch": 200}, tmp_path / "ckpt.pth")
    teacher = common.load_teacher(arch, "cifar100", str(tmp_path / "ckpt.pth"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), official(x), atol=1e-5, rtol=1e-4)
    # the BN loss counts only what fired: EfficientNet's dead BN never enters it
    hook = common.BNStatsHook(teacher)
    with torch.no_grad():
        teacher(x)
    fired = len(hook.values)
    hook.remove()
    assert fired == sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) - (arch == "efficientnet_b0_cifar")


def test_efficientnet_dead_expand_layer_is_not_trainable():
    model = common.build_model("efficientnet_b0_cifar", 10)
    model.train()
    F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # DDP would refuse a trainable parameter that never gets a gradient
    assert not model.layers[0].conv1.weight.requires_grad


@pytest.mark.parametrize("layout", ["rded", "ddranking"])
def test_rded_and_ddranking_convnet_checkpoints_load(tmp_path, layout):
    torch.manual_seed(0)
    official = randomise_bn(RefRDEDConvNet(10, 3, 32), 2)
    sd = official.state_dict()
    assert "layers.conv.0.weight" in sd and "layers.norm.2.running_mean" in sd and "classifier.weight" in sd
    if layout == "ddranking":  # our Sequential names (conv at 4d, BN at 4d + 1) with classifier.* for fc.*
        sd = {(k.replace(f"layers.conv.{k.split('.')[2]}", f"features.{4 * int(k.split('.')[2])}")
               .replace(f"layers.norm.{k.split('.')[2]}", f"features.{4 * int(k.split('.')[2]) + 1}")
               if k.startswith("layers.") else k): v for k, v in sd.items()}
        assert "features.9.running_var" in sd and "classifier.bias" in sd
    torch.save({"model": sd}, tmp_path / "conv3.pth")
    teacher = common.load_teacher("conv3", "cifar10", str(tmp_path / "conv3.pth"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), official(x))


# ---------------------------------------------------------------- pretrained torchvision teachers
def test_each_script_names_the_official_torchvision_weights(monkeypatch):
    """The ImageNet teachers of every script resolve to IMAGENET1K_V1, the weights the official code
    loaded (pretrained=True / IMAGENET1K_V1), not DEFAULT (V2 for ResNet-50/101 and MobileNetV2)."""
    import d4m
    import delt
    import dmkd
    import infer_ufc
    seen, real_get_model = {}, torchvision.models.get_model

    def fake_get_model(name, weights=None, **kw):  # records the request instead of downloading
        seen[name] = weights
        return real_get_model(name, weights=None, num_classes=1000)

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    archs = {delt.PRESETS["imagenet"]["teacher"], dmkd.PRESETS["imagenet"]["teacher"],
             d4m.PRESETS["imagenet"]["teacher"], *infer_ufc.IMAGENET_TEACHERS.split(","),
             "resnet50", "resnet101"}  # validate_fkd: the teacher defaults to the student (R18/50/101)
    for arch in archs:
        common.load_teacher(arch, "imagenet")
    v1 = {"resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
          "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
          "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
          "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
          "efficientnet_b0": torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1}
    assert seen == {a: v1[a] for a in archs}
    assert torchvision.models.ResNet50_Weights.DEFAULT != v1["resnet50"]  # what "DEFAULT" would have loaded


# ---------------------------------------------------------------- normalisation a checkpoint expects
def test_resolve_norm_follows_the_checkpoint(tmp_path):
    rded = RefRDEDConvNet(10).state_dict()
    torch.save({"model": rded}, tmp_path / "rded_conv3.pth")
    torch.save({"model": common.build_model("conv3", 10).state_dict()}, tmp_path / "ours.pth")
    torch.save({"model": common.build_model("conv3", 10).state_dict(), "mean": [0.1, 0.2, 0.3],
                "std": [0.4, 0.5, 0.6]}, tmp_path / "flagged.pth")
    mean, std, why = common.resolve_norm("cifar10", [str(tmp_path / "rded_conv3.pth")])
    assert (mean, std) == (common.IMAGENET_MEAN, common.IMAGENET_STD) and "RDED" in why
    assert common.resolve_norm("cifar10", [str(tmp_path / "ours.pth")])[:2] == (common.CIFAR_MEAN, common.CIFAR_STD)
    assert common.resolve_norm("cifar10", [str(tmp_path / "flagged.pth")])[:2] == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert common.resolve_norm("cifar10", [None])[:2] == (common.CIFAR_MEAN, common.CIFAR_STD)
    # explicit choices beat the checkpoint; --mean/--std beat everything
    assert common.resolve_norm("cifar10", [str(tmp_path / "rded_conv3.pth")], norm="dataset")[:2] == (common.CIFAR_MEAN, common.CIFAR_STD)
    assert common.resolve_norm("cifar10", [], norm="imagenet")[:2] == (common.IMAGENET_MEAN, common.IMAGENET_STD)
    m, s, why = common.resolve_norm("cifar10", [str(tmp_path / "rded_conv3.pth")], mean=(0.5,) * 3, std=(0.25,) * 3)
    assert (m, s, why) == ((0.5,) * 3, (0.25,) * 3, "--mean/--std")
    with pytest.raises(common.UserError, match="different input normalisations"):
        common.resolve_norm("cifar10", [str(tmp_path / "rded_conv3.pth"), str(tmp_path / "flagged.pth")])


# ---------------------------------------------------------------- class names for prompts
def test_class_names_for_prompts(tmp_path, monkeypatch):
    for w in ("n02012849", "n03126707", "n01440764"):
        os.makedirs(tmp_path / "train" / w)
    monkeypatch.setitem(common.DATASETS, "imagenette", common.DatasetInfo("imagenette", 3, 224, common.IMAGENET_MEAN,
                                                                          common.IMAGENET_STD))
    names = [c["name"] for c in common.class_list("imagenette", str(tmp_path))]
    assert names == ["tench, Tinca tinca", "crane, bird", "crane, machine"]  # sorted wnids: the bird first

    class FakeCifar100:  # torchvision's CIFAR-100 class names, with their underscores
        classes = ["apple", "aquarium_fish", "maple_tree", "sweet_pepper"]
    monkeypatch.setattr(common, "_cifar", lambda *a, **k: FakeCifar100())
    classes = common.class_list("cifar100", str(tmp_path))
    assert [c["name"] for c in classes] == ["apples", "aquarium fish", "maple", "sweet peppers"]  # the prompt files' names
    assert [c["id"] for c in classes] == FakeCifar100.classes  # ids stay torchvision's (class-order checks)


# ---------------------------------------------------------------- the official JPEG saving
def test_jpg_format_is_the_official_saving(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    x[0, 0, 0, 0] = 0.999  # 254.745: truncated to 254, rounded to 255
    common.save_images(x, [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")])
    # reference: numpy's (x * 255).astype(uint8) (truncation) saved by PIL at quality 75
    arr = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert arr[0, 0, 0] == 254
    Image.fromarray(arr).save(tmp_path / "ref.jpg", quality=75)
    assert (tmp_path / "a.jpg").read_bytes() == (tmp_path / "ref.jpg").read_bytes()
    png = np.asarray(Image.open(tmp_path / "b.png"))  # PNG stays lossless and rounded
    assert np.array_equal(png, np.rint(x[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
