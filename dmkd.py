"""DM-KD: knowledge distillation on images synthesised by a class-conditional diffusion model.

Paper: "Is Synthetic Data From Diffusion Models Ready for Knowledge Distillation?", Zheng Li, Yuxuan Li,
Penghai Zhao, Renjie Song, Xiang Li, Jian Yang, arXiv 2305.12954 (2023).
Official code: https://github.com/zhengli97/DM-KD (AIGC_generate.py, train_student.py), read at commit
bbab9ce; cited as DMKD = zhengli97/DM-KD@bbab9ce. Full notes (matches/differs table, figures): docs/dmkd.md.

Stage 1 samples `--ipc` images per class from DiT-XL/2 (class ids = the ImageNet ids of the dataset's
classes), stage 2 trains a student from scratch on those images only, with the teacher's soft labels
computed online (KL * T^2), and reports its top-1 on the real validation set.

    # digits, both stages, with our class-conditional DiT trained on the digits train split on first use
    # (--model digits-dit, the digits default; not the paper's weights; docs/dmkd.md)
    uv run python dmkd.py
    # digits (the embedded data set), both stages, with a local DiT folder (`uv run python -m tests.tiny_models
    # /tmp/tiny` makes a random one whose images are noise: the student stays at chance; a real one works the same)
    uv run python dmkd.py --model /tmp/tiny/dit --steps 4 --out runs/dmkd_digits
    #   -> "KD result: 200 images -> student conv3 top-1 best 9.72 last 9.72 (teacher conv3 98.61)", then the
    #      validate_fkd evaluation (3 students on the set, 3 on random real) and "dmkd: digits IPC 20 -> ..."
    # digits KD through any image folder: 200 blends of two training digits in arbitrary folders
    uv run python dmkd.py --syn-data-path runs/digit_blends --out runs/dmkd_digits_blends
    #   -> "KD result: 200 images -> student conv3 top-1 best 97.22 last 96.94 (teacher conv3 98.61)"
    # ImageNet-1K, the released setting (200 images/class, s=2, T=100; RN-18 -> RN-18, 100 epochs)
    uv run torchrun --nproc_per_node 8 dmkd.py --dataset imagenet --data-path $IMAGENET --ipc 200 --fidelity low \
        --out runs/dmkd_imagenet_200k

Deliberate differences from the official code (all on purpose):
- Sampler. AIGC_generate.py runs DiT's own code; we load the diffusers `DiTPipeline` (from_pretrained)
  and step its parts in a short loop (`sample_dit`) so that latents and noise can be passed per image.
  Known differences from the official sampler (DMKD:AIGC_generate.py) and what we do about them:
  1. CFG channels: DiT guides only the first 3 of the 4 latent channels, diffusers all 4. Default
     `--cfg-channels 3` (official); 4 gives diffusers' behaviour.
  2. Variance: DiT samples ancestrally with its learned variance; DiTPipeline drops it and steps the
     checkpoint's DDIM scheduler. Default `--scheduler dit` = diffusers' DDPMScheduler with
     variance_type="learned_range", linspace timesteps (= DiT's space_timesteps) and no clipping, fed
     the full model output: the official sampler up to float32 schedule arithmetic. `--scheduler
     default` is DiTPipeline's own (DDIM for the hub checkpoint).
  3. VAE: the hub folder's VAE may differ from the sd-vae-ft-mse that AIGC_generate.py uses; `--vae`
     loads another AutoencoderKL folder. Noise comes from per-image CPU generators, so sets are not
     bit-identical to the released ones; the s/T trend (low fidelity teaches better) is the target.
- Seeds. The official loop (torch.manual_seed(seed), one batch of 10 per class) gives every class the
  same noise at a given seed; we keep that (seed s, image i -> the same noise for every class) and
  `--per-class-seed` gives every class its own. Because each image has its own generator, classes are
  batched together (`--gen-batch`) with results equal to one class per call (tested).
- Output: one folder per class of the on-disk contract, resized to the dataset's resolution (224 for
  ImageNet instead of 256 PNGs; training uses RandomResizedCrop(224) either way); resumable per class
  (the official skip-check never matches), sharded over ranks under torchrun.
- Classes outside ImageNet: the official CIFAR-100 run trains on DiT ImageNet-class images resized to
  32 px (labels unused by KD, DMKD:dataset/cifar100.py:81-94); there is no CIFAR->ImageNet map. We require `--class-map FILE`
  for CIFAR (or `--class-map spread`, which deals the 1000 ImageNet classes round-robin over the
  dataset's classes: the official route). digits defaults to `spread` (no ImageNet class is a digit).
- KD: the official KL*T^2 with alpha 1 (the CE term is dead code there), SGD + step milestones, optional
  mixup/cutmix seen by the teacher too; evaluated on a single process (the official DDP val pads
  duplicates); best and last top-1 are both reported. The released ImageNet script runs 100 epochs
  while the README tables say 200: --epochs/--milestones. Stage 2 writes kd_<student>.json (it also takes
  folders the validator cannot read); --eval writes eval_rded.json through validate_fkd.py --preset dmkd
  with the same teacher, normalisation and recipe (the collection's record, like every method's).
- CIFAR-100 nets: DM-KD's own (common.py: cifarresnet18/34, without the stem ReLU; wrn_16_1/16_2/40_1/40_2),
  the preset pair RN-34 -> RN-18; the README table's VGG-11 teacher is not in DM-KD's code (DMKD:models/__init__.py).
"""
import argparse
import dataclasses
import inspect
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# --------------------------------------------------------------------------------------------------
# flags and presets
# --------------------------------------------------------------------------------------------------
FIDELITY = {  # README "Synthetic Dataset" table: (guidance scale s, sampling steps T)
    "low": (2.0, 100),   # the released 200K set and AIGC_generate.py defaults; the paper's pick
    "high": (4.0, 250),  # the high-fidelity comparison set
}

_IMAGENET_KD = dict(  # scripts/imagenet_distill.sh
    crop="rrc", teacher="resnet18", student="resnet18", epochs=100, batch_size=256, lr=0.1,
    weight_decay=1e-4, milestones="30,60,90", temperature=10.0, eval_every=1)
_CIFAR_KD = dict(  # train_student.py argparse defaults (CRD recipe; no released CIFAR script)
    crop="pad", teacher="resnet18_modified", student="resnet18_modified", epochs=240, batch_size=128,
    lr=0.1, weight_decay=5e-4, milestones="150,180,210", temperature=4.0, eval_every=1)
PRESETS = {
    "imagenet": dict(_IMAGENET_KD, ipc=200),     # AIGC_generate.py: 20 seeds x 10 images = 200K
    # ImageNet-100 (README: RN-18 -> RN-50) and the 10-class subsets: recipe not published, ImageNet's
    "imagenet100": dict(_IMAGENET_KD, ipc=200, student="resnet50"),
    "imagenette": dict(_IMAGENET_KD, ipc=200),
    "imagewoof": dict(_IMAGENET_KD, ipc=200),
    # '50k' data option; CIFAR amount UNVERIFIED (DMKD:AIGC_generate.py, DMKD:dataset/cifar100.py:81-94); the pair
    # RN-34 -> RN-18 of the README's CIFAR-100 table, DM-KD's own CIFAR ResNets (DMKD:models/__init__.py, cifar_resnet.py)
    "cifar100": dict(_CIFAR_KD, ipc=500, teacher="cifarresnet34", student="cifarresnet18"),
    "cifar10": dict(_CIFAR_KD, ipc=5000),        # not published: our choice, 50K as for CIFAR-100
    "tiny": dict(_CIFAR_KD, ipc=250),            # not in the paper: our choice, CIFAR recipe at 64 px
    # not published: our choice, small enough for CPU minutes; lr 0.02 as the official small students
    # (with the T^2 = 16 gradient scale: 6 epochs on noised digits gave 28 % at lr 0.1, 88 % at 0.02)
    "digits": dict(crop="pad", teacher="conv3", student="conv3", ipc=20, epochs=30, batch_size=64,
                   lr=0.02, weight_decay=5e-4, milestones="20,25", temperature=4.0, eval_every=5,
                   model="digits-dit"),  # our digits DiT (digits_dit), trained here on first use
}
DEFAULTS = dict(fidelity="low", per_seed=10, gen_batch=32, aug="none", model="facebook/DiT-XL-2-256")
MIX_ALPHA = {"mixup": 0.4, "cutmix": 0.25, "none": 0.0}  # helper/loops.py
# DM-KD normalises CIFAR-100 with its own statistics (dataset/cifar100.py:81-108), as every standard
# CIFAR-100 teacher was trained (common.py keeps the CIFAR-10 constants that SRe2L/RDED/DELT use)
DMKD_NORM = {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), "CIFAR-100 statistics (DM-KD)")}
SMALL_LR_STUDENTS = ("mobilenet_v2", "mobilenet_v2_cifar", "shufflenet_g2")  # train_student.py:113: lr 0.02
KD_FLAGS = ("stage", "syn_data_path", "teacher", "teacher_path", "student", "epochs", "batch_size", "lr",
            "weight_decay", "momentum", "milestones", "temperature", "aug", "mix_alpha", "eval_every", "crop",
            "eval_protocol", "mean", "std")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + "\n\nWith no flags (digits, IPC 20): 447 s on 2 idle CPU cores with a fresh cache (the digits VAE and "
                                "DiT trained first; a rerun loads them; README 'How long it takes').",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_generic_args(p, ipc=None, out="runs/dmkd_<dataset> (--syn-data-path: that folder)")
    g = p.add_argument_group("synthesis (Sec. 3.1, AIGC_generate.py)")
    g.add_argument("--images-per-class", dest="ipc", type=int, default=argparse.SUPPRESS,
                   help="alias of --ipc: synthetic images per class (official: 200)")
    g.add_argument("--model", default=None, help="DiTPipeline hub id or local folder; 'digits-dit': our small "
                   "class-conditional DiT trained on the digits train split on first use (not the paper's weights)")
    g.add_argument("--vae", default=None, help="optional AutoencoderKL folder or hub id replacing the pipeline's VAE "
                   "(the official script uses stabilityai/sd-vae-ft-mse)")
    g.add_argument("--class-map", default=None, help="JSON file {class index or name: ImageNet id or list of ids}, "
                   "or 'spread' (all 1000 ImageNet classes dealt round-robin); needed outside ImageNet")
    g.add_argument("--fidelity", choices=list(FIDELITY), default=None, help="low: s=2, T=100 (paper); high: s=4, T=250")
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance s (overrides --fidelity)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps T (overrides --fidelity)")
    g.add_argument("--scheduler", default=None, choices=("dit", "default", "ddim", "ddpm", "dpm"),
                   help="dit: ancestral DDPM with the learned variance (official; the default, except 'default' for digits-dit); default: the checkpoint's")
    g.add_argument("--cfg-channels", type=int, default=None, choices=(3, 4),
                   help="latent channels that get guidance: 3 as DiT's forward_with_cfg (the default), 4 as diffusers (digits-dit's default)")
    g.add_argument("--per-seed", type=int, default=None, help="images per class drawn from one seed (official 10)")
    g.add_argument("--per-class-seed", action="store_true",
                   help="give every class its own noise (official: the same noise for all classes at a seed)")
    g.add_argument("--gen-batch", type=int, default=None, help="images per sampling call (classes are batched)")
    g.add_argument("--resolution", type=int, default=None, help="stored image size (default: the dataset's)")
    k = p.add_argument_group("distillation (Sec. 3.3, train_student.py)")
    k.add_argument("--stage", default="all", choices=("all", "synthesize", "distill"), help="which stages to run")
    k.add_argument("--syn-data-path", default=None, help="distil through this existing image folder instead of "
                   "synthesising (class sub-folders or flat; its labels are not used)")
    k.add_argument("--teacher", default=None, choices=common.ARCHS, help="teacher architecture")
    k.add_argument("--teacher-path", default=None, help="teacher checkpoint (digits: trained on first use)")
    k.add_argument("--student", default=None, choices=common.ARCHS, help="student architecture (from scratch)")
    k.add_argument("--epochs", type=int, default=None, help="KD epochs (ImageNet script 100, README tables 200)")
    k.add_argument("--batch-size", type=int, default=None, help="KD batch size over all ranks")
    k.add_argument("--lr", type=float, default=None, help="SGD learning rate")
    k.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay")
    k.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    k.add_argument("--milestones", default=None, help="comma list of epochs where the LR drops 10x")
    k.add_argument("--temperature", type=float, default=None, help="KD temperature T (loss x T^2)")
    k.add_argument("--aug", default=None, choices=list(MIX_ALPHA), help="batch mixing seen by student and teacher")
    k.add_argument("--mix-alpha", type=float, default=None, help="Beta parameter (mixup 0.4, cutmix 0.25)")
    k.add_argument("--crop", default=None, choices=("rrc", "pad"), help="rrc: RandomResizedCrop (ImageNet); "
                   "pad: Resize + RandomCrop(pad 4) (CIFAR)")
    k.add_argument("--eval-every", type=int, default=None, help="evaluate on the real val set every N epochs")
    k.add_argument("--mean", type=float, nargs=3, default=None, help="input normalisation mean of teacher and student "
                   "(default: what the teacher checkpoint expects, else the dataset's; CIFAR-100 (0.5071, 0.4867, 0.4408))")
    k.add_argument("--std", type=float, nargs=3, default=None, help="input normalisation std (CIFAR-100: "
                   "(0.2675, 0.2565, 0.2761))")
    k.add_argument("--eval-protocol", default="rded", choices=("rded", "hard"),
                   help="validate_fkd protocol for --eval (the collection's common yardstick beside DM-KD's own KD)")
    k.add_argument("--eval-repeats", type=int, default=None,
                   help="--eval: students on the set and on random real images (default: 3 on digits, else 1)")
    common.document_defaults(p, PRESETS, DEFAULTS, (
        "ImageNet from zhengli97/DM-KD@bbab9ce (AIGC_generate.py, scripts/imagenet_distill.sh); CIFAR from its "
        "train_student.py argparse defaults; other datasets and digits: not published, our choice. The "
        "source of each value is the comment beside it in PRESETS in dmkd.py."),
        citations="DMKD:path is zhengli97/DM-KD@bbab9ce:path (the official code); Sec. x.y is the paper's section")
    args = p.parse_args(argv)
    lr_given = args.lr is not None
    common.apply_presets(args, PRESETS, DEFAULTS)
    if args.eval is None and args.syn_data_path:  # a given folder may be flat or foreign: evaluated only when asked
        args.eval = False
    common.eval_on(args)
    ours = args.model == DIGITS_DIT  # no learned variance: its own DDIM scheduler; trained with guidance on all 4 channels
    args.scheduler = args.scheduler or ("default" if ours else "dit")
    args.cfg_channels = args.cfg_channels or (4 if ours else 3)
    if not lr_given and args.dataset.startswith("cifar") and args.student in SMALL_LR_STUDENTS:
        args.lr = 0.02
    s, t = FIDELITY[args.fidelity]
    args.guidance_scale = s if args.guidance_scale is None else args.guidance_scale
    args.steps = t if args.steps is None else args.steps
    args.mix_alpha = MIX_ALPHA[args.aug] if args.mix_alpha is None else args.mix_alpha
    args.out = args.out or (args.syn_data_path if args.syn_data_path else os.path.join("runs", f"dmkd_{args.dataset}"))
    if args.syn_data_path:
        if args.stage == "synthesize":
            raise common.UserError("--syn-data-path trains on an existing folder: it cannot go with --stage synthesize")
        args.stage = "distill"
    common.check_numbers(args, {">= 1": "ipc steps per_seed gen_batch epochs batch_size eval_every resolution",
                                "> 0": "lr temperature std", ">= 0": "weight_decay mix_alpha guidance_scale workers",
                                "in [0, 1)": "momentum"})
    try:
        args.milestones = ",".join(str(int(m)) for m in str(args.milestones).split(",") if m.strip())
    except ValueError:
        raise common.UserError(f"--milestones must be a comma list of epochs, not {args.milestones!r}") from None
    return args


# --------------------------------------------------------------------------------------------------
# class ids: which DiT (ImageNet-1K) class each dataset class is drawn from
# --------------------------------------------------------------------------------------------------
def imagenet_wnids():
    """The 1000 ImageNet-1K wnids in sorted order: DiT's class id = position in this list."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def spread_map(num_classes, num_model_classes=1000):
    """The official route outside ImageNet (DMKD:AIGC_generate.py, DMKD:dataset/cifar100.py:81-94): DiT images of all ImageNet classes, dealt
    round-robin over the dataset's classes (class c gets ids c, c+C, c+2C, ...). KD never reads them."""
    return [list(range(c, num_model_classes, num_classes)) for c in range(num_classes)]


def class_imagenet_ids(dataset, classes, class_map=None, num_model_classes=1000):
    """One list of DiT class ids per dataset class (images of a class cycle through its list)."""
    wnids = imagenet_wnids()
    if class_map is None and dataset == "digits":
        class_map = "spread"
    if class_map == "spread":
        return spread_map(len(classes), num_model_classes)
    if class_map is None:
        if dataset not in common.FOLDER_DATASETS:
            raise common.UserError(f"{dataset} has no ImageNet classes: pass --class-map FILE (JSON {{class: ImageNet "
                                   f"id(s)}}) or --class-map spread (ImageNet-class images as the official CIFAR run)")
        missing = [c["id"] for c in classes if c["id"] not in wnids]
        if missing:
            raise common.UserError(f"{len(missing)} class folders of {dataset} are not ImageNet-1K wnids (e.g. "
                                   f"{missing[0]}): pass --class-map FILE")
        return [[wnids.index(c["id"])] for c in classes]
    if not os.path.isfile(class_map):
        raise common.UserError(f"--class-map {class_map} {'is a folder' if os.path.isdir(class_map) else 'does not exist'} "
                               f"(a JSON file, or the word 'spread')")
    try:
        with open(class_map) as f:
            raw = json.load(f)
    except ValueError as e:  # UnicodeDecodeError included: not a text file
        raise common.UserError(f"--class-map {class_map} is not valid JSON ({e})") from e
    by_key = {str(k): v for k, v in raw.items()} if isinstance(raw, dict) else None
    if by_key is None:
        raise common.UserError(f"--class-map {class_map} must hold a JSON object {{class index or name: id(s)}}")
    ids = []
    for c in classes:
        v = next((by_key[k] for k in (str(c["index"]), c["name"], c["id"]) if k in by_key), None)
        if v is None:
            raise common.UserError(f"--class-map {class_map} has no entry for class {c['index']} ({c['name']})")
        v = v if isinstance(v, list) else [v]
        try:
            if any(isinstance(x, (bool, float, dict, list)) or x is None for x in v):
                raise TypeError(v)
            v = [wnids.index(x) if isinstance(x, str) and x in wnids else int(x) for x in v]
        except (TypeError, ValueError):
            raise common.UserError(f"--class-map {class_map}: class {c['index']} maps to {v}, not ImageNet ids") from None
        if not v or any(not 0 <= x < num_model_classes for x in v):
            raise common.UserError(f"--class-map {class_map}: class {c['index']} needs ids in 0..{num_model_classes - 1}")
        ids.append(v)
    return ids


# --------------------------------------------------------------------------------------------------
# DiT sampling (AIGC_generate.py, via diffusers' DiTPipeline parts)
# --------------------------------------------------------------------------------------------------
def load_dit(model, vae, scheduler, device):
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline,
                           DPMSolverMultistepScheduler)
    pipe = common.hub_from_pretrained(DiTPipeline, model, "--model")
    if vae:
        pipe.vae = common.hub_from_pretrained(AutoencoderKL, vae, "--vae")
    cfg = pipe.scheduler.config
    if scheduler == "dit":  # DiT's respaced ancestral sampler with the learned variance, clip_denoised=False
        if pipe.transformer.config.out_channels != 2 * pipe.transformer.config.in_channels:
            raise common.UserError(f"{model} predicts no variance: use --scheduler default, ddim, ddpm or dpm")
        pipe.scheduler = DDPMScheduler.from_config(cfg, variance_type="learned_range", timestep_spacing="linspace",
                                                   clip_sample=False)
    elif scheduler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(cfg, clip_sample=False)
    elif scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(cfg)
    elif scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def noise_seed(seed, image, cls=None):
    """Seed of one image's generator. Official rule: image i of seed s has the same noise in every
    class (cls=None); --per-class-seed mixes the class index in."""
    base = seed * 100_003 + image
    return base if cls is None else base * 1_009 + cls + 1


def class_jobs(c, ipc, per_seed, ids, seed, per_class_seed):
    """(DiT class id, noise seed) of each image of dataset class c: image j comes from seed
    seed + j // per_seed, slot j % per_seed, as the official loop over seeds of 10-image batches."""
    return [(ids[j % len(ids)], noise_seed(seed + j // per_seed, j % per_seed, c if per_class_seed else None))
            for j in range(ipc)]


@torch.no_grad()
def sample_dit(pipe, labels, seeds, guidance_scale, steps, cfg_channels=3, resolution=None):
    """DiTPipeline.__call__ with one CPU generator per image (its initial latent and its ancestral
    noise), so any grouping of images into batches gives the same images. Returns [B,3,R,R] in [0,1]."""
    tr, vae, sched = pipe.transformer, pipe.vae, pipe.scheduler
    device, ch, size = pipe._execution_device, tr.config.in_channels, tr.config.sample_size
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = torch.cat([torch.randn((1, ch, size, size), generator=g) for g in gens]).to(device)
    y = torch.tensor(labels, device=device)
    guided = guidance_scale > 1  # s = 1 means no guidance (as both DiT and diffusers)
    y_in = torch.cat([y, torch.full_like(y, 1000)]) if guided else y  # 1000 = DiT's null class
    sched.set_timesteps(steps, device=device)
    latents = latents * sched.init_noise_sigma
    learned = getattr(sched.config, "variance_type", None) == "learned_range"
    step_kw = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    with common.autocast(device):
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
            out = tr(x, timestep=t.reshape(1).expand(len(x)), class_labels=y_in).sample.float()
            if guided:  # eps = eps_u + s (eps_c - eps_u) on the first cfg_channels channels only
                cond, uncond = out.chunk(2)
                k = cfg_channels
                out = torch.cat([uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], 1)
            if not learned:  # drop the variance half, as DiTPipeline does
                out = out[:, :ch]
            latents = sched.step(out, t, latents, **step_kw).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample.float()
    images = (images / 2 + 0.5).clamp(0, 1)  # = save_image(normalize=True, value_range=(-1, 1))
    if resolution and images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
    return images.cpu()


def synthesize(pipe, jobs, args, resolution):
    """Images for a list of (class id, noise seed) jobs, --gen-batch at a time."""
    out = []
    for i in range(0, len(jobs), args.gen_batch):
        labels, seeds = zip(*jobs[i:i + args.gen_batch])
        out.append(sample_dit(pipe, list(labels), list(seeds), args.guidance_scale, args.steps,
                              args.cfg_channels, resolution))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# the digits DiT: ours, trained here on first use (no DiT knows digits; not the paper's weights)
# --------------------------------------------------------------------------------------------------
DIGITS_DIT = "digits-dit"  # the --model name of digits_dit()


def digits_dit(seed=0, steps=1500, batch=64, width=96, layers=4, patch=2, lr=5e-4, ema=0.995, guidance=2.0,
               sample_steps=100, judge_per_class=10, vae_steps=250, verbose=True):
    """A class-conditional DiTPipeline folder for digits: DiTTransformer2DModel (ada-norm-zero over
    num_embeds_ada_norm=1000 classes, as DiTPipeline's null class is 1000; digits use ids 0-9) on the
    latents of common.digits_vae, v-prediction, 10% of labels dropped to 1000 for classifier-free
    guidance, EMA, DiT's linear betas with a DDIM scheduler, id2label "0".."9". Cached like the digits
    teachers (common.cached_build); recipe.json holds the teacher agreement of its samples."""
    recipe = dict(seed=seed, steps=steps, batch=batch, width=width, layers=layers, patch=patch, lr=lr, ema=ema,
                  guidance=guidance, sample_steps=sample_steps, judge_per_class=judge_per_class,
                  vae=os.path.basename(common.digits_vae(seed, vae_steps, verbose=verbose)))  # keys never hold $DD_CACHE
    return common.cached_build("digits_dit", recipe, _train_digits_dit, verbose)


def _train_digits_dit(out, seed, steps, batch, width, layers, patch, lr, ema, guidance, sample_steps,
                      judge_per_class, vae):
    import copy
    from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
    common.digits_teacher("conv3", verbose=False)  # the judge of the samples
    vae, post, y = common.digits_latents(vae)
    sf = vae.config.scaling_factor
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=width // 4, in_channels=4, out_channels=4,
                                  num_layers=layers, sample_size=post.mean.shape[-1], patch_size=patch,
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    betas = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 prediction_type="v_prediction", clip_sample=False)  # DiT's schedule
    noise_sched = DDPMScheduler(**betas)
    id2label = {i: str(i) for i in range(10)}
    pipe = DiTPipeline(transformer=copy.deepcopy(model), vae=vae, scheduler=DDIMScheduler(**betas), id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # from_pretrained passes it back to __init__
    pipe.set_progress_bar_config(disable=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(seed)
    t0, c0, curve = time.time(), time.process_time(), []
    for step in tqdm(range(steps), desc="digits DiT", unit="step"):
        z, labels = common.latent_batch(post, y, batch, sf, g)
        labels = torch.where(torch.rand(batch, generator=g) < 0.1, 1000, labels)  # classifier-free-guidance dropout
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = model(noise_sched.add_noise(z, noise, t), timestep=t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise_sched.get_velocity(z, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warm.step()
        common.ema_update(pipe.transformer, model, step, ema)
        if step + 1 == steps or (step + 1) % 500 == 0:
            n = judge_per_class
            images = sample_dit(pipe, [c for c in range(10) for _ in range(n)], list(range(10 * n)), guidance,
                                sample_steps, cfg_channels=4)
            curve.append([step + 1, round(time.time() - t0), round(time.process_time() - c0),
                          common.teacher_agreement(images, torch.arange(10).repeat_interleave(n))])
            tqdm.write(f"  step {step + 1}: {curve[-1][1]} s, {curve[-1][2]} CPU-s, teacher agreement {curve[-1][3]}%")
    pipe.save_pretrained(out)
    return {"agreement": curve[-1][-1], "agreement_guidance": guidance, "curve [step, s, cpu_s, agreement]": curve}


# --------------------------------------------------------------------------------------------------
# knowledge distillation (train_student.py, distiller_zoo/KD.py)
# --------------------------------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class SyntheticImages(torch.utils.data.Dataset):
    """Every image of a folder (class sub-folders or flat), read lazily: KD labels come from the
    teacher, so the folder's own classes are not used (an ImageNet-class folder can teach CIFAR)."""

    def __init__(self, folder, transform):
        if not os.path.isdir(folder):
            raise common.UserError(f"--syn-data-path {folder} does not exist")
        subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        self.files, self.targets = [], []
        for c, d in enumerate([""] + subdirs):
            root = os.path.join(folder, d)
            names = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTS) and f != "preview.png")
            self.files += [os.path.join(root, f) for f in names]
            self.targets += [max(c - 1, 0)] * len(names)
        if not self.files:
            raise common.UserError(f"{folder} holds no images (expected class folders of .png/.jpg files)")
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(common._checked_loader(self.files[i])), self.targets[i], i


def kd_norm(args):
    """(mean, std, source) of teacher and student inputs: --mean/--std, else what the teacher checkpoint
    says it expects (common.resolve_norm), else DM-KD's own constants (CIFAR-100) or the dataset's."""
    return common.resolve_norm(args.dataset, [args.teacher_path], args.mean, args.std,
                               default=DMKD_NORM.get(args.dataset))


def kd_config(args):
    """The DM-KD recipe as a common.TrainConfig: teacher soft labels online, KL * T^2, SGD, step LR."""
    return common.TrainConfig(
        labels="teacher", epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr,
        weight_decay=args.weight_decay, momentum=args.momentum, schedule="step",
        milestones=tuple(int(m) for m in args.milestones.split(",") if m), gamma=0.1,
        temperature=args.temperature, t_squared=True, mix=args.aug, alpha=args.mix_alpha,
        eval_every=args.eval_every, seed=args.seed, workers=args.workers)


# --------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    info = common.dataset_info(args.dataset)
    classes = common.class_list(args.dataset, args.data_path)
    d = common.dist_setup(args.device)
    common.seed_everything(args.seed)
    synth, distill = args.stage in ("all", "synthesize"), args.stage in ("all", "distill")
    common.check_out_folder(args.out)
    # asked before the digits DiT is trained: its agreement check trains the digits teacher when none is cached
    teacher_reused = distill and common.teacher_cached(args.teacher, args.dataset, args.teacher_path, args.seed)
    resolution = args.resolution or info.size

    # everything that can fail on bad input fails here, before any output is touched
    if synth:
        common.RunDir.precheck(args.out, args, args.overwrite, KD_FLAGS)  # before the generator or teacher loads
        ours = args.model == DIGITS_DIT  # its class ids are the digits themselves
        ids = [[c] for c in range(len(classes))] if ours and args.class_map is None else \
            class_imagenet_ids(args.dataset, classes, args.class_map)
        model = digits_dit() if ours else args.model
        pipe = load_dit(model, args.vae, args.scheduler, d.device)
        n_model = pipe.transformer.config.num_embeds_ada_norm
        if max(max(i) for i in ids) >= n_model:
            raise common.UserError(f"{args.model} knows {n_model} classes; the class map asks for id {max(max(i) for i in ids)}")
    if distill:
        size = common.input_size(args.dataset, args.student)
        if common.input_size(args.dataset, args.teacher) != size:
            raise common.UserError(f"teacher {args.teacher} and student {args.student} see different input sizes on "
                                   f"{args.dataset}: pick a pair with the same resolution")
        teacher = common.load_teacher(args.teacher, args.dataset, args.teacher_path, args.data_path, args.seed, d.device)
        mean, std, norm_source = kd_norm(args)
        val_set = common.real_dataset(args.dataset, args.data_path, "val",
                                      common.eval_transform(args.dataset, size, mean=mean, std=std))
        if args.syn_data_path and not os.path.isdir(args.syn_data_path):
            raise common.UserError(f"--syn-data-path {args.syn_data_path} does not exist")
        if args.syn_data_path:
            os.makedirs(common.check_out_folder(args.out), exist_ok=True)

    # --- stage 1: DiT synthesis, `--ipc` images per class (Sec. 3.1, AIGC_generate.py) ---
    if synth:
        run = common.RunDir(args.out, args, classes, rank=d.rank, overwrite=args.overwrite, ignore=KD_FLAGS,
                            extra_artefacts=tuple(f"kd_{a}.json" for a in common.ARCHS) + tuple(
                                f"eval_{p}.json" for p in ("rded", "fkd", "static", "hard")))
        mine = common.shard(range(len(classes)), d.rank, d.world)
        todo = [c for c in mine if not run.class_complete(c, args.ipc)]
        if d.main:
            print(f"synthesis: {len(todo)} of {len(classes)} classes to do, {args.ipc} images each, "
                  f"s={args.guidance_scale} T={args.steps} scheduler={args.scheduler} on {d.device} x{d.world}")
        group = max(1, args.gen_batch // args.ipc)  # whole classes per round, so resume stays per class
        with run.stage("synthesis", items=len(todo) * args.ipc * d.world):
            for k in tqdm(range(0, len(todo), group), desc="dit", disable=not d.main or not todo):
                batch = todo[k:k + group]
                jobs = [j for c in batch for j in class_jobs(c, args.ipc, args.per_seed, ids[c], args.seed,
                                                               args.per_class_seed)]
                images = synthesize(pipe, jobs, args, resolution)
                for i, c in enumerate(batch):
                    run.write_class(c, images[i * args.ipc:(i + 1) * args.ipc])
        mean, std, why = kd_norm(args)  # read back by validate_fkd --preset auto (the teacher's inputs)
        run.record["teacher_norm"] = {"mean": list(mean), "std": list(std), "source": why}
        common.barrier()  # every rank's classes are written before the set is read
        if d.main and args.dataset == "digits":  # the first check of a generator: does the teacher see the intended class?
            images, labels = common.load_image_set(args.out, classes)
            run.record["teacher_agreement"] = common.teacher_agreement(images.float() / 255, labels, args.teacher)
            print(f"teacher agreement: the digits teacher {args.teacher} assigns {run.record['teacher_agreement']:.1f}% "
                  f"of the {len(labels)} generated images to the class they were made for")
        run.record["generator"] = common.generator_record(model)
        run.record["dit"] = {"model": args.model, "scheduler": pipe.scheduler.__class__.__name__,
                             "scheduler_config": dict(pipe.scheduler.config), "class_ids": ids,
                             "guidance_scale": args.guidance_scale, "steps": args.steps,
                             "seed_rule": "per class" if args.per_class_seed else "official (shared across classes)"}
        run.finish(device=d.device, images=len(classes) * args.ipc)
        del pipe
        if d.main:
            print(f"synthesis done: {len(classes) * args.ipc} images in {args.out}")

    # --- stage 2: KD from the teacher on the synthetic images only (Sec. 3.3, train_student.py) ---
    if distill:
        folder = args.syn_data_path or args.out
        transform = common.train_transform(size, mean, std, crop=args.crop, flip=True, pad=4)
        train_set = SyntheticImages(folder, transform)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=min(args.workers, 4),
                                                 worker_init_fn=common.quiet_worker)
        teacher_top1 = common.evaluate(teacher, val_loader, d.device) if d.main else None
        cfg = kd_config(args)
        if d.main:
            print(f"KD: {len(train_set)} images from {folder}; teacher {args.teacher} top-1 {teacher_top1:.2f}; "
                  f"student {args.student}, {cfg.epochs} epochs, T={cfg.temperature}, lr {cfg.lr}; normalisation "
                  f"mean {mean} std {std} ({norm_source})")
        common.seed_everything(args.seed)
        student = common.build_model(args.student, info.num_classes, size)
        t0 = time.time()
        result = common.train_student(student, cfg, val_loader, d.device, train_set=train_set, teacher=teacher,
                                      dist_info=d)
        if d.main:
            record = {"dataset": args.dataset, "syn_data_path": os.path.abspath(folder), "images": len(train_set),
                      "teacher": args.teacher, "teacher_path": args.teacher_path, "teacher_top1": teacher_top1,
                      "student": args.student, "best": result["best"], "last": result["last"],
                      "history": result["history"], "seconds": round(time.time() - t0, 2),
                      "images_per_s": round(result["images_per_s"], 2), "world": d.world,
                      "device": common.device_name(d.device),
                      "recipe": {**dataclasses.asdict(cfg), "crop": args.crop, "flip": True, "size": size,
                                 "mean": list(mean), "std": list(std), "normalisation": norm_source,
                                 "loss": "KL(p_t||p_s) batchmean * T^2, alpha 1, no CE"}}
            common.atomic_write_json(os.path.join(args.out, f"kd_{args.student}.json"), record)
            print(f"KD result: {len(train_set)} images -> student {args.student} top-1 best "
                  f"{result['best']:.2f} last {result['last']:.2f} (teacher {args.teacher} {teacher_top1:.2f})")

    # --- optional: the collection's record of the set, by validate_fkd.py with DM-KD's preset: the same teacher,
    # normalisation and KD recipe as stage 2, written to <set>/eval_<protocol>.json like every method's ---
    result = None
    if args.eval:  # every rank: validate_fkd trains with DDP under torchrun
        import validate_fkd
        folder = args.syn_data_path or args.out
        mean, std, _ = kd_norm(args)
        argv = ["--syn-data-path", folder, "--dataset", args.dataset, "--protocol", args.eval_protocol, "--preset", "dmkd",
                "--teacher", args.teacher, "--student", args.student, "--mean", *map(str, mean), "--std", *map(str, std),
                "--device", str(d.device), "--workers", str(args.workers), "--seed", str(args.seed)]
        argv += ["--ipc", str(args.ipc)] if synth else []
        argv += ["--data-path", args.data_path] if args.data_path else []
        argv += ["--teacher-path", args.teacher_path] if args.teacher_path else []
        if args.eval_protocol == "rded":  # stage 2's recipe, value for value
            argv += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--optimizer", "sgd",
                     "--lr", str(args.lr), "--weight-decay", str(args.weight_decay), "--schedule", "step",
                     "--milestones", args.milestones, "--gamma", "0.1", "--temperature", str(args.temperature),
                     "--t-squared", "1", "--mix", args.aug, "--alpha", str(args.mix_alpha or 1.0), "--crop", args.crop,
                     "--min-scale", "0.08", "--factor", "1", "--flip", "1", "--eval-every", str(args.eval_every), "--eval-from", "0"]
        repeats = common.eval_repeats(args)
        argv += ["--repeats", str(repeats)] if repeats else []
        argv += ["--baseline", "random"] if args.dataset == "digits" else []
        result = validate_fkd.main(argv, closing=False)
    if d.main:
        print(common.closing_line("dmkd", args.dataset, args.ipc, args.syn_data_path or args.out, result,
                                  {"teacher": teacher_reused}))


if __name__ == "__main__":
    common.run_cli(main)
