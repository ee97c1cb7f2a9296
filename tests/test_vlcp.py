"""vlcp.py: the text-prototype rule worked out by hand, LOF + KMeans against sklearn, the captions
file formats, fine-tuning two steps, long-prompt chunking, and an end-to-end digits run with the
tiny LLaVA and Stable Diffusion fixtures (on-disk contract, resume, bad input, captions and fine-tuned
model shared across an IPC loop)."""
import json
import os

import numpy as np
import pytest
import torch

import common
import vlcp
from conftest import run_script, unexpected_stderr

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost on a shared box


# --- stage 4: the text-prototype rule --------------------------------------------------------------
CAPTIONS = [
    "A cat with red fur.",                   # cluster 0
    "A cat with red ears.",                  # cluster 0
    "A tabby cat, covered in green fur.",    # cluster 0
    "A cat on green grass.",                 # cluster 0
    "The cat has fur.",                      # cluster 1
    "Abby? No: it is a cat.",                # cluster 1
]
LABELS = [0, 0, 0, 0, 1, 1]


def test_text_prototype_rule_worked_example():
    # N=6, threshold 0.5: common words have DF >= 3 -> "cat" (6), "fur" (3); red/green have DF 2.
    # Cluster 0 pool (stop words, common words and substrings of "Tabby cat" removed; the test is
    # case-sensitive, so "tabby" stays): red, red, ears, tabby, covered, green, green, grass.
    # top-2 = [(red, 2), (green, 2)]. Substring scores: 2, 2, 2 ("red" in "covered") + 2 = 4, 2
    # -> caption 2. Token scores: 2, 2, 2, 2 -> the first maximum, caption 0.
    # Cluster 1 pool: "abby" is a substring of "Tabby cat", the rest are stop/common -> all scores 0 -> "".
    got = vlcp.text_prototypes(CAPTIONS, LABELS, 2, "Tabby cat", threshold=0.5, tpk=2)
    assert got == ["A tabby cat, covered in green fur.", ""]
    got = vlcp.text_prototypes(CAPTIONS, LABELS, 2, "Tabby cat", threshold=0.5, tpk=2, match="token")
    assert got == ["A cat with red fur.", ""]
    # threshold 0.9: "fur" (DF 3 < 5.4) is no longer common and joins cluster 0's top words
    # (fur 2 ties red 2 but red came first); captions 0 and 2 score red+fur = 4 -> caption 0 first.
    got = vlcp.text_prototypes(CAPTIONS, LABELS, 2, "Tabby cat", threshold=0.9, tpk=2)
    assert got[0] == "A cat with red fur."


# nltk 3.10.4's tokens for these captions: NLTKWordTokenizer on each sentence (punkt's cuts, made by hand:
# no abbreviation in them), kept by isalpha and lower-cased, generated with nltk outside the project
NLTK_TOKENS = [
    ("The dog in the image is a small, fluffy white breed. It doesn't look aggressive; its tail is curled up!",
     "the dog in the image is a small fluffy white breed it does look aggressive its tail is curled up"),
    ("A well-known black-and-white bird with a long neck stands on one leg. Its feathers are grey/blue, and it's "
     "3-4 feet tall.", "a bird with a long neck stands on one leg its feathers are and it feet tall"),
    ('The fish\'s body is "streamlined" (about 30 cm long) -- silver scales... It can\'t swim fast? It cannot, I think.',
     "the fish body is streamlined about cm long silver scales it ca swim fast it can not i think"),
    ("Two cranes: one lifts 1,000 kg at 3:30; the other isn't moving. They'll be gone soon.",
     "two cranes one lifts kg at the other is moving they be gone soon"),
    ("The car\u2019s front is red\u2014its side shows \u201cchrome\u201d trim. You're looking at a 1960s model, aren't you?",
     "the car s front is red its side shows chrome trim you looking at a model are you"),
    ("It's gonna rain, wanna go? The umbrella (open) is blue & yellow; 50% off @ store #1.",
     "it gon na rain wan na go the umbrella open is blue yellow off store"),
    ("The cat sits on the mat.The window is open. 'Quoted' words and dogs' tails.",
     "the cat sits on the window is open quoted words and dogs tails"),
    ("He said \u201cgood dog.\u201d Then it ran (fast.) 'Tis 'twas y'all o'clock rock'n'roll, e-mail \u2013 done.",
     "he said good dog then it ran fast tis twas done"),
    ("THE DOG ISN'T BIG; it's 'really' small... Dogs' ears.", "the dog is big it really small dogs ears"),
]


@pytest.mark.parametrize("caption,expected", NLTK_TOKENS)
def test_words_are_nltk_word_tokenize_isalpha(caption, expected):
    assert vlcp.words(caption) == expected.split()


def test_class_name_prompt_ablation():
    """--text-prompt class-name gives every image the class name; the default is the text prototypes."""
    import argparse
    args = argparse.Namespace(ipc=2, threshold=0.5, tpk=2, text_match="substring", text_prompt="class-name")
    assert vlcp.image_prompts(CAPTIONS, LABELS, "Tabby cat", args) == ["Tabby cat", "Tabby cat"]
    args.text_prompt = "prototype"
    assert vlcp.image_prompts(CAPTIONS, LABELS, "Tabby cat", args) == vlcp.text_prototypes(
        CAPTIONS, LABELS, 2, "Tabby cat", threshold=0.5, tpk=2)


def test_stop_words_are_nltks():
    assert len(vlcp.NLTK_STOP_WORDS) == 179
    assert {"doesn", "t", "s", "won", "ma", "y", "ain", "does", "not", "can"} <= vlcp.NLTK_STOP_WORDS
    assert not {"back", "front", "side", "top", "thin", "full", "two", "three"} & vlcp.NLTK_STOP_WORDS


def test_official_rule_picks_another_prototype_than_regex_and_sklearn_stop_words():
    caps = ["A dog with a thin coat on its back and side.",
            "The back and the side of the dog are thin.",
            "A well-groomed, short-haired dog doesn't bark.",
            "Short hair covers the dog; it doesn't shed.",
            "A dog with short, well-groomed hair."]
    # official (nltk tokens, 179 stop words), threshold 0.7 -> common = DF >= 3.5: only "dog" (class name
    # anyway). Hyphenated words are dropped whole, "doesn't" -> does (stop) + n't. Pool counts:
    # thin 2, back 2, side 2, short 2 (caption 4's "Short" lower-cased), hair 2, coat 1, bark 1, covers 1,
    # shed 1. Substring scores: c0 thin+coat+back+side = 7, c1 back+side+thin = 6, c2 short+hair (in
    # "haired")+bark = 5, c3 hair+covers+shed = 4 ("Short" is not "short"), c4 short+hair = 4 -> c0.
    assert vlcp.text_prototypes(caps, [0] * 5, 1, "dog", 0.7, 30) == [caps[0]]
    # the old rule (alphabetic regex runs, scikit-learn's 318 stop words that hold back/side/thin)
    # keeps short 3, groomed 2, doesn 2, t 2, hair 2 ... and picks caption 2
    import re
    from collections import Counter
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    toks = [[w.lower() for w in re.findall(r"[^\W\d_]+", c)] for c in caps]
    pool = [w for t in toks for w in t if w not in ENGLISH_STOP_WORDS and w != "dog"]
    top = Counter(pool).most_common(30)
    scores = [sum(f for w, f in top if w in c) for c in caps]
    assert scores.index(max(scores)) == 2


def test_caption_prompt_is_the_papers_question():
    p = vlcp.caption_prompt("tench, Tinca tinca")
    assert p.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert p.endswith(" USER: <image>\nDescribe the physical appearance of the tench, Tinca tinca in the "
                      "image.Include details about its shape, posture, color, and any distinct features. ASSISTANT:")


# --- stage 3: LOF + KMeans ---------------------------------------------------------------------
def test_image_prototypes_equal_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.neighbors import LocalOutlierFactor
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 4, 2, 2))
    z = np.concatenate([c + rng.normal(0, 0.3, (12, 4, 2, 2)) for c in centres] +
                       [rng.normal(0, 40, (2, 4, 2, 2))]).astype(np.float32)  # two far outliers at the end
    got_c, got_l, keep = vlcp.image_prototypes(z, 3, 0.05, seed=0)
    X = z.reshape(len(z), -1).astype(np.float64)
    ref_keep = LocalOutlierFactor(n_neighbors=10, contamination=0.05).fit_predict(X) == 1
    ref = KMeans(n_clusters=3, random_state=0, n_init=10).fit(X[ref_keep])
    np.testing.assert_array_equal(keep, ref_keep)
    assert not keep[-2:].any() and keep[:-2].all()
    np.testing.assert_allclose(got_c, ref.cluster_centers_)
    np.testing.assert_array_equal(got_l, ref.labels_)
    # each prototype lies on one true centre
    dist = np.linalg.norm(got_c[:, None] - centres.reshape(3, -1)[None], axis=-1).min(1)
    assert (dist < 0.5).all()
    # contamination 0 keeps everything
    assert vlcp.image_prototypes(z, 3, 0.0, seed=0)[2].all()
    with pytest.raises(common.UserError, match="fewer than --ipc"):
        vlcp.image_prototypes(z[:5], 6, 0.0, seed=0)


# --- stage 1: captions files ---------------------------------------------------------------------
def test_captions_file_formats(tmp_path):
    official = tmp_path / "metadata.jsonl"
    official.write_text('{"file_name": "n01440764/n01440764MM10026.JPEG", "text": "a green fish"}\n'
                        '{"file_name": "n01443537/x.JPEG", "text": "a gold fish"}\n')
    caps = vlcp.read_captions(official)
    assert caps["n01440764/n01440764_10026.JPEG"] == caps["n01440764/n01440764MM10026.JPEG"] == "a green fish"
    assert caps["n01443537/x.JPEG"] == "a gold fish"
    ours = tmp_path / "captions.jsonl"
    ours.write_text('{"3/00001.png": "a bold three"}\n{"3/00002.png": "a thin thr')  # crash mid-line
    assert vlcp.read_captions(ours) == {"3/00001.png": "a bold three"}
    vlcp.append_captions(ours, [("3/00002.png", 'a thin three')])
    assert vlcp.read_captions(ours) == {"3/00001.png": "a bold three", "3/00002.png": "a thin three"}
    # the official ImageWoof metadata: captions keyed by bare (renamed) file names
    woof = tmp_path / "woof.jsonl"
    woof.write_text('{"file_name": "n02086240MM1004.JPEG", "text": "a small dog"}\n')
    caps = vlcp.load_captions(woof, ["n02086240/n02086240_1004.JPEG", "n02087394/other.JPEG"])
    assert caps["n02086240/n02086240_1004.JPEG"] == "a small dog" and "n02087394/other.JPEG" not in caps
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "b"}\nnot json\n{"c": "d"}\n')
    with pytest.raises(common.UserError, match="line 2"):
        vlcp.read_captions(bad)


# --- stage 5: long prompts -----------------------------------------------------------------------
def test_long_prompt_is_encoded_in_77_token_chunks(tiny_sd):
    from diffusers import StableDiffusionImg2ImgPipeline
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    prompt = "a small red car on a blue road near a big green tree " * 4  # char-level vocab: > 154 tokens
    ids = tok(prompt, truncation=False, return_tensors="pt").input_ids
    n = ids.shape[1]
    assert 154 < n < 231
    pe, ne = vlcp.long_prompt_embeds(pipe, prompt, "cartoon, anime, painting")
    assert pe.shape == ne.shape == (1, n, 32)
    with torch.no_grad():
        ref = torch.cat([enc(ids[:, :77])[0], enc(ids[:, 77:154])[0], enc(ids[:, 154:])[0]], 1)
        neg_ids = tok("cartoon, anime, painting", padding="max_length", max_length=n, return_tensors="pt").input_ids
        ref_neg = torch.cat([enc(neg_ids[:, i:i + 77])[0] for i in (0, 77, 154)], 1)
        # the first chunk is what truncated (training-style) encoding gives, up to the EOS that
        # truncation puts at position 76 (the official train/synthesis mismatch)
        trunc = enc(tok(prompt, truncation=True, max_length=77, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(pe, ref)
    torch.testing.assert_close(ne, ref_neg)
    torch.testing.assert_close(pe[:, :76], trunc[:, :76])
    pe77, ne77 = vlcp.long_prompt_embeds(pipe, prompt, "cartoon, anime, painting", pad_to_77k=True)
    assert pe77.shape == ne77.shape == (1, 231, 32)
    torch.testing.assert_close(pe77[:, :154], pe[:, :154])  # causal text encoder: padding changes nothing before it
    # an empty text prototype takes the negative prompt's length
    neg_n = tok("cartoon, anime, painting", return_tensors="pt").input_ids.shape[1]
    assert vlcp.long_prompt_embeds(pipe, "", "cartoon, anime, painting")[0].shape == (1, neg_n, 32)
    # more words but fewer tokens than the negative prompt (the official word-count rule crashes here)
    pe, ne = vlcp.long_prompt_embeds(pipe, "a b c d", "cartoon, anime, painting")
    assert pe.shape == ne.shape == (1, neg_n, 32)


# --- stage 2: fine-tuning ---------------------------------------------------------------------------
def test_finetune_two_steps_changes_unet_and_saves_a_pipeline(tiny_sd, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    args = vlcp.parse_args(["--ft-res", "32", "--ft-batch-size", "2", "--grad-accum", "1", "--finetune-epochs", "3",
                            "--ft-max-steps", "2", "--workers", "0", "--model", tiny_sd])
    train = common.real_dataset("digits", None, "train")
    out = str(tmp_path / "sd")
    os.makedirs(out)
    vlcp.finetune_unet(tiny_sd, train, [0, 1, 2, 3], ["a red one", "a blue " * 60, "a cat", "a dog"], out, args,
                       common.Dist(device="cpu"), {"steps": 2})
    assert json.load(open(os.path.join(out, "vlcp_finetune.json"))) == {"steps": 2}
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    tuned = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    diff = max((tuned[k] - base[k]).abs().max().item() for k in base)
    assert 0 < diff < 1e-3  # two AdamW steps at lr 1e-5, seen through the EMA
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(out)
    assert pipe.safety_checker is None and pipe.vae.config.scaling_factor == pytest.approx(0.18215)


# --- every stage from the command line ------------------------------------------------------------
def _argv(out, tiny_sd, tiny_llava, ipc=2):
    return ["--dataset", "digits", "--ipc", str(ipc), "--max-per-class", "4", "--out", out, "--model", tiny_sd,
            "--captioner", tiny_llava, "--size", "64", "--ft-res", "32", "--caption-max-tokens", "8",
            "--finetune-epochs", "1", "--ft-batch-size", "4", "--grad-accum", "1", "--ft-max-steps", "1",
            "--steps", "4", "--workers", "0", "--no-eval"]


def _sha256(path):
    import hashlib
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_cli_digits_end_to_end_and_resume(tiny_sd, tiny_llava, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = str(tmp_path / "cache")  # the shared captions and fine-tuned model of this test only
    monkeypatch.setenv("DD_CACHE", cache)
    out = str(tmp_path / "vlcp")
    # one image per caption batch: each caption's sampling seed is its own, so a lost caption comes back the same
    argv = [*_argv(out, tiny_sd, tiny_llava), "--caption-batch-size", "1"]
    proc = run_script("vlcp.py", *argv, env={"DD_CACHE": cache})
    assert "images: 20 at 32 px; " in proc.stdout
    assert not unexpected_stderr(proc.stderr)  # no accelerate / float32-cast notes from diffusers, only progress bars
    assert proc.stdout.strip().splitlines()[-1] == (f"vlcp: digits IPC 2 -> {out} | top-1 not evaluated (--no-eval) | "
                                                   f"reused from cache: nothing")  # common.closing_line
    classes = common.class_list("digits")
    images, targets = common.load_image_set(out, classes)
    assert images.shape == (20, 3, 32, 32) and targets.tolist() == [c for c in range(10) for _ in range(2)]
    assert sorted(os.listdir(out)) == sorted([f"{c:05d}" for c in range(10)] + [
        "classes.json", "preview.png", "prototypes.pt", "run.json", "text_prototypes.json"])
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["status"] == "done"
    assert {"captions", "finetune", "image_prototypes", "text_prototypes", "synthesis"} <= set(record["stages"])
    # stages 1-2 went to the shared cache, not beside the set
    captions_file, sd_dir = record["captions"]["path"], record["finetuned"]["path"]
    assert os.path.dirname(captions_file) == os.path.join(cache, "vlcp_captions") and captions_file.endswith(".jsonl")
    assert record["captions"] == {"path": captions_file, "reused": False, "images": 40, "generated": 40,
                                  "captioner": tiny_llava}
    assert os.path.dirname(sd_dir) == os.path.join(cache, "vlcp_finetuned") and not record["finetuned"]["reused"]
    assert record["sd_model"] == sd_dir and os.path.isfile(os.path.join(sd_dir, "vlcp_finetune.json"))
    assert not os.path.exists(out + "_sd")
    # captions: one {"<class id>/<index>.png": text} line for the first 4 images of every class
    train_targets = common.digits_split("train")[1]
    expected = {f"{c}/{i:05d}.png" for c in range(10) for i in (train_targets == c).nonzero().flatten()[:4].tolist()}
    lines = open(captions_file).read().splitlines()
    caps = vlcp.read_captions(captions_file)
    assert len(lines) == 40 and set(caps) == expected and all(isinstance(v, str) for v in caps.values())
    # each text prototype is one of its class's captions (or "")
    texts = json.load(open(os.path.join(out, "text_prototypes.json")))
    for c in range(10):
        assert len(texts[f"{c:05d}"]) == 2
        assert all(t == "" or t in [v for k, v in caps.items() if k.startswith(f"{c}/")] for t in texts[f"{c:05d}"])
    protos = torch.load(os.path.join(out, "prototypes.pt"), weights_only=False)
    assert protos[0]["prototypes"].shape == (2, 4, 8, 8) and len(protos[0]["inliers"]) == 4

    # resume: class 3 lost, one caption of class 5 lost -> only those are redone, class 3 identically; the
    # caption comes back the same, so the fine-tuned model (keyed by the captions' content) is reused
    import shutil
    before3 = common.load_image_set(out, classes)[0][6:8]
    mtime0 = os.path.getmtime(os.path.join(out, "00000", "00000.png"))
    shutil.rmtree(os.path.join(out, "00003"))
    dropped = next(k for k in sorted(caps) if k.startswith("5/"))
    kept = [ln for ln in lines if dropped not in ln]
    open(captions_file, "w").write("\n".join(kept) + "\n")
    capsys.readouterr()
    vlcp.main(argv)
    printed = capsys.readouterr().out
    assert "captioning 1 with" in printed and f"finetune: using {sd_dir} (reused)" in printed and "class 3:" in printed
    assert "class 0:" not in printed
    new_lines = open(captions_file).read().splitlines()
    assert new_lines[:39] == kept and dropped in new_lines[39] and sorted(new_lines) == sorted(lines)
    again = json.load(open(os.path.join(out, "run.json")))
    assert again["captions"]["generated"] == 1 and again["finetuned"] == {"path": sd_dir, "reused": True}
    assert os.path.getmtime(os.path.join(out, "00000", "00000.png")) == mtime0
    assert torch.equal(common.load_image_set(out, classes)[0][6:8], before3)
    assert json.load(open(os.path.join(out, "run.json")))["status"] == "done"


def test_bad_input_stops_before_touching_output(tmp_path):
    out = tmp_path / "bad"
    proc = run_script("vlcp.py", "--ipc", "5", "--max-per-class", "4", "--out", out, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --ipc 5") and not out.exists()
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"0/00001.png": "x"}\n{oops\n{"0/00002.png": "y"}\n')
    with pytest.raises(common.UserError, match="line 2 is not JSON"):
        vlcp.main(["--ipc", "2", "--out", str(out), "--captions", str(bad)])
    assert not out.exists()


def test_torchrun_two_processes_write_the_same_set(tiny_sd, tiny_llava, tmp_path):
    """Captioning, encoding and synthesis sharded over 2 gloo processes: the same captions and images
    as one process (fine-tuning skipped: DDP changes the optimisation, not the plumbing)."""
    import subprocess
    import sys
    from conftest import ROOT, script_env
    argv = ["--model", tiny_sd, "--captioner", tiny_llava, "--size", "64", "--steps", "4", "--ipc", "2",
            "--max-per-class", "4", "--caption-max-tokens", "8", "--finetune-epochs", "0", "--device", "cpu",
            "--workers", "0", "--no-eval"]  # the evaluation is not what sharding changes
    # a cache of its own for each run: both caption every image
    env = script_env(OMP_NUM_THREADS="1", DD_CACHE=str(tmp_path / "cache_two"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("vlcp.py", *argv, "--out", one, env={"DD_CACHE": str(tmp_path / "cache_one")})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29532",
                           os.path.join(ROOT, "vlcp.py"), *argv, "--out", two], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = common.class_list("digits")
    a, b = common.load_image_set(one, classes), common.load_image_set(two, classes)
    # the same seeds, prompts and prototypes; float sums in another thread count or batch shape may
    # move a pixel by a grey level
    assert torch.equal(a[1], b[1]) and (a[0].int() - b[0].int()).abs().max() <= 2
    assert (a[0].float() - b[0].float()).abs().mean() < 0.05
    paths = [json.load(open(os.path.join(p, "run.json")))["captions"]["path"] for p in (one, two)]
    assert paths[0].startswith(str(tmp_path / "cache_one")) and paths[1].startswith(str(tmp_path / "cache_two"))
    assert os.path.basename(paths[0]) == os.path.basename(paths[1])  # the key does not hold the process count
    lines = lambda p: sorted(open(p).read().splitlines())
    assert lines(paths[0]) == lines(paths[1]) and len(lines(paths[0])) == 40


def test_ipc_loop_captions_and_finetunes_once(tiny_sd, tiny_llava, tmp_path):
    """for ipc in 1 2: the second run reuses the shared captions and fine-tuned model untouched, and they
    are what an uncached (--no-cache) run makes."""
    from safetensors.torch import load_file
    env = {"DD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run_script("vlcp.py", *_argv(str(tmp_path / "ipc1"), tiny_sd, tiny_llava, ipc=1), env=env)
    first = json.load(open(tmp_path / "ipc1" / "run.json"))
    captions_file, sd_dir = first["captions"]["path"], first["finetuned"]["path"]
    assert first["captions"]["reused"] is False and first["finetuned"]["reused"] is False
    assert captions_file.startswith(str(tmp_path / "cache" / "vlcp_captions"))
    assert sd_dir.startswith(str(tmp_path / "cache" / "vlcp_finetuned"))
    cached = [captions_file] + [os.path.join(r, f) for r, _, fs in os.walk(sd_dir) for f in fs]
    assert len(cached) > 5 and not any(f.endswith("checkpoint.pt") for f in cached)
    stamp = lambda: [(f, os.stat(f).st_mtime_ns, _sha256(f)) for f in sorted(cached)]  # noqa: E731
    before = stamp()

    proc = run_script("vlcp.py", *_argv(str(tmp_path / "ipc2"), tiny_sd, tiny_llava, ipc=2), env=env)
    second = json.load(open(tmp_path / "ipc2" / "run.json"))
    assert second["captions"] == {"path": captions_file, "reused": True, "images": 40, "generated": 0,
                                  "captioner": tiny_llava}
    assert second["finetuned"] == {"path": sd_dir, "reused": True} and second["sd_model"] == sd_dir
    assert "finetune" not in second["stages"] and "images" not in second["stages"]["captions"]  # no item done
    assert "captioning" not in proc.stdout and f"captions: reusing {captions_file}" in proc.stdout
    assert f"finetune: using {sd_dir} (reused)" in proc.stdout and "finetune epoch" not in proc.stdout
    assert stamp() == before
    assert sorted(os.listdir(tmp_path)) == ["cache", "ipc1", "ipc2"]  # nothing beside the sets (no <out>_sd)
    assert len(os.listdir(tmp_path / "cache" / "vlcp_captions")) == 1
    assert len(os.listdir(tmp_path / "cache" / "vlcp_finetuned")) == 1
    assert len(common.load_image_set(str(tmp_path / "ipc2"), common.class_list("digits"))[1]) == 20

    # --no-cache: today's per-output files, made afresh: the same captions and the same fine-tuned UNet
    fresh = str(tmp_path / "fresh")
    run_script("vlcp.py", *_argv(fresh, tiny_sd, tiny_llava, ipc=1), "--no-cache", env=env)
    record = json.load(open(os.path.join(fresh, "run.json")))
    assert record["captions"]["path"] == os.path.join(fresh, "captions.jsonl") and not record["captions"]["reused"]
    assert record["finetuned"] == {"path": fresh + "_sd", "reused": False}
    assert sorted(open(captions_file).read().splitlines()) == sorted(open(record["captions"]["path"]).read().splitlines())
    ours = load_file(os.path.join(sd_dir, "unet", "diffusion_pytorch_model.safetensors"))
    theirs = load_file(os.path.join(fresh + "_sd", "unet", "diffusion_pytorch_model.safetensors"))
    base = load_file(os.path.join(tiny_sd, "unet", "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(not torch.equal(ours[k], base[k]) for k in ours)  # fine-tuned, not the base model
    assert stamp() == before
