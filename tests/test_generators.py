"""The digits generators trained here (common.digits_sd, dmkd.digits_dit) and VLCP's computed digit
captions: a few steps through the real training code, loaded back with the stock diffusers pipelines;
the caption measures against shapes drawn in the test with known stroke width, slant and loops."""
import json
import os

import numpy as np
import pytest
import torch

import common

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """The digits VAE's real training code, 2 steps."""
    out = str(tmp_path_factory.mktemp("vae") / "vae")
    figures = common._train_digits_vae(out, seed=0, steps=2, channels=[16, 16, 16], batch=4, lr=1e-3)
    return out, figures


def test_cached_build_trains_once_into_a_complete_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DD_CACHE", str(tmp_path))
    calls = []

    def build(folder, seed, x):
        calls.append(torch.rand(1).item())  # under the recipe's seed
        os.makedirs(folder)
        return {"agreement": 50.0}

    path = common.cached_build("thing", {"seed": 3, "x": 1}, build, verbose=False)
    assert common.cached_build("thing", {"seed": 3, "x": 1}, build, verbose=False) == path and len(calls) == 1
    rec = json.load(open(os.path.join(path, "recipe.json")))
    assert rec["recipe"] == {"seed": 3, "x": 1} and rec["agreement"] == 50.0 and rec["cpu_s"] >= 0
    torch.manual_seed(3)
    assert calls[0] == torch.rand(1).item()
    assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path), os.path.basename(path) + ".lock"]
    assert common.generator_record(path)["trained_here"] and not common.generator_record("org/model")["trained_here"]


def test_digits_sd_trains_and_loads_with_the_stock_img2img_pipeline(tiny_vae, tmp_path, digits_conv3):
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline
    vae_path, vae_figures = tiny_vae
    vae = AutoencoderKL.from_pretrained(vae_path)
    with torch.no_grad():  # the scaling factor is 1 / the std of the train split's latent means
        z = vae.encode(common.digits_split("train")[0] * 2 - 1).latent_dist.mean
    assert vae.config.scaling_factor == pytest.approx(1 / float(z.std()), rel=1e-3)
    assert list(vae.config.block_out_channels) == [16, 16, 16] and vae_figures["recon_mse"] > 0
    out = str(tmp_path / "sd")
    figures = common._train_digits_sd(out, seed=0, steps=2, batch=4, channels=[32, 32], width=32,
                                      prediction="v_prediction", lr=1e-3, ema=0.9, guidance=2.0, curve_every=0,
                                      vae=vae_path, judge_per_class=1)
    assert 0 <= figures["agreement"] <= 100 and [c[0] for c in figures["curve [step, s, cpu_s, agreement]"]] == [2]
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.vae_scale_factor == 4
    tok = pipe.tokenizer
    for w in common.DIGITS_WORDS + [str(i) for i in range(10)]:  # every word: known tokens, never the unknown one
        assert all(t in tok.get_vocab() and t != tok.unk_token for t in tok.tokenize(w)), w
    import vlcp
    x, y = common.digits_split("train")
    used = {w for i in range(50) for w in vlcp.digit_caption(x[i], str(int(y[i])), i).replace(",", "").split()}
    used |= {w for t in common.DIGITS_TEMPLATES for w in t.format(name="0").split()}
    assert all(tok.tokenize(w) == [w + "</w>"] for w in used)  # every prompt and caption word is one token
    images = pipe(prompt=["3", "a handwritten digit 8, thin strokes, with two closed loops"],
                  image=torch.zeros(2, 4, 8, 8), negative_prompt=["cartoon, anime, painting"] * 2, strength=0.7,
                  guidance_scale=8.0, num_inference_steps=4, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_digits_dit_trains_and_loads_with_the_stock_dit_pipeline(tiny_vae, tmp_path, digits_conv3):
    import dmkd
    from diffusers import DiTPipeline
    out = str(tmp_path / "dit")
    figures = dmkd._train_digits_dit(out, seed=0, steps=2, batch=4, width=32, layers=1, patch=2, lr=1e-3, ema=0.9,
                                     guidance=2.0, sample_steps=2, judge_per_class=1, vae=tiny_vae[0])
    assert 0 <= figures["agreement"] <= 100
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_embeds_ada_norm == 1000 and pipe.get_label_ids(["3", "7"]) == [3, 7]
    images = pipe(class_labels=[3, 7], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    again = dmkd.sample_dit(pipe, [3], [0], 2.0, 2, cfg_channels=4)  # dmkd's own sampler on the same folder
    assert again.shape == (1, 3, 32, 32)


# --- VLCP's computed digit captions -------------------------------------------------------------
def _bar(width, shear=0.0, rows=range(2, 30), centre=16.0):
    """A stroke `width` px wide whose centre column moves `shear` px right per row upwards."""
    img = np.zeros((32, 32))
    for r in rows:
        c = centre + shear * (16 - r)
        img[r, int(round(c - width / 2)):int(round(c - width / 2)) + width] = 1.0
    return img


def _ring(img, cy, cx, r_out, r_in, gap=False):
    yy, xx = np.mgrid[:32, :32]
    d = np.hypot(yy - cy, xx - cx)
    ring = (d <= r_out) & (d >= r_in)
    if gap:  # cut the ring open on its right side
        ring &= ~((xx > cx) & (abs(yy - cy) < 3))
    img[ring] = 1.0
    return img


def test_digit_captions_measure_what_is_drawn():
    import vlcp
    thin, thick = _bar(3), _bar(10)
    assert vlcp.digit_measures(thin)[0] == 3 and vlcp.digit_measures(thick)[0] == 10  # stroke width in px
    assert "thin strokes" in vlcp.digit_caption(thin, "1", 0) and "thick strokes" in vlcp.digit_caption(thick, "1", 0)
    for shear, word in ((0.4, "slanted right"), (-0.4, "slanted left"), (0.0, "upright")):
        img = _bar(3, shear)
        assert vlcp.digit_measures(img)[1] == pytest.approx(shear, abs=0.05)  # d(column)/d(height)
        assert word in vlcp.digit_caption(img, "1", 0)
    zero = _ring(np.zeros((32, 32)), 16, 16, 12, 8)
    eight = _ring(_ring(np.zeros((32, 32)), 9, 16, 7, 3), 23, 16, 7, 3)
    c = _ring(np.zeros((32, 32)), 16, 16, 12, 8, gap=True)
    assert [vlcp.digit_measures(x)[3] for x in (zero, eight, c)] == [1, 2, 0]
    assert "one closed loop" in vlcp.digit_caption(zero, "0", 0) and "two closed loops" in vlcp.digit_caption(eight, "8", 0)
    assert "no closed loop" in vlcp.digit_caption(c, "0", 0)
    assert vlcp.digit_measures(zero)[2] == 25 and "wide" in vlcp.digit_caption(zero, "0", 0)  # ink width in px
    assert "narrow" in vlcp.digit_caption(thin, "1", 0)


def test_digit_captions_are_varied_and_in_the_generators_vocabulary():
    import vlcp
    x, y = common.digits_split("train")
    caps = [vlcp.digit_caption(x[i], str(int(y[i])), i) for i in range(100)]
    assert all(caps[i].split(", ")[0].endswith(f" {int(y[i])}") for i in range(100))  # the class name leads
    assert len({frozenset(c.split(", ")[1:]) for c in caps}) >= 10  # different measured attributes
    words = {w for c in caps for w in vlcp.words(c)}
    assert words <= set(common.DIGITS_WORDS)
