"""Each method's evaluation as its official code runs it, read off `validate_fkd.py --preset auto --dry-run` on
small fabricated sets (a run.json and class folders of empty files): INFER's (UFC@83d19f8) CIFAR-100 statistics,
four-teacher ensemble and AdamW over every parameter; recipes the papers never published, marked so; DELT's
evaluation cadence; Minimax's epochs; the batch size stored FKD labels replay. And the CIFAR-100 prompt names."""
import json
import os

import pytest
import torch

import common
import validate_fkd

INFER_TEACHERS = "resnet18_modified,mobilenet_v2_cifar,efficientnet_b0_cifar,shufflenet_g2"
CIFAR100_STATS = [[0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]]


def _set(root, script, dataset, classes=3, ipc=2, **record):
    """A set as the dry run reads it: run.json naming the script that made it (plus `record`), class folders."""
    os.makedirs(root)
    rec = {"argv": [script, "--dataset", dataset], "status": "done", **record}
    rec["args"] = {"dataset": dataset, **record.get("args", {})}
    json.dump(rec, open(os.path.join(root, "run.json"), "w"))
    for c in range(classes):
        os.makedirs(os.path.join(root, f"{c:05d}"))
        for i in range(ipc):
            open(os.path.join(root, f"{c:05d}", f"{i:05d}.png"), "w").close()
    return root


def _dry(root, *flags):
    r = validate_fkd.main(["--syn-data-path", root, "--dry-run", *flags])
    return {**r, **r["recipe"]}


def test_infer_cifar100_set_gets_ufcs_evaluation(tmp_path, capsys):
    """What infer_ufc.py records (teachers, their checkpoints, the statistics they saw) drives a standalone
    evaluation: CIFAR-100 statistics, the four-teacher ensemble, AdamW decaying every parameter."""
    root = _set(str(tmp_path / "infer"), "infer_ufc.py", "cifar100",
                args={"teacher": INFER_TEACHERS, "teacher_path": "r18.pth,mbv2.pth,effb0.pth,shuffle.pth"},
                teacher_norm={"mean": CIFAR100_STATS[0], "std": CIFAR100_STATS[1]})
    r = _dry(root)
    out = capsys.readouterr().out
    assert (r["preset"], r["protocol"], r["label_mode"]) == ("infer", "static", "static")
    assert r["teacher"] == INFER_TEACHERS and r["teacher_path"] == "r18.pth,mbv2.pth,effb0.pth,shuffle.pth"
    assert [r["mean"], r["std"]] == CIFAR100_STATS and "run.json" in r["norm_source"]
    assert (r["optimizer"], r["lr"], r["weight_decay"], r["decay"], r["epochs"], r["batch_size"]) == \
        ("adamw", 1e-3, 0.01, "all", 400, 64)
    assert "mean [0.5071, 0.4867, 0.4408]" in out and "not published" not in out
    # an older set without the recorded statistics still gets INFER's CIFAR-100 constants; flags beat both
    old = _set(str(tmp_path / "old"), "infer_ufc.py", "cifar100", args={"teacher": INFER_TEACHERS})
    r = _dry(old)
    assert [r["mean"], r["std"]] == CIFAR100_STATS and "INFER" in r["norm_source"]
    r = _dry(old, "--teacher", "resnet18_modified", "--norm", "dataset", "--decay", "weights")
    assert (r["teacher"], r["teacher_path"], r["mean"], r["decay"]) == \
        ("resnet18_modified", None, list(common.CIFAR_MEAN), "weights")


@pytest.mark.parametrize("dataset,crop", [("tiny", "pad"), ("imagenette", "rrc"), ("imagewoof", "rrc"),
                                          ("imagenet100", "rrc"), ("imagenet", "rrc")])
def test_infer_recipes_not_published_are_marked(tmp_path, capsys, dataset, crop):
    r = _dry(_set(str(tmp_path / dataset), "infer_ufc.py", dataset, ipc=13))  # 130 images on 10 classes
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("preset: infer") and "not published: our choice" in line
    assert "not published: our choice" in r["preset_note"] and r["crop"] == crop
    if crop == "rrc":  # DWA's ImageNet recipe, not the 32 px padded crop
        assert (r["epochs"], r["batch_size"], r["min_scale"], r["mean"]) == (300, 128, 0.08, list(common.IMAGENET_MEAN))


def test_dmkd_cifar100_set_gets_dmkds_kd(tmp_path):
    root = _set(str(tmp_path / "dmkd"), "dmkd.py", "cifar100", args={
        "teacher": "cifarresnet34", "teacher_path": "rn34.pth", "student": "cifarresnet18"},
        teacher_norm={"mean": CIFAR100_STATS[0], "std": CIFAR100_STATS[1], "source": "CIFAR-100 statistics (DM-KD)"})
    r = _dry(root)
    assert (r["preset"], r["label_mode"], r["teacher"], r["teacher_path"], r["student"]) == \
        ("dmkd", "teacher", "cifarresnet34", "rn34.pth", "cifarresnet18")
    assert (r["optimizer"], r["lr"], r["weight_decay"], r["milestones"], r["temperature"], r["t_squared"], r["mix"],
            r["epochs"], r["batch_size"], r["eval_every"], r["crop"]) == \
        ("sgd", 0.1, 5e-4, [150, 180, 210], 4.0, True, "none", 240, 128, 1, "pad")
    assert [r["mean"], r["std"]] == CIFAR100_STATS and r["preset_note"] is None


def test_delt_tests_every_10_epochs_from_epoch_0(tmp_path):
    """VILA-Lab/DELT@f2f81ca:evaluation/validation/main.py:195: `epoch % 10 == 0 or last`; RDED: the last 20 %."""
    r = _dry(_set(str(tmp_path / "delt"), "delt.py", "cifar100"))
    assert (r["preset"], r["eval_every"], r["eval_from"]) == ("delt", 10, 0.0)
    assert _dry(_set(str(tmp_path / "rded"), "x.py", "cifar100"), "--preset", "rded")["eval_from"] == 0.8


def test_minimax_epochs_follow_ipc_epoch():
    """Reference: zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4:
    04_evaluation/Minimax/argument.py:18-43 (factor 1)."""
    def ipc_epoch(ipc, nclass):
        table = [(1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500)]
        epoch = next((e for bound, e in table if ipc <= bound), 300)
        if nclass == 100:
            epoch = int((2 / 3) * epoch)
            epoch -= epoch % 100
        return epoch
    for ipc in (1, 2, 10, 11, 50, 51, 100, 200, 201, 500, 501, 1000):
        for n in (10, 100):
            assert validate_fkd.minimax_epochs(ipc, n) == ipc_epoch(ipc, n), (ipc, n)
    assert validate_fkd.minimax_epochs(100, 10) == 1000 and validate_fkd.minimax_epochs(600, 100) == 200


def test_fkd_recipe_records_the_stored_batch_size(tmp_path):
    root = _set(str(tmp_path / "d4m"), "d4m.py", "imagenette", ipc=10)
    json.dump({"epochs": 300, "batch_size": 1024, "size": 224, "mean": [0.5] * 3, "std": [0.2] * 3},
              open(os.path.join(root, "fkd_meta.json"), "w"))
    r = _dry(root)
    assert (r["protocol"], r["batch_size"]) == ("fkd", 1024)


def test_adamw_decays_every_parameter_with_decay_all():
    model = common.build_model("conv3", 10)
    n = sum(1 for _ in model.parameters())
    every = common.make_optimizer(model, "adamw", 1e-3, 0.01, decay="all")
    assert [len(g["params"]) for g in every.param_groups if g["weight_decay"] == 0.01] == [n]
    assert sum(len(g["params"]) for g in every.param_groups if g["weight_decay"] == 0) == 0
    weights = common.make_optimizer(model, "adamw", 1e-3, 0.01)
    assert sum(len(g["params"]) for g in weights.param_groups if g["weight_decay"] == 0.01) == 4  # 3 convs + fc
    # one step on a zero gradient: decoupled decay shrinks a BN weight only under decay "all"
    for opt, shrinks in ((every, True), (weights, False)):
        m = common.build_model("conv3", 10)
        o = common.make_optimizer(m, "adamw", 0.1, 0.5, decay="all" if shrinks else "weights")
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        o.step()
        assert bool((m.features[1].weight < 1).all()) == shrinks


# ---------------------------------------------------------------- CIFAR-100 prompt names
# torchvision's CIFAR-100 classes (its meta file's fine_label_names), in its class order
TORCHVISION_CIFAR100 = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm""".split()
# the 100 lines of suduo94/D4M@da35d10:distillation/label-prompt/cifar-100.txt (byte-identical to VLCP@d0060eb4:
# 03_distiilation/label-prompt/cifar-100.txt), in the file's (superclass) order
OFFICIAL_PROMPT_FILE = [
    "beaver", "dolphin", "otter", "seal", "whale", "aquarium fish", "flatfish", "ray", "shark", "trout",
    "orchids", "poppies", "roses", "sunflowers", "tulips", "bottles", "bowls", "cans", "cups", "plates",
    "apples", "mushrooms", "oranges", "pears", "sweet peppers", "clock", "computer keyboard", "lamp", "telephone",
    "television", "bed", "chair", "couch", "table", "wardrobe", "bee", "beetle", "butterfly", "caterpillar",
    "cockroach", "bear", "leopard", "lion", "tiger", "wolf", "bridge", "castle", "house", "road", "skyscraper",
    "cloud", "forest", "mountain", "plain", "sea", "camel", "cattle", "chimpanzee", "elephant", "kangaroo", "fox",
    "porcupine", "possum", "raccoon", "skunk", "crab", "lobster", "snail", "spider", "worm", "baby", "boy", "girl",
    "man", "woman", "crocodile", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse", "rabbit", "shrew",
    "squirrel", "maple", "oak", "palm", "pine", "willow", "bicycle", "bus", "motorcycle", "pickup truck", "train",
    "lawn-mower", "rocket", "streetcar", "tank", "tractor"]


def test_cifar100_prompt_names_are_the_official_files_in_torchvision_order(tmp_path, monkeypatch):
    class FakeCifar100:
        classes = TORCHVISION_CIFAR100
    monkeypatch.setattr(common, "_cifar", lambda *a, **k: FakeCifar100())
    classes = common.class_list("cifar100", str(tmp_path))
    assert len(OFFICIAL_PROMPT_FILE) == len(set(OFFICIAL_PROMPT_FILE)) == 100
    assert sorted(c["name"] for c in classes) == sorted(OFFICIAL_PROMPT_FILE)  # every prompt is a line of the file
    assert [c["id"] for c in classes] == TORCHVISION_CIFAR100 and [c["index"] for c in classes] == list(range(100))
    # each class keeps its own word: the file's name, or torchvision's with spaces where they agree
    by_id = {c["id"]: c["name"] for c in classes}
    assert (by_id["apple"], by_id["keyboard"], by_id["maple_tree"], by_id["lawn_mower"], by_id["aquarium_fish"],
            by_id["pickup_truck"], by_id["poppy"]) == ("apples", "computer keyboard", "maple", "lawn-mower",
                                                       "aquarium fish", "pickup truck", "poppies")
    assert sum(c["name"] != c["id"].replace("_", " ") for c in classes) == 22
