"""d4m.py on digits with the tiny Stable Diffusion fixture (64 px images <-> 4x8x8 latents).

One CLI run (module fixture) makes the whole pipeline's output; the tests check it against reference
computations written here: VAE latents, sklearn k-means, one-image-per-call img2img, FKD label replay.
Citations: D4M = suduo94/D4M@da35d10."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import run_script, unexpected_stderr

import common

ARGS = ["--size", "64", "--steps", "4", "--ipc", "3", "--prototypes", "2", "--ttm-epochs", "2",
        "--ttm-batch-size", "16", "--batch-size", "7", "--workers", "0", "--no-eval"]


@pytest.fixture(scope="module")
def d4m_run(tiny_sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d4m")
    out, latents = str(tmp / "set"), str(tmp / "latents")
    proc = run_script("d4m.py", "--model", tiny_sd, "--out", out, "--save-latents", latents, *ARGS,
                      "--eval", "--eval-epochs", "1")
    return {"out": out, "latents": latents, "stdout": proc.stdout, "stderr": proc.stderr, "model": tiny_sd}


def test_on_disk_contract(d4m_run):
    out = d4m_run["out"]
    classes = common.class_list("digits")
    assert sorted(n for n in os.listdir(out) if n.isdigit()) == [f"{c:05d}" for c in range(10)]
    images, targets = common.load_image_set(out, classes)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8  # digits resolution, not 64 px
    assert targets.tolist() == [c for c in range(10) for _ in range(3)]
    assert json.load(open(os.path.join(out, "classes.json"))) == classes
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["status"] == "done" and record["latent_shape"] == [4, 8, 8]
    assert record["prompts"] == [c["name"] for c in classes]
    assert record["stages"]["synthesis"]["images"] == 30
    assert os.path.isfile(os.path.join(out, "preview.png"))
    assert not os.path.exists(os.path.join(out, ".prototypes"))  # merged into prototypes.pt
    # image 2 reuses prototype 0 with new noise: same start, different picture
    assert not torch.equal(images[0], images[2])
    assert "images: 30 at 32 px" in d4m_run["stdout"]
    assert not unexpected_stderr(d4m_run["stderr"])  # no diffusers/accelerate notes, only progress bars
    closing = d4m_run["stdout"].splitlines()[-1]  # common.closing_line; fkd replay of the stored TTM labels
    assert closing.startswith(f"d4m: digits IPC 3 -> {out} | top-1 distilled ") and " vs random real " in closing
    assert "| protocol fkd (fkd labels), preset d4m |" in closing


def test_latents_are_seeded_vae_samples(d4m_run):
    """D4M:distillation/dataset_utils.py:L18-21: z = vae.encode(2x-1).latent_dist.sample(g) * scaling_factor on the 64 px squash."""
    from diffusers import AutoencoderKL
    from torchvision.transforms import v2 as T
    import d4m
    x, y = common.digits_split("train")
    saved = torch.load(os.path.join(d4m_run["latents"], "00003.pt"), weights_only=True)
    assert saved["latents"].shape == (int((y == 3).sum()), 4, 8, 8)
    assert sorted(saved["index"].tolist()) == (y == 3).nonzero().flatten().tolist()  # the whole class, shuffled
    vae = AutoencoderKL.from_pretrained(os.path.join(d4m_run["model"], "vae"))
    idx = saved["index"][:4].tolist()
    images = T.Resize((64, 64), antialias=True)(x[idx])
    with torch.no_grad():
        dist = vae.encode(2 * images - 1).latent_dist
        z = torch.cat([dist.mean[k:k + 1] + dist.std[k:k + 1] * torch.randn(
            (1, 4, 8, 8), generator=torch.Generator().manual_seed(d4m.image_seed(0, 1, i))) for k, i in enumerate(idx)])
    torch.testing.assert_close(saved["latents"][:4], z * vae.config.scaling_factor, rtol=1e-4, atol=1e-5)


def test_prototypes_equal_sklearn_minibatch_kmeans(d4m_run):
    """D4M:distillation/gen_prototype.py: MiniBatchKMeans(n_clusters=P, random_state=0, batch_size=km_expand*P, n_init="auto").partial_fit
    over buffers of km_expand*P latents, the last partial buffer flushed (official bug D4M:distillation/gen_prototype.py:L83-84 fixed)."""
    from sklearn.cluster import MiniBatchKMeans
    saved = torch.load(os.path.join(d4m_run["out"], "prototypes.pt"), weights_only=True)
    assert saved["classes"] == [str(c) for c in range(10)]
    assert sorted(saved["prototypes"]) == list(range(10))
    P, buf = 2, 10 * 2  # --prototypes 2, km_expand 10 (the default)
    for c in (0, 7):
        X = torch.load(os.path.join(d4m_run["latents"], f"{c:05d}.pt"), weights_only=True)["latents"]
        X = X.flatten(1).double().numpy()
        assert len(X) % buf, "the test needs a partial last buffer"
        km = MiniBatchKMeans(n_clusters=P, random_state=0, batch_size=buf, n_init="auto")
        for s in range(0, len(X), buf):
            km.partial_fit(X[s:s + buf])
        ours = saved["prototypes"][c]
        assert ours.shape == (P, 4, 8, 8)
        np.testing.assert_allclose(ours.flatten(1).numpy(), km.cluster_centers_, rtol=1e-5, atol=1e-6)
        dropped = MiniBatchKMeans(n_clusters=P, random_state=0, batch_size=buf, n_init="auto")
        for s in range(0, len(X) - len(X) % buf, buf):  # the official code drops this class's leftovers
            dropped.partial_fit(X[s:s + buf])
        assert not np.allclose(ours.flatten(1).numpy(), dropped.cluster_centers_)


def test_random_latents_ablation_draws_the_class_own_latents():
    """--kmeans random (the prototypes' ablation): P distinct latents of the class itself, seeded, no centres."""
    import d4m
    latents = torch.randn(37, 256)
    batches = [latents[:16], latents[16:30], latents[30:]]
    picked, seen = d4m.kmeans_prototypes(iter(batches), 5, 10, "random", seed=3)
    assert torch.equal(seen, latents) and picked.shape == (5, 256)
    rows = [int((latents == p).all(1).nonzero()) for p in picked]  # each one is a row of the class's latents
    assert len(set(rows)) == 5
    again, _ = d4m.kmeans_prototypes(iter(batches), 5, 10, "random", seed=3)
    other, _ = d4m.kmeans_prototypes(iter(batches), 5, 10, "random", seed=4)
    assert torch.equal(again, picked) and not torch.equal(other, picked)


def test_batched_synthesis_equals_one_call_per_image(d4m_run):
    """D4M:scripts/pipeline_stable_diffusion_latents2img.py, D4M:distillation/gen_syn_image_imgnt.sh: stock img2img from the prototype latent, class-name prompt, the negative prompt, strength,
    guidance, one seeded generator per image; called here the official way, one image per call."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image
    import d4m
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(d4m_run["model"], safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    protos = torch.load(os.path.join(d4m_run["out"], "prototypes.pt"), weights_only=True)["prototypes"]
    for c, i in ((0, 0), (4, 2)):
        with torch.no_grad():
            im = pipe(prompt=str(c), image=protos[c][i % 2][None], negative_prompt="cartoon, anime, painting",
                      strength=0.7, guidance_scale=8.0, num_inference_steps=4,
                      generator=torch.Generator().manual_seed(d4m.image_seed(0, 2, c, i))).images[0]
        ref = np.asarray(im.resize((32, 32), Image.BICUBIC)).astype(int)
        ours = np.asarray(Image.open(os.path.join(d4m_run["out"], f"{c:05d}", f"{i:05d}.png")).convert("RGB")).astype(int)
        assert np.abs(ours - ref).max() <= 1


def test_ttm_labels_replay(d4m_run, digits_conv3):
    """D4M:matching/utils_fkd.py:L199-237: the stored FKD batches rebuild to the same pixels, whose teacher logits are the stored ones; and
    validate_fkd.py's fkd protocol replayed them (D4M:validate/train_FKD.sh: T=20, AdamW, cosine, no T^2)."""
    out = d4m_run["out"]
    meta = json.load(open(os.path.join(out, "fkd_meta.json")))
    assert meta["epochs"] == 2 and meta["batch_size"] == 16 and meta["mix"] == "cutmix" and meta["min_scale"] == 0.08
    images, _ = common.load_image_set(out, common.class_list("digits"))
    rec = torch.load(os.path.join(out, "fkd_epoch_0001.pt"), weights_only=True)
    assert len(rec["index"]) == 2 and sorted(torch.cat(rec["index"]).tolist()) == list(range(30))
    x = common.fkd_batch(images, rec, 1, meta["size"], meta["mean"], meta["std"])
    with torch.no_grad():
        torch.testing.assert_close(digits_conv3(x).half(), rec["logits"][1], rtol=1e-2, atol=1e-2)
    ev = json.load(open(os.path.join(out, "eval_fkd.json")))
    assert ev["protocol"] == "fkd" and ev["label_mode"] == "fkd" and ev["epochs"] == 1
    assert ev["recipe"]["temperature"] == 20.0 and not ev["recipe"]["t_squared"]
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["eval"]["protocol"] == "fkd"
    assert record["ttm"]["normalisation"] == "digits statistics" and meta["mean"] == list(common.DATASETS["digits"].mean)


def test_image_folder_readers_see_only_the_classes(d4m_run):
    """The TTM labels are files in the root, so torchvision's ImageFolder (and DD-Ranking, which uses it) sees
    exactly the 10 class folders and the 30 images, no extra "fkd" class."""
    import torchvision
    out = d4m_run["out"]
    assert os.path.isfile(os.path.join(out, "fkd_meta.json")) and not os.path.exists(os.path.join(out, "fkd"))
    folder = torchvision.datasets.ImageFolder(out)
    assert folder.classes == [f"{c:05d}" for c in range(10)] and len(folder) == 30
    assert [t for _, t in folder.samples] == [c for c in range(10) for _ in range(3)]
    assert all(os.path.isdir(os.path.join(out, n)) == (len(n) == 5 and n.isdigit()) for n in os.listdir(out))


def test_prompts_in_class_order(d4m_run, tmp_path, monkeypatch):
    """Prompts reach the pipeline from the dataset's class list, class by class, with the official settings."""
    from diffusers import StableDiffusionImg2ImgPipeline
    import d4m
    calls, original = [], StableDiffusionImg2ImgPipeline.__call__

    def recording(self, **kw):
        calls.append(kw)
        return original(self, **kw)
    monkeypatch.setattr(StableDiffusionImg2ImgPipeline, "__call__", recording)
    out = str(tmp_path / "set")
    os.makedirs(out)
    shutil.copy(os.path.join(d4m_run["out"], "prototypes.pt"), out)  # reused: only synthesis runs
    d4m.main(["--model", d4m_run["model"], "--out", out, *ARGS, "--ttm-epochs", "0", "--batch-size", "4"])
    prompts = [p for kw in calls for p in kw["prompt"]]
    assert prompts == [c["name"] for c in common.class_list("digits") for _ in range(3)]
    assert [len(kw["prompt"]) for kw in calls] == [4] * 7 + [2]  # many prototypes per call
    kw = calls[0]
    assert kw["negative_prompt"] == ["cartoon, anime, painting"] * 4
    assert (kw["strength"], kw["guidance_scale"], kw["num_inference_steps"]) == (0.7, 8.0, 4)
    assert kw["image"].shape == (4, 4, 8, 8) and len(kw["generator"]) == 4
    protos = torch.load(os.path.join(out, "prototypes.pt"), weights_only=True)["prototypes"]
    torch.testing.assert_close(kw["image"][2], protos[0][0])  # class 0 image 2 starts from prototype 0
    assert d4m.class_prompts([{"name": "tench, Tinca tinca"}], "a photo of {name}") == ["a photo of tench, Tinca tinca"]


def test_resume_redoes_only_missing_work(d4m_run, tmp_path, capsys):
    import d4m
    out = str(tmp_path / "set")
    shutil.copytree(d4m_run["out"], out)
    before = open(os.path.join(out, "00004", "00001.png"), "rb").read()
    mtime = os.path.getmtime(os.path.join(out, "00003", "00001.png"))
    shutil.rmtree(os.path.join(out, "00004"))
    os.remove(os.path.join(out, "fkd_epoch_0001.pt"))
    d4m.main(["--model", d4m_run["model"], "--out", out, *ARGS])  # the same run, without --eval
    assert "latents ->" not in capsys.readouterr().out  # prototypes.pt reused, nothing re-encoded
    assert os.path.getmtime(os.path.join(out, "00003", "00001.png")) == mtime  # a complete class is kept
    assert open(os.path.join(out, "00004", "00001.png"), "rb").read() == before  # redone, identically
    assert os.path.isfile(os.path.join(out, "fkd_epoch_0001.pt"))
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["status"] == "done" and record["stages"]["synthesis"]["images"] == 3
    with pytest.raises(common.UserError, match="different run"):  # another setting never mixes into this set
        d4m.main(["--model", d4m_run["model"], "--out", out, *ARGS, "--strength", "0.5"])


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-org/no-such-model"], "pass the folder with --model"),  # HF_HUB_OFFLINE=1 (conftest)
    (["--ipc", "2", "--prototypes", "3"], "--prototypes 3 exceeds --ipc 2"),
])
def test_bad_input_stops_with_one_sentence(argv, message, tmp_path, capsys):
    import d4m
    out = str(tmp_path / "never")
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: d4m.main(["--out", out, "--size", "64", *argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error:") and message in err[-1]
    assert not os.path.exists(out)  # nothing written before the error


def test_generator_loading(tiny_sd):
    """Stock pipeline from the folder, safety checker off, --scheduler swaps the sampler on the same config."""
    import argparse
    from diffusers import DDIMScheduler, PNDMScheduler
    import d4m
    pipe = d4m.load_generator(argparse.Namespace(model=tiny_sd, scheduler=None), "cpu")
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    pipe = d4m.load_generator(argparse.Namespace(model=tiny_sd, scheduler="ddim"), "cpu")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_torchrun_two_processes_write_the_same_set(d4m_run, tmp_path):
    """Classes sharded over 2 gloo processes: the same images, prototypes and stored labels as one process."""
    import subprocess
    import sys
    from conftest import ROOT, script_env
    out = str(tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                           os.path.join(ROOT, "d4m.py"), "--model", d4m_run["model"], "--out", out, "--device", "cpu", *ARGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=script_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = common.load_image_set(d4m_run["out"], common.class_list("digits")), common.load_image_set(out, common.class_list("digits"))
    # the same seeds, prompts and prototypes; float sums in another thread count or batch shape may
    # move a pixel by a grey level
    assert torch.equal(one[1], two[1]) and (one[0].int() - two[0].int()).abs().max() <= 2
    assert (one[0].float() - two[0].float()).abs().mean() < 0.05
    p1 = torch.load(os.path.join(d4m_run["out"], "prototypes.pt"), weights_only=True)
    p2 = torch.load(os.path.join(out, "prototypes.pt"), weights_only=True)
    assert sorted(p1) == sorted(p2)
    for e in range(2):
        a = torch.load(os.path.join(d4m_run["out"], f"fkd_epoch_{e:04d}.pt"), weights_only=True)
        b = torch.load(os.path.join(out, f"fkd_epoch_{e:04d}.pt"), weights_only=True)
        assert all(torch.equal(x, y) for x, y in zip(a["index"], b["index"]))  # the same batches and crops
        assert all(torch.equal(x, y) for x, y in zip(a["boxes"], b["boxes"]))
        assert all(torch.allclose(x.float(), y.float(), atol=0.05) for x, y in zip(a["logits"], b["logits"]))


def test_latents_are_cached_so_an_ipc_loop_encodes_once(tiny_sd, tmp_path, monkeypatch):
    import d4m
    monkeypatch.setenv("DD_CACHE", str(tmp_path / "cache"))
    small = ["--model", tiny_sd, "--size", "64", "--steps", "4", "--ttm-epochs", "0", "--workers", "0", "--no-eval"]
    d4m.main([*small, "--ipc", "1", "--out", str(tmp_path / "ipc1")])
    first = json.load(open(tmp_path / "ipc1" / "run.json"))["latent_cache"]
    files = sorted(os.listdir(first["path"]))
    assert first["reused_classes"] == 0 and files == [f"{c:05d}.pt" for c in range(10)]
    mtimes = [os.stat(os.path.join(first["path"], f)).st_mtime_ns for f in files]
    d4m.main([*small, "--ipc", "2", "--out", str(tmp_path / "ipc2"), "--save-latents", str(tmp_path / "enc")])
    second = json.load(open(tmp_path / "ipc2" / "run.json"))["latent_cache"]
    assert second == {"path": first["path"], "reused_classes": 10}
    assert [os.stat(os.path.join(first["path"], f)).st_mtime_ns for f in files] == mtimes  # not re-encoded
    # the cached latents are the ones a fresh encoding gives: compare with an uncached run's saved latents
    d4m.main([*small, "--ipc", "2", "--out", str(tmp_path / "fresh"), "--no-latent-cache",
              "--save-latents", str(tmp_path / "fresh_enc")])
    for c in (0, 9):
        a = torch.load(tmp_path / "enc" / f"{c:05d}.pt", weights_only=True)["latents"]
        b = torch.load(tmp_path / "fresh_enc" / f"{c:05d}.pt", weights_only=True)["latents"]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for c in (0, 9):  # hence the same prototypes and images
        assert (open(tmp_path / "ipc2" / f"{c:05d}" / "00001.png", "rb").read()
                == open(tmp_path / "fresh" / f"{c:05d}" / "00001.png", "rb").read())
