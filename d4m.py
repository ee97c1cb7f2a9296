"""D4M: Dataset Distillation via Disentangled Diffusion Model.

Duo Su, Junjie Hou, Weizhi Gao, Yingjie Tian, Bowen Tang. CVPR 2024. arXiv:2407.15138. Official code: github.com/suduo94/D4M (@da35d10).
Citations: D4M = suduo94/D4M@da35d10, VLCP = zou-yawen/Dataset-Distillation-via-Vision-Language-Category-
Prototype@d0060eb4, as `D4M:path:line`. Full notes (stages, presets, matches/differs table): docs/d4m.md.

Pipeline (one stage each in main()):
  1. encode every training image with the Stable Diffusion VAE (a seeded sample,
     D4M:distillation/dataset_utils.py:L18-21), class by class;
  2. per class, MiniBatchKMeans over the latents -> IPC "prototype" latents (D4M:distillation/gen_prototype.py);
  3. stock img2img from each prototype, prompted with the class name (D4M:distillation/gen_syn_image.py);
  4. training-time matching (TTM): FKD soft labels of a teacher stored per epoch (D4M:matching/utils_fkd.py:L199-237);
  5. --eval: validate_fkd.py with the stored labels (fkd protocol, D4M:validate/train_FKD.sh) or online ones (rded).

Runs (digits needs no download: `--model digits-sd`, its default, is our small Stable Diffusion trained on the
digits train split on first use and cached under $DD_CACHE/generators, not the paper's weights; docs/d4m.md):
  uv run python d4m.py
      -> trains or loads the digits SD, writes runs/d4m_digits_ipc10, prints the digits teacher's agreement
         with the intended classes, and evaluates (fkd protocol)
  uv run python -m tests.tiny_models /tmp/tiny --only sd   # a tiny random SD: checks the plumbing, images are noise
  uv run python d4m.py --model /tmp/tiny/sd --size 64 --steps 4 --ttm-epochs 2 --eval --eval-epochs 2
      -> writes runs/d4m_digits_ipc10 (10 classes x 10 PNGs at 32 px, prototypes.pt, fkd_*.pt) and prints
         "d4m: digits IPC 10 -> runs/d4m_digits_ipc10 | top-1 distilled ... vs random real ... | ..." (the students
         learn little from noise)
  uv run python d4m.py --dataset imagenet --data-path $IMAGENET --ipc 10 --eval --eval-student resnet18
      -> the paper's ImageNet-1K IPC10 setting (SD v1.5, km_expand 1, 50 PNDM steps, 224 px, ResNet-18 TTM)
  uv run torchrun --nproc_per_node 8 d4m.py --dataset imagenet --data-path $IMAGENET --ipc 50
      -> classes and TTM epochs sharded over 8 GPUs; rerun the same command to resume

Deliberate deviations from the official code (docs/d4m.md gives the reason for each):
  - stock diffusers StableDiffusionImg2ImgPipeline with the 4-channel prototype latent as `image` (same maths and
    random draws as D4M:scripts/pipeline_stable_diffusion_latents2img.py, no files copied into diffusers);
  - every class's last partial k-means buffer is flushed (official: the last class only,
    D4M:distillation/gen_prototype.py:L83-84); `--kmeans full` offers exact k-means;
  - prompts from the dataset's class list in torchvision order (official: D4M:distillation/label-prompt/ files,
    CIFAR-100 in superclass order, ImageNet's two "crane" swapped); everything keyed by class index;
  - output at the dataset's resolution (`--out-size`; official 224 for all, D4M:distillation/gen_syn_image.py:L69),
    class folders 00000.. with files 00000.png.. (official: unpadded folders, colliding names);
  - safety checker off (official: on, flagged images come out black); everything seeded per image;
  - many prototypes per img2img call (`--batch-size`); latents streamed class by class and cached under $DD_CACHE;
    classes sharded over torchrun ranks;
  - TTM labels stored by common.fkd_generate and replayed by validate_fkd.py without patching torch's DataLoader
    (official: patched _MapDatasetFetcher, mandatory wandb, broken import at D4M:validate/train_FKD.py:L21).
"""
import argparse
import importlib.util
import os
import shutil
from contextlib import nullcontext
from itertools import groupby
from operator import itemgetter

import numpy as np
import torch
from tqdm import tqdm

import common

NEGATIVE_PROMPT = "cartoon, anime, painting"  # both repos' unconditional branch (D4M:scripts/pipeline_stable_diffusion_latents2img.py)

# Per-dataset values; an explicit flag always beats them. Unlisted flags come from DEFAULTS.
PRESETS = {
    "imagenet": {
        "km_expand": 1,  # official distillation/gen_prototype_imgnt.sh, gen_syn_image_imgnt.sh
        "teacher": "resnet18",  # official matching/matching.sh (-a resnet18, torchvision weights)
        "out_size": 224,  # official gen_syn_image.py:L69 (= the dataset's resolution here)
    },
    "tiny": {
        "teacher": "resnet18_modified",  # not published (no Tiny TTM code): SRe2L/RDED's Tiny teacher
    },
    "cifar10": {
        "teacher": "conv3",  # official issue #7: ConvNet-W128 teacher for CIFAR (depth 3: our choice)
    },
    "cifar100": {
        "teacher": "conv3",  # official issue #7: ConvNet-W128 teacher for CIFAR (depth 3: our choice)
    },
    "digits": {
        "model": "digits-sd",  # not published: our digits Stable Diffusion, trained here on first use (common.digits_sd)
        "size": 32,  # the digits resolution: 4 x 8 x 8 latents with the digits VAE
        "teacher": "conv3",  # not published: the collection's cached digits teacher
        "ttm_epochs": 30,  # not published: our choice for a CPU-sized run
        "ttm_batch_size": 100,  # not published: our choice (= the whole IPC10 set)
    },
}
DEFAULTS = {
    "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # official: SD v1.5 (D4M:distillation/gen_prototype.py:L123)
    "size": 512,  # official gen_prototype.py --size default (D4M:distillation/dataset_utils.py:L18-21)
    "km_expand": 10,  # official gen_prototype.py --km_expand default (D4M:distillation/gen_prototype.py)
    "kmeans": "minibatch",  # official gen_prototype.py (D4M:distillation/gen_prototype.py)
    "strength": 0.7,  # official gen_syn_image_imgnt.sh (argparse default 0.75, D4M:distillation/gen_syn_image_imgnt.sh)
    "guidance_scale": 8.0,  # official gen_syn_image_imgnt.sh -g 8 (D4M:distillation/gen_syn_image_imgnt.sh)
    "steps": 50,  # official: never passed, so the pipeline default (D4M:distillation/gen_prototype.py:L123)
    "teacher": "resnet18",  # official matching/matching.sh
    "ttm_epochs": 300,  # official matching/generate_soft_label.py --epochs 300 (D4M:matching/utils_fkd.py:L199-237)
    "ttm_batch_size": 1024,  # official matching/matching.sh -b 1024 (D4M:matching/utils_fkd.py:L199-237)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\nWith no flags (digits, IPC 10): 392 s on 2 idle CPU cores with a fresh cache (the digits VAE and "
                                "Stable Diffusion trained first; a rerun loads them; README 'How long it takes').", formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_generic_args(p, ipc=10, out="runs/d4m_<dataset>_ipc<ipc>")
    g = p.add_argument_group("generator (Stable Diffusion, D4M:distillation/gen_prototype.py:L123)")
    g.add_argument("--model", default=None,
                   help="hub id or local folder of a Stable Diffusion v1.x checkpoint (diffusers layout); 'digits-sd': "
                        "our small SD trained on the digits train split on first use and cached under $DD_CACHE/generators "
                        "(not the paper's weights; docs/d4m.md)")
    g.add_argument("--scheduler", default=None, choices=("pndm", "ddim", "dpm"),
                   help="sampler; default: the checkpoint's own (PNDM for SD v1.5, as the paper)")
    g.add_argument("--size", type=int, default=None, help="images are squashed to size x size before encoding (D4M:distillation/dataset_utils.py:L18-21)")
    g.add_argument("--latent", default="sample", choices=("sample", "mean"),
                   help="VAE posterior sample (official) or its mean")
    g.add_argument("--encode-batch-size", type=int, default=16, help="images per VAE encode call")
    g = p.add_argument_group("prototypes (D4M:distillation/gen_prototype.py)")
    g.add_argument("--prototypes", type=int, default=None, help="k-means prototypes per class (default: --ipc); "
                   "more images than prototypes reuse them with new noise")
    g.add_argument("--km-expand", type=int, default=None, help="k-means partial_fit buffer = km_expand x prototypes latents")
    g.add_argument("--kmeans", default=None, choices=("minibatch", "full", "random"),
                   help="minibatch: MiniBatchKMeans.partial_fit over buffers (official); full: exact KMeans; random: "
                        "no clustering, P of the class's own latents drawn at random (the ablation of D4M's prototypes)")
    g.add_argument("--save-latents", default=None, help="folder to keep each class's latents in k-means order (for inspection)")
    g.add_argument("--no-latent-cache", dest="latent_cache", action="store_false",
                   help="do not keep the VAE latents under $DD_CACHE/d4m_latents/ (default: kept, keyed by dataset, "
                        "VAE weights, --size, --latent and --seed, so a loop over IPC encodes once; ImageNet-1K at "
                        "512 px in fp16 takes ~42 GB)")
    g = p.add_argument_group("synthesis (D4M:distillation/gen_syn_image_imgnt.sh)")
    g.add_argument("--strength", type=float, default=None, help="img2img strength: fraction of the steps run")
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--steps", type=int, default=None, help="num_inference_steps (36 of 50 run at strength 0.7)")
    g.add_argument("--prompt-template", default="{name}", help="prompt for a class; {name} = the class name")
    g.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="the unconditional branch of CFG")
    g.add_argument("--batch-size", type=int, default=8, help="prototypes per img2img call")
    g.add_argument("--out-size", type=int, default=None, help="side of the written images (default: the dataset's resolution)")
    g = p.add_argument_group("training-time matching (D4M:matching/utils_fkd.py:L199-237) and evaluation (D4M:validate/train_FKD.sh)")
    g.add_argument("--teacher", default=None, help=f"teacher architecture ({', '.join(common.ARCHS)})")
    g.add_argument("--teacher-path", default=None, help="teacher checkpoint (default: torchvision weights for imagenet, cached for digits)")
    g.add_argument("--ttm-epochs", type=int, default=None, help="epochs of stored FKD soft labels (0: none)")
    g.add_argument("--ttm-batch-size", type=int, default=None, help="FKD batch size (the student replays the same batches)")
    g.add_argument("--eval-protocol", default="fkd", choices=("fkd", "rded"), help="fkd: replay the stored TTM labels; rded: online teacher")
    g.add_argument("--eval-epochs", type=int, default=None, help="student epochs (default: validate_fkd's, at most --ttm-epochs for fkd)")
    g.add_argument("--eval-repeats", type=int, default=None,
                   help="students on the set and on random real images (default: 3 on digits, else validate_fkd's)")
    g.add_argument("--eval-student", default=None, help="student architecture (default: validate_fkd's)")
    common.document_defaults(p, PRESETS, DEFAULTS, (
        "ImageNet-1K from suduo94/D4M@da35d10 (distillation/gen_prototype_imgnt.sh, gen_syn_image_imgnt.sh, "
        "matching/matching.sh); CIFAR/Tiny teachers: not published (official issue #7 for CIFAR); digits: our "
        "choice. The source of each value is the comment beside it in PRESETS/DEFAULTS in d4m.py."),
        citations="D4M:path:line is suduo94/D4M@da35d10:path:line (the official code), VLCP: "
                  "zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype@d0060eb4")
    args = p.parse_args(argv)
    common.apply_presets(args, PRESETS, DEFAULTS)
    common.eval_on(args)
    args.out = args.out or os.path.join("runs", f"d4m_{args.dataset}_ipc{args.ipc}")
    args.prototypes = args.prototypes or args.ipc
    return args


# ----------------------------------------------------------------------------------------------
# helpers, in the paper's words
# ----------------------------------------------------------------------------------------------
def image_seed(*keys):
    """A 63-bit seed for one image's generator from (run seed, stage, class, image): independent of batching."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def generators(seeds):
    # CPU generators: the same seed gives the same noise on the CPU and on any GPU
    return [torch.Generator().manual_seed(s) for s in seeds]


def class_prompts(classes, template="{name}"):
    """The prompt of each class index, from the dataset's own class list 
    (official: the D4M:distillation/label-prompt/ files, read by D4M:distillation/dataset_utils.py:L101-112)."""
    return [template.format(name=c["name"]) for c in classes]


def load_generator(args, device):
    """Stock StableDiffusionImg2ImgPipeline 
    (the maths of D4M:scripts/pipeline_stable_diffusion_latents2img.py), fp16 on CUDA, safety checker off."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                           StableDiffusionImg2ImgPipeline)
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model = common.digits_sd() if args.model == common.DIGITS_SD else args.model
    pipe = common.hub_from_pretrained(StableDiffusionImg2ImgPipeline, model, "--model", dtype=dtype,
                                      safety_checker=None, requires_safety_checker=False,
                                      low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    if args.scheduler:
        cls = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[args.scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def encode_latents(vae, images, seeds, mode="sample"):
    """z = vae.encode(2x-1).latent_dist.sample(g) * scaling_factor (D4M:distillation/dataset_utils.py:L18-21), one generator per image."""
    x = (2 * images - 1).to(vae.device, vae.dtype)
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator=generators(seeds)) if mode == "sample" else dist.mean
    return z * vae.config.scaling_factor


def encoded_classes(ds, class_indices, vae, args):
    """Yield (class, latent batch) class after class: one loader over this rank's classes (its workers live
    across classes), each class in a seeded shuffled order (the official loader shuffles), batches never
    mixing classes, so the latents stream class by class and never sit in memory all at once."""
    from torchvision.transforms import v2 as T
    ds.transform = T.Compose([common.to_tensor(), T.Resize((args.size, args.size), antialias=True)])  # squash, no crop (D4M:distillation/dataset_utils.py:L18-21)
    batches = [(c, idx[s:s + args.encode_batch_size].tolist()) for c, idx in class_indices
               for s in range(0, len(idx), args.encode_batch_size)]
    workers = 0 if args.dataset == "digits" else args.workers  # digits lives in memory: workers only cost
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[b for _, b in batches], num_workers=workers,
                                         worker_init_fn=common.quiet_worker)
    for (c, batch), (x, _) in zip(batches, loader):
        yield c, encode_latents(vae, x, [image_seed(args.seed, 1, i) for i in batch], args.latent).flatten(1).cpu()


def kmeans_prototypes(latent_batches, n_prototypes, km_expand, mode, seed):
    """Per-class prototypes (D4M:distillation/gen_prototype.py), or random latents of the class (mode random). minibatch: the official MiniBatchKMeans(n_clusters=P, random_state,
    batch_size=km_expand*P, n_init="auto") fed by partial_fit over buffers of km_expand*P latents, the last
    partial buffer flushed too (D4M:distillation/gen_prototype.py:L83-84). full: KMeans over all the class's latents. Returns (centres, latents)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    seen, buffer, buffer_len = [], [], 0
    km = MiniBatchKMeans(n_clusters=n_prototypes, random_state=seed, batch_size=km_expand * n_prototypes, n_init="auto")
    for z in latent_batches:
        seen.append(z)
        if mode != "minibatch":
            continue
        buffer.append(z)
        buffer_len += len(z)
        while buffer_len >= km_expand * n_prototypes:  # sklearn upcasts the fp16 latents to float64, as officially
            flat = torch.cat(buffer)
            km.partial_fit(flat[:km_expand * n_prototypes].double().numpy())
            buffer, buffer_len = [flat[km_expand * n_prototypes:]], len(flat) - km_expand * n_prototypes
    latents = torch.cat(seen)
    if mode == "random":  # ablation: real latents of the class, not cluster centres (the same img2img follows)
        pick = torch.randperm(len(latents), generator=torch.Generator().manual_seed(seed))[:n_prototypes]
        return latents[pick].float(), latents
    if mode == "full":
        km = KMeans(n_clusters=n_prototypes, random_state=seed, n_init=10).fit(latents.double().numpy())
    elif buffer_len:
        km.partial_fit(torch.cat(buffer).double().numpy())
    return torch.from_numpy(km.cluster_centers_).float(), latents


@torch.no_grad()
def synthesize(pipe, prototypes, prompts, seeds, args):
    """Stock img2img from a batch of 4-channel prototype latents (D4M:scripts/pipeline_stable_diffusion_latents2img.py): the prototype is noised to the first
    kept timestep and denoised with CFG against the negative prompt (D4M:scripts/pipeline_stable_diffusion_latents2img.py). Returns PIL images."""
    return pipe(prompt=prompts, image=prototypes.to(pipe.device, pipe.unet.dtype),
                negative_prompt=[args.negative_prompt] * len(prompts), strength=args.strength,
                guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
                generator=generators(seeds), output_type="pil").images


def to_dataset_resolution(images, size):
    """PIL resize with the official BICUBIC filter (D4M:scripts/pipeline_stable_diffusion_latents2img.py) to the dataset's side, as [n,3,s,s] in [0,1]."""
    from PIL import Image
    to_tensor = common.to_tensor()
    return torch.stack([to_tensor(im.resize((size, size), Image.BICUBIC)) for im in images])


def run_validation(args):
    """validate_fkd.py on the written set: stored TTM labels (fkd, D4M:validate/train_FKD.sh) or an online teacher (rded)."""
    import validate_fkd
    argv = ["--syn-data-path", args.out, "--dataset", args.dataset, "--protocol", args.eval_protocol,
            "--seed", str(args.seed), "--device", args.device, "--workers", str(args.workers),
            "--teacher", args.teacher]
    epochs = args.eval_epochs or (args.ttm_epochs if args.eval_protocol == "fkd" else None)  # fkd: <= stored epochs
    for flag, value in (("--data-path", args.data_path), ("--teacher-path", args.teacher_path), ("--epochs", epochs),
                        ("--repeats", common.eval_repeats(args)), ("--student", args.eval_student)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--baseline", "random"] if args.dataset == "digits" else []  # random real at the same IPC, same protocol
    return validate_fkd.main(argv, closing=False)


def main(argv=None):
    args = parse_args(argv)
    info = common.dataset_info(args.dataset)
    out_size = args.out_size or info.size
    # --- checks: every bad input stops here, before any output is touched ---
    common.check_numbers(args, {">= 1": "ipc prototypes km_expand steps batch_size encode_batch_size out_size size "
                                        "ttm_batch_size", ">= 0": "ttm_epochs guidance_scale workers", "in (0, 1]": "strength"})
    if args.prototypes > args.ipc:
        raise common.UserError(f"--prototypes {args.prototypes} exceeds --ipc {args.ipc}: each prototype gives at least one image")
    if args.eval and args.eval_protocol == "fkd" and args.ttm_epochs < 1:
        raise common.UserError("--eval-protocol fkd (the default evaluation, on by default for digits) replays stored "
                               "TTM labels: set --ttm-epochs to at least 1, or pass --eval-protocol rded or --no-eval")
    if args.eval and args.eval_protocol == "fkd" and args.eval_epochs and args.eval_epochs > args.ttm_epochs:
        raise common.UserError(f"--eval-epochs {args.eval_epochs} exceeds the {args.ttm_epochs} stored TTM epochs")
    common.check_out_folder(args.out)
    if args.save_latents:
        common.check_out_folder(args.save_latents, "--save-latents")
    d = common.dist_setup(args.device)
    common.seed_everything(args.seed)
    classes = common.class_list(args.dataset, args.data_path)
    prompts = class_prompts(classes, args.prompt_template)
    train = common.real_dataset(args.dataset, args.data_path, "train")
    targets = torch.as_tensor(train.targets)
    counts = torch.bincount(targets, minlength=len(classes))
    if int(counts.min()) < args.prototypes:
        c = int(counts.argmin())
        raise common.UserError(f"class {c} ({classes[c]['name']}) has {int(counts[c])} training images, "
                               f"fewer than the {args.prototypes} prototypes asked for")
    ignore = ("batch_size", "encode_batch_size", "save_latents", "latent_cache", "ttm_epochs", "eval_student")
    common.RunDir.precheck(args.out, args, args.overwrite, ignore)  # before the generator is loaded
    teacher_reused = common.teacher_cached(args.teacher, args.dataset, args.teacher_path)
    pipe = load_generator(args, d.device)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if args.size % factor:
        raise common.UserError(f"--size {args.size} must be a multiple of the VAE's factor {factor}")
    run = common.RunDir(args.out, args, classes, rank=d.rank, overwrite=args.overwrite,
                        extra_artefacts=("prototypes.pt", ".prototypes"),
                        ignore=ignore)
    run.record.update({"prompts": prompts, "scheduler": type(pipe.scheduler).__name__, "out_size": out_size,
                       "generator": common.generator_record(pipe.name_or_path),
                       "latent_shape": [pipe.vae.config.latent_channels, args.size // factor, args.size // factor]})
    mine = common.shard(range(len(classes)), d.rank, d.world)
    print(f"d4m {args.dataset}: {len(classes)} classes ({len(mine)} on rank {d.rank}), model {args.model}, "
          f"{run.record['scheduler']}, {args.steps} steps x strength {args.strength}, guidance {args.guidance_scale}")

    # --- stage 1-2: VAE latents and k-means prototypes per class (D4M:distillation/gen_prototype.py), class by class ---
    merged = os.path.join(args.out, "prototypes.pt")
    partial = os.path.join(args.out, ".prototypes")
    if not os.path.isfile(merged):
        os.makedirs(partial, exist_ok=True)
        todo = [c for c in mine if not os.path.isfile(os.path.join(partial, f"{c:05d}.pt"))]
        order = {c: (targets == c).nonzero().flatten() for c in todo}
        order = {c: idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(image_seed(args.seed, 0, c)))]
                 for c, idx in order.items()}
        shape = run.record["latent_shape"]
        # the latents depend on the data, the VAE, --size, --latent and --seed, not on IPC: cached per class under
        # $DD_CACHE so that a loop over IPC encodes once (k-means, which depends on IPC, reruns on them)
        paths = [os.path.relpath(p, train.root) for p, _ in train.samples] if hasattr(train, "samples") else None
        cache = common.cache_path("d4m_latents", {
            "dataset": args.dataset, "data_path": os.path.abspath(args.data_path) if args.data_path else None,
            "files": common.content_hash([paths, targets.tolist()]), "vae": common.weights_hash(pipe.vae),
            "dtype": str(pipe.vae.dtype), "size": args.size, "latent": args.latent, "seed": args.seed}, "")
        def check_latents(c):  # one class's cached latents: [its training images, C*h*w] floats, else encoded again
            def load(p):
                z = torch.load(p, weights_only=True, mmap=True)
                if not (torch.is_tensor(z) and z.is_floating_point() and tuple(z.shape) == (int(counts[c]), int(np.prod(shape)))):
                    raise ValueError(f"not [{int(counts[c])}, {int(np.prod(shape))}] latents")
                return True
            return common.read_cached(os.path.join(cache, f"{c:05d}.pt"), f"D4M latents of class {c}", load)

        cached = {c for c in todo if args.latent_cache and check_latents(c)}
        run.record["latent_cache"] = {"path": cache if args.latent_cache else None, "reused_classes": len(cached)}

        vae = pipe.vae  # bound here: `del pipe` below would leave the generator's closure without it

        def class_latents():  # (class, latent batches): from the cache, or encoded (streamed) and then cached
            for c in todo:
                if c in cached:
                    yield c, [torch.load(os.path.join(cache, f"{c:05d}.pt"), weights_only=True)]
            stream = encoded_classes(train, [(c, order[c]) for c in todo if c not in cached], vae, args)
            for c, group in groupby(stream, key=itemgetter(0)):
                yield c, (z for _, z in group)

        with run.stage("latents_prototypes", items=int(sum(counts[c] for c in todo))) if todo else nullcontext():
            for c, batches in tqdm(class_latents(), total=len(todo), desc="prototypes", disable=not d.main):
                centres, latents = kmeans_prototypes(batches, args.prototypes, args.km_expand, args.kmeans, args.seed)
                if args.latent_cache and c not in cached:
                    common.make_cache_dir(cache)
                    common.atomic_torch_save(latents, os.path.join(cache, f"{c:05d}.pt"))
                if args.save_latents:
                    os.makedirs(args.save_latents, exist_ok=True)
                    common.atomic_torch_save({"latents": latents.view(-1, *shape), "index": order[c]},
                                             os.path.join(args.save_latents, f"{c:05d}.pt"))
                common.atomic_torch_save(centres.view(-1, *shape), os.path.join(partial, f"{c:05d}.pt"))
                print(f"class {c:5d} {prompts[c]!r}: {len(latents)} latents -> {len(centres)} prototypes")
        common.barrier()
        if d.main:  # one file keyed by class index, written once every rank's classes are done
            common.atomic_torch_save({"classes": [c["id"] for c in classes], "prototypes": {
                c: torch.load(os.path.join(partial, f"{c:05d}.pt"), weights_only=True) for c in range(len(classes))}}, merged)
            shutil.rmtree(partial)
        common.barrier()
    saved = torch.load(merged, weights_only=True)
    if saved["classes"] != [c["id"] for c in classes]:
        raise common.UserError(f"{merged} was made for a different class list; pass --overwrite to remake it")
    prototypes = saved["prototypes"]

    # --- stage 3: img2img synthesis from the prototypes with the class-name prompt (D4M:distillation/gen_syn_image.py) ---
    jobs = [(c, i) for c in mine if not run.class_complete(c, args.ipc) for i in range(args.ipc)]
    pending = {}
    with run.stage("synthesis", items=len(jobs)) if jobs else nullcontext():
        for b in tqdm(range(0, len(jobs), args.batch_size), desc="synthesis", disable=not d.main):
            batch = jobs[b:b + args.batch_size]
            # image i of a class starts from prototype i % P with its own noise (official: ipc/P passes, D4M:distillation/gen_syn_image_imgnt.sh)
            images = synthesize(pipe, torch.stack([prototypes[c][i % args.prototypes] for c, i in batch]),
                                [prompts[c] for c, _ in batch], [image_seed(args.seed, 2, c, i) for c, i in batch], args)
            for (c, i), im in zip(batch, to_dataset_resolution(images, out_size)):
                pending.setdefault(c, []).append(im)
                if len(pending[c]) == args.ipc:
                    run.write_class(c, torch.stack(pending.pop(c)))
    del pipe
    common.barrier()
    if d.main and args.dataset == "digits":  # the first check of a generator: does the teacher see the intended class?
        images, labels = common.load_image_set(args.out, classes)
        agreement = common.teacher_agreement(images.float() / 255, labels, args.teacher)
        run.record["teacher_agreement"] = agreement
        print(f"teacher agreement: the digits teacher {args.teacher} assigns {agreement:.1f}% of the {len(labels)} "
              f"generated images to the class they were made for")

    # --- stage 4: training-time matching (TTM), FKD soft labels stored per epoch (D4M:matching/utils_fkd.py:L199-237) ---
    if args.ttm_epochs:
        images, _ = common.load_image_set(args.out, classes)
        teacher = common.load_teacher(args.teacher, args.dataset, args.teacher_path, args.data_path, device=d.device)
        size = common.input_size(args.dataset, args.teacher)
        mean, std, norm_source = common.resolve_norm(args.dataset, [args.teacher_path])  # what the checkpoint expects
        # the labels are files in the set's root (fkd_epoch_XXXX.pt, fkd_meta.json): ImageFolder(out) sees only classes
        fkd = dict(teacher=teacher, out_dir=args.out, batch_size=args.ttm_batch_size, size=size,
                   mean=mean, std=std, mix="cutmix", alpha=1.0, min_scale=0.08, flip=True,
                   seed=42 + args.seed, device=d.device)  # official fkd_seed 42, cutmix Beta(1,1), RRC 0.08-1
        missing = [e for e in range(args.ttm_epochs) if not os.path.isfile(common.fkd_path(args.out, f"epoch_{e:04d}.pt"))]
        with run.stage("ttm", items=args.ttm_epochs * len(images)) if missing else nullcontext():
            for epoch in tqdm(common.shard(range(args.ttm_epochs), d.rank, d.world), desc="TTM labels", disable=not d.main):
                common.fkd_generate(images, epochs=epoch + 1, start_epoch=epoch, **fkd)  # epochs sharded over ranks
            common.barrier()
            if d.main:  # every epoch file exists now: this only writes meta.json for all epochs
                common.fkd_generate(images, epochs=args.ttm_epochs, **fkd)
        run.record["ttm"] = {"teacher": args.teacher, "teacher_path": args.teacher_path, "input_size": size,
                             "mean": list(mean), "std": list(std), "normalisation": norm_source,
                             "epochs": args.ttm_epochs, "batch_size": args.ttm_batch_size}
        common.barrier()

    # --- stage 5: evaluation of the distilled set with validate_fkd.py (D4M:validate/train_FKD.sh) ---
    summary, result = {}, None
    if args.eval:
        result = run_validation(args)
        summary["eval"] = {k: result.get(k) for k in ("protocol", "best_mean", "best_std", "last_mean", "last_std")}
    synth = run.record["stages"].get("synthesis", {})
    run.finish(device=d.device, images=len(classes) * args.ipc, **summary)
    if d.main:
        line = (f"images: {len(classes) * args.ipc} at {out_size} px; synthesis {synth.get('images_per_s', 0):.2f} img/s")
        if args.ttm_epochs:
            line += f"; TTM labels for {args.ttm_epochs} epochs in {os.path.join(args.out, common.FKD_PREFIX + '*')}"
        print(line)
        latents = run.record.get("latent_cache") or {}
        print(common.closing_line("d4m", args.dataset, args.ipc, args.out, result, {
            "VAE latents": bool(latents.get("reused_classes")), "teacher": teacher_reused and bool(args.ttm_epochs)}))


if __name__ == "__main__":
    common.run_cli(main)
