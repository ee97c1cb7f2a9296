"""Checkpoints of the official DM-KD CIFAR-100 nets and of DD-Ranking's default (instance-norm) ConvNet
load strictly into the model zoo and give the logits of reference modules written here from the official
definitions: zhengli97/DM-KD@bbab9ce:models/cifar_resnet.py and models/wrn.py, NUS-HPC-AI-Lab/DD-Ranking@b8b0966:
ddranking/utils/networks.py (ConvNet, net_norm 'instancenorm')."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import randomise_bn


# ---------------------------------------------------------------- DM-KD's CIFAR ResNet (cifar_resnet.py)
class RefBlock(nn.Module):  # BasicBlock: conv-bn-relu-conv-bn, + downsample (empty Sequential = identity), relu
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential()
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.downsample(x))


class RefCifarResNet(nn.Module):  # CIFAR_ResNet: conv3x3 -> bn1 (no ReLU) -> layer1..4 -> pool(relu) -> fc
    def __init__(self, num_blocks, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            layers = []
            for stride in [1 if i == 0 else 2] + [1] * (n - 1):
                layers.append(RefBlock(cin, planes, stride))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(out), (1, 1)).view(len(x), -1))


# ---------------------------------------------------------------- DM-KD's WRN (wrn.py, Wei Yang's)
class RefWRNBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = (not self.equal) and nn.Conv2d(cin, cout, 1, stride, 0, bias=False) or None

    def forward(self, x):
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return torch.add(x if self.equal else self.convShortcut(x), out)


class RefNetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RefWRNBlock(i == 0 and cin or cout, cout, i == 0 and stride or 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RefWRN(nn.Module):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        ch, n = [16, 16 * widen, 32 * widen, 64 * widen], (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = RefNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RefNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RefNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.n_channels = ch[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.n_channels))


@pytest.mark.parametrize("arch,ref", [
    ("cifarresnet18", lambda: RefCifarResNet([2, 2, 2, 2], 100)),
    ("cifarresnet34", lambda: RefCifarResNet([3, 4, 6, 3], 100)),
    ("wrn_16_1", lambda: RefWRN(16, 1, 100)), ("wrn_16_2", lambda: RefWRN(16, 2, 100)),
    ("wrn_40_1", lambda: RefWRN(40, 1, 100)), ("wrn_40_2", lambda: RefWRN(40, 2, 100))])
def test_dmkd_cifar_checkpoints_load_with_equal_logits(tmp_path, arch, ref):
    """DM-KD's train_student.py loads ckpt['model'] (a DataParallel state dict in its teachers' folders):
    strict key match, equal logits."""
    torch.manual_seed(0)
    official = randomise_bn(ref(), 3)
    sd = official.state_dict()
    ours = common.build_model(arch, 100).state_dict()
    assert sorted(sd) == sorted(ours) and all(sd[k].shape == ours[k].shape for k in sd)
    torch.save({"model": nn.DataParallel(official).state_dict(), "epoch": 240}, tmp_path / "ckpt.pth")
    teacher = common.load_teacher(arch, "cifar100", str(tmp_path / "ckpt.pth"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), official(x), atol=1e-5, rtol=1e-4)


def test_dmkd_resnet_differs_from_resnet18_modified_only_by_the_stem_relu(tmp_path):
    """The same checkpoint fits resnet18_modified key for key, but there a ReLU follows the stem BN:
    other logits (why cifarresnet18 is its own architecture)."""
    torch.manual_seed(0)
    official = randomise_bn(RefCifarResNet([2, 2, 2, 2], 100), 4)
    torch.save({"model": official.state_dict()}, tmp_path / "ckpt.pth")
    relu_stem = common.load_teacher("resnet18_modified", "cifar100", str(tmp_path / "ckpt.pth"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (relu_stem(x) - official(x)).abs().max() > 1e-3


# ---------------------------------------------------------------- DD-Ranking's ConvNet-3 (instance norm)
class RefDDRankingConvNet(nn.Module):  # networks.py ConvNet(3, C, 128, 3, 'relu', 'instancenorm', 'avgpooling')
    def __init__(self, num_classes, depth=3, size=32):
        super().__init__()
        layers, c = [], 3
        for _ in range(depth):
            layers += [nn.Conv2d(c, 128, 3, padding=1), nn.GroupNorm(128, 128, affine=True), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2, 2)]
            c, size = 128, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128 * size * size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).view(len(x), -1))


def test_ddranking_instance_norm_convnet_loads_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    official = RefDDRankingConvNet(10).eval()
    for m in official.modules():  # non-trivial affine parameters
        if isinstance(m, nn.GroupNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    sd = official.state_dict()
    assert not any("running" in k for k in sd) and "features.1.weight" in sd and "classifier.weight" in sd
    torch.save(sd, tmp_path / "ckpt_best.pt")  # DD-Ranking saves a plain state dict
    teacher = common.load_teacher("conv3", "cifar10", str(tmp_path / "ckpt_best.pt"))
    assert sum(isinstance(m, nn.GroupNorm) for m in teacher.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), official(x), atol=1e-6, rtol=1e-5)
    # a BatchNorm checkpoint still builds the BatchNorm ConvNet
    bn = common.build_model("conv3", 10)
    torch.save(bn.state_dict(), tmp_path / "bn.pt")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in common.load_teacher("conv3", "cifar10", str(tmp_path / "bn.pt")).modules()) == 3
