"""Builders for tiny, randomly initialised model folders used by the tests.

The reference scripts load real checkpoints (Stable Diffusion v1.x, DiT-XL/2,
LLaVA-1.5) with ``from_pretrained``.  The tests cannot download anything, so
each builder here writes a folder with the same layout and config *shapes*
as the real checkpoint, but with a few thousand random weights, so that the
scripts' code paths (pipeline kwargs, latent shapes, processor prompts) run
unchanged on CPU in seconds.  Outputs are noise; only shapes/types matter.

Every builder takes ``(path, seed=0)``, writes into ``path`` and returns it
as ``str``.  Nothing is downloaded, so no Hugging Face cache is touched.
"""

from __future__ import annotations

import json
import os
import string

import torch

# The VAE downsamples by 2 per block after the first, so 4 blocks give the
# real SD/DiT factor of 8 (512 px -> 64 latent px).  Channels stay tiny.
VAE_SCALE_FACTOR = 8
SD_LATENT_SIZE = 8  # -> 64 px images, like SD's 64 latent -> 512 px
DIT_LATENT_SIZE = 8  # -> 64 px images, like DiT-256's 32 latent -> 256 px
LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 8  # (32/8)^2 = 16 image tokens per image

# Ordinary English words so that prompts look realistic in the vocabulary.
_WORDS = """
a an the of and or in on at to for with without from by is are was be this that
photo picture image drawing painting sketch render realistic high quality low
blurry detailed sharp bright dark small large big tiny red green blue yellow
black white gray orange purple pink brown cat dog bird fish horse cow sheep car
truck airplane ship boat deer frog bike bicycle tree flower house road sky sea
water grass field mountain city street forest beach snow rain sun night day
person man woman child face hand eye one two three many some every class label
object animal vehicle plant food fruit apple banana orange chair table bed cup
bottle book phone computer clock lamp door window wall floor background
foreground center close up view side front back top bottom left right what
which who where when how why describe question answer yes no not very good bad
new old young style art color colour shape texture pattern dataset sample
sampling example synthetic real distilled image net imagenet cifar mnist
""".split()

# Printable ASCII without whitespace: all map to themselves under CLIP's
# byte-level pre-tokeniser, so any such word can be spelt out char by char.
_CHARS = [c for c in string.printable if not c.isspace()]


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=SD_LATENT_SIZE * VAE_SCALE_FACTOR,
        scaling_factor=0.18215,  # SD 1.x value; scripts divide latents by it
    )


def _clip_tokenizer(tmp_dir: str):
    """CLIP BPE tokenizer from a hand-written vocab (no hub download)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for tok in (
        ["<|startoftext|>", "<|endoftext|>"]
        + _CHARS
        + [c + "</w>" for c in _CHARS]
        + [w + "</w>" for w in _WORDS]
    ):
        vocab.setdefault(tok, len(vocab))
    os.makedirs(tmp_dir, exist_ok=True)
    with open(os.path.join(tmp_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    # No merges: words are tokenised character by character, which keeps the
    # vocabulary small while still letting long prompts exceed 77 tokens.
    with open(os.path.join(tmp_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(tmp_dir, model_max_length=77)


def build_tiny_sd(path, seed: int = 0) -> str:
    """Tiny SD-1.x folder for StableDiffusion(Img2Img)Pipeline.from_pretrained.

    64x64 images <-> 4x8x8 latents; text embeddings are [B, 77, 32].
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = str(path)
    tokenizer = _clip_tokenizer(os.path.join(path, "tokenizer"))

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SD_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            # CLIPTextModel pools at eos_token_id, so it must match the vocab.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.5's shipped scheduler config, so timestep maths matches the real one.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_dit(path, seed: int = 0) -> str:
    """Tiny DiT-XL/2-256-shaped folder for DiTPipeline.from_pretrained.

    Class-conditional over 1000 classes (DiTPipeline hard-codes null class
    1000); 4x8x8 latents -> 64x64 images.  Labels are 'class0'..'class999'.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    path = str(path)
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma: eps + variance, as in the real model
        num_layers=2,
        sample_size=DIT_LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_num_groups=4,
    )
    # The real checkpoint ships a DDIMScheduler with these linear betas.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
    )
    id2label = {str(i): f"class{i}" for i in range(1000)}
    pipe = DiTPipeline(transformer=transformer, vae=_vae(seed + 1), scheduler=scheduler, id2label=id2label)
    # DiTPipeline does not register id2label itself; the real model_index.json
    # carries it, and from_pretrained passes it back to __init__.
    pipe.register_to_config(id2label=id2label)
    pipe.save_pretrained(path)
    return path


def _llava_tokenizer():
    """Word-level fast tokenizer: LLaVA only needs ids, '<image>' and padding."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = _WORDS + ["user", "assistant"] + list(string.punctuation) + list(string.digits)
    vocab: dict[str, int] = {}
    for tok in specials + words:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Llama prepends BOS; mirror that so prompts look like LLaVA-1.5's.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        # Batched generation with a decoder-only LM needs left padding.
        padding_side="left",
        model_max_length=512,
    )
    # Added as special so "<image>\n" is never split or lower-cased away.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_tiny_llava(path, seed: int = 0) -> str:
    """Tiny LLaVA-1.5-shaped folder for LlavaForConditionalGeneration and
    AutoProcessor.  32x32 images -> 16 '<image>' tokens per image.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = str(path)
    tokenizer = _llava_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    n_image_tokens = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        # The CLIP tower emits a CLS token that the 'default' strategy drops.
        num_additional_image_tokens=1,
        # LLaVA-1.5 style; callers may also write the prompt string directly.
        chat_template=(
            "{% for m in messages %}{{ m['role'].upper() }}: "
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
        ),
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH_SIZE,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def main(argv=None) -> None:
    """`uv run python -m tests.tiny_models DIR`: build DIR/sd, DIR/dit and DIR/llava (seconds, no download)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.tiny_models",
                                description="Build tiny random Stable Diffusion, DiT and LLaVA folders for the "
                                            "no-weights digits recipes (outputs are noise; they exercise the pipelines).")
    p.add_argument("dir", help="folder to write sd/, dit/ and llava/ into (created if missing)")
    p.add_argument("--only", choices=["sd", "dit", "llava"], action="append",
                   help="build only these (repeatable; default: all three)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = p.parse_args(argv)
    builders = {"sd": build_tiny_sd, "dit": build_tiny_dit, "llava": build_tiny_llava}
    for name in args.only or list(builders):
        out = os.path.join(args.dir, name)
        os.makedirs(out, exist_ok=True)
        print(f"{name}: {builders[name](out, seed=args.seed)}", flush=True)


if __name__ == "__main__":
    main()
