"""Checks that the tiny model folders behave like the real checkpoints.

These guard the test fixtures themselves: if a diffusers/transformers
upgrade changes a loading or call convention, this file fails first, with
a clearer message than a failing script test would give.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import (
    LLAVA_IMAGE_SIZE,
    VAE_SCALE_FACTOR,
    build_tiny_dit,
    build_tiny_llava,
    build_tiny_sd,
)

# The models are tiny, so intra-op threading only costs: on a shared 2-core
# box OpenMP spin-waits made this file ~5x slower with the default 2 threads.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory):
    return build_tiny_dit(tmp_path_factory.mktemp("tiny_dit"))


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def test_builders_return_str_folder(tmp_path):
    out = build_tiny_dit(tmp_path / "dit", seed=1)
    assert isinstance(out, str) and os.path.isfile(os.path.join(out, "model_index.json"))


# --------------------------------------------------------------------------- SD


def _img2img(path):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd_loads_with_sd15_shapes(tiny_sd_dir):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.vae.config.latent_channels == 4 == pipe.unet.config.in_channels
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


def test_sd_tokenizer_truncates_to_77(tiny_sd_dir):
    pipe = _img2img(tiny_sd_dir)
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    long_ids = tok("a big red car " * 40, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == tok.eos_token_id
    # Any lower-case word spells out in single characters (CLIP's unk is eos).
    word_ids = tok("zyzzyva", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in word_ids
    assert tok.convert_ids_to_tokens(word_ids) == ["z", "y", "z", "z", "y", "v", "a</w>"]


def test_sd_img2img_accepts_latent_image(tiny_sd_dir):
    pipe = _img2img(tiny_sd_dir)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(
        prompt=["a photo of a cat", "a photo of a dog " * 30],  # 2nd exceeds 77 tokens
        negative_prompt=["blurry", "low quality"],
        image=latents,
        strength=0.7,
        guidance_scale=8.0,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (2, 64, 64, 3)
    assert np.isfinite(out.images).all()
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0


def test_sd_img2img_pil_roundtrip_and_txt2img(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = _img2img(tiny_sd_dir)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = pipe(prompt="a cat", image=img, strength=0.5, num_inference_steps=2, output_type="pil")
    assert out.images[0].size == (64, 64)

    t2i = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    t2i.set_progress_bar_config(disable=True)
    assert t2i(prompt="a dog", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


# -------------------------------------------------------------------------- DiT


def test_dit_generates_expected_resolution(tiny_dit_dir):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tiny_dit_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_embeds_ada_norm == 1000
    assert pipe.get_label_ids(["class0", "class999"]) == [0, 999]
    out = pipe(
        class_labels=[0, 5],
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    size = pipe.transformer.config.sample_size * VAE_SCALE_FACTOR
    assert out.images.shape == (2, size, size, 3) == (2, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_dit_is_deterministic_per_seed(tiny_dit_dir):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tiny_dit_dir)
    pipe.set_progress_bar_config(disable=True)

    def run():
        gen = torch.Generator().manual_seed(3)
        return pipe(class_labels=[7], num_inference_steps=2, generator=gen, output_type="np").images

    np.testing.assert_array_equal(run(), run())


# ------------------------------------------------------------------------ LLaVA


def test_llava_batched_generation(tiny_llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    assert processor.tokenizer.padding_side == "left"
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
    ]
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in ("What is in this image?", "Describe the photo.")]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE)
    # Shorter prompt is left-padded, so every row ends with the prompt tail.
    assert (inputs["input_ids"][:, -1] == inputs["input_ids"][0, -1]).all()

    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, temperature=0.2, max_new_tokens=8)
    n_prompt = inputs["input_ids"].shape[1]
    assert out.shape[0] == 2 and n_prompt < out.shape[1] <= n_prompt + 8
    texts = processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    full = processor.batch_decode(out, skip_special_tokens=True)
    assert all("assistant" in t for t in full)


def test_llava_chat_template_matches_manual_prompt(tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == "USER: <image>\nWhat is this? ASSISTANT:"
