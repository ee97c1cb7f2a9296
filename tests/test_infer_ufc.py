"""infer_ufc.py: the budget arithmetic (paper Sec. 3; UFC README), the on-disk contract, one UFC shared by every class
of its set, the loss falling, reals saved unchanged, the compact form rebuilding the written set,
soft_labels.pt against an independent teacher-ensemble computation, resume, and bad input.
The runs use two copies of the cached digits conv3 teacher (M=2), IPC 2 -> K=1, 3 files per class."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import infer_ufc
from conftest import run_script, unexpected_stderr

ARGS = ("--teacher", "conv3,conv3", "--ipc", "2", "--iterations", "15", "--seed", "1", "--no-eval")


@pytest.fixture(scope="module")
def infer_run(tmp_path_factory, digits_conv3):
    out = tmp_path_factory.mktemp("infer") / "set"
    proc = run_script("infer_ufc.py", *ARGS, "--out", out)
    return out, proc.stdout


def read_class(folder):
    files = sorted(os.listdir(folder))
    return files, torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(folder, f)).convert("RGB"))).permute(2, 0, 1)
                               for f in files])


def test_budget_table_of_the_docs():
    # (C, M, IPC) -> (K, files/class, UFCs, image-equivalents), the table in docs/infer_ufc.md
    table = {(10, 4, 10): (7, 35, 28, 98), (10, 4, 50): (35, 175, 140, 490),
             (100, 4, 10): (9, 45, 36, 936), (100, 4, 50): (48, 240, 192, 4992), (100, 4, 100): (96, 480, 384, 9984),
             (200, 4, 10): (9, 45, 36, 1836), (200, 4, 50): (49, 245, 196, 9996),
             (1000, 3, 10): (9, 36, 27, 9027), (1000, 3, 50): (49, 196, 147, 49147)}
    for (C, M, ipc), want in table.items():
        b = infer_ufc.ufc_budget(ipc, C, M)
        assert (b["K"], b["files_per_class"], b["ufcs"], b["image_equivalents"]) == want
        assert b["K"] == int(np.floor(ipc * C / (C + M))) and b["image_equivalents"] <= ipc * C
    assert infer_ufc.ufc_budget(1, 100, 4)["K"] == 0 and infer_ufc.ufc_budget(1, 100, 4)["smallest_ipc"] == 2
    # file order of ufc_cifar.py: reals first, then teacher m's composites at ids (m+1)K + k
    ids = infer_ufc.ufc_ids(3, 2)
    assert ids[:3] == [(0, None), (1, None), (2, None)] and ids[3 + 1 * 3 + 2] == (2, 1)


def test_ipc_too_small_is_one_sentence(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same run_cli path as the command line
        common.run_cli(lambda: infer_ufc.main(["--teacher", "conv3,conv3", "--ipc", "1", "--out", str(out)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: --ipc 1 is too small") and "smallest valid IPC is 2" in err and err.count("\n") == 1
    assert not out.exists()


def test_contract_budget_and_reals_unchanged(infer_run):
    out, stdout = infer_run
    assert "K = floor(2*10/(10+2)) = 1" in stdout and "files per class K*(M+1) = 3" in stdout
    assert "10 + 2 = 12 <= 20" in stdout
    assert json.load(open(out / "classes.json"))[3]["id"] == "3"
    record = json.load(open(out / "run.json"))
    assert record["status"] == "done" and record["budget"]["ufcs"] == 2
    compact = torch.load(out / "ufc.pt", weights_only=True)
    assert compact["ufc"].shape == (1, 2, 3, 32, 32) and compact["real_index"].shape == (1, 10)
    train_x, train_y = common.digits_split("train")
    for c in range(10):
        files, x = read_class(out / f"{c:05d}")
        assert files == ["00000_k0_real.png", "00001_k0_ufc_conv3.png", "00002_k0_ufc_conv3.png"]
        i = int(compact["real_index"][0, c])
        assert int(train_y[i]) == c
        assert torch.equal(x[0], (train_x[i] * 255).round().to(torch.uint8))  # the real image, saved unchanged
        assert (x[1].int() - x[0].int()).abs().max() > 10 and (x[2].int() - x[0].int()).abs().max() > 10


def test_one_ufc_shared_by_every_class_of_its_set(infer_run):
    out, _ = infer_run
    compact = torch.load(out / "ufc.pt", weights_only=True)
    mean, std = compact["mean"], compact["std"]
    xs = torch.stack([read_class(out / f"{c:05d}")[1] for c in range(10)]).float() / 255  # [C, 3 files, 3, H, W]
    for m in range(2):
        u = compact["ufc"][0, m]
        assert u.abs().max() > 0.05
        delta = common.normalize(xs[:, 1 + m], mean, std) - common.normalize(xs[:, 0], mean, std)
        inside = (xs[:, 1 + m] > 0) & (xs[:, 1 + m] < 1)  # pixels the [0,1] clamp left alone
        err = (delta - u[None]).abs()[inside]
        assert inside.float().mean() > 0.3 and err.max() < 0.6 / 255 / std[0] + 1e-4  # same u for all C, up to rounding
    assert not torch.allclose(compact["ufc"][0, 0], compact["ufc"][0, 1])  # a different u per teacher


def test_loss_falls(infer_run):
    out, stdout = infer_run
    losses = torch.load(out / "ufc.pt", weights_only=True)["losses"]  # [K, M, T]
    assert losses.shape == (1, 2, 15)
    assert (losses[..., -3:].mean(-1) < 0.7 * losses[..., :3].mean(-1)).all()


def test_compact_form_rebuilds_the_written_set(infer_run):
    out, _ = infer_run
    compact = torch.load(out / "ufc.pt", weights_only=True)
    train_x, _ = common.digits_split("train")
    real = ((train_x[compact["real_index"].flatten()] * 255).round() / 255).view(1, 10, 3, 32, 32)
    rebuilt = (infer_ufc.rebuild_set(compact, real) * 255).round().to(torch.uint8)  # [C, 3, 3, H, W]
    for c in range(10):
        assert torch.equal(rebuilt[c], read_class(out / f"{c:05d}")[1])


def test_soft_labels_are_the_teacher_ensemble_mean(infer_run, digits_conv3):
    out, _ = infer_run
    stored = torch.load(out / "soft_labels.pt", weights_only=True)
    assert stored["set"] == common.set_identity(str(out))  # the images they label, checked by the validator
    labels = stored["logits"].float()
    info = common.dataset_info("digits")
    x = torch.cat([read_class(out / d)[1] for d in sorted(os.listdir(out)) if d.isdigit()]).float() / 255
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = (digits_conv3(x) + digits_conv3(x)) / 2  # the ensemble of the two teachers, computed here
    assert labels.shape == (30, 10)
    assert torch.allclose(labels, want, rtol=2e-3, atol=2e-2)
    assert (labels.argmax(1)[::3] == torch.arange(10)).float().mean() >= 0.8  # reals: teacher agrees with class


def test_resume_redoes_only_missing_work_and_evaluates(infer_run, tmp_path):
    """The rerun is a script run like the first one (same environment, hence the same intra-op thread
    count): the re-optimised UFC is then bit-identical. Across thread counts no small tolerance holds,
    as 15 Adam steps (update ~ lr * g/sqrt(v)) amplify reduction-order differences in near-zero
    gradient components up to lr per step."""
    src, _ = infer_run
    out = tmp_path / "set"
    shutil.copytree(src, out)
    compact = torch.load(out / "ufc.pt", weights_only=True)
    # simulate an interruption: one UFC finished (a loose part), class 3 and the labels not written
    os.makedirs(out / "ufc_parts")
    common.atomic_torch_save({"k": 0, "m": 0, "ufc": compact["ufc"][0, 0][None], "losses": compact["losses"][0, 0]},
                             infer_ufc.part_path(str(out), 0, 0))
    os.remove(out / "ufc.pt")
    os.remove(out / "soft_labels.pt")
    shutil.rmtree(out / "00003")
    before = os.path.getmtime(out / "00005" / "00000_k0_real.png")
    proc = run_script("infer_ufc.py", *ARGS, "--out", out, "--eval", "--eval-epochs", "1", "--eval-protocol", "dynamic",
                      "--baseline", "random", "--workers", "0")
    stdout = proc.stdout
    assert not unexpected_stderr(proc.stderr)  # nothing but progress bars on stderr
    assert "compensators: 1 to optimise (1 already done)" in stdout
    assert stdout.splitlines()[-1].startswith(f"infer_ufc: digits IPC 2 -> {out} | top-1 distilled ")  # common.closing_line
    assert "| 3 students each: conv3, 1 epoch = " in stdout.splitlines()[-1]  # 3 on digits by default
    assert "classes: 1 to write" in stdout
    assert os.path.getmtime(out / "00005" / "00000_k0_real.png") == before
    assert torch.equal(torch.load(out / "ufc.pt", weights_only=True)["ufc"], compact["ufc"])
    assert torch.equal(read_class(out / "00003")[1], read_class(src / "00003")[1])
    assert torch.allclose(torch.load(out / "soft_labels.pt", weights_only=True)["logits"].float(),
                          torch.load(src / "soft_labels.pt", weights_only=True)["logits"].float(), atol=2e-2)
    ev = json.load(open(out / "eval_static_teacher.json"))
    assert ev["label_mode"] == "teacher" and ev["teacher"] == "conv3,conv3" and ev["baseline"]["ipc"] == 2
    assert ev["images"] == 30 and ev["recipe"]["epochs"] == 1


def test_dwa_adjust_moves_a_copy_uphill_by_rho(digits_conv3):
    x, y = common.digits_split("train")
    info = common.dataset_info("digits")
    x = common.normalize(x[:20], info.mean, info.std)
    y = y[:20]
    before = [p.clone() for p in digits_conv3.parameters()]
    adjusted = infer_ufc.dwa_adjust(digits_conv3, x, y, steps=3, rho=0.5, jitter=0, chunk=20)
    assert all(torch.equal(a, p) for a, p in zip(before, digits_conv3.parameters()))  # the teacher is untouched
    dist = torch.sqrt(sum(((a - p) ** 2).sum() for a, p in zip(adjusted.parameters(), before)))
    assert 0.3 < float(dist) <= 0.5 + 1e-4
    with torch.no_grad():
        ce = lambda m: float(torch.nn.functional.cross_entropy(m(x), y))
        assert ce(adjusted) > ce(digits_conv3)
    assert not any(p.requires_grad for p in adjusted.parameters()) and not adjusted.training


def test_torchrun_two_processes_write_the_same_set(infer_run, tmp_path):
    """(set, teacher) work sharded over 2 gloo processes: the same files and compact form as one process."""
    import subprocess
    import sys
    from conftest import ROOT, script_env
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                           os.path.join(ROOT, "infer_ufc.py"), *ARGS, "--out", str(out), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=script_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, _ = infer_run
    for c in range(10):
        f1, x1 = read_class(os.path.join(one, f"{c:05d}"))
        f2, x2 = read_class(os.path.join(out, f"{c:05d}"))
        assert f1 == f2 and (x1.int() - x2.int()).abs().max() <= 1
