"""The GPU path, as far as the CPU can show it: the graph runner's bookkeeping (warm-up, capture, replays,
re-use when an EarlyLate round's active set is unchanged) and its eager fallback on a capture error, the
current device for --device cuda:N, what `auto` precision means on which GPU, the BN hook's bf16 backward,
precision recorded as what ran (and a resume that would mix arithmetics refused), the HLR students'
precision and view placement, the DD-Ranking export's fp32 teacher, bench_train at bf16 on the CPU.
Tests marked `cuda` run the real capture and are skipped without a GPU (scripts/gpu_check.py does more)."""
import argparse
import json
import os
import random

import pytest
import torch

import common
import delt
import infer_ufc
import validate_fkd
from conftest import ROOT, random_digits_set, run_script

pytestmark = pytest.mark.usefixtures("one_thread")

RECOVER_ARGS = argparse.Namespace(lr=0.1, r_bn=0.01, first_bn_multiplier=10.0, crop_schedule="cosine", milestone=1.0,
                                  jitter=2, precision="fp32")


def tiny_teacher():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return common.freeze(common.build_model("conv3", 10, 32))


def recover(graphs, ipc=2, iterations=20, round_itr=4):
    """delt's EarlyLate recover of 4 images (2 classes) on the CPU: the images and the per-round trace."""
    teacher = tiny_teacher()
    hook = common.BNStatsHook(teacher, RECOVER_ARGS.first_bn_multiplier)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 32, 32, generator=g).clamp(-1.5, 1.5)
    y = torch.tensor([0, 0, 1, 1])
    sched = delt.early_late_schedule(ipc, iterations, round_itr)
    group = torch.tensor(sched["group_of_rank"])[torch.arange(4) % ipc]
    x, rec = delt.early_late_recover(teacher, hook, x0, y, group, sched, RECOVER_ARGS, random.Random(0),
                                     (0.5,) * 3, (0.25,) * 3, "cpu", graphs)
    hook.remove()
    return x, rec


class ReplayingGraph:
    """Stands in for a captured CUDA graph on the CPU: capturing records without running, a replay runs."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()


@pytest.fixture
def pretend_cuda(monkeypatch):
    """StepGraph believes the CPU can hold graphs; each test then says what a capture does."""
    monkeypatch.setattr(common, "graph_capable", lambda device: True)
    monkeypatch.setattr(common.StepGraph, "failed", False)


def test_graph_bookkeeping_replays_the_same_steps_and_captures_once_per_active_set(pretend_cuda, monkeypatch):
    captured = []

    def capture(step, device):
        captured.append(step)
        return ReplayingGraph(step)

    monkeypatch.setattr(common, "capture_graph", capture)
    x_graph, rec_graph = recover(graphs=True)
    x_eager, rec_eager = recover(graphs=False)
    # 5 rounds of 4 steps: ranks 0 join at round 0, ranks 1 at round 1, rounds 2-4 keep all four images
    assert rec_graph["active_per_round"] == [2, 4, 4, 4, 4] and rec_graph["iterations"] == 20
    assert len(captured) == 2  # round 0 and round 1; rounds 2-4 replay round 1's graph
    assert torch.equal(x_graph, x_eager)
    assert rec_graph["ce_per_round"] == rec_eager["ce_per_round"] and rec_graph["bn_per_round"] == rec_eager["bn_per_round"]


def test_capture_error_warns_once_and_runs_the_same_steps_eagerly(pretend_cuda, monkeypatch, capsys):
    def broken_capture(step, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(common, "capture_graph", broken_capture)
    x_fallback, rec_fallback = recover(graphs=True)
    u_fallback, losses_fallback = ufc(graph=True)
    err = capsys.readouterr().err
    x_eager, rec_eager = recover(graphs=False)
    u_eager, losses_eager = ufc(graph=False)
    warning = err[err.index("warning:"):]
    assert err.count("warning:") == 1 and "\n" not in warning[:warning.index("slower)")]  # once, one line, for the process
    assert "RuntimeError: operation not permitted when stream is capturing" in err and "eagerly" in err
    assert torch.equal(x_fallback, x_eager) and rec_fallback["ce_per_round"] == rec_eager["ce_per_round"]
    assert torch.equal(u_fallback, u_eager) and torch.equal(losses_fallback, losses_eager)


def ufc(graph):
    args = argparse.Namespace(lr=0.05, augment="crop", jitter=2, iterations=6, first_bn_multiplier=1.0, r_var=1.0,
                              r_bn=0.01, class_chunk=None, precision="fp32")
    real = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return infer_ufc.optimise_ufc(tiny_teacher(), real, args, torch.Generator().manual_seed(1), "cpu", graph)


def test_no_cuda_graph_flag_never_captures(pretend_cuda, monkeypatch):
    monkeypatch.setattr(common, "capture_graph", lambda step, device: pytest.fail("captured with graphs off"))
    recover(graphs=False)
    ufc(graph=False)


# ------------------------------------------------------------------------------ devices and precision
def test_dist_setup_makes_cuda_n_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert common.dist_setup("cuda:1").device == "cuda:1" and chosen == [torch.device("cuda:1")]
    assert common.dist_setup("cuda").device == "cuda:0" and chosen[-1] == torch.device("cuda:0")
    with pytest.raises(common.UserError, match="cuda:2 is not a CUDA device of this machine: use cuda or cuda:0 .. cuda:1"):
        common.dist_setup("cuda:2")


@pytest.mark.parametrize("capability, expected", [((6, 1), "fp32"), ((7, 0), "fp32"), ((7, 5), "fp32"),
                                                  ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(torch.device(d)) or capability)
    assert common.resolve_precision("auto", "cuda:1") == expected and asked == [torch.device("cuda:1")]
    assert common.resolve_precision("fp32", "cuda:1") == "fp32" and common.resolve_precision("bf16", "cuda:1") == "bf16"
    assert common.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(common.UserError, match="unknown precision 'fp16'"):
        common.resolve_precision("fp16", "cuda")


def test_bn_hook_bf16_backward_equals_autograd_of_an_fp32_copy_and_saves_no_fp32_copy():
    x = (torch.randn(6, 8, 5, 5) * 2 + 1).bfloat16().requires_grad_(True)
    weights_var, weights_mean = torch.randn(8), torch.randn(8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        var, mean = common._VarMean.apply(x)
    (var @ weights_var + mean @ weights_mean).backward()
    ref = x.detach().clone().requires_grad_(True)
    rvar, rmean = torch.var_mean(ref.float(), dim=(0, 2, 3), unbiased=False)
    (rvar @ weights_var + rmean @ weights_mean).backward()
    assert torch.allclose(var, rvar, rtol=1e-5) and torch.allclose(mean, rmean, rtol=1e-5, atol=1e-7) and var.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16 and torch.allclose(x.grad.float(), ref.grad.float(), rtol=1e-2, atol=1e-4)
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)  # no fp32 copy kept
    # the hook uses it for bf16 inputs and plain var_mean for fp32 ones: same loss either way
    teacher = tiny_teacher()
    hook = common.BNStatsHook(teacher)
    xs = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        teacher(xs)
    bf16_loss = hook.loss()
    assert bf16_loss.dtype == torch.float32 and torch.isfinite(bf16_loss)
    hook.remove()


def test_precision_is_recorded_as_resolved_and_a_resume_that_would_mix_arithmetics_is_refused(tmp_path):
    out = str(tmp_path / "delt")
    small = ["--ipc", "2", "--iterations", "4", "--round-itr", "2", "--batch-size", "4", "--no-eval", "--device", "cpu",
             "--out", out]
    run_script("delt.py", *small)
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["args"]["precision"] == "fp32" and record["identity"]["precision"] == "fp32"  # auto, resolved
    proc = run_script("delt.py", *small, "--precision", "bf16", check=False)
    assert proc.returncode != 0
    assert (f"{out} was made with --precision fp32 and this run resolves to bf16: pass --precision fp32 to resume it "
            "without mixing arithmetics, or --overwrite to start again") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validator_records_resolved_precision_and_hlr_students_follow_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DD_CACHE", str(tmp_path))
    dry = validate_fkd.main(["--random-real", "2", "--device", "cpu", "--dry-run"])
    assert dry["recipe"]["precision"] == "fp32"  # auto on the CPU
    args = validate_fkd.build_parser().parse_args(["--random-real", "2", "--device", "cpu", "--precision", "bf16",
                                                   "--augment-on", "device", "--lrs"])
    method, _ = validate_fkd.choose_preset(args)
    args = validate_fkd.resolve(args, method)
    validate_fkd.resolve_execution(args, "cpu")
    assert (args.precision, args.augment_on) == ("bf16", "device")
    h = validate_fkd.hard_label_args(args)
    assert (h.precision, h.augment_on) == ("bf16", "loader")  # the hard recipe's ColorJitter/Lighting are per image
    calls = []

    def fake_train_once(a, images, targets, cfg, *rest, train_set=None):
        calls.append((train_set, cfg.precision, validate_fkd.augment_on_device(a, "cpu")))
        return {"best": 50.0, "last": 49.0, "history": [(0, 50.0)], "seconds": 1.0}

    monkeypatch.setattr(validate_fkd, "train_once", fake_train_once)
    full = validate_fkd.full_data_top1(h, None, common.Dist(), epochs=1)
    assert calls[0][1:] == ("bf16", False) and len(calls[0][0]) == len(common.digits_split("train")[1])
    assert full["recipe"]["precision"] == "bf16" and full["recipe"]["augment_on"] == "loader"
    h.precision = "fp32"
    full_fp32 = validate_fkd.full_data_top1(h, None, common.Dist(), epochs=1)
    assert full_fp32["cache"] != full["cache"] and not full_fp32["cached"]  # another arithmetic, another cache entry
    assert calls[1][1] == "fp32" and full_fp32["recipe"]["precision"] == "fp32"
    assert validate_fkd.full_data_top1(h, None, common.Dist(), epochs=1)["cached"] and len(calls) == 2


def test_ddranking_export_writes_the_fp32_teacher_whatever_the_precision(tmp_path, digits_conv3):
    out = random_digits_set(tmp_path / "set", 2, 3)
    export = str(tmp_path / "export")
    run_script("validate_fkd.py", "--syn-data-path", out, "--export-ddranking", export, "--precision", "bf16",
               "--device", "cpu")
    spec = json.load(open(os.path.join(export, "ddranking.json")))["LabelRobustScoreSoft"]
    state = torch.load(os.path.join(spec["teacher_dir"], spec["dataset"], spec["teacher_model_names"][0], "ckpt_best.pt"),
                       weights_only=True)
    teacher = common.load_teacher("conv3", "digits")
    ours = validate_fkd.ddranking_state_dict(teacher, "conv3")
    assert state.keys() == ours.keys()
    assert all(v.dtype == ours[k].dtype and torch.equal(v, ours[k]) for k, v in state.items())
    provenance = json.load(open(os.path.join(export, "export.json")))
    assert state["features.0.weight"].dtype == torch.float32 and "bf16" in provenance["soft_labels_from"]


# ------------------------------------------------------------------------------ bench_train
def test_bench_train_runs_at_bf16_on_the_cpu():
    proc = run_script("scripts/bench_train.py", "--device", "cpu", "--precision", "bf16", "--images", "40",
                      "--batch-size", "20", "--epochs", "1", "--threads", "1")
    assert "precision bf16" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if "images/s   views on" in line]
    assert len(rows) == 7 and all(float(r.split()[1]) > 0 for r in rows)  # 3 protocols x 2 placements + fkd


def test_bench_train_fp32_means_fp32_teacher_labels(monkeypatch):
    """Where auto resolves to bf16 (CUDA), --precision fp32 must reach every teacher call, the stored labels included."""
    import runpy
    import sys
    resolve = common.resolve_precision
    monkeypatch.setattr(common, "resolve_precision", lambda p, d: "bf16" if p == "auto" else resolve(p, d))
    asked = []
    autocast = common.autocast
    monkeypatch.setattr(common, "autocast", lambda device, precision="auto", cache=True: asked.append(precision)
                        or autocast(device, precision, cache))
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--precision", "fp32", "--images", "20",
                                      "--batch-size", "10", "--epochs", "1", "--augment-on", "device"])
    runpy.run_path(os.path.join(ROOT, "scripts", "bench_train.py"), run_name="__main__")
    assert asked and set(asked) == {"fp32"}


# ------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
def test_cuda_graph_recover_equals_eager_on_the_gpu():
    teacher = tiny_teacher().cuda()
    results = []
    for graphs in (True, False):
        hook = common.BNStatsHook(teacher, 10.0)
        x0 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).clamp(-1.5, 1.5)
        sched = delt.early_late_schedule(2, 20, 4)
        group = torch.tensor(sched["group_of_rank"])[torch.arange(4) % 2]
        x, _ = delt.early_late_recover(teacher, hook, x0, torch.tensor([0, 0, 1, 1]).cuda(), group, sched, RECOVER_ARGS,
                                       random.Random(0), (0.5,) * 3, (0.25,) * 3, "cuda", graphs)
        hook.remove()
        results.append(x)
    assert torch.allclose(results[0], results[1], atol=1e-4)
