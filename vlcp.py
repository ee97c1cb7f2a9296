"""VLCP: Dataset Distillation via Vision-Language Category Prototype (ICCV 2025), arXiv 2506.23580.
Official code: https://github.com/zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype
read at commit d0060eb4; cited as VLCP:path:line. Full notes (stages, presets, matches/differs table):
docs/vlcp.md.

Pipeline, one file, every stage resumable (rerun the same command):
  1. captions      LLaVA-1.5 describes every training image, asked about its class (Sec. 3.1)
  2. fine-tuning   the Stable Diffusion UNet learns (image, caption) pairs (Sec. 3.2)
  3. image protos  per class: VAE latents -> LocalOutlierFactor -> KMeans with IPC clusters (Sec. 3.3)
  4. text protos   per cluster: the caption that holds most of the cluster's frequent words (Sec. 3.4)
  5. synthesis     img2img from each image prototype, conditioned on its text prototype (Sec. 3.5)
  6. --eval        validate_fkd.py with the Minimax (`hard`) or RDED (`rded`) protocol (Sec. 3.6/3.7)
Stages 1-2 do not depend on IPC: unless --captions/--finetuned/--no-cache say otherwise, their outputs are
shared under $DD_CACHE (vlcp_captions/, vlcp_finetuned/), keyed by everything that decides them, so a
loop over IPC captions and fine-tunes once.

Run (digits first, no weights: `uv run python vlcp.py` uses our small Stable Diffusion trained on the digits
train split on first use (--model digits-sd) and captions COMPUTED from what each image measurably shows
(--captioner computed: stroke thickness, slant, width, closed loops), not LLaVA's; docs/vlcp.md.
The tiny random SD and LLaVA of `uv run python -m tests.tiny_models /tmp/tiny` check the LLaVA path;
their images are noise; real folders or hub ids give the real method):
  uv run python vlcp.py   # digits IPC 10 -> runs/vlcp_digits_ipc10, teacher agreement, rded evaluation
  uv run python vlcp.py --dataset digits --ipc 10 --out runs/vlcp_digits --model /tmp/tiny/sd \
      --captioner /tmp/tiny/llava --max-per-class 20 --size 64 --ft-res 32 --caption-max-tokens 8 \
      --finetune-epochs 1 --ft-batch-size 4 --grad-accum 1 --ft-max-steps 2 --steps 4
    prints one line per stage and ends with
    "vlcp: digits IPC 10 -> runs/vlcp_digits | top-1 distilled ... vs random real ... | ..."
  uv run torchrun --nproc_per_node 8 vlcp.py --dataset imagenette --data-path $NETTE --ipc 10 \
      --out runs/vlcp_nette_ipc10 --captions runs/nette/captions.jsonl --finetuned runs/nette/sd --eval
  uv run python vlcp.py --dataset imagenet --data-path $IMNET --ipc 10 --out runs/vlcp_in1k_ipc10 \
      --captions metadata.jsonl --finetuned /models/vlcp-sd-in1k --finetune-epochs 0 --eval
    (reuses the authors' shared metadata.jsonl and fine-tuned model; --finetune-epochs 0 skips
    stage 2 and synthesises with --model, so point --model at the fine-tuned folder instead)

Deliberate deviations from the official code (docs/vlcp.md gives the reason for each):
- No nltk dependency: the text rule's tokens are those of nltk.word_tokenize kept by isalpha,
  reproduced by `words` (nltk 3.10's Treebank rules; punkt's abbreviation list is not modelled), and
  nltk's 179 English stop words are a fixed list in this file.
- Stock StableDiffusionImg2ImgPipeline with the 4-channel prototype as `image` replaces the patched
  diffusers pipelines (same maths as
  VLCP:02_diffusion_model_training/scripts/); the safety checker is off; every image has its own seeded
  generator, so batching does not change its noise.
- Captions come from llava-hf through transformers (prompt of conv mode llava_v1, images padded to a
  square with the processor's mean colour as LLaVA's "pad" aspect mode does), seeded; texts are
  cleaned as llava_result_sum.py does (no '"', no "'s") but files keep their original names (no MM).
- Fine-tuning is built in (the official repo relies on diffusers' train_text_to_image.py, not
  vendored): same loss, optimiser, EMA, truncation and transforms; no gradient checkpointing on CPU.
- Every class is processed on its own (official: all latents in RAM); classes are keyed by index;
  a missing caption stops with its file name (official: crash inside nltk); output size is a flag.
- Long prompts: the longer of caption / negative prompt is chosen by token count, not word count
  (official crashes when the wordier text has fewer tokens, e.g. a 4-word caption); same result otherwise.
- Class names come from common.class_list (fixes the CIFAR-100 order bug, VLCP issue #6).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter

import numpy as np
import torch

import common

T = common.lazy_module("torchvision.transforms.v2")  # imported on first use: --help stays fast

# --- flags ----------------------------------------------------------------------------------------
COMPUTED = "computed"  # the --captioner name of digit_caption (digits)
PRESETS = {
    # ft_res: SD fine-tuning resolution; threshold: common-word DF ratio; out_size: saved px
    "digits": dict(ft_res=32, threshold=0.3, contamination=0.0, out_size=32,  # not published: CIFAR-10's values
                   eval_protocol="rded",
                   # not published, our choice: our digits SD (common.digits_sd) and computed captions (digit_caption),
                   # 32 px latents, a fine-tuning rate that moves the small model, no flip (a flipped digit is another shape)
                   model=common.DIGITS_SD, captioner=COMPUTED, size=32, ft_lr=1e-4, ft_flip=False,
                   finetune_epochs=2, grad_accum=1),  # 90 steps of 32: minutes on a CPU
    "cifar10": dict(ft_res=32, threshold=0.3, contamination=0.0, out_size=32,  # run_cifar10.sh
                    eval_protocol="rded"),
    "cifar100": dict(ft_res=32, threshold=0.2, contamination=0.0, out_size=32,  # cifar100 eval dir names; res assumed
                     eval_protocol="rded"),
    "tiny": dict(ft_res=64, threshold=0.2, contamination=0.1, out_size=64,  # eval dir names; ft_res not published: our choice
                 eval_protocol="rded"),
    "imagenette": dict(ft_res=512, threshold=0.7, contamination=0.1, out_size=256,  # run_nette.sh, nette_dm.sh
                       eval_protocol="hard"),
    "imagewoof": dict(ft_res=512, threshold=0.7, contamination=0.1, out_size=256,  # not published: Nette's values
                      eval_protocol="hard"),
    "imagenet100": dict(ft_res=512, threshold=0.7, contamination=0.1, out_size=256,  # not published: Nette's values
                        eval_protocol="hard"),
    "imagenet": dict(ft_res=512, threshold=0.7, contamination=0.1, out_size=224,  # Image1K dir names, gen_syn_image.py L131
                     eval_protocol="rded"),
}
DEFAULTS = dict(ft_res=512, threshold=0.7, contamination=0.1, out_size=256, eval_protocol="hard",
                model="stable-diffusion-v1-5/stable-diffusion-v1-5", captioner="llava-hf/llava-1.5-7b-hf",
                size=512, ft_lr=1e-5, ft_flip=True, finetune_epochs=8, grad_accum=4)  # official: SD 1.5, LLaVA-1.5-7B, train_text_to_image.py

QUESTION = ("Describe the physical appearance of the {} in the image.Include details about its shape, "
            "posture, color, and any distinct features.")  # config_produce_llava.py (no space after "image.")
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions.")  # LLaVA conv mode llava_v1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + "\n\nWith no flags (digits, IPC 10): 394 s on 2 idle CPU cores with a fresh cache (the digits VAE and "
                                "Stable Diffusion trained first; a rerun loads them; README 'How long it takes').", formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_generic_args(p, ipc=10, out="runs/vlcp_<dataset>_ipc<ipc>")
    g = p.add_argument_group("models")
    g.add_argument("--model", default=None,
                   help="Stable Diffusion 1.x hub id or folder (the official base is benjamin-paine/stable-diffusion-v1-5); "
                        f"'{common.DIGITS_SD}': our small SD trained on the digits train split on first use (not the paper's weights)")
    g.add_argument("--captioner", default=None,
                   help=f"LLaVA-1.5 (transformers) hub id or folder; '{COMPUTED}' (digits): captions COMPUTED from what each image "
                        "measurably shows (stroke thickness, slant, width, closed loops), not LLaVA's (docs/vlcp.md)")
    g.add_argument("--max-per-class", type=int, default=None,
                   help="use only the first N real training images of each class in every stage (quick runs, tests)")
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="keep the default captions in <out>/captions.jsonl and the fine-tuned model in <out>_sd "
                        "(default: shared under $DD_CACHE/vlcp_captions/ and $DD_CACHE/vlcp_finetuned/, keyed by "
                        "the data, the models' files and every setting that changes them, so a loop over IPC "
                        "captions and fine-tunes once)")
    g = p.add_argument_group("stage 1: captions (Sec. 3.1)")
    g.add_argument("--captions", default=None,
                   help="captions file to reuse and complete: our captions.jsonl or the official metadata.jsonl "
                        "({'file_name','text'} lines); default $DD_CACHE/vlcp_captions/<key>.jsonl "
                        "(--no-cache: <out>/captions.jsonl)")
    g.add_argument("--caption-batch-size", type=int, default=8, help="images per LLaVA generate call")
    g.add_argument("--caption-temperature", type=float, default=0.2, help="sampling temperature (model_vqa.py default)")
    g.add_argument("--caption-max-tokens", type=int, default=1024, help="max new tokens per caption (model_vqa.py default)")
    g = p.add_argument_group("stage 2: fine-tuning (Sec. 3.2)")
    g.add_argument("--finetuned", default=None,
                   help="folder of the fine-tuned pipeline: trained if incomplete, loaded if done; default "
                        "$DD_CACHE/vlcp_finetuned/<key>/ (--no-cache: <out>_sd)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="epochs over (image, caption); 0 skips stage 2")
    g.add_argument("--ft-res", type=int, default=None, help="fine-tuning resolution (512 ImageNet, 32 CIFAR)")
    g.add_argument("--ft-batch-size", type=int, default=32, help="images per micro-batch (per process)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (32x4 = 128)")
    g.add_argument("--ft-lr", type=float, default=None, help="AdamW learning rate, constant")
    g.add_argument("--ft-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips while fine-tuning (train_text_to_image.py --random_flip)")
    g.add_argument("--ft-max-steps", type=int, default=None, help="stop after this many optimiser steps")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay cap (diffusers EMAModel)")
    g.add_argument("--mixed-precision", default="fp16", choices=("fp16", "bf16", "no"), help="on CUDA only")
    g.add_argument("--checkpointing-steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g = p.add_argument_group("stages 3-4: prototypes (Sec. 3.3, 3.4)")
    g.add_argument("--size", type=int, default=None, help="real images are squashed to size x size before VAE encoding")
    g.add_argument("--encode-batch-size", type=int, default=10, help="images per VAE encode call")
    g.add_argument("--contamination", type=float, default=None, help="LocalOutlierFactor contamination; 0 keeps all")
    g.add_argument("--lof-neighbors", type=int, default=10, help="LocalOutlierFactor n_neighbors")
    g.add_argument("--threshold", type=float, default=None, help="a word in >= threshold of a class's captions is common")
    g.add_argument("--tpk", type=int, default=30, help="top-k frequent words scored per cluster (scripts: 30)")
    g.add_argument("--text-prompt", default="prototype", choices=("prototype", "class-name"),
                   help="prototype: each cluster's text prototype (Sec. 3.4); class-name: the plain class name for every "
                        "image (the ablation of the text prototypes, D4M's prompt)")
    g.add_argument("--text-match", default="substring", choices=("substring", "token"),
                   help="substring: official 'w in caption' (red matches covered); token: whole words only")
    g = p.add_argument_group("stage 5: synthesis (Sec. 3.5)")
    g.add_argument("--strength", type=float, default=0.7, help="img2img strength")
    g.add_argument("--guidance-scale", type=float, default=10.0, help="classifier-free guidance")
    g.add_argument("--steps", type=int, default=50, help="inference steps (pipeline default)")
    g.add_argument("--scheduler", default="pndm", choices=("pndm", "ddim"), help="pndm is the checkpoint's own")
    g.add_argument("--negative-prompt", default="cartoon, anime, painting", help="unconditional branch of CFG")
    g.add_argument("--out-size", type=int, default=None, help="saved resolution (CIFAR 32, Tiny 64, IN-1K 224, else 256)")
    g.add_argument("--pad-to-77k", action="store_true",
                   help="pad prompt embeddings to a multiple of 77 tokens so every image batches (changes outputs)")
    g.add_argument("--synth-batch-size", type=int, default=8, help="images per img2img call")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-protocol", default=None, choices=("hard", "rded"), help="hard = Minimax (Sec. 3.6), rded (Sec. 3.7)")
    g.add_argument("--eval-repeats", type=int, default=None,
                   help="students on the set and on random real images (default: 3 on digits, else validate_fkd's)")
    g.add_argument("--eval-epochs", type=int, default=None, help="override validate_fkd's epochs")
    g.add_argument("--eval-teacher-path", default=None, help="rded: teacher checkpoint (CIFAR/Tiny: RDED's)")
    common.document_defaults(p, PRESETS, DEFAULTS, (
        "from the run_*.sh scripts of zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4 "
        "(CIFAR-10: run_cifar10.sh, ImageNette: run_nette.sh, ImageNet-1K: its evaluation folder names); "
        "Woof/ImageNet-100/Tiny/digits: not published, our choice. The source of each value is the comment "
        "beside it in PRESETS in vlcp.py."),
        citations="VLCP:path is zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4:path (the official code); Sec. x.y is the paper's section")
    args = common.apply_presets(p.parse_args(argv), PRESETS, DEFAULTS)
    common.eval_on(args)
    args.out = args.out or os.path.join("runs", f"vlcp_{args.dataset}_ipc{args.ipc}")
    return args


# --- cache keys of stages 1-2 (shared across IPCs) ---------------------------------------------------------
SD_PARTS = ("model_index.json", "scheduler", "tokenizer", "text_encoder", "vae", "unet")  # what stage 2 loads
MODEL_FILES = (".json", ".txt", ".model", ".safetensors", ".bin")  # configs, tokenizers, weights


def file_digest(path):
    """sha256 of a file's bytes, remembered under $DD_CACHE by (real path, size, mtime) so that a loop over
    IPC reads a 14 GB model once."""
    st = os.stat(path)
    memo = common.cache_path("file_digests", [os.path.realpath(path), st.st_size, st.st_mtime_ns], ".txt")

    def load(p):
        with open(p) as f:
            digest = f.read()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("not a sha256 digest")
        return digest
    if (digest := common.read_cached(memo, "file digest", load)) is not None:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    common.make_cache_dir(os.path.dirname(memo))
    with open(f"{memo}.tmp{os.getpid()}", "w") as f:
        f.write(h.hexdigest())
    os.replace(f"{memo}.tmp{os.getpid()}", memo)
    return h.hexdigest()


def model_files_hash(name, flag, index="config.json", parts=("",)):
    """Which model `name` is, without loading it: a folder by the content of its config, tokenizer and
    weight files (those directly in each of `parts`, files or sub-folders of `name`); a hub id by the
    commit of its snapshot (offline: the cached one)."""
    common.hub_check(name, flag, index)
    if not os.path.isdir(name):
        from huggingface_hub import hf_hub_download
        return "hub commit " + os.path.basename(os.path.dirname(hf_hub_download(name, index)))
    files = []
    for part in parts:
        p = os.path.join(name, part)
        if os.path.isfile(p):
            files.append(part)
        elif os.path.isdir(p):
            files += [os.path.join(part, f) for f in sorted(os.listdir(p))
                      if f.endswith(MODEL_FILES) and os.path.isfile(os.path.join(p, f))]
    return common.content_hash([(f, file_digest(os.path.join(name, f))) for f in files])


# --- stage 1 helpers: captions ---------------------------------------------------------------------
def image_keys(ds, dataset, classes):
    """Path of every training image relative to the train root: the caption key (official metadata)."""
    if hasattr(ds, "samples"):
        root = ds.root
        return [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in ds.samples]
    return [f"{classes[int(t)]['id']}/{i:05d}.png" for i, t in enumerate(ds.targets)]


def read_captions(path):
    """{key: text} from our one-pair-per-line file or the official {"file_name", "text"} lines."""
    caps = {}
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise common.UserError(f"{path} is not a text file of JSON lines (captions.jsonl or metadata.jsonl)") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a last line cut by a crash: its image is captioned again
            raise common.UserError(f"{path} line {n} is not JSON; expected captions.jsonl or metadata.jsonl lines")
        if not isinstance(obj, dict):
            raise common.UserError(f"{path} line {n} is not a JSON object")
        if "file_name" in obj and "text" in obj:
            name = obj["file_name"]
            caps[name] = obj["text"]
            folder, base = os.path.split(name)  # llava_result_sum renamed a_b.JPEG to aMMb.JPEG
            caps.setdefault(f"{folder}/{base.replace('MM', '_', 1)}" if folder else base.replace("MM", "_", 1), obj["text"])
        else:
            caps.update(obj)
        if not all(isinstance(v, str) for v in obj.values()):
            raise common.UserError(f"{path} line {n} holds a caption that is not text")
    return caps


def load_captions(path, keys):
    """read_captions, with each image key (class folder/file) also found under its bare file name: the
    official ImageWoof metadata keys captions by file name alone (gen_prototype.py looks Woof up by
    basename)."""
    caps = read_captions(path)
    for k in keys:
        if k not in caps and os.path.basename(k) in caps:
            caps[k] = caps[os.path.basename(k)]
    return caps


def append_captions(path, pairs):
    """Append {key: text} lines; a last line cut by a crash is dropped first (its image is redone)."""
    with open(path, "a+b") as f:
        f.seek(0)
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as f:
        f.write("".join(json.dumps({k: v}) + "\n" for k, v in pairs))
        f.flush()
        os.fsync(f.fileno())


# digits: no LLaVA can be trained or downloaded here, so each digit's caption is computed from what the
# image measurably shows (ours, not the paper's): stroke thickness, slant, ink width and closed loops.
# Thresholds: roughly the terciles of each measure over the digits train split (32 px images).
CAPTION_VERSION = 1  # part of the captions' cache key: bump when digit_captions changes
LEADS = ("a handwritten digit", "the digit", "a handwritten", "a written digit")


def run_lengths(mask, axis):
    """For every pixel, the length of the run of ink along `axis` (1: its row, 0: its column) it lies in."""
    from scipy import ndimage
    m = mask if axis == 1 else mask.T
    out = np.zeros(m.shape)
    for r, row in enumerate(m):
        lab, n = ndimage.label(row)
        if n:
            out[r][lab > 0] = np.bincount(lab[lab > 0])[lab[lab > 0]]
    return out if axis == 1 else out.T


def digit_measures(img, level=0.5):
    """(stroke thickness px, slant, ink width px, closed loops) of a grey image (H x W in [0,1]): thickness = the
    median over ink pixels of the shorter of its horizontal and vertical ink runs; slant = d(column)/d(height)
    of the ink's intensity-weighted second moments (> 0 leans right); loops = background regions
    (4-connected) that do not touch the border."""
    from scipy import ndimage
    m = img > level
    if not m.any():
        return 0.0, 0.0, 0, 0
    thick = float(np.median(np.minimum(run_lengths(m, 1), run_lengths(m, 0))[m]))
    rows, cols = np.nonzero(m)
    cov = np.cov(cols.astype(float), -rows.astype(float), aweights=img[m]) if len(rows) > 1 else np.zeros((2, 2))
    slant = float(cov[0, 1] / cov[1, 1]) if cov[1, 1] > 0 else 0.0
    lab, n = ndimage.label(~m)
    border = set(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]).tolist())
    return thick, slant, int(cols.max() - cols.min() + 1), len(set(range(1, n + 1)) - border)


def digit_caption(img, name, seed):
    """One caption of a digit image ([3,H,W] or [H,W] in [0,1]) from digit_measures; the lead words and
    the order of the phrases vary with `seed`."""
    img = np.asarray(img)
    img = img[0] if img.ndim == 3 else img
    thick, slant, width, loops = digit_measures(img)
    scale = img.shape[-1] / 32  # thresholds are in 32 px units
    phrases = ["thin strokes" if thick <= 6 * scale else "thick strokes" if thick >= 9 * scale else "medium strokes",
               "slanted left" if slant < -0.1 else "slanted right" if slant > 0.05 else "upright",
               ["with no closed loop", "with one closed loop", "with two closed loops"][min(loops, 2)]]
    if width <= 17 * scale or width >= 21 * scale:
        phrases.append("narrow" if width <= 17 * scale else "wide")
    rng = np.random.default_rng(seed)
    rng.shuffle(phrases)
    return f"{LEADS[rng.integers(len(LEADS))]} {name}, " + ", ".join(phrases)


def compute_captions(ds, items, keys, class_names, path, seed):
    """Stage 1 on digits: digit_caption of every image, appended to `path` in the captions.jsonl format."""
    append_captions(path, [(keys[i], digit_caption(ds[i][0], class_names[int(ds.targets[i])], seed * 1_000_003 + i))
                           for i in items])


def expand2square(img, color):
    """LLaVA-1.5's image_aspect_ratio='pad': paste the image centred on a square of the mean colour."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img
    sq = Image.new(img.mode, (max(w, h),) * 2, color)
    sq.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return sq


def as_pil(x):
    return T.functional.to_pil_image(x) if isinstance(x, torch.Tensor) else x.convert("RGB")


def caption_prompt(class_name):
    """model_vqa.py with conv mode llava_v1: system line, then USER: <image>\n{Q} ASSISTANT:"""
    return f"{SYSTEM} USER: <image>\n{QUESTION.format(class_name)} ASSISTANT:"


def caption_images(ds, items, keys, class_names, path, args, device):
    """LLaVA answers the paper's question for each (index) in items; appended to `path` batch by batch."""
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model = common.hub_from_pretrained(LlavaForConditionalGeneration, args.captioner, "--captioner",
                                       dtype=dtype).to(device).eval()
    processor = common.hub_from_pretrained(AutoProcessor, args.captioner, "--captioner")
    processor.tokenizer.padding_side = "left"  # batched decoder-only generation
    mean = tuple(int(m * 255) for m in processor.image_processor.image_mean)
    bs = args.caption_batch_size
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, items), batch_size=bs, num_workers=args.workers,
                                         collate_fn=lambda b: [as_pil(x) for x, _ in b], worker_init_fn=common.quiet_worker)
    for b, images in enumerate(tqdm(loader, desc="captions", unit="batch")):
        idx = items[b * bs:(b + 1) * bs]
        prompts = [caption_prompt(class_names[int(ds.targets[i])]) for i in idx]
        inputs = processor(text=prompts, images=[expand2square(im, mean) for im in images], return_tensors="pt",
                           padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        torch.manual_seed(args.seed * 1_000_003 + idx[0])  # sampling at T=0.2 is random: seed it
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=args.caption_temperature, num_beams=1,
                                 max_new_tokens=args.caption_max_tokens)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        # llava_result_sum.py: drop '"' and every "'s"
        append_captions(path, [(keys[i], t.strip().replace('"', "").replace("'s", "")) for i, t in zip(idx, texts)])


# --- stage 2 helper: fine-tuning -------------------------------------------------------------------
class CaptionedImages(torch.utils.data.Dataset):
    """(image in [-1,1], 77 caption token ids): Resize + CenterCrop + flip, captions truncated as in training."""

    def __init__(self, ds, indices, texts, tokenizer, res, flip=True):
        self.ds, self.indices = ds, indices
        self.ids = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        self.tf = T.Compose([common.to_tensor(), T.Resize(res, antialias=True), T.CenterCrop(res),
                             T.RandomHorizontalFlip(0.5 if flip else 0.0), T.Normalize([0.5], [0.5])])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.tf(self.ds[self.indices[k]][0]), self.ids[k]


def finetune_unet(model, ds, indices, texts, out_dir, args, d, settings):
    """train_text_to_image.py: eps-prediction MSE on DDPM-noised VAE latents, UNet only, AdamW, EMA."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from tqdm import tqdm
    dev = d.device
    cuda = str(dev).startswith("cuda")
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision) if cuda else None
    load = lambda cls, sub, **kw: common.hub_from_pretrained(cls, model, "--model", subfolder=sub, **kw)  # noqa: E731
    tokenizer, noise_scheduler = load(CLIPTokenizer, "tokenizer"), load(DDPMScheduler, "scheduler")
    vae = load(AutoencoderKL, "vae", dtype=amp or torch.float32).to(dev).requires_grad_(False)  # dtype at load: no cast warning
    text_encoder = load(CLIPTextModel, "text_encoder").to(dev, amp or torch.float32).requires_grad_(False)
    unet = load(UNet2DConditionModel, "unet").to(dev).train()
    if cuda:
        unet.enable_gradient_checkpointing()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.ft_lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    net = unet
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[d.local_rank] if cuda else None)
    data = CaptionedImages(ds, indices, texts, tokenizer, args.ft_res, args.ft_flip)
    micro_per_epoch = math.ceil(len(shard_of(range(len(data)), d)) / args.ft_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum)
    total = args.finetune_epochs * steps_per_epoch
    total = min(total, args.ft_max_steps) if args.ft_max_steps else total
    ckpt_path, step = os.path.join(out_dir, "checkpoint.pt"), 0
    if os.path.isfile(ckpt_path):  # resume
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(ck["unet"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        step = ck["step"]
        print(f"finetune: resuming at step {step}/{total}")
    ema.to(dev)
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not d.main)
    while step < total:
        epoch, done_micro = step // steps_per_epoch, (step % steps_per_epoch) * args.grad_accum
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
        mine = shard_of(perm, d)[done_micro * args.ft_batch_size:]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=args.ft_batch_size,
                                             num_workers=args.workers, worker_init_fn=common.quiet_worker)
        n_micro, losses = micro_per_epoch - done_micro, []
        for m, (x, ids) in enumerate(loader):
            g = torch.Generator(dev).manual_seed(args.seed * 1_000_003 + (epoch * micro_per_epoch + done_micro + m) * d.world + d.rank)
            with torch.no_grad():
                x = x.to(dev, amp or torch.float32)
                latents = vae.encode(x).latent_dist.sample(g).float() * vae.config.scaling_factor
                cond = text_encoder(ids.to(dev))[0].float()
            noise = torch.randn(latents.shape, generator=g, device=dev)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x),), generator=g, device=dev)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                noise_scheduler.get_velocity(latents, noise, t)
            sync = (m + 1) % args.grad_accum == 0 or m + 1 == n_micro
            with net.no_sync() if d.world > 1 and not sync else contextlib.nullcontext():
                with torch.autocast("cuda", dtype=amp) if amp else contextlib.nullcontext():
                    loss = torch.nn.functional.mse_loss(net(noisy, t, cond).sample.float(), target)
                scaler.scale(loss / args.grad_accum).backward()
            losses.append(loss.detach())
            if not sync:
                continue
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # --max_grad_norm=1
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
            step += 1
            bar.update(1)
            if d.main and (step % args.checkpointing_steps == 0 or step == total):
                common.atomic_torch_save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                          "scaler": scaler.state_dict(), "step": step}, ckpt_path)
            if step >= total:
                break
        if d.main and losses:
            print(f"finetune epoch {epoch}: step {step}/{total} loss {torch.stack(losses).mean().item():.4f}")
    bar.close()
    if d.main:  # the whole pipeline with the EMA UNet, as train_text_to_image.py saves it
        ema.copy_to(unet.parameters())
        pipe = common.hub_from_pretrained(StableDiffusionPipeline, model, "--model", unet=unet.float().eval(),
                                          safety_checker=None, requires_safety_checker=False)
        pipe.save_pretrained(out_dir)
        common.atomic_write_json(os.path.join(out_dir, "vlcp_finetune.json"), settings)
        os.remove(ckpt_path)
    common.barrier()


def finetune_record(path):
    """The settings a finished fine-tuning folder was made with (None while unfinished)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        return rec
    except (ValueError, UnicodeDecodeError) as e:
        raise common.UserError(f"{path} is damaged ({e})") from e


def check_finetuned(folder):
    """A fine-tuning folder checked on read: a finished one (vlcp_finetune.json) holds model_index.json and readable
    safetensors weights, an unfinished one a readable resume checkpoint. Returns its record (None while
    unfinished); raises on anything damaged."""
    rec = finetune_record(os.path.join(folder, "vlcp_finetune.json"))
    if rec is None:
        ck = os.path.join(folder, "checkpoint.pt")
        if os.path.lexists(ck) and not isinstance(torch.load(ck, map_location="cpu", weights_only=True, mmap=True)["step"], int):
            raise ValueError(f"{ck} holds no step")
        return None
    from safetensors import safe_open
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError("model_index.json is missing")
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(root, f), "pt") as st:
                    for k in st.keys():
                        st.get_slice(k)
    return rec


def shard_of(items, d):
    return common.shard(items, d.rank, d.world)


# --- stage 3 helpers: image prototypes --------------------------------------------------------------
@torch.no_grad()
def encode_latents(vae, ds, indices, args, generator, device):
    """z = vae.encode(2x-1).latent_dist.sample() * scaling_factor on size x size squashed images
    (VLCP:03_distiilation/dataset_utils.py:L24-27)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=args.encode_batch_size,
                                         num_workers=args.workers, worker_init_fn=common.quiet_worker)
    out = []
    for x, _ in loader:
        x = (2 * x - 1).to(device, vae.dtype)
        out.append((vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def image_prototypes(latents, ipc, contamination, seed, n_neighbors=10, what="class"):
    """LOF outlier removal (if contamination > 0), then KMeans(ipc): (centres [ipc,D], labels, inlier mask)."""
    from sklearn.cluster import KMeans
    from sklearn.neighbors import LocalOutlierFactor
    X = latents.reshape(len(latents), -1).astype(np.float64)  # official: fp16 numpy, upcast by sklearn
    keep = np.ones(len(X), dtype=bool)
    if contamination > 0:
        keep = LocalOutlierFactor(n_neighbors=n_neighbors, contamination=contamination).fit_predict(X) == 1
    if keep.sum() < ipc:
        raise common.UserError(f"{what} keeps {keep.sum()} images after outlier removal (contamination "
                               f"{contamination}), fewer than --ipc {ipc}; lower --contamination or --ipc")
    km = KMeans(n_clusters=ipc, random_state=seed, n_init=10).fit(X[keep])
    return km.cluster_centers_, km.labels_, keep


# --- stage 4 helper: text prototypes -----------------------------------------------------------------
# nltk's English stop words (nltk_data corpora/stopwords/english, the 179 words VLCP's gen_prototype.py
# removes). Later nltk data adds 19 more, every one with an apostrophe, which no isalpha token has.
NLTK_STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
his himself she she's her hers herself it it's its itself they them their theirs themselves what which who
whom this that that'll these those am is are was were be been being have has had having do does did doing a
an the and but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here there when
where why how all any both each few more most other some such no nor not only own same so than too very s t
can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split())

# nltk.word_tokenize = punkt sentences, then the Treebank rules of nltk 3.10's NLTKWordTokenizer. What the
# rule sees of it: the isalpha tokens. A token is a run between spaces after these characters stand alone:
_CLOSERS = "\"')\\]}>\u00bb\u201d\u2019"
_SENTENCE_END = re.compile(rf"[.!?][{_CLOSERS}]*(?=\s)")  # punkt: a break after ./?/! + space
_ALONE = re.compile("[;@#$%&?!*()\\[\\]{}<>\"`\u00ab\u00bb\u201c\u201d\u2018\u2019\u201e\u2012-\u2015]|\\.{2,}|--")
_COMMA = re.compile(r"[:,](?!\d)")  # not inside numbers such as 1,000 or 3:30
_FINAL_PERIOD = re.compile(rf"(?<=[^.])\.(?=[{_CLOSERS}\s]*$)")  # only a sentence's last period
_OPEN_QUOTE = re.compile(r"(?i)(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")  # 'quoted, 'tis: the quote stands alone
_CLITIC = re.compile(r"(?<=[^' ])('[sS]|'[mM]|'[dD]|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T|')(?= )")  # does n't, dog 's
_FUSED = re.compile(r"(?i)\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b|\b(gim|lem)(me)\b")  # can not, gon na


def words(text):
    """nltk.word_tokenize(text) reduced to its isalpha tokens, lower-cased, without nltk: hyphenated or
    slashed words stay whole (so they are dropped), "doesn't" gives "does" + "n't", a sentence's final
    period is split off. Not modelled: punkt's abbreviation list (an abbreviation's period mid-text
    still ends a sentence here)."""
    out = []
    ends = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    for a, b in zip(ends, ends[1:]):
        s = _ALONE.sub(lambda m: f" {m.group(0)} ", text[a:b].strip())
        s = _FINAL_PERIOD.sub(" . ", _COMMA.sub(lambda m: f" {m.group(0)} ", _OPEN_QUOTE.sub("' ", s)))
        s = _FUSED.sub(lambda m: " ".join(g for g in m.groups() if g), f" {s} ")
        s = _CLITIC.sub(lambda m: f" {m.group(1)}", s)
        out += [w.lower() for w in s.split() if w.isalpha()]
    return out


def text_prototypes(captions, labels, n_clusters, class_name, threshold, tpk, match="substring"):
    """gen_prototype.py L128-217: per cluster, the first caption with the highest sum of the
    frequencies of the cluster's top-tpk words it contains (common, stop and class-name words
    removed), over nltk's tokens and stop words."""
    STOP = NLTK_STOP_WORDS
    toks = [words(c) for c in captions]
    df = Counter(w for t in toks for w in set(t))
    common_words = {w for w, n in df.items() if n >= threshold * len(captions) and w not in STOP}
    out = []
    for k in range(n_clusters):
        members = [i for i, lab in enumerate(labels) if lab == k]
        pool = [w for i in members for w in toks[i]
                if w not in STOP and w not in common_words and w not in class_name]  # class name: substring, case-sensitive
        top = Counter(pool).most_common(tpk)
        best, best_score = "", 0
        for i in members:
            has = (lambda w: w in captions[i]) if match == "substring" else (lambda w, s=set(toks[i]): w in s)
            score = sum(f for w, f in top if has(w))
            if score > best_score:  # the first maximum wins
                best, best_score = captions[i], score
        out.append(best)
    return out


def image_prompts(captions, labels, class_name, args):
    """The prompt of each of a class's IPC images: its cluster's text prototype (Sec. 3.4), or with
    --text-prompt class-name the plain class name for all (the ablation: D4M's prompt)."""
    if args.text_prompt == "class-name":
        return [class_name] * args.ipc
    return text_prototypes(captions, labels, args.ipc, class_name, args.threshold, args.tpk, args.text_match)


# --- stage 5 helper: long-prompt embeddings ----------------------------------------------------------
@torch.no_grad()
def long_prompt_embeds(pipe, prompt, negative, pad_to_77k=False):
    """get_pipeline_embeds (gen_syn_image.py L70-103): tokenise without truncation, pad the shorter
    text to the longer one's n tokens, encode 77-token chunks and concatenate: [1, n, dim] each.
    (Official picks the longer text by word count and crashes when it has fewer tokens: we use tokens.)"""
    tok, enc, chunk = pipe.tokenizer, pipe.text_encoder, pipe.tokenizer.model_max_length
    n = max(len(tok(t, truncation=False).input_ids) for t in (prompt, negative))
    n = math.ceil(n / chunk) * chunk if pad_to_77k else n
    ids = [tok(t, truncation=False, padding="max_length", max_length=n, return_tensors="pt").input_ids.to(enc.device)
           for t in (prompt, negative)]
    return tuple(torch.cat([enc(x[:, i:i + chunk])[0] for i in range(0, n, chunk)], 1) for x in ids)


def image_seed(seed, c, k):
    return seed * 1_000_003 + c * 1009 + k


# --- main ----------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    classes = common.class_list(args.dataset, args.data_path)
    names = [c["name"] for c in classes]
    common.check_out_folder(args.out)
    if args.finetuned:
        common.check_out_folder(args.finetuned, "--finetuned")
    if args.captions and not os.path.lexists(args.captions):  # a captions file to write
        common.check_out_folder(os.path.dirname(os.path.abspath(args.captions)), "the folder of --captions")
    common.check_numbers(args, {">= 1": "ipc max_per_class caption_batch_size caption_max_tokens ft_res ft_batch_size "
                                        "grad_accum ft_max_steps checkpointing_steps size encode_batch_size "
                                        "lof_neighbors tpk steps out_size synth_batch_size",
                                ">= 0": "finetune_epochs caption_temperature guidance_scale workers",
                                "in [0, 0.5]": "contamination", "in [0, 1]": "threshold", "in [0, 1)": "ema_decay",
                                "in (0, 1]": "strength"})
    if args.max_per_class is not None and args.max_per_class < args.ipc:
        raise common.UserError(f"--ipc {args.ipc} must be <= --max-per-class {args.max_per_class}")
    if args.eval and not os.path.isfile(os.path.join(common.ROOT, "validate_fkd.py")):
        raise common.UserError("validate_fkd.py is missing next to vlcp.py; --eval needs it")
    if args.captioner == COMPUTED and args.dataset != "digits":
        raise common.UserError(f"--captioner {COMPUTED} measures digit strokes: it is for --dataset digits only")
    ignore = ("caption_batch_size", "encode_batch_size", "synth_batch_size", "checkpointing_steps", "eval_teacher_path",
              "cache")
    common.RunDir.precheck(args.out, args, args.overwrite, ignore)  # before any model is looked up, loaded or trained
    d = common.dist_setup(args.device)
    common.seed_everything(args.seed)
    train = common.real_dataset(args.dataset, args.data_path, "train")
    targets = np.asarray(train.targets)
    per_class = [np.flatnonzero(targets == c)[:args.max_per_class].tolist() for c in range(len(classes))]
    for c, idx in enumerate(per_class):
        if len(idx) < args.ipc:
            raise common.UserError(f"class {c} ({names[c]}) has {len(idx)} training images, fewer than --ipc {args.ipc}")
    selected = [i for idx in per_class for i in idx]
    keys = image_keys(train, args.dataset, classes)
    data_key = {"dataset": args.dataset, "data_path": os.path.abspath(args.data_path) if args.data_path else None,
                "files": common.content_hash([[keys[i], int(targets[i])] for i in selected])}
    device_type = str(d.device).split(":")[0]  # fp16 on CUDA, fp32 elsewhere: other captions and models
    captions_path = args.captions or os.path.join(args.out, "captions.jsonl")
    if args.cache and not args.captions:
        # the captions depend on the images, the captioner, its prompt and sampling, not on IPC (nor on
        # the number of processes: whole batches go to ranks), so a loop over IPC captions once
        try:
            captioner_files = (f"vlcp.digit_caption v{CAPTION_VERSION}" if args.captioner == COMPUTED
                               else model_files_hash(args.captioner, "--captioner"))
        except common.UserError as e:
            raise common.UserError(f"{e}; the shared captions are keyed by the captioner's files (pass --captions "
                                   f"FILE to use a captions file without it)") from e
        captions_path = common.cache_path("vlcp_captions", {
            **data_key, "captioner": os.path.abspath(args.captioner) if os.path.isdir(args.captioner) else args.captioner,
            "captioner_files": captioner_files, "classes": names,
            "prompt": caption_prompt("{}"), "temperature": args.caption_temperature,
            "max_tokens": args.caption_max_tokens, "batch_size": args.caption_batch_size, "seed": args.seed,
            "device": device_type}, ".jsonl")
    if args.captions and not os.path.isfile(args.captions) and os.path.exists(args.captions):
        raise common.UserError(f"--captions {args.captions} is not a file")
    # models and captions are checked here, before the output is touched (a malformed file stops in read_captions;
    # a damaged shared one under $DD_CACHE is removed and captioned again)
    if args.cache and not args.captions:
        known = common.read_cached(captions_path, "VLCP captions", read_captions) or {}
    else:
        known = read_captions(captions_path) if os.path.isfile(captions_path) else {}
    uncaptioned = [i for i in selected if keys[i] not in known]
    if uncaptioned and args.captioner != COMPUTED:
        try:
            common.hub_check(args.captioner, "--captioner")
        except common.UserError as e:
            if not args.captions:
                raise
            raise common.UserError(f"--captions {args.captions} has no caption for {len(uncaptioned)} of the {len(selected)} "
                                   f"training images (the first: {keys[uncaptioned[0]]}) and the captioner that would "
                                   f"caption them cannot be loaded: pass a complete file, or a LLaVA folder with "
                                   f"--captioner") from e
    if args.model == common.DIGITS_SD:  # trained on first use (minutes), loaded from $DD_CACHE after
        args.model = common.digits_sd()
    if not all(os.path.isdir(os.path.join(args.out, f"{c:05d}")) and len(os.listdir(os.path.join(args.out, f"{c:05d}")))
               >= args.ipc for c in range(len(classes))):
        common.hub_check(args.model, "--model", "model_index.json")
    ft_dir = args.finetuned or args.out.rstrip("/") + "_sd"
    shared_ft = args.finetune_epochs > 0 and args.cache and not args.finetuned  # folder named in stage 2
    base_files = model_files_hash(args.model, "--model", "model_index.json", SD_PARTS) if shared_ft else None
    ft_settings = {k: getattr(args, k) for k in ("model", "dataset", "max_per_class", "finetune_epochs", "ft_res",
                                                 "ft_batch_size", "grad_accum", "ft_lr", "ft_flip", "ft_max_steps", "ema_decay",
                                                 "mixed_precision", "seed")}
    ft_record = os.path.join(ft_dir, "vlcp_finetune.json")
    if args.finetune_epochs > 0 and not shared_ft and os.path.exists(ft_dir):
        if not os.path.isdir(ft_dir):
            raise common.UserError(f"--finetuned {ft_dir} is a file, not a model folder")
        try:
            check_finetuned(ft_dir)
        except Exception as e:
            if not args.overwrite:
                raise common.UserError(f"the fine-tuned model in {ft_dir} is damaged ({common.user_sentence(e)[:160]}): "
                                       f"pass --overwrite to retrain it or choose another --finetuned") from e
            if d.main:
                shutil.rmtree(ft_dir)
    if (args.finetune_epochs > 0 and not shared_ft and finetune_record(ft_record) not in (None, ft_settings)
            and not args.overwrite):
        raise common.UserError(f"{ft_dir} holds a model fine-tuned with other settings; pass --overwrite to "
                               f"retrain it or choose another --finetuned")
    run = common.RunDir(args.out, args, classes, rank=d.rank, overwrite=args.overwrite,
                        extra_artefacts=("captions.jsonl", "text_prototypes.json", "prototypes.pt", ".vlcp"),
                        ignore=ignore)
    todo = [c for c in shard_of(range(len(classes)), d) if not run.class_complete(c, args.ipc)]
    proto_dir = os.path.join(args.out, ".vlcp")
    os.makedirs(proto_dir, exist_ok=True)

    # --- stage 1: LLaVA captions of every training image (Sec. 3.1) ---
    captions = load_captions(captions_path, keys) if os.path.isfile(captions_path) else {}
    missing = [i for i in selected if keys[i] not in captions]
    with run.stage("captions", items=len(missing)):
        if missing:
            print(f"captions: {len(selected) - len(missing)} of {len(selected)} images already captioned in "
                  f"{captions_path}; captioning {len(missing)} with {args.captioner}")
            if args.cache and not args.captions:
                common.make_cache_dir(os.path.dirname(captions_path))
            os.makedirs(os.path.dirname(os.path.abspath(captions_path)), exist_ok=True)
            part = captions_path if d.world == 1 else f"{captions_path}.rank{d.rank}"
            # whole caption batches go to ranks, so every batch (and its sampling seed) is the one a
            # single process would caption: the captions do not depend on the number of processes
            bs = args.caption_batch_size
            batches = [missing[i:i + bs] for i in range(0, len(missing), bs)]
            mine = [i for b in shard_of(batches, d) for i in b]
            if args.captioner == COMPUTED:
                compute_captions(train, mine, keys, names, part, args.seed)
            else:
                caption_images(train, mine, keys, names, part, args, d.device)
            common.barrier()
            if d.main and d.world > 1:
                for r in range(d.world):
                    if os.path.isfile(f"{captions_path}.rank{r}"):
                        append_captions(captions_path, read_captions(f"{captions_path}.rank{r}").items())
                        os.remove(f"{captions_path}.rank{r}")
            common.barrier()
            captions = load_captions(captions_path, keys)
        else:
            print(f"captions: reusing {captions_path} (all {len(selected)} images captioned)")
    run.record["captions"] = {"path": os.path.abspath(captions_path), "reused": not missing, "images": len(selected),
                              "generated": len(missing), "captioner": args.captioner}
    if args.captioner == COMPUTED:
        run.record["captions"]["note"] = ("computed from what each image measurably shows (vlcp.digit_caption: stroke "
                                          "thickness, slant, width, closed loops), not LLaVA's")
    run.record["generator"] = common.generator_record(args.model)

    # --- stage 2: fine-tune the SD UNet on (image, caption) (Sec. 3.2) ---
    sd_path, run.record["finetuned"] = args.model, None
    if args.finetune_epochs > 0:
        if shared_ft:  # the captions' content, the base model and every fine-tuning setting decide the model
            ft_dir = common.cache_path("vlcp_finetuned", {
                **data_key, **ft_settings, "base_files": base_files, "world": d.world, "device": device_type,
                "captions": common.content_hash([captions[keys[i]] for i in selected])}, "")
            ft_record = os.path.join(ft_dir, "vlcp_finetune.json")
            def check_shared(p):
                if check_finetuned(p) not in (None, ft_settings):
                    raise ValueError("its record names other settings than its key")
                return True
            if d.main:  # a damaged shared model (cut weights, a bad record or checkpoint) is removed and trained again
                common.read_cached(ft_dir, "VLCP fine-tuned model", check_shared)
                common.make_cache_dir(os.path.dirname(ft_dir))
            common.barrier()
        sd_path = ft_dir
        ft_reused = finetune_record(ft_record) == ft_settings
        if not ft_reused:
            if d.main and os.path.isfile(ft_record):  # other settings and --overwrite: retrain from scratch
                shutil.rmtree(ft_dir)
            os.makedirs(ft_dir, exist_ok=True)
            with run.stage("finetune", items=len(selected) * args.finetune_epochs):
                finetune_unet(args.model, train, selected, [captions[keys[i]] for i in selected], ft_dir, args, d,
                              ft_settings)
        print(f"finetune: using {ft_dir}" + (" (reused)" if ft_reused else ""))
        run.record["finetuned"] = {"path": os.path.abspath(ft_dir), "reused": ft_reused}
    run.record["sd_model"] = sd_path

    pipe = None
    if todo:
        from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
        dtype = torch.float16 if str(d.device).startswith("cuda") else torch.float32  # official: fp16
        pipe = common.hub_from_pretrained(StableDiffusionImg2ImgPipeline, sd_path, "--model", dtype=dtype,
                                          safety_checker=None, requires_safety_checker=False).to(d.device)
        pipe.set_progress_bar_config(disable=True)
        if args.scheduler == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    # --- stage 3: image prototypes, LOF + KMeans per class on VAE latents (Sec. 3.3) ---
    enc_set = common.real_dataset(args.dataset, args.data_path, "train",
                                  T.Compose([common.to_tensor(), T.Resize((args.size, args.size), antialias=True)]))
    proto_file = lambda c: os.path.join(proto_dir, f"{c:05d}.pt")  # noqa: E731
    need = [c for c in todo if not os.path.isfile(proto_file(c))]
    with run.stage("image_prototypes", items=sum(len(per_class[c]) for c in need)):
        for c in need:
            g = torch.Generator(d.device).manual_seed(args.seed * 1009 + c)
            z = encode_latents(pipe.vae, enc_set, per_class[c], args, g, d.device)
            centres, labels, keep = image_prototypes(z.numpy(), args.ipc, args.contamination, args.seed,
                                                     args.lof_neighbors, f"class {c} ({names[c]})")
            inliers = [keys[i] for i, k in zip(per_class[c], keep) if k]
            common.atomic_torch_save({"prototypes": torch.tensor(centres, dtype=torch.float32).view(args.ipc, *z.shape[1:]),
                                      "labels": labels.tolist(), "inliers": inliers}, proto_file(c))
            print(f"class {c}: {keep.sum()}/{len(keep)} inliers -> {args.ipc} prototypes of {tuple(z.shape[1:])}")

    # --- stage 4: text prototypes, one caption per cluster (Sec. 3.4) ---
    with run.stage("text_prototypes"):
        for c in todo:
            rec = torch.load(proto_file(c), weights_only=True)
            if "text" in rec:
                continue
            lost = [k for k in rec["inliers"] if k not in captions]
            if lost:
                raise common.UserError(f"{captions_path} has no caption for {lost[0]} (and {len(lost) - 1} more)")
            rec["text"] = image_prompts([captions[k] for k in rec["inliers"]], rec["labels"], names[c], args)
            common.atomic_torch_save(rec, proto_file(c))

    # --- stage 5: img2img from each image prototype with its text prototype (Sec. 3.5) ---
    from PIL import Image
    from tqdm import tqdm
    with run.stage("synthesis", items=len(todo) * args.ipc):
        for c in tqdm(todo, desc="synthesis", unit="class", disable=not todo):
            rec = torch.load(proto_file(c), weights_only=True)
            embeds = [long_prompt_embeds(pipe, t, args.negative_prompt, args.pad_to_77k) for t in rec["text"]]
            images = [None] * args.ipc
            by_len = {}
            for k, (pe, _) in enumerate(embeds):  # same length -> one batch
                by_len.setdefault(pe.shape[1], []).append(k)
            for group in by_len.values():
                for s in range(0, len(group), args.synth_batch_size):
                    ks = group[s:s + args.synth_batch_size]
                    out = pipe(image=rec["prototypes"][ks].to(d.device, pipe.dtype),
                               prompt_embeds=torch.cat([embeds[k][0] for k in ks]),
                               negative_prompt_embeds=torch.cat([embeds[k][1] for k in ks]),
                               strength=args.strength, guidance_scale=args.guidance_scale,
                               num_inference_steps=args.steps, output_type="pil",
                               generator=[torch.Generator().manual_seed(image_seed(args.seed, c, k)) for k in ks]).images
                    for k, im in zip(ks, out):  # official PIL .resize: bicubic
                        im = im.resize((args.out_size, args.out_size), Image.BICUBIC) if im.size[0] != args.out_size else im
                        images[k] = common.to_tensor()(im)
            run.write_class(c, torch.stack(images))
    common.barrier()
    if d.main:  # gather the per-class records; the folder stays a plain ImageFolder root
        merged_path = os.path.join(args.out, "prototypes.pt")
        merged = torch.load(merged_path, weights_only=True) if os.path.isfile(merged_path) else {}
        merged.update({c: torch.load(proto_file(c), weights_only=True) for c in range(len(classes))
                       if os.path.isfile(proto_file(c))})
        if len(merged) == len(classes):
            common.atomic_torch_save(merged, merged_path)
            common.atomic_write_json(os.path.join(args.out, "text_prototypes.json"),
                                     {f"{c:05d}": r["text"] for c, r in merged.items()})
            run.record["text_prototypes"] = {"file": "text_prototypes.json",
                                             "empty": sum(t == "" for r in merged.values() for t in r["text"]),
                                             "inliers": [len(merged[c]["inliers"]) for c in sorted(merged)]}
        if all(run.class_complete(c, args.ipc) for c in range(len(classes))):
            shutil.rmtree(proto_dir, ignore_errors=True)
    n_images = len(classes) * args.ipc
    if d.main and args.dataset == "digits":  # the first check of a generator: does the teacher see the intended class?
        images, labels = common.load_image_set(args.out, classes)
        agreement = common.teacher_agreement(images.float() / 255, labels)
        run.record["teacher_agreement"] = agreement
        print(f"teacher agreement: the digits teacher conv3 assigns {agreement:.1f}% of the {len(labels)} generated "
              f"images to the class they were made for")
    run.finish(device=d.device, images=n_images, seconds=round(time.time() - t_start, 1))

    # --- stage 6: evaluation (Sec. 3.6 Minimax = hard labels, Sec. 3.7 RDED) ---
    result = None
    if args.eval:  # every rank: validate_fkd trains with DDP under torchrun
        import validate_fkd
        extra = ["--data-path", args.data_path] if args.data_path else []
        extra += ["--repeats", str(common.eval_repeats(args))] if common.eval_repeats(args) else []
        extra += ["--baseline", "random"] if args.dataset == "digits" else []  # random real, same IPC and protocol
        extra += ["--epochs", str(args.eval_epochs)] if args.eval_epochs else []
        extra += ["--teacher-path", args.eval_teacher_path] if args.eval_teacher_path else []
        result = validate_fkd.main(["--syn-data-path", args.out, "--dataset", args.dataset, "--protocol",
                                    args.eval_protocol, "--ipc", str(args.ipc), "--seed", str(args.seed),
                                    "--device", str(args.device), *extra], closing=False)
    if d.main:
        print(f"images: {n_images} at {args.out_size} px; {run.record.get('text_prototypes', {}).get('empty', 0)} empty "
              f"text prototypes; {time.time() - t_start:.0f}s")
        print(common.closing_line("vlcp", args.dataset, args.ipc, args.out, result, {
            "captions": run.record["captions"]["reused"],
            "fine-tuned SD": bool((run.record.get("finetuned") or {}).get("reused"))}))


if __name__ == "__main__":
    common.run_cli(main)
