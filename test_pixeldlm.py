"""
Tests that read as the specification of PixelDLM. Run: python -m pytest -q test_pixeldlm.py
"""
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pixeldlm
import prepare_data
import sample
from pixeldlm import (JiT, ddim_sample, diffusion_loss, from_grid, generate, ids_to_image, image_to_ids, mask_after_eot,
                      to_grid)
from prepare_data import get_encoding
from sample import ids_to_text, text_part

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ['--img_size=8', '--patch_size=2', '--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=4',
        '--learning_rate=1e-3', '--warmup_iters=2', '--eval_iters=2', '--log_interval=1', '--compile=False',
        '--device=cpu']


@pytest.fixture(scope='module')
def enc():
    return get_encoding('cl100k_base')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('data')
    run('prepare_data.py', f'--out_dir={out}')
    return str(out)


@pytest.fixture(scope='module')
def copy_dir(tmp_path_factory):  # prompt/answer pairs in bytes: copy a few words
    out = tmp_path_factory.mktemp('copy')
    run('prepare_data.py', '--task=copy', '--encoding=bytes', '--num_pairs=200', f'--out_dir={out}')
    return str(out)


def run(script, *args, check=True, cwd=REPO):
    """Run a project script as a user would; returns the finished process (stdout + stderr in .out)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, *script.split(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    proc.out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, proc.out
    return proc


def text_canvas(ids, eot_id, n_pixels):
    ids, mask = mask_after_eot(np.array([ids + [eot_id] * (n_pixels - len(ids))]), eot_id)
    return torch.from_numpy(ids), torch.from_numpy(mask).float()


# ----------------------------------------------------------------------------- codec

def test_codec_round_trips_every_id_of_the_encoding(enc):
    ids = torch.arange(enc.n_vocab)
    ids = torch.cat([ids, torch.zeros(-len(ids) % 4096, dtype=torch.long)]).view(-1, 4096)
    image = ids_to_image(ids, 256)
    assert image.shape == (len(ids), 3, 64, 64) and image.min() >= -1 and image.max() <= 1
    assert torch.equal(image_to_ids(image, 256), ids)
    assert torch.equal(image_to_ids(ids_to_image(ids, 47), 47), ids)  # any base whose cube covers the vocab


def test_codec_uses_the_original_designs_digits_row_major():
    ids = torch.tensor([[0, 1, 256, 65536, 100257, 5, 6, 7, 8]])
    digits = ((ids_to_image(ids, 256) + 1) / 2 * 255).round().long()
    assert digits[0, :, 0, 0].tolist() == [0, 0, 0]
    assert digits[0, :, 0, 1].tolist() == [1, 0, 0]  # R is the least significant digit
    assert digits[0, :, 0, 2].tolist() == [0, 1, 0]
    assert digits[0, :, 1, 0].tolist() == [0, 0, 1]  # row-major: the 4th id starts the second row
    assert digits[0, :, 1, 1].tolist() == [100257 % 256, 100257 // 256 % 256, 1]


def test_patch_order_puts_consecutive_ids_in_each_patch_and_round_trips():
    ids = torch.arange(64)[None]
    image = ids_to_image(ids, 256, tile=2)
    digits = ((image + 1) / 2 * 255).round().long()[0, 0]  # R: the id itself
    assert digits[:2, :2].flatten().tolist() == [0, 1, 2, 3]  # the first patch: ids 0-3, row by row inside
    assert digits[:2, 2:4].flatten().tolist() == [4, 5, 6, 7]  # the next patch to the right
    assert digits[2:4, :2].flatten().tolist() == [16, 17, 18, 19]  # the second row of patches
    model = JiT(img_size=8, patch_size=2, n_layer=1, n_head=2, n_embd=32)
    assert model.patchify(image)[0, :, :4].mul(127.5).add(127.5).round().long().flatten().tolist() == list(range(64))
    for tile in (1, 2, 4, 8):
        some = torch.randint(0, 343, (3, 64))
        assert torch.equal(image_to_ids(ids_to_image(some, 7, tile), 7, tile), some)
        assert torch.equal(from_grid(to_grid(some[..., None], tile), tile)[..., 0], some)
        mask = (ids < 21).float()  # the text is ids 0-20: its mask lands on exactly their pixels
        on_text = ((ids_to_image(ids, 256, tile) + 1) * 127.5).round()[:, :1] < 21  # R is the id here
        assert torch.equal(to_grid(mask[..., None], tile).bool(), on_text)
    assert torch.equal(ids_to_image(ids, 256, tile=1), ids_to_image(ids, 256))  # tile 1: the original row order


def test_decoding_rounds_to_the_nearest_color_and_clamps():
    ids = torch.randint(0, 100277, (2, 16))
    image = ids_to_image(ids, 256)
    spacing = 2 / 255
    assert torch.equal(image_to_ids(image - 0.45 * spacing, 256), ids)  # truncation would fail here
    assert torch.equal(image_to_ids(image + 0.45 * spacing, 256), ids)
    assert image_to_ids(torch.full((1, 3, 2, 2), 7.0), 256).unique().item() == 256 ** 3 - 1
    assert image_to_ids(torch.full((1, 3, 2, 2), -7.0), 256).unique().item() == 0


def test_real_text_round_trips_and_the_mask_covers_end_of_text_not_padding(enc):
    text = "Lists are mutable sequences, typically used to store collections of homogeneous items."
    ids = enc.encode_ordinary(text)
    canvas, mask = text_canvas(ids, enc.eot_token, 256)
    decoded = image_to_ids(ids_to_image(canvas, 256), 256)[0].tolist()
    assert ids_to_text(decoded, enc) == (text, 0)
    assert mask[0, :len(ids) + 1].eq(1).all()  # the text and its end-of-text count
    assert mask[0, len(ids) + 1:].eq(0).all()  # the padding does not
    assert canvas[0, len(ids):].eq(enc.eot_token).all()


def test_mask_ends_each_text_at_its_first_end_of_text():
    ids, mask = mask_after_eot(np.array([[5, 6, 9, 7, 9, 8], [1, 2, 3, 4, 5, 6]]), eot_id=9)
    assert ids.tolist() == [[5, 6, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_decoding_counts_ids_outside_the_vocabulary_instead_of_crashing(enc):
    hello = enc.encode_ordinary("hello")
    image = ids_to_image(torch.tensor([hello + [200000, 100256, enc.eot_token] + [5] * 5]), 256)
    text, n_invalid = ids_to_text(image_to_ids(image, 256)[0].tolist(), enc)
    assert text == "hello" and n_invalid == 2  # 100256 is a hole in cl100k_base; the 5 after eot is ignored
    image[0, :, 0, 1] = float('nan')  # a diverged model's pixel
    assert ids_to_text(image_to_ids(image, 256)[0].tolist(), enc) == ("hello", 2)


def test_byte_vocabulary_round_trips_every_id_in_base_7():
    enc = get_encoding('bytes')
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    ids = torch.arange(257 + 32).view(17, 17) % 257  # every id, in a 17x17 image
    assert torch.equal(image_to_ids(ids_to_image(ids[None].flatten(1), 7), 7), ids[None].flatten(1))
    text = "naïve café: ünïcödé → bytes"
    canvas, _ = text_canvas(enc.encode_ordinary(text), enc.eot_token, 64)
    assert ids_to_text(image_to_ids(ids_to_image(canvas, 7), 7)[0].tolist(), enc) == (text, 0)
    assert ids_to_text([104, 105, 300, 342, 256, 1], enc) == ('hi', 2)  # base 7 has 343 colors, 257 ids
    with pytest.raises(KeyError):
        enc.decode_single_token_bytes(256)  # end-of-text is no byte


# ----------------------------------------------------------------------------- model

def test_jit_b4_parameter_count():
    with torch.device('meta'):
        model = JiT(img_size=64, patch_size=4, n_layer=12, n_head=12, n_embd=768)
    d, hidden, patch = 768, 2048, 3 * 4 * 4
    block = (d * 3 * d + 3 * d) + 2 * 64 + (d * d + d) + (d * 2 * hidden + 2 * hidden) + (hidden * d + d) \
        + (d * 6 * d + 6 * d)
    expected = (patch * d + d) + (256 * d + d + d * d + d) + 12 * block + (d * 2 * d + 2 * d) + (d * patch + patch)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == expected == 129_597_744  # the v head: one value per pixel channel
    with torch.device('meta'):  # the default digit head: 47 logits per channel for cl100k_base
        model = JiT(img_size=64, patch_size=4, n_layer=12, n_head=12, n_embd=768, digit_classes=47)
    expected += (d * patch + patch) * 46
    assert sum(p.numel() for p in model.parameters()) == expected == 131_295_696
    assert model.pos_embed.shape == (2 * 256, 768)  # condition patches, then target patches


def tiny_model(seed=0, randomize=False):
    torch.manual_seed(seed)
    model = JiT(img_size=8, patch_size=2, n_layer=2, n_head=2, n_embd=32)
    if randomize:  # move off the zero init, so that every path of the network matters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_output_shapes_with_and_without_condition():
    model = tiny_model(randomize=True)
    z, t, cond = torch.randn(3, 3, 8, 8), torch.rand(3), torch.randn(3, 3, 8, 8)
    assert model(z, t).shape == (3, 3, 8, 8)
    assert model(z, t, cond).shape == (3, 3, 8, 8)
    assert model(z, t, cond[:1]).shape == (3, 3, 8, 8)
    assert not torch.allclose(model(z, t, cond), model(z, t))  # the condition is seen


def test_every_block_is_the_identity_and_the_output_zero_at_init():
    model = tiny_model()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert model(torch.randn(2, 3, 8, 8), torch.rand(2)).abs().max() == 0


def test_the_target_takes_the_lower_position_rows_and_the_condition_the_upper_ones():
    model = tiny_model(randomize=True)
    z, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    before = model(z, t)
    model.pos_embed[:16] = 0  # the condition's rows: unused without a condition
    assert torch.equal(model(z, t), before)
    model.pos_embed[16:] = 0
    assert not torch.allclose(model(z, t), before)


def test_prompts_belong_to_the_first_samples_and_the_rest_run_alone():
    model = tiny_model(randomize=True)
    z, t, cond = torch.randn(4, 3, 8, 8), torch.rand(4), torch.randn(2, 3, 8, 8)
    mixed = model(z, t, cond)  # samples 0 and 1 see a prompt, 2 and 3 none
    assert torch.allclose(mixed[:2], model(z[:2], t[:2], cond), atol=1e-6)
    assert torch.allclose(mixed[2:], model(z[2:], t[2:]), atol=1e-6)
    assert not torch.allclose(mixed[:2], model(z[:2], t[:2]), atol=1e-3)  # the prompt is seen


def test_a_digit_head_predicts_the_expected_color_of_its_digits():
    torch.manual_seed(0)
    model = JiT(img_size=8, patch_size=2, n_layer=1, n_head=2, n_embd=32, digit_classes=7)
    z, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    assert model(z, t).abs().max() < 1e-6  # zero init: uniform over the digits, so grey like the pixel head
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    logits = model(z, t, logits=True)
    assert logits.shape == (2, 7, 3, 8, 8)
    colors = torch.linspace(-1, 1, 7).view(1, 7, 1, 1, 1)
    assert torch.allclose(model(z, t), (logits.softmax(dim=1) * colors).sum(dim=1), atol=1e-6)


def test_digit_cross_entropy_ignores_padding_and_rewards_the_right_digits(enc):
    ids = enc.encode_ordinary("Short.")
    canvas, mask = text_canvas(ids, enc.eot_token, 64)
    x, mask = ids_to_image(canvas, 47), mask.view(1, 1, 8, 8)
    digits = torch.round((x + 1) / 2 * 46).long()

    class FixedLogits(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.out = logits

        def forward(self, z, t, cond=None, logits=False):
            return self.out
    right = F.one_hot(digits, 47).permute(0, 4, 1, 2, 3).float() * 20
    t, noise = torch.tensor([0.5]), torch.randn(1, 3, 8, 8)
    loss_right = diffusion_loss(FixedLogits(right), x, mask, t, noise, digit_classes=47)
    padding_changed = right.clone()
    padding_changed.view(1, 47, 3, -1)[..., len(ids) + 1:] = torch.randn(47, 3, 64 - len(ids) - 1)
    assert diffusion_loss(FixedLogits(padding_changed), x, mask, t, noise, digit_classes=47) == loss_right
    assert loss_right < 1e-6 < diffusion_loss(FixedLogits(torch.zeros_like(right)), x, mask, t, noise, 47)


# ----------------------------------------------------------------------------- loss

class FixedPrediction(torch.nn.Module):
    """A stand-in denoiser that returns a given x_hat and records what it was asked."""
    digit_classes, token_classes = 0, 0

    def __init__(self, x_hat):
        super().__init__()
        self.x_hat, self.calls = x_hat, []

    def forward(self, z, t, cond=None, logits=False):
        self.calls.append((z.clone(), t.clone()))
        return self.x_hat.clone()


def test_loss_ignores_padding_and_counts_the_end_of_text_pixel(enc):
    ids = enc.encode_ordinary("A short text.")
    canvas, mask = text_canvas(ids, enc.eot_token, 64)
    x, mask = ids_to_image(canvas, 256), mask.view(1, 1, 8, 8)
    t, noise = torch.tensor([0.7]), torch.randn(1, 3, 8, 8)
    x_pred = x + 0.1 * torch.randn_like(x)
    loss = diffusion_loss(FixedPrediction(x_pred), x, mask, t, noise)
    eot_row, eot_col = divmod(len(ids), 8)
    pred_other_padding = x_pred.clone()
    pred_other_padding.view(3, -1)[:, len(ids) + 1:] = 0.9
    assert diffusion_loss(FixedPrediction(pred_other_padding), x, mask, t, noise) == loss
    pred_other_eot = x_pred.clone()
    pred_other_eot[0, :, eot_row, eot_col] += 0.5
    assert diffusion_loss(FixedPrediction(pred_other_eot), x, mask, t, noise) > loss


def test_loss_is_the_v_loss_with_the_clamped_weight():
    x, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    x_pred, mask = torch.zeros_like(x), torch.ones(2, 1, 4, 4)
    t = torch.tensor([0.3, 0.99])
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise
    v, v_pred = (x - z), (x_pred - z)
    v, v_pred = [u / torch.tensor([0.7, 0.05]).view(-1, 1, 1, 1) for u in (v, v_pred)]
    assert torch.allclose(diffusion_loss(FixedPrediction(x_pred), x, mask, t, noise), ((v - v_pred) ** 2).mean())


# ----------------------------------------------------------------------------- sampler

def test_ddim_last_step_returns_x_hat_exactly_and_the_trajectory_is_the_closed_form():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8)
    model = FixedPrediction(x)
    out = ddim_sample(model, noise, steps=20)
    assert torch.equal(out, x)
    assert len(model.calls) == 20
    for i, (z, t) in enumerate(model.calls):  # with a perfect x_hat, z_t stays on the line t*x + (1-t)*noise
        assert torch.allclose(t, torch.full((2,), i / 20))
        assert torch.allclose(z, i / 20 * x + (1 - i / 20) * noise, atol=1e-6)


def test_ddim_step_is_the_update_from_t_to_s():
    torch.manual_seed(0)
    x_hats = [torch.randn(1, 3, 4, 4) for _ in range(4)]
    seen = []

    class Scripted(torch.nn.Module):  # returns a different x_hat at each call
        digit_classes, token_classes = 0, 0

        def forward(self, z, t, cond=None, logits=False):
            seen.append(z)
            return x_hats[int(round(t[0].item() * 4))]
    noise = torch.randn(1, 3, 4, 4)
    out = ddim_sample(Scripted(), noise, steps=4)
    z = noise
    for i in range(4):  # every z the model is shown is the update from the step before, written out
        t, s = i / 4, (i + 1) / 4
        assert torch.allclose(seen[i], z, atol=1e-6)
        z = x_hats[i] + (1 - s) / (1 - t) * (z - x_hats[i])
    assert torch.allclose(out, z)
    assert torch.equal(ddim_sample(Scripted(), noise, steps=4), x_hats[3])


def test_time_shift_moves_the_grid_towards_the_clean_end():
    x, noise = torch.zeros(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    model = FixedPrediction(x)
    ddim_sample(model, noise, steps=4, time_shift=3.0)
    ts = [t.item() for _, t in model.calls]
    u = [0, 0.25, 0.5, 0.75]
    assert ts == pytest.approx([3 * a / (1 + 2 * a) for a in u])  # 0, 0.5, 0.75, 0.9: denser near t = 1
    assert ts == sorted(ts) and ts[1] > u[1]


def test_time_delay_tells_the_model_a_noisier_time_on_the_same_grid():
    x, noise = torch.zeros(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    plain, delayed = FixedPrediction(x), FixedPrediction(x)
    ddim_sample(plain, noise, steps=4)
    ddim_sample(delayed, noise, steps=4, time_delay=0.3)
    assert [t.item() for _, t in delayed.calls] == pytest.approx([0, 0, 0.2, 0.45])  # t - 0.3, never below 0
    for (z, _), (z_plain, _) in zip(delayed.calls, plain.calls):  # z itself still walks 0, 0.25, 0.5, 0.75
        assert torch.equal(z, z_plain)


def test_steps_above_renoise_above_draw_z_afresh_from_x_hat_and_the_others_keep_their_path():
    torch.manual_seed(0)
    x, noise = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    fresh = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    plain, renoised = FixedPrediction(x), FixedPrediction(x)
    ddim_sample(plain, noise, steps=4, step_noise=lambda step: fresh[step])  # DDIM, eta 0: no fresh noise
    ddim_sample(renoised, noise, steps=4, step_noise=lambda step: fresh[step], renoise_above=0.6)
    for step in range(2):  # to t = 0.25 and 0.5: as plain DDIM
        assert torch.equal(renoised.calls[step + 1][0], plain.calls[step + 1][0])
    z3 = renoised.calls[3][0]  # to t = 0.75 > 0.6: nothing kept of the path but x_hat
    assert torch.allclose(z3, 0.75 * x + 0.25 * fresh[2], atol=1e-6)


@pytest.mark.parametrize('kind', ['text', 'grid'])
def test_rotary_positions_make_attention_depend_on_the_offset_alone(kind):
    cos, sin = pixeldlm.rotary_angles(kind, 16, 6, 6)  # a 6x6 grid of patches, head size 16
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):  # q at patch i (row by row) attends to k at patch j
        return (pixeldlm.rotate(q, cos[i], sin[i]) @ pixeldlm.rotate(k, cos[j], sin[j])).item()
    assert score(0, 7) == pytest.approx(score(14, 21), abs=1e-5)  # the same offset (1 row, 1 column) elsewhere
    assert score(0, 7) != pytest.approx(score(0, 8), abs=1e-3)
    # the last patch of a row and the first of the next: neighbours in the text, 5 columns apart on the grid
    assert (score(5, 6) == pytest.approx(score(0, 1), abs=1e-5)) == (kind == 'text')
    assert pixeldlm.rotate(q, cos[9], sin[9]).norm() == pytest.approx(q.norm())
    torch.manual_seed(0)
    plain, rotary = JiT(8, 2, 2, 2, 32), JiT(8, 2, 2, 2, 32, rope=kind)
    rotary.load_state_dict(plain.state_dict())  # the same weights: rotary positions add no parameters
    with torch.no_grad():
        for p in rotary.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        plain.load_state_dict(rotary.state_dict())
    z, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    assert not torch.allclose(plain(z, t), rotary(z, t), atol=1e-4)


def logits_as_image(patch_logits, p):
    """A token head's (B, patches, p*p, V) logits -> (B, V, H, W), pixel by pixel."""
    B, n, _, V = patch_logits.shape
    g = math.isqrt(n)
    image = torch.empty(B, V, g * p, g * p)
    for patch in range(n):
        for k in range(p * p):
            image[:, :, patch // g * p + k // p, patch % g * p + k % p] = patch_logits[:, patch, k, :]
    return image


def test_a_token_head_predicts_the_expected_color_of_its_ids_and_answers_with_the_likeliest():
    torch.manual_seed(0)
    model = JiT(img_size=4, patch_size=2, n_layer=1, n_head=2, n_embd=32, token_classes=7 ** 3)
    with torch.no_grad():
        model.final.bias.normal_()
    z, t = torch.randn(1, 3, 4, 4), torch.rand(1)
    assert model(z, t, logits=True).shape == (1, 4, 4, 343)  # 4 patches of 2x2 pixels
    # the checkpoint layout: the head's output row v * p*p + k is id v at pixel k of a patch
    with torch.no_grad():
        saved_bias = model.final.bias.clone()
        model.final.weight.zero_()
        assert torch.equal(model(z, t, logits=True)[0, 2], saved_bias.view(343, 4).T)
        model.final.weight.normal_()
    logits = logits_as_image(model(z, t, logits=True), 2)
    colors = pixeldlm.ids_to_pixels(torch.arange(343), 7).T  # (3, 343): the color of every id
    expected = torch.einsum('bvhw,cv->bchw', logits.softmax(dim=1), colors)
    assert torch.allclose(model(z, t), expected, atol=1e-6)
    ids = torch.randint(0, 343, (1, 16))
    x, mask = ids_to_image(ids, 7), torch.ones(1, 1, 4, 4)
    mask[..., 3, :] = 0  # padding counts zero
    noise = torch.randn(1, 3, 4, 4)
    loss = diffusion_loss(model, x, mask, t, noise, token_classes=343)
    z = t * x + (1 - t) * noise
    targets = image_to_ids(x, 7).view(1, 4, 4)
    by_pixel = F.cross_entropy(logits_as_image(model(z, t, logits=True), 2), targets, reduction='none')
    assert loss.item() == pytest.approx(by_pixel[0, :3].mean().item(), rel=1e-5)
    noise = torch.randn(1, 3, 4, 4)
    out = ddim_sample(model, noise, steps=1)  # one step, the last: from pure noise straight to an answer
    likeliest = logits_as_image(model(noise, torch.zeros(1), logits=True), 2).argmax(dim=1)  # (1, 4, 4) ids
    assert torch.equal(out, pixeldlm.ids_to_pixels(likeliest, 7).permute(0, 3, 1, 2))  # whole tokens, no means


def test_eta_one_draws_each_step_from_the_ddpm_posterior():
    torch.manual_seed(0)
    x, noise = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    fresh = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    model = FixedPrediction(x)
    ddim_sample(model, noise, steps=4, eta=1.0, step_noise=lambda step: fresh[step])
    (z0, _), (z1, _), (z2, _), _ = model.calls
    assert torch.equal(z0, noise)
    assert torch.allclose(z1, 0.25 * x + 0.75 * fresh[0], atol=1e-6)  # leaving t = 0, nothing of the start is kept
    t, s = 0.25, 0.5  # the posterior of z_s given z_t and x, for z_t = t*x + (1-t)*noise, written out on its own
    var_ts = (1 - t) ** 2 - (t / s) ** 2 * (1 - s) ** 2  # the noise that goes in between s and t
    mean = (t / s) * (1 - s) ** 2 / (1 - t) ** 2 * z1 + s * var_ts / (1 - t) ** 2 * x
    var = var_ts * (1 - s) ** 2 / (1 - t) ** 2
    assert torch.allclose(z2, mean + math.sqrt(var) * fresh[1], atol=1e-5)


def test_sampling_with_fresh_noise_is_seeded_per_sample(enc):
    start = pixeldlm.sample_noise(7, 0, 2, 8)
    for step in range(3):  # every step's noise is new, not the starting noise again
        assert not torch.allclose(pixeldlm.sample_noise(7, 0, 2, 8, step), start)
    model = tiny_model(randomize=True)
    a = generate(model, num_samples=3, steps=5, seed=7, base=256, eot_id=enc.eot_token, eta=1.0)
    b = generate(model, num_samples=3, steps=5, seed=7, base=256, eot_id=enc.eot_token, eta=1.0)
    later = generate(model, num_samples=2, steps=5, seed=7, base=256, eot_id=enc.eot_token, first=1, eta=1.0)
    still = generate(model, num_samples=3, steps=5, seed=7, base=256, eot_id=enc.eot_token)
    assert torch.equal(a[0], b[0]) and torch.allclose(later[0], a[0][1:], atol=1e-5)
    assert not torch.allclose(a[0], still[0])  # the fresh noise changes the path


def test_a_digit_head_answers_with_its_most_likely_digit_not_the_mean():
    # half-sure between digits 0 and 6 (base 7): the mean color is digit 3, a token neither hypothesis holds
    class TwoMinded(torch.nn.Module):
        digit_classes, token_classes = 7, 0

        def forward(self, z, t, cond=None, logits=False):
            scores = torch.full((1, 7, 3, 2, 2), -9.0)
            scores[:, 0], scores[:, 6] = 0.0, 0.2  # digit 6 slightly more likely
            if logits:
                return scores
            return (scores.softmax(dim=1) * torch.linspace(-1, 1, 7).view(1, 7, 1, 1, 1)).sum(dim=1)
    out = ddim_sample(TwoMinded(), torch.randn(1, 3, 2, 2), steps=3)
    assert torch.equal(out, torch.ones(1, 3, 2, 2))  # digit 6 everywhere
    assert (image_to_ids(out, 7) == 6 + 6 * 7 + 6 * 49).all()


def test_below_draw_below_each_pixel_of_x_hat_is_drawn_from_the_head_by_its_own_uniform(monkeypatch):
    class Sure(torch.nn.Module):  # a token head over base-2 ids whose mass lies on ids 2 (3/4) and 5 (1/4)
        digit_classes, token_classes, patch_size = 0, 8, 2
        token_colors = pixeldlm.ids_to_pixels(torch.arange(8), 2)

        def forward(self, z, t, cond=None, logits=False):
            scores = torch.full((1, 4, 4, 8), -30.0)  # (B, patches, p*p, ids)
            scores[..., 2], scores[..., 5] = math.log(0.75), math.log(0.25)
            return scores
    uniform = torch.full((1, 3, 4, 4), 0.2)
    uniform[0, 0, 0, 2] = uniform[0, 0, 3, 1] = 0.9  # past 3/4: id 5 at these pixels (channel 0 draws a token)
    uniform[0, 1:] = 0.99  # the other channels play no part
    drawn = pixeldlm.decide(Sure(), None, None, None, 1.0, uniform)
    expected = Sure.token_colors[torch.where(uniform[0, 0] > 0.75, 5, 2)].permute(2, 0, 1)  # each pixel by its own
    assert torch.equal(drawn[0], expected)

    class Unsure(torch.nn.Module):  # a digit head: each channel's digit is 0, 1, 2 with probability .2, .5, .3
        digit_classes, token_classes = 3, 0

        def forward(self, z, t, cond=None, logits=False):
            return torch.tensor([0.2, 0.5, 0.3]).log().view(1, 3, 1, 1, 1).expand(1, 3, 3, 5, 5)
    uniform = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    digits = (pixeldlm.decide(Unsure(), None, None, None, 1.0, uniform) + 1).round().long()  # colors -1, 0, 1
    assert torch.equal(digits, (uniform >= 0.2).long() + (uniform >= 0.7).long())  # each by its own uniform
    assert len(digits.unique()) == 3
    two = torch.tensor([0.0, 0.0, -1e9])  # two even classes and one that is never drawn, even at u = 1 (Phi rounds
    draws = [pixeldlm.draw_class(two, torch.tensor([u]), dim=0).item() for u in (0.0, 0.49, 0.51, 1.0)]  # to it)
    assert draws == [0, 0, 1, 1]
    model = tiny_model(randomize=True)
    model.digit_classes = 7  # its head as a 7-digit classifier: 3 * 4 * 7 outputs per patch
    model.final = torch.nn.Linear(32, 3 * 4 * 7)
    trajectory, asked = [], []
    step_noise = lambda step: asked.append(step) or torch.randn(2, 3, 8, 8)
    ddim_sample(model, torch.randn(2, 3, 8, 8), steps=4, trajectory=trajectory, draw_below=0.3, step_noise=step_noise)
    colors = pixeldlm.digit_values(torch.arange(7), 7)
    for t, _, x_hat in trajectory[:-1]:  # drawn at t = 0 and 0.25: every channel is one of the 7 digits' colors
        assert ((x_hat.unsqueeze(-1) - colors).abs().min(dim=-1).values < 1e-6).all() == (t < 0.3), t
    assert asked == [4, 5]  # noise of its own (steps + step), which no step adds to z
    given, decide = [], pixeldlm.decide
    monkeypatch.setattr(pixeldlm, 'decide', lambda *args: given.append(args[5:]) or decide(*args))  # the uniform
    noise = [torch.randn(2, 3, 8, 8) for _ in range(8)]
    ddim_sample(model, torch.randn(2, 3, 8, 8), steps=4, draw_below=0.3, step_noise=lambda step: noise[step])
    assert torch.allclose(given[0][0], 0.5 * (1 + torch.erf(noise[4] / math.sqrt(2))))  # Phi: uniform in [0, 1]
    assert given[-1] == ()  # the last step: the most likely colors
    monkeypatch.undo()
    a = generate(model, num_samples=3, steps=4, seed=7, base=7, eot_id=0, draw_below=0.6)
    later = generate(model, num_samples=2, steps=4, seed=7, base=7, eot_id=0, first=1, draw_below=0.6)
    assert torch.equal(later[1], a[1][1:])  # seeded per sample, as the noise is
    assert not torch.equal(generate(model, num_samples=3, steps=4, seed=7, base=7, eot_id=0)[1], a[1])


def test_sampling_is_seeded(enc):
    model = tiny_model(randomize=True)
    a = generate(model, num_samples=3, steps=5, seed=7, base=256, eot_id=enc.eot_token)
    b = generate(model, num_samples=3, steps=5, seed=7, base=256, eot_id=enc.eot_token)
    c = generate(model, num_samples=3, steps=5, seed=8, base=256, eot_id=enc.eot_token)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 3, 8, 8) and a[1].shape == (3, 64)
    later = generate(model, num_samples=2, steps=5, seed=7, base=256, eot_id=enc.eot_token, first=1)
    assert torch.allclose(later[0], a[0][1:], atol=1e-5)  # sample k is the same in any batch


def test_a_tiny_model_overfits_one_sentence_and_samples_it_back_exactly(enc):
    sentence = "The quick brown fox jumps over the lazy dog."
    canvas, mask = text_canvas(enc.encode_ordinary(sentence), enc.eot_token, 64)
    x, mask = ids_to_image(canvas, 256).expand(16, -1, -1, -1), mask.view(1, 1, 8, 8).expand(16, -1, -1, -1)
    torch.manual_seed(0)
    model = JiT(img_size=8, patch_size=2, n_layer=2, n_head=2, n_embd=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0)
    gen, steps = torch.Generator().manual_seed(0), 1000
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine to zero: base-256 colors need precise pixels
            group['lr'] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        t = torch.sigmoid(torch.randn(16, generator=gen) * 0.8 - 0.8)
        loss = diffusion_loss(model, x, mask, t, torch.randn(x.shape, generator=gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, ids = generate(model, num_samples=4, steps=20, seed=0, base=256, eot_id=enc.eot_token)
    assert [ids_to_text(row, enc) for row in ids.tolist()] == [(sentence, 0)] * 4


# ----------------------------------------------------------------------------- training

def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())


def test_training_logs_saves_and_sample_py_prints_text_and_writes_png(data_dir, tmp_path):
    out = tmp_path / 'out'
    proc = run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4')
    assert 'parameters' in proc.out and 'img/s' in proc.out and 'tok/s' in proc.out and 'mfu' in proc.out
    assert 'val loss' in proc.out
    checkpoint = load(out / 'ckpt.pt')
    assert checkpoint['iter_num'] == 4 and checkpoint['config']['n_embd'] == 32
    assert set(checkpoint) >= {'model', 'ema', 'optimizer', 'config', 'meta', 'iter_num'}
    key = 'blocks.0.adaLN.weight'  # zero at init: the EMA has moved from there, but not all the way to the model
    assert checkpoint['ema'][key].abs().sum() > 0
    assert not torch.equal(checkpoint['ema'][key], checkpoint['model'][key])
    png = tmp_path / 's.png'
    proc = run('sample.py', f'--out_dir={out}', '--num_samples=2', '--steps=3', '--device=cpu', f'--png={png}')
    assert proc.out.count('---------- sample') == 2
    data = png.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    idat = data[data.index(b'IDAT') + 4:data.index(b'IEND') - 8]
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)
    assert height == 256 and width == (8 + 2 + 8) * 32  # two 8x8 images at 32x, a 2-pixel gap between


def assert_same_optimizer_states(a, b, muon):  # two checkpoints: AdamW's state, and Muon's where it ran
    for key in ('optimizer', 'muon') if muon else ('optimizer',):
        assert len(a[key]['state']) == len(b[key]['state']) > 0
        for x, y in zip(a[key]['state'].values(), b[key]['state'].values()):
            assert_same_tensors(x, y)


def logged_losses(out):
    return [float(m) for m in re.findall(r'iter \d+/\d+ \(\d+%\): loss ([0-9.]+)', out)]


@pytest.mark.parametrize('muon', [[], ['--muon_lr=0.02']], ids=['adamw', 'muon'])
def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(data_dir, tmp_path, muon):
    probe = tmp_path / 'probe.py'
    probe.write_text("import os, sys, torch, pixeldlm\n"
                     "pixeldlm.configure(sys.argv[1:])\n"
                     "start = pixeldlm.build_model(None, 'cpu')[0].state_dict()  # seeded: the weights train() starts from\n"
                     "model = pixeldlm.train()\n"
                     "rank = os.environ.get('RANK', 0)\n"
                     "torch.save(model.state_dict(), os.path.join(pixeldlm.out_dir, f'rank{rank}.pt'))\n"
                     "torch.save(start, os.path.join(pixeldlm.out_dir, 'start.pt'))\n")
    # 4 micro-steps: 2 per process, so the first of each runs under no_sync (no all-reduce) and the second syncs
    args = [*TINY, f'--data_dir={data_dir}', '--max_iters=3', '--gradient_accumulation_steps=4', '--dtype=float32',
            *muon]
    ddp = run(f'-m torch.distributed.run --standalone --nproc_per_node=2 {probe}', *args, f'--out_dir={tmp_path}/ddp')
    single = run(str(probe), *args, f'--out_dir={tmp_path}/single')
    rank0, rank1 = load(tmp_path / 'ddp/rank0.pt'), load(tmp_path / 'ddp/rank1.pt')
    alone = load(tmp_path / 'single/rank0.pt')
    assert_same_tensors(rank0, rank1)  # the ranks never drift apart
    if not muon:
        assert_same_tensors(rank0, alone, exact=False)  # and they did what one process does
    else:  # Muon orthogonalizes in bf16 where bf16 is fast: the all-reduced gradient's last bits round differently
        start = load(tmp_path / 'single/start.pt')
        for k in alone:
            moved = (alone[k] - start[k]).abs().max()
            assert (rank0[k] - alone[k]).abs().max() <= 0.01 * moved + 1e-6, k
    initial = tiny_model().state_dict()
    assert not torch.allclose(alone['blocks.0.adaLN.weight'], initial['blocks.0.adaLN.weight'])
    assert len(logged_losses(ddp.out)) == 3  # the logged loss is the mean over ranks, not rank 0's share
    assert logged_losses(ddp.out) == pytest.approx(logged_losses(single.out), abs=2e-4)


@pytest.mark.parametrize('muon', [[], ['--muon_lr=0.02']], ids=['adamw', 'muon'])
def test_resume_continues_exactly(data_dir, tmp_path, muon):
    args = [*TINY, f'--data_dir={data_dir}', '--eval_interval=100', *muon]
    run('pixeldlm.py', *args, f'--out_dir={tmp_path}/straight', '--max_iters=6')
    run('pixeldlm.py', *args, f'--out_dir={tmp_path}/split', '--max_iters=3')
    run('pixeldlm.py', f'--out_dir={tmp_path}/split', '--max_iters=6', '--init_from=resume')  # the rest is saved
    straight, split = load(tmp_path / 'straight/ckpt.pt'), load(tmp_path / 'split/ckpt.pt')
    assert split['iter_num'] == straight['iter_num'] == 6
    assert_same_tensors(straight['model'], split['model'])
    assert_same_tensors(straight['ema'], split['ema'])
    assert_same_optimizer_states(straight, split, muon)


def test_resume_keeps_what_the_run_saved_over_a_preset_and_takes_the_flags(data_dir, tmp_path):
    out = tmp_path / 'out'
    run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--ema_decay=0.5')
    proc = run('pixeldlm.py', '--preset=classroom', f'--out_dir={out}', '--init_from=resume', '--max_iters=3',
               '--beta2=0.5', '--weight_decay=0.1', '--n_layer=3')
    assert 'note: --n_layer=3 is not used' in proc.out and 'n_layer=2' in proc.out
    checkpoint = load(out / 'ckpt.pt')
    config, (group,) = checkpoint['config'], checkpoint['optimizer']['param_groups']
    assert checkpoint['iter_num'] == 3 and config['n_layer'] == 2 and config['img_size'] == 8  # not the preset's
    assert config['ema_decay'] == 0.5 and config['data_dir'] == str(data_dir)  # what the run saved, not the preset's
    assert tuple(group['betas']) == (0.9, 0.5) and group['weight_decay'] == 0.1  # the flags, not the saved state's


def test_muon_is_torchs_update_with_newton_schulz_in_fp32_where_bf16_is_emulated(monkeypatch):
    torch.manual_seed(0)
    shapes = [(8, 24), (24, 8), (16, 16), (8, 24), (24, 8)]  # wide, tall (iterated transposed), square; the same
    # shapes twice, as the same layer of two blocks, which orthogonalize together in one batch
    start = [torch.randn(shape) for shape in shapes]
    params = {name: [w.clone().requires_grad_() for w in start] for name in ('torch', 'bf16', 'fp32')}
    settings = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn='original')
    optimizers = {'torch': torch.optim.Muon(params['torch'], **settings),
                  'bf16': pixeldlm.Muon(params['bf16'], torch.bfloat16, **settings),
                  'fp32': pixeldlm.Muon(params['fp32'], torch.float32, **settings)}
    for _ in range(3):
        grads = [torch.randn(shape) for shape in shapes]
        for name, optimizer in optimizers.items():
            for p, g in zip(params[name], grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, c, w in zip(params['torch'], params['bf16'], params['fp32'], start):
        assert torch.equal(a, b)  # in bf16, bit for bit torch's
        assert (c - w).norm() > 0.1 and torch.allclose(c, a, atol=0.02 * 0.1)  # fp32: within bf16's rounding,
        assert not torch.equal(c, a)  # but not bf16's
    optimizers['fp32'].load_state_dict(optimizers['torch'].state_dict())  # checkpoints saved by torch's still load
    # the training loop orthogonalizes in bf16 only where bf16 matmuls are fast
    for has_bf16 in (True, False):
        monkeypatch.setattr(pixeldlm, 'cpu_has_bf16', lambda: has_bf16)
        for key, value in dict(muon_lr=0.02, img_size=4, patch_size=2, n_layer=1, n_head=2, n_embd=16).items():
            monkeypatch.setattr(pixeldlm, key, value)
        optimizers = pixeldlm.build_model(None, 'cpu')[2]
        assert optimizers[1].ns_dtype == (torch.bfloat16 if has_bf16 else torch.float32)


def test_muon_steps_the_blocks_matrices_adamw_the_rest_and_resume_keeps_the_choice(data_dir, tmp_path):
    args = [*TINY, f'--data_dir={data_dir}', '--max_iters=2']
    run('pixeldlm.py', *args, f'--out_dir={tmp_path}/muon', '--muon_lr=0.02')
    checkpoint = load(tmp_path / 'muon/ckpt.pt')
    model = pixeldlm.model_from_config(checkpoint['config'])
    matrices = [n for n, p in model.named_parameters() if n.endswith(('qkv.weight', 'proj.weight', 'mlp.w12.weight',
                                                                        'mlp.w3.weight'))]
    others = [p for n, p in model.named_parameters() if n not in matrices]
    assert len(matrices) == 2 * 4  # two blocks; adaLN's matrix stays on AdamW
    shapes = lambda tensors: sorted(tuple(t.shape) for t in tensors)
    assert shapes(s['momentum_buffer'] for s in checkpoint['muon']['state'].values()) == \
        shapes(model.get_parameter(n) for n in matrices)
    assert shapes(s['exp_avg'] for s in checkpoint['optimizer']['state'].values()) == shapes(others)
    saved = (tmp_path / 'muon/ckpt.pt').read_bytes()
    proc = run('pixeldlm.py', f'--out_dir={tmp_path}/muon', '--init_from=resume', '--max_iters=4', '--muon_lr=0',
               check=False)
    assert proc.returncode != 0 and '--muon_lr=0.02; resume it with Muon on' in proc.out, proc.out
    assert (tmp_path / 'muon/ckpt.pt').read_bytes() == saved
    run('pixeldlm.py', *args, f'--out_dir={tmp_path}/adamw')
    assert 'muon' not in load(tmp_path / 'adamw/ckpt.pt')
    proc = run('pixeldlm.py', f'--out_dir={tmp_path}/adamw', '--init_from=resume', '--max_iters=4',
               '--muon_lr=0.02', check=False)
    assert proc.returncode != 0 and '--muon_lr=0; resume it with Muon off' in proc.out, proc.out


def test_learning_rate_warms_up_then_stays_or_follows_the_cosine(monkeypatch):
    for key, value in dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110).items():
        monkeypatch.setattr(pixeldlm, key, value)
    monkeypatch.setattr(pixeldlm, 'decay_lr', False)
    assert [pixeldlm.get_lr(i) for i in (0, 4, 9, 10, 1000)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    monkeypatch.setattr(pixeldlm, 'decay_lr', True)
    assert pixeldlm.get_lr(60) == pytest.approx(0.55) and pixeldlm.get_lr(110) == pixeldlm.get_lr(500) == 0.1


# ----------------------------------------------------------------------------- bad input

def test_configure_parses_types_and_presets(monkeypatch):
    for key in pixeldlm.config_keys:
        monkeypatch.setattr(pixeldlm, key, getattr(pixeldlm, key))  # restored after the test
    pixeldlm.configure(['--preset=classroom', '--n_layer', '3', '--learning_rate=1', '--compile=True',
                        '--color_base=7'])  # 0, the default, would look the base up in the data
    assert pixeldlm.img_size == 16 and pixeldlm.n_layer == 3  # from the preset, then overridden
    assert pixeldlm.learning_rate == 1.0 and isinstance(pixeldlm.learning_rate, float)
    assert pixeldlm.compile is True


@pytest.mark.parametrize('args, message', [
    (['--n_layers=3'], 'unknown config key --n_layers (did you mean --n_layer?)'),
    (['--n_layer=three'], '--n_layer takes a int like 12'),
    (['--compile=maybe'], '--compile takes True or False'),
    (['--preset=huge'], 'unknown preset'),
    (['n_layer=3'], 'config values are given as --key=value'),
])
def test_bad_config_is_a_clear_error(args, message):
    proc = run('pixeldlm.py', *args, check=False)
    assert proc.returncode != 0 and message in proc.out and 'Traceback' not in proc.out


def test_missing_data_or_checkpoint_is_a_clear_error(data_dir, tmp_path):
    proc = run('pixeldlm.py', *TINY, f'--data_dir={tmp_path}/nowhere', f'--out_dir={tmp_path}/o', check=False)
    assert proc.returncode != 0 and 'run `python prepare_data.py` first' in proc.out
    proc = run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/o', '--init_from=resume',
               check=False)
    assert proc.returncode != 0 and 'ckpt.pt does not exist' in proc.out
    proc = run('sample.py', f'--out_dir={tmp_path}/o', check=False)
    assert proc.returncode != 0 and 'ckpt.pt not found' in proc.out and 'Traceback' not in proc.out


def test_a_fresh_run_never_overwrites_a_checkpoint_and_a_prompt_needs_a_conditional_model(data_dir, tmp_path):
    out = tmp_path / 'out'
    run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=1')
    before = (out / 'ckpt.pt').read_bytes()
    proc = run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', check=False)
    assert proc.returncode != 0 and 'already exists' in proc.out and '--init_from=resume' in proc.out
    assert (out / 'ckpt.pt').read_bytes() == before
    proc = run('sample.py', f'--out_dir={out}', '--prompt=What is a list?', check=False)
    assert proc.returncode != 0 and 'trained on plain text only' in proc.out


def test_checkpoints_load_without_running_code(data_dir, tmp_path):
    out = tmp_path / 'out'
    run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=1')

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path}/pwned',))
    checkpoint = load(out / 'ckpt.pt')
    checkpoint['meta'] = Evil()
    torch.save(checkpoint, out / 'ckpt.pt')
    for proc in (run('sample.py', f'--out_dir={out}', check=False),
                 run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
                     '--init_from=resume', check=False)):
        assert proc.returncode != 0 and 'refusing to load' in proc.out and 'Traceback' not in proc.out
    assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('content, message', [
    (b'', 'is empty'),
    (b'caf\xe9 au lait', 'is not UTF-8 text'),
    (b'{"title": "no text field"}\n', 'needs a "text" string, or "prompt" and "answer"'),
])
def test_bad_input_files_are_clear_errors_and_keep_the_data_already_prepared(tmp_path, content, message):
    out = tmp_path / 'data'
    good = tmp_path / 'good.txt'
    good.write_text("A document that is long enough to split. " * 20)
    run('prepare_data.py', f'--input={good}', f'--out_dir={out}')
    before = {name: (out / name).read_bytes() for name in ('train.bin', 'val.bin', 'meta.json')}
    bad = tmp_path / ('bad.jsonl' if b'title' in content else 'bad.txt')
    bad.write_bytes(content)
    proc = run('prepare_data.py', '--input', str(good), str(bad), f'--out_dir={out}', check=False)
    assert proc.returncode != 0 and message in proc.out and str(bad) in proc.out and 'Traceback' not in proc.out
    assert {name: (out / name).read_bytes() for name in before} == before


def test_prepared_data_ends_every_document_with_end_of_text(tmp_path, enc):
    docs = tmp_path / 'docs.jsonl'
    docs.write_text('\n'.join(json.dumps({'text': f"Document number {i} says hello."}) for i in range(20)))
    run('prepare_data.py', f'--input={docs}', f'--out_dir={tmp_path}/d')
    meta = json.loads((tmp_path / 'd/meta.json').read_text())
    train = np.fromfile(tmp_path / 'd/train.bin', dtype=np.uint32)
    val = np.fromfile(tmp_path / 'd/val.bin', dtype=np.uint32)
    assert meta['eot_id'] == enc.eot_token and meta['vocab_size'] == enc.n_vocab
    assert train[-1] == val[-1] == enc.eot_token
    texts = enc.decode(np.concatenate([train, val]).tolist()).split('<|endoftext|>')
    assert texts[0] == "Document number 0 says hello." and (train == enc.eot_token).sum() >= 18


# ----------------------------------------------------------------------------- quality report

def test_recovery_is_perfect_for_a_perfect_model_and_near_zero_for_noise(enc):
    texts = [enc.encode_ordinary("Tuples are immutable sequences."), enc.encode_ordinary("x" * 300)]
    canvases = [text_canvas(text[:63], enc.eot_token, 64) for text in texts]
    ids, mask = torch.cat([c[0] for c in canvases]), torch.cat([c[1] for c in canvases])
    noise = torch.randn(2, 3, 8, 8)
    perfect = FixedPrediction(ids_to_image(ids, 256))
    assert sample.recovery_accuracy(perfect, ids, mask, 0.5, noise, 256, enc.eot_token) == (1.0, 1.0)
    wrong_padding = ids_to_image(ids, 256)
    wrong_padding.view(2, 3, -1)[0, :, 20:] = 0.5  # text 0 ends before pixel 20: only its padding is wrong
    assert sample.recovery_accuracy(FixedPrediction(wrong_padding), ids, mask, 0.5, noise, 256,
                                      enc.eot_token) == (1.0, 1.0)
    noisy = FixedPrediction(torch.rand(2, 3, 8, 8) * 2 - 1)
    accuracy, eot_accuracy = sample.recovery_accuracy(noisy, ids, mask, 0.5, noise, 256, enc.eot_token)
    assert accuracy < 0.05 and eot_accuracy == 0.0


def test_sample_statistics_span_floor_to_ceiling_and_count_invalid_colors(data_dir, enc):
    train = pixeldlm.load_tokens(data_dir, 'train')
    rng = np.random.default_rng(0)
    real, _ = pixeldlm.get_batch(pixeldlm.load_tokens(data_dir, 'val'), rng, 16, 256, enc.eot_token)
    real = torch.from_numpy(real)
    as_good_as_real = sample.sample_statistics(real.tolist(), real.tolist(), train, enc, rng)
    assert as_good_as_real['bigram_hits'] == as_good_as_real['bigram_ceiling'] > 0.5
    assert as_good_as_real['valid_ids'] == 1.0
    assert as_good_as_real['entropy'] == pytest.approx(as_good_as_real['entropy_real'])
    assert as_good_as_real['word_hits'] == as_good_as_real['word_ceiling'] > as_good_as_real['word_floor'] + 0.1
    unigram = np.bincount(np.asarray(train, dtype=np.int64), minlength=enc.n_vocab).astype(float)
    unigram[enc.eot_token] = 0
    word_salad = rng.choice(enc.n_vocab, size=(16, 256), p=unigram / unigram.sum())
    salad = sample.sample_statistics(word_salad.tolist(), real.tolist(), train, enc, rng)
    assert abs(salad['bigram_hits'] - salad['bigram_floor']) < 0.05
    # random cl100k_base tokens are mostly words: the word floor is such tokens, not letter soup
    assert abs(salad['word_hits'] - salad['word_floor']) < 0.1 and salad['word_floor'] > 0.3
    assert salad['bigram_ceiling'] - salad['bigram_floor'] > 0.3
    assert salad['ended'] == 0.0
    broken = real.clone()
    broken[:, :10] = 16_000_000  # colors that decode to no id at all
    stats = sample.sample_statistics(broken.tolist(), real.tolist(), train, enc, rng)
    n_text = sum(len(text_part(row, enc.eot_token)) for row in broken.tolist())
    assert stats['valid_ids'] == pytest.approx(1 - 160 / n_text)


def test_entropy_is_in_bits():
    assert sample.entropy_bits([0, 1]) == 1.0 and sample.entropy_bits([5, 5, 5]) == 0.0
    assert sample.entropy_bits([0, 1, 2, 3] * 3) == 2.0


def test_quality_report_is_seeded(data_dir, enc):
    model = tiny_model(randomize=True)
    reports = [sample.quality_report(model, enc, data_dir, 256, -0.8, 0.8, seed, steps=3, n_windows=8,
                                       n_samples=4) for seed in (1, 1, 2)]
    for r in reports:
        r.pop('seconds_per_sample')
    np.testing.assert_equal(reports[0], reports[1])  # NaN (no text ends inside an 8x8 window) equals NaN here
    assert reports[0]['val_loss'] != reports[2]['val_loss']


# ----------------------------------------------------------------------------- prompts and answers

def pair_texts(data_dir, split):
    enc = get_encoding('bytes')
    stream, bounds = pixeldlm.load_pairs(data_dir, split, enc.eot_token)
    return [(enc.decode(stream[a:b].tolist()), enc.decode(stream[c:d].tolist())) for a, b, c, d in bounds]


def test_prepare_data_writes_pairs_and_text_side_by_side(tmp_path):
    lines = [{'text': f"Document {i} is plain text."} for i in range(30)]
    lines += [{'prompt': f"question {i}", 'answer': f"answer {i}"} for i in range(30)]
    (tmp_path / 'mixed.jsonl').write_text('\n'.join(json.dumps(line) for line in lines))
    run('prepare_data.py', f'--input={tmp_path}/mixed.jsonl', '--encoding=bytes', f'--out_dir={tmp_path}/d')
    meta = json.loads((tmp_path / 'd/meta.json').read_text())
    assert meta['documents'] == 30 and meta['train_pairs'] == 27 and meta['val_pairs'] == 3
    held = [4, 12, 25]  # pair k is held out when frac((k+1) * golden ratio) < 0.1: spread out, not the last ones
    assert np.flatnonzero(prepare_data.held_out(0, 30, 0.1)).tolist() == held
    assert pair_texts(tmp_path / 'd', 'val') == [(f"question {i}", f"answer {i}") for i in held]
    assert pair_texts(tmp_path / 'd', 'train') == [(f"question {i}", f"answer {i}") for i in range(30) if i not in held]
    assert b'question' not in (tmp_path / 'd/train.bin').read_bytes()  # pairs are not text windows


def test_generated_tasks_are_correct_and_held_out_prompts_are_new(tmp_path):
    for task in ('copy', 'reverse', 'sort'):
        run('prepare_data.py', f'--task={task}', '--encoding=bytes', '--num_pairs=300',
            f'--out_dir={tmp_path}/{task}')
        train, val = pair_texts(tmp_path / task, 'train'), pair_texts(tmp_path / task, 'val')
        assert len(train) + len(val) == 300 and len(val) == prepare_data.held_out(0, 300, 0.1).sum() == 29
        assert not {p for p, _ in val} & {p for p, _ in train}
        for prompt, answer in train + val:
            words = prompt.split()
            expected = words if task == 'copy' else words[::-1] if task == 'reverse' else sorted(words, key=int)
            assert answer.split() == expected and 2 <= len(words) <= 8


def test_condition_dropout_drops_prompts_at_the_given_rate(copy_dir):
    pairs = pixeldlm.load_pairs(copy_dir, 'train', 256)
    for cond_drop in (0.0, 0.1, 0.5, 1.0):
        kept = []
        for seed in range(400):
            prompts, ids, mask = pixeldlm.get_pair_batch(pairs, np.random.default_rng(seed), 32, 64, 256, cond_drop)
            assert ids.shape == (32, 64) and mask.shape == (32, 64) and prompts.shape[1:] == (64,)
            for prompt, row in zip(prompts.tolist(), ids.tolist()):  # a copy task: each kept prompt is its own answer
                text = text_part(row, 256)
                assert prompt == text + [256] * (64 - len(text))  # then its end-of-text and padding
            kept.append(len(prompts))
        assert 1 - np.mean(kept) / 32 == pytest.approx(cond_drop, abs=0.006)
        assert len(set(kept)) <= 2  # two batch shapes at most, friendly to torch.compile


def test_guidance_one_is_the_conditional_prediction_and_zero_the_unconditional_one():
    model = tiny_model(randomize=True)
    z, t, cond = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 3, 8, 8)
    conditional, unconditional = model(z, t, cond), model(z, t)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert torch.allclose(pixeldlm.predict(model, z, t, cond, 1.0), conditional, atol=1e-6)
    assert torch.allclose(pixeldlm.predict(model, z, t, cond, 0.0), unconditional, atol=1e-5)
    calls.clear()
    guided = pixeldlm.predict(model, z, t, cond, 3.0)
    assert torch.allclose(guided, unconditional + 3 * (conditional - unconditional), atol=1e-5)
    assert len(calls) == 1  # both halves in one batched call


def test_prompt_pixels_are_the_same_in_training_and_sampling(copy_dir, tmp_path):
    probe = tmp_path / 'probe.py'
    probe.write_text("""
import sys, torch, pixeldlm, prepare_data
seen, forward = [], pixeldlm.JiT.forward
def spy_forward(self, z, t, cond=None, logits=False):
    seen.append(cond)
    return forward(self, z, t, cond, logits)
pixeldlm.JiT.forward = spy_forward
pixeldlm.configure(sys.argv[1:])
model = pixeldlm.train()
trained = seen[0][:1]  # the first prompt image of the first training step
enc = prepare_data.get_encoding('bytes')
ids = pixeldlm.image_to_ids(trained, 7, model.tile)[0].tolist()  # as the model fills images
text = enc.decode(ids[:ids.index(enc.eot_token)])
seen.clear()  # now the same prompt as a user types it, encoded the way sample.py encodes it
pixeldlm.generate(model.eval(), 1, 2, 0, 7, enc.eot_token, prompts=[enc.encode_ordinary(text)])
assert torch.equal(seen[0], trained)  # every pixel, the padding too
print('same pixels for', repr(text))
""")
    proc = run(str(probe), *TINY, f'--data_dir={copy_dir}', f'--out_dir={tmp_path}/o', '--max_iters=1',
               '--objective=digits', '--color_base=0')
    assert 'same pixels for' in proc.out


def test_sample_py_answers_prompts_and_refuses_one_too_long(copy_dir, tmp_path):
    out = tmp_path / 'out'
    proc = run('pixeldlm.py', *TINY, f'--data_dir={copy_dir}', f'--out_dir={out}', '--max_iters=2',
               '--objective=digits', '--color_base=0', '--guidance=1.5')
    assert 'prompt dropped 10% of the time' in proc.out
    proc = run('sample.py', f'--out_dir={out}', '--prompt=alpha beta', '--steps=3')
    assert "prompt 0: 'alpha beta' (guidance 1.5" in proc.out
    (tmp_path / 'prompts.txt').write_text("first prompt\nsecond prompt\n")
    png = tmp_path / 'answers.png'
    proc = run('sample.py', f'--out_dir={out}', f'--prompt_file={tmp_path}/prompts.txt', '--guidance=1',
               '--steps=2', f'--png={png}')
    assert "prompt 1: 'second prompt' (guidance 1," in proc.out
    data = png.read_bytes()
    assert int.from_bytes(data[16:20], 'big') == (8 + 1 + 8 + 2 + 8 + 1 + 8) * 32  # prompt | answer, twice
    proc = run('sample.py', f'--out_dir={out}', '--prompt=' + 'x' * 64, check=False)
    assert proc.returncode != 0 and 'does not fit' in proc.out and 'at most 63' in proc.out
    assert 'Traceback' not in proc.out
    proc = run('sample.py', f'--out_dir={out}', '--eval', '--steps=2', '--guidance=2')
    assert 'guidance w=1' in proc.out and 'guidance w=2' in proc.out and 'exact match' in proc.out


def test_fine_tuning_starts_from_the_pretrained_weights(copy_dir, tmp_path):
    text = tmp_path / 'text'
    run('prepare_data.py', '--encoding=bytes', f'--out_dir={text}')
    args = [*TINY, '--objective=digits', '--color_base=0']
    run('pixeldlm.py', *args, f'--data_dir={text}', f'--out_dir={tmp_path}/pre', '--max_iters=2')
    proc = run('pixeldlm.py', *TINY, f'--data_dir={copy_dir}', f'--out_dir={tmp_path}/tuned', '--max_iters=1',
               f'--init_from={tmp_path}/pre/ckpt.pt', '--learning_rate=0')  # lr 0: nothing may move
    assert 'from iter 0' in proc.out and 'base 7' in proc.out  # the model keys come from the checkpoint
    assert_same_tensors(load(tmp_path / 'pre/ckpt.pt')['ema'], load(tmp_path / 'tuned/ckpt.pt')['ema'])
    before = (tmp_path / 'pre/ckpt.pt').read_bytes()  # fine-tuning into a folder with a checkpoint, its own source
    proc = run('pixeldlm.py', *TINY, f'--data_dir={copy_dir}', f'--out_dir={tmp_path}/pre', '--max_iters=1',
               f'--init_from={tmp_path}/pre/ckpt.pt', check=False)
    assert proc.returncode != 0 and 'already exists' in proc.out and (tmp_path / 'pre/ckpt.pt').read_bytes() == before
    proc = run('pixeldlm.py', *TINY, f'--data_dir={data_dir_cl100k(tmp_path)}', f'--out_dir={tmp_path}/x',
               f'--init_from={tmp_path}/pre/ckpt.pt', check=False)
    assert proc.returncode != 0 and 'same encoding' in proc.out and 'Traceback' not in proc.out
    proc = run('pixeldlm.py', *TINY, f'--data_dir={copy_dir}', f'--out_dir={tmp_path}/y', '--init_from=nowhere.pt',
               check=False)
    assert proc.returncode != 0 and "'nowhere.pt' is none of these" in proc.out


def data_dir_cl100k(tmp_path):
    (tmp_path / 'c.txt').write_text("Some text to tokenize with cl100k_base. " * 30)
    run('prepare_data.py', f'--input={tmp_path}/c.txt', f'--out_dir={tmp_path}/c')
    return tmp_path / 'c'


def test_text_and_pairs_train_together_and_an_over_long_pair_is_a_clear_error(tmp_path):
    lines = [{'text': f"Document {i} is plain text."} for i in range(30)]
    lines += [{'prompt': f"q{i}", 'answer': f"a{i}"} for i in range(30)]
    (tmp_path / 'mixed.jsonl').write_text('\n'.join(json.dumps(line) for line in lines))
    run('prepare_data.py', f'--input={tmp_path}/mixed.jsonl', '--encoding=bytes', f'--out_dir={tmp_path}/d')
    proc = run('pixeldlm.py', *TINY, f'--data_dir={tmp_path}/d', f'--out_dir={tmp_path}/o', '--max_iters=2')
    assert '2 per micro-batch' in proc.out and 'text windows fill the rest' in proc.out
    (tmp_path / 'long.jsonl').write_text('\n'.join(json.dumps({'prompt': 'p' * n, 'answer': 'a'}) for n in
                                                    (70, 1, 2, 3, 4, 5, 6, 7, 8, 9)))
    run('prepare_data.py', f'--input={tmp_path}/long.jsonl', '--encoding=bytes', f'--out_dir={tmp_path}/long')
    proc = run('pixeldlm.py', *TINY, f'--data_dir={tmp_path}/long', f'--out_dir={tmp_path}/o2', check=False)
    assert proc.returncode != 0 and 'of 70 tokens' in proc.out and '--img_size' in proc.out
    assert 'Traceback' not in proc.out


def test_answer_accuracy_is_perfect_for_a_copier_and_zero_for_a_model_that_ignores_prompts(copy_dir):
    enc = get_encoding('bytes')

    class Copier(torch.nn.Module):  # x_hat = the prompt image, or flat grey without one
        digit_classes, token_classes, grid, patch_size, tile, pos_embed = 0, 0, 4, 2, 1, torch.zeros(1)

        def forward(self, z, t, cond=None, logits=False):
            out = torch.zeros_like(z)
            if cond is not None:
                out[:len(cond)] = cond
            return out
    pairs = pixeldlm.load_pairs(copy_dir, 'val', enc.eot_token)
    exact, per_token, _ = sample.answer_accuracy(Copier(), enc, pairs, 7, 3, 1.0, guidance=1.0)
    assert exact == per_token == 1.0
    exact, per_token, _ = sample.answer_accuracy(Copier(), enc, pairs, 7, 3, 1.0, guidance=0.0)
    assert exact == 0.0 and per_token < 0.05
    sizes, generate = [], sample.generate

    def counting_generate(model, n, *args, **kwargs):
        out = generate(model, n, *args, **kwargs)
        sizes.append(len(out[1]))
        return out
    with pytest.MonkeyPatch.context() as patch:  # in batches of 8, each batch with its own prompts
        patch.setattr(sample, 'generate', counting_generate)
        exact, per_token, _ = sample.answer_accuracy(Copier(), enc, pairs, 7, 3, 1.0, guidance=1.0, batch_size=8)
    assert exact == per_token == 1.0 and sizes == [8, 8, 3]  # the 19 held-out prompts

    class NeverStops(Copier):  # copies the prompt but writes 'x' where the end-of-text belongs
        def forward(self, z, t, cond=None, logits=False):
            ids = image_to_ids(super().forward(z, t, cond), 7)
            return ids_to_image(ids.masked_fill(ids == enc.eot_token, ord('x')), 7)
    exact, per_token, _ = sample.answer_accuracy(NeverStops(), enc, pairs, 7, 3, 1.0, guidance=1.0)
    assert exact == 0.0 and 0.8 < per_token < 1.0  # every word right, but the answer never ends


# ----------------------------------------------------------------------------- the real run

def start(script, *args, env=None):
    """Start a project script in the background; read its output (stdout and stderr) line by line."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, **(env or {}))
    return subprocess.Popen([sys.executable, *script.split(), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_with_children(proc):  # torchrun's workers run in sessions of their own
    for pid in children(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.kill()


def read_until(proc, pattern, timeout=120):
    """The output of a running process up to the first line that matches pattern (killed after timeout s)."""
    lines, deadline = [], threading.Timer(timeout, kill_with_children, (proc,))
    deadline.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                return ''.join(lines)
    finally:
        deadline.cancel()
    raise AssertionError(f"the process ended without printing {pattern!r}:\n{''.join(lines)}")


def children(pid):  # (Linux /proc)
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            if int(open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except OSError:
            pass
    return found


def worker_of(agent_pid, rank):
    """The pid of the torchrun worker with this RANK, a child of the torchrun process agent_pid."""
    for pid in children(agent_pid):
        try:
            if f'RANK={rank}'.encode() in open(f'/proc/{pid}/environ', 'rb').read().split(b'\0'):
                return pid
        except OSError:
            pass
    raise AssertionError(f"no worker with RANK={rank} under process {agent_pid}")


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):  # a tiny trained run to sample from and to break
    out = tmp_path_factory.mktemp('trained') / 'out'
    run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2')
    return out


def test_a_gpu_is_named_by_its_index_alone_and_under_torchrun(monkeypatch):
    reached = []

    def set_device(dev):  # torch.cuda.set_device parses its argument like this first; a bare 'cuda' raises
        reached.append(torch.cuda._utils._get_device_index(dev))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', set_device)
    for name, local_rank, ddp, expected in [('auto', 0, False, 0), ('cuda', 0, False, 0), ('cuda:1', 0, False, 1),
                                            ('auto', 1, True, 1), ('cuda', 1, True, 1), ('cuda', 0, True, 0)]:
        reached.clear()
        dev = pixeldlm.setup_device(name, local_rank, ddp)
        assert dev == f'cuda:{expected}' and reached == [expected]
        assert torch.device(dev).index == expected  # what .to(dev) and DDP's device_ids get
    with pytest.raises(SystemExit, match='LOCAL_RANK'):  # two processes on one GPU would be a silent mistake
        pixeldlm.setup_device('cuda:1', 0, ddp=True)
    with pytest.raises(SystemExit, match='has 2 GPU'):
        pixeldlm.setup_device('cuda:2')
    assert sample.setup_device is pixeldlm.setup_device  # sample.py sets up its device the same way
    reached.clear()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert pixeldlm.setup_device('auto') in ('cpu', 'mps') and reached == []
    with pytest.raises(SystemExit, match='sees no CUDA GPU'):
        pixeldlm.setup_device('cuda')


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason="glibc's settings; other C libraries keep theirs")
def test_a_cpu_process_keeps_freed_memory_for_its_next_step():
    # a step's shape: many big buffers alive at once, then all freed; the second step should find them in place
    probe = """
import resource, sys, torch, pixeldlm
if sys.argv[1] == 'cpu':
    pixeldlm.setup_device('cpu')
def step():
    buffers = [torch.ones(3_000_000) for _ in range(10)]  # 10 x 12 MB
    del buffers
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {how: int(subprocess.run([sys.executable, '-c', probe, how], capture_output=True, text=True, check=True,
                                      cwd=os.path.dirname(os.path.abspath(__file__))).stdout)
              for how in ('cpu', 'none')}
    assert faults['none'] > 20_000  # glibc's default gives the 120 MB back and faults its 29,000 pages in again
    assert faults['cpu'] < faults['none'] // 2  # 3,000-9,000 pages: the heap keeps them


def test_prepare_data_reads_folders_and_gz_the_same_for_any_num_proc(tmp_path, enc):
    import gzip
    corpus = tmp_path / 'corpus'
    (corpus / 'more').mkdir(parents=True)
    docs = [f"Document {i} is about {'lists' if i % 2 else 'tuples'}." + " More words here." * (i % 5)
            for i in range(90)]
    (corpus / 'a.jsonl').write_text('\n'.join(json.dumps({'text': d}) for d in docs[:30]))
    with gzip.open(corpus / 'more/b.jsonl.gz', 'wt') as f:
        f.write('\n'.join(json.dumps({'text': d}) for d in docs[30:60]))
    (corpus / 'c.txt').write_text('\n'.join(docs[60:75]))  # one document, read in pieces
    with gzip.open(corpus / 'more/d.txt.gz', 'wt') as f:
        f.write('\n'.join(docs[75:]))
    (corpus / 'notes.md').write_text("not a corpus file")
    folders = {}
    for num_proc in (1, 3):
        run('prepare_data.py', f'--input={corpus}', f'--num_proc={num_proc}', f'--out_dir={tmp_path}/d{num_proc}')
        folders[num_proc] = {p.name: p.read_bytes() for p in (tmp_path / f'd{num_proc}').iterdir()}
    assert folders[1] == folders[3]  # the same files, byte for byte, however many processes tokenize
    meta = json.loads(folders[1]['meta.json'])
    assert meta['documents'] == 62 and meta['files'] == {'train.bin': len(folders[1]['train.bin']),
                                                         'val.bin': len(folders[1]['val.bin'])}
    train, val = (enc.decode(np.frombuffer(folders[1][name], dtype=np.uint32).tolist()) for name in ('train.bin',
                                                                                                      'val.bin'))
    assert 'not a corpus file' not in train + val
    held = np.flatnonzero(prepare_data.held_out(0, 30, 0.1))  # a.jsonl comes first: its documents are records 0-29
    assert val.split('<|endoftext|>')[:len(held)] == [docs[i] for i in held]
    assert train.split('<|endoftext|>')[:2] == docs[:2] and 0 not in held
    for doc in docs[:60]:  # every .jsonl document lands whole in one split
        assert (f'{doc}<|endoftext|>' in train) != (f'{doc}<|endoftext|>' in val)


def test_a_txt_file_is_one_document_read_in_pieces_that_go_to_train_or_val(tmp_path):
    text = ''.join(f"Line {i}: {'some words ' * (i % 9)}\n{'   indented' if i % 4 == 0 else ''}\n"
                   for i in range(300))
    (tmp_path / 'book.txt').write_text(text)
    raw = text.encode()
    pieces = [block for block, _, _ in prepare_data.read_file(str(tmp_path / 'book.txt'), max(64, len(raw) // 64),
                                                               whole_lines=False)]
    assert b''.join(pieces) == raw and 40 <= len(pieces) <= 64
    for piece, following in zip(pieces, pieces[1:]):  # a cut falls after a line end, before a non-space
        assert piece.endswith(b'\n') and not following[:1].isspace()
    held = prepare_data.held_out(0, len(pieces), 0.1)
    run('prepare_data.py', f'--input={tmp_path}/book.txt', '--encoding=bytes', f'--out_dir={tmp_path}/d')
    train = np.fromfile(tmp_path / 'd/train.bin', dtype=np.uint32)
    val = np.fromfile(tmp_path / 'd/val.bin', dtype=np.uint32)
    assert train[-1] == val[-1] == 256 and (train == 256).sum() == (val == 256).sum() == 1  # one document
    assert bytes(train[:-1].astype(np.uint8)) == b''.join(p for p, h in zip(pieces, held) if not h)
    assert bytes(val[:-1].astype(np.uint8)) == b''.join(p for p, h in zip(pieces, held) if h)


def test_batches_are_pure_functions_of_seed_and_key_and_prefetch_keeps_them(copy_dir, monkeypatch):
    for key, value in dict(data_dir=copy_dir, img_size=8, batch_size=6, color_base=7, cond_drop=0.5, seed=3).items():
        monkeypatch.setattr(pixeldlm, key, value)
    data = pixeldlm.load_data()
    keys = [(0, it, micro) for it in range(3) for micro in range(2)]
    direct = [pixeldlm.make_batch(data, 'train', key) for key in keys]
    fetched = list(pixeldlm.prefetch(lambda key: pixeldlm.make_batch(data, 'train', key), keys))
    assert len(fetched) == len(keys) and all(waited >= 0 for _, waited in fetched)
    for a, (b, _) in zip(direct, fetched):
        assert a.keys() == b.keys()
        for name in a:
            same = torch.equal(a[name], b[name]) if isinstance(a[name], torch.Tensor) else a[name] == b[name]
            assert same, name
    assert not torch.equal(direct[0]['ids'], direct[1]['ids'])
    assert direct[0]['ids'].dtype == torch.int32 and direct[0]['ids'].shape == (6, 64)
    assert direct[0]['n_tokens'] == int(direct[0]['mask'].sum()) and direct[0]['n_prompts'] <= 6


def test_two_nodes_train_exactly_what_one_process_trains(data_dir, tmp_path):
    args = [*TINY, f'--data_dir={data_dir}', '--max_iters=3', '--gradient_accumulation_steps=4', '--dtype=float32']
    env = dict(NNODES='2', NPROC='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    nodes = [subprocess.Popen(['bash', 'train_8gpu.sh', *args, f'--out_dir={tmp_path}/nodes'], cwd=REPO, text=True,
                              env=dict(os.environ, **env, NODE_RANK=str(r), OMP_NUM_THREADS='1'),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert 'x 2 process(es)' in outputs[0] and 'global batch 16 = 4 x 4 micro-steps' in outputs[0]
    single = run('pixeldlm.py', *args, f'--out_dir={tmp_path}/single')
    assert logged_losses(outputs[0]) == pytest.approx(logged_losses(single.out), abs=2e-4)
    assert_same_tensors(load(tmp_path / 'nodes/ckpt.pt')['model'], load(tmp_path / 'single/ckpt.pt')['model'],
                        exact=False)


def test_the_last_step_is_chosen_by_its_index_for_any_time_shift():
    class TwoMinded(torch.nn.Module):  # half-sure between digits 0 and 6: the mean color would be digit 3
        digit_classes, token_classes = 7, 0

        def forward(self, z, t, cond=None, logits=False):
            scores = torch.full((len(z), 7, 3, 2, 2), -9.0)
            scores[:, 0], scores[:, 6] = 0.0, 0.2
            return scores if logits else (scores.softmax(dim=1) * torch.linspace(-1, 1, 7).view(1, 7, 1, 1, 1)).sum(1)
    x = torch.rand(1, 3, 2, 2) * 2 - 1
    for shift in (1.0, 3.0, 8.0, 8.669, 0.37, 12.345):  # 8.669's grid ends at 0.99999988 in float32
        assert torch.equal(ddim_sample(TwoMinded(), torch.randn(1, 3, 2, 2), steps=20, time_shift=shift),
                           torch.ones(1, 3, 2, 2))
        pixels = FixedPrediction(x)
        assert torch.equal(ddim_sample(pixels, torch.randn(1, 3, 2, 2), steps=7, time_shift=shift), x)
        assert len(pixels.calls) == 7


def test_bf16_trains_and_samples_on_a_cpu(data_dir, tmp_path, enc):
    out = tmp_path / 'out'
    proc = run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3',
               '--dtype=bfloat16', '--objective=digits', '--color_base=0')
    assert 'bf16 autocast' in proc.out and len(logged_losses(proc.out)) == 3
    proc = run('sample.py', f'--out_dir={out}', '--num_samples=2', '--steps=3', '--dtype=bfloat16')
    assert proc.out.count('---------- sample') == 2
    model = JiT(img_size=8, patch_size=2, n_layer=2, n_head=2, n_embd=32, digit_classes=47)
    model.load_state_dict(load(out / 'ckpt.pt')['ema'])
    ids, mask = text_canvas(enc.encode_ordinary("Lists are mutable."), enc.eot_token, 64)
    x, mask, t, noise = ids_to_image(ids, 47), mask.view(1, 1, 8, 8), torch.tensor([0.6]), torch.randn(1, 3, 8, 8)
    fp32 = diffusion_loss(model, x, mask, t, noise, 47)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16 = diffusion_loss(model, x, mask, t, noise, 47)
        assert model(x, t).dtype == torch.float32  # the output layer runs in fp32
        sampled = ddim_sample(model, noise, steps=3)
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(fp32.item(), rel=0.02)
    assert torch.equal(ids_to_image(image_to_ids(sampled, 47), 47), sampled)  # every pixel an exact digit color


def test_auto_precision_and_fp32_attention_on_a_cpu(monkeypatch):
    for has_bf16 in (True, False):
        monkeypatch.setattr(pixeldlm, 'cpu_has_bf16', lambda: has_bf16)
        assert isinstance(pixeldlm.autocast_for('cpu', 'auto'), torch.autocast) == has_bf16
        assert isinstance(pixeldlm.autocast_for('cpu', 'bfloat16'), torch.autocast)
        assert not isinstance(pixeldlm.autocast_for('cpu', 'float32'), torch.autocast)
        assert not isinstance(pixeldlm.autocast_for('mps', 'auto'), torch.autocast)
    model, dtypes = tiny_model(), {}
    layers = {'qkv': model.blocks[0].attn.qkv, 'proj': model.blocks[0].attn.proj, 'w12': model.blocks[0].mlp.w12,
              'block': model.blocks[0]}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda module, args, out, name=name: dtypes.update({name: out.dtype}))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(torch.randn(2, 3, 8, 8), torch.rand(2))
    # bf16 attention cost words (README): from the qk-norm to the output projection it runs in fp32, while the
    # qkv projection and the MLP keep bf16's speed; the residual stream stays fp32
    assert dtypes == {'qkv': torch.bfloat16, 'proj': torch.float32, 'w12': torch.bfloat16, 'block': torch.float32}


# ----------------------------------------------------------------------------- nothing lost, nothing silent

def test_a_nan_stops_every_process_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / 'out'
    run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2')
    before = (out / 'ckpt.pt').read_bytes()
    torchrun = '-m torch.distributed.run --standalone --nproc_per_node=2 pixeldlm.py'
    for launcher, evaluate, caught_by in [('pixeldlm.py', 2000, 'the step was not taken'),
                                          ('pixeldlm.py', 1, 'the EMA weights give losses'),  # after every step
                                          (torchrun, 2000, 'the step was not taken')]:
        proc = run(launcher, f'--out_dir={out}', '--init_from=resume', '--max_iters=8', '--learning_rate=1e30',
                   f'--eval_interval={evaluate}', check=False)
        assert proc.returncode != 0 and proc.out.count('nothing was saved') == 1 and caught_by in proc.out, proc.out
        assert re.search(r'error: iteration \d+: ', proc.out) and '--learning_rate' in proc.out
        assert launcher == torchrun or 'Traceback' not in proc.out  # torchrun prints its own report of the exit
        assert (out / 'ckpt.pt').read_bytes() == before
    run('sample.py', f'--out_dir={out}', '--steps=2')


@pytest.mark.parametrize('muon', [[], ['--muon_lr=0.02']], ids=['adamw', 'muon'])
def test_sigterm_saves_and_resume_continues_bit_for_bit(data_dir, tmp_path, muon):
    args = [*TINY, f'--data_dir={data_dir}', '--eval_interval=100000', *muon]
    proc = start('pixeldlm.py', *args, f'--out_dir={tmp_path}/stopped', '--max_iters=100000')
    read_until(proc, r'^iter 5/')
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and 'stopped on SIGTERM; saved' in out and '--init_from=resume' in out, out
    stopped_at = load(tmp_path / 'stopped/ckpt.pt')['iter_num']
    assert stopped_at >= 5
    run('pixeldlm.py', f'--out_dir={tmp_path}/stopped', '--init_from=resume', f'--max_iters={stopped_at + 3}')
    run('pixeldlm.py', *args, f'--out_dir={tmp_path}/straight', f'--max_iters={stopped_at + 3}')
    resumed, straight = load(tmp_path / 'stopped/ckpt.pt'), load(tmp_path / 'straight/ckpt.pt')
    for part in ('model', 'ema'):
        assert_same_tensors(resumed[part], straight[part])
    assert_same_optimizer_states(resumed, straight, muon)


def test_sigusr1_to_one_process_under_torchrun_stops_them_all_after_one_save(data_dir, tmp_path):
    args = [*TINY, f'--data_dir={data_dir}', '--eval_interval=100000', '--gradient_accumulation_steps=2']
    torchrun = '-m torch.distributed.run --standalone --nproc_per_node=2 pixeldlm.py'
    proc = start(torchrun, *args, f'--out_dir={tmp_path}/stopped', '--max_iters=100000')
    read_until(proc, r'^iter 5/')
    os.kill(worker_of(proc.pid, rank=1), signal.SIGUSR1)  # as SLURM's --signal=USR1 reaches the tasks
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and out.count('stopped on a signal to another process; saved') == 1, out
    stopped_at = load(tmp_path / 'stopped/ckpt.pt')['iter_num']
    run(torchrun, f'--out_dir={tmp_path}/stopped', '--init_from=resume', f'--max_iters={stopped_at + 2}')
    run(torchrun, *args, f'--out_dir={tmp_path}/straight', f'--max_iters={stopped_at + 2}')
    resumed, straight = load(tmp_path / 'stopped/ckpt.pt'), load(tmp_path / 'straight/ckpt.pt')
    assert resumed['iter_num'] == straight['iter_num'] == stopped_at + 2
    assert_same_tensors(resumed['model'], straight['model'])
    assert_same_tensors(resumed['ema'], straight['ema'])


def test_a_process_ends_cleanly_while_its_watchdog_talks_to_the_store(tmp_path):
    # Python ends a daemon thread that is inside a store call at exit with std::terminate: the process aborts
    # and torchrun reports a failure after a good save. finish() must stop the watchdog first.
    code = f"""if True:
        import sys, time, torch.distributed as dist, pixeldlm
        dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)
        store = dist.distributed_c10d._get_default_store()
        class Busy:  # a heartbeat that spends two seconds inside store calls
            def set(self, key, value):
                end = time.time() + 2
                while time.time() < end:
                    store.set(key, value)
        dist.distributed_c10d._get_default_store = Busy
        stop_processes = pixeldlm.start_watchdog(0, 1, {{'count': 0, 'iter': 0}})
        time.sleep(1.5)  # inside the first heartbeat
        pixeldlm.finish(True, stop_processes, 'stopped', 0)
    """
    proc = run('-c', code, check=False)
    assert proc.returncode == 0 and proc.stdout == 'stopped\n', proc.out


def test_a_frozen_process_stops_the_others_with_its_rank_named(data_dir, tmp_path):
    proc = start('-m torch.distributed.run --standalone --nproc_per_node=2 pixeldlm.py', *TINY,
                 f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--max_iters=100000',
                 '--gradient_accumulation_steps=2', '--collective_timeout=3')
    read_until(proc, r'^iter 3/')
    frozen = worker_of(proc.pid, rank=1)
    os.kill(frozen, signal.SIGSTOP)
    clock = time.time()
    try:
        rank0 = worker_of(proc.pid, rank=0)
        while os.path.exists(f'/proc/{rank0}') and time.time() - clock < 60:
            time.sleep(0.2)
        assert time.time() - clock < 60  # not forever
    finally:
        os.kill(frozen, signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert re.search(r'rank 0: no progress for 3 s at iteration \d+; rank 1 stopped', out), out


def test_a_failed_prepare_leaves_the_folder_as_it_was_and_a_mixed_folder_is_refused(data_dir, tmp_path):
    folder = tmp_path / 'data'
    run('prepare_data.py', f'--out_dir={folder}')  # cl100k_base
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def small_disk():  # every file this process writes is cut off at 1 MB, as a full disk would cut it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    proc = subprocess.run([sys.executable, 'prepare_data.py', '--encoding=bytes', f'--out_dir={folder}'], cwd=REPO,
                          capture_output=True, text=True, preexec_fn=small_disk)
    assert proc.returncode != 0 and 'is as it was' in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['data']  # no half-written folder left beside it
    proc = run('prepare_data.py', '--encoding=bytes', f'--out_dir={folder}')
    assert f'note: {folder} held cl100k_base ids; they are replaced by bytes ids' in proc.out
    for damage in ('truncate', 'stray'):
        if damage == 'truncate':
            with open(folder / 'val.bin', 'r+b') as f:
                f.truncate(100)
        else:
            run('prepare_data.py', '--encoding=bytes', f'--out_dir={folder}')
            (folder / 'train_pairs.bin').write_bytes(b'\0' * 8)  # a pairs file meta.json does not list
        proc = run('pixeldlm.py', *TINY, f'--data_dir={folder}', f'--out_dir={tmp_path}/o-{damage}', check=False)
        assert proc.returncode != 0 and 'did not finish this folder' in proc.out and 'Traceback' not in proc.out


def test_one_trainer_per_out_dir_and_a_killed_one_leaves_no_lock(data_dir, tmp_path):
    args = [*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--eval_interval=2']
    first = start('pixeldlm.py', *args, '--max_iters=100000')
    read_until(first, r'^iter 2: .*saved')
    for init_from in ('scratch', 'resume'):
        second = run('pixeldlm.py', *args, f'--init_from={init_from}', '--max_iters=2', check=False)
        assert second.returncode != 0 and 'another trainer is using' in second.out, second.out
    first.kill()  # perhaps in the middle of a save
    first.communicate()
    saved_at = load(tmp_path / 'out/ckpt.pt')['iter_num']
    run('pixeldlm.py', f'--out_dir={tmp_path}/out', '--init_from=resume', f'--max_iters={saved_at + 1}')
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['ckpt.pt', 'lock']  # no temporary files


@pytest.mark.parametrize('args, message', [
    (['--gradient_accumulation_steps=0'], '--gradient_accumulation_steps=0 is out of range: it must be at least 1'),
    (['--eval_iters=0'], '--eval_iters=0 is out of range'),
    (['--max_iters=0'], '--max_iters=0 is out of range'),
    (['--batch_size=0'], '--batch_size=0 is out of range'),
    (['--batch_size=-1'], '--batch_size=-1 is out of range'),
    (['--n_head=0'], '--n_head=0 is out of range'),
    (['--eval_interval=0'], '--eval_interval=0 is out of range'),
    (['--log_interval=0'], '--log_interval=0 is out of range'),
    (['--learning_rate=1e999'], '--learning_rate=inf is out of range: it must be a finite number >= 0'),
    (['--time_shift=1e999'], '--time_shift=inf is out of range'),
    (['--time_shift=nan'], '--time_shift=nan is out of range'),
    (['--guidance=inf'], '--guidance=inf is out of range: it must be finite'),
    (['--beta2=1'], '--beta2=1.0 is out of range'),
    (['--img_size=7', '--patch_size=2'], '--img_size=7 is out of range: it must be a multiple of --patch_size=2'),
    (['--n_embd=30', '--n_head=4'], '--n_embd=30 is out of range'),
    (['--objective=x'], "--objective='x' is out of range"),
    (['--objective=tokens', '--color_base=256'], "--color_base=256 is out of range: it must be at most 16 with"),
    (['--pixel_order=columns'], "--pixel_order='columns' is out of range"),
    (['--n_embd=24', '--n_head=4', '--rope=grid'], '--n_head=4 is out of range: it must be such that --n_embd / --n_head'),
    (['--n_embd=12', '--n_head=4'], '--n_head=4 is out of range: it must be such that --n_embd / --n_head'),
    (['--rope=True'], "--rope='True' is out of range: it must be 'text', 'grid' or 'none'"),
    (['--eta=2'], '--eta=2.0 is out of range: it must be between 0 and 1'),
    (['--time_delay=-0.1'], '--time_delay=-0.1 is out of range: it must be between 0 and 1'),
    (['--renoise_above=1.5'], '--renoise_above=1.5 is out of range: it must be between 0 and 1'),
    (['--draw_below=-0.5'], '--draw_below=-0.5 is out of range: it must be between 0 and 1'),
    (['--sample_steps=0'], '--sample_steps=0 is out of range: it must be at least 1'),
    (['--device=banana'], "--device='banana' is not a device"),
    (['--device=cuda'], 'no CUDA GPU'),
    (['--device=mps'], 'no MPS device'),
    (['--init_from=nowhere.pt'], "'nowhere.pt' is none of these"),
])
def test_bad_values_are_one_line_errors_before_anything_starts(data_dir, tmp_path, args, message):
    proc = run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--max_iters=3', *args,
               check=False)
    assert proc.returncode != 0 and message in proc.out and 'Traceback' not in proc.out, proc.out
    assert len(proc.out.strip().splitlines()) == 1 and not (tmp_path / 'out/ckpt.pt').exists()


def test_micro_steps_that_cannot_be_shared_out_among_the_processes_are_refused_before_anything_starts(data_dir,
                                                                                                      tmp_path):
    proc = run('-m torch.distributed.run --standalone --nproc_per_node=2 pixeldlm.py', *TINY, f'--data_dir={data_dir}',
               f'--out_dir={tmp_path}/out', '--gradient_accumulation_steps=3', '--max_iters=2', check=False)
    assert proc.returncode != 0 and 'it must be a multiple of the number of processes (2)' in proc.out, proc.out
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('args, message', [
    (['--guidance=nan'], '--guidance must be finite'),
    (['--time_shift=inf'], '--time_shift must be a finite number > 0'),
    (['--time_shift=0'], '--time_shift must be a finite number > 0'),
    (['--batch_size=0'], '--batch_size must be at least 1'),
    (['--num_samples=0'], '--num_samples must be at least 1'),
    (['--steps=0'], '--steps must be at least 1'),
    (['--eta=-0.5'], '--eta must be between 0 and 1'),
    (['--time_delay=2'], '--time_delay must be between 0 and 1'),
    (['--renoise_above=-1'], '--renoise_above must be between 0 and 1'),
    (['--draw_below=1.1'], '--draw_below must be between 0 and 1'),
    (['--device=banana'], 'is not a device'),
    (['--device=cuda'], 'no CUDA GPU'),
    (['--device=mps'], 'no MPS device'),
    (['--png=/nowhere/at/all.png'], 'a folder that exists'),
    (['--png=.'], 'a folder that exists'),
])
def test_bad_sample_options_are_one_line_errors_before_sampling(trained, args, message):
    proc = run('sample.py', f'--out_dir={trained}', *args, check=False)
    assert proc.returncode != 0 and message in proc.out and 'Traceback' not in proc.out, proc.out
    assert '---------- sample' not in proc.out


def test_broken_checkpoints_are_one_line_errors(trained, data_dir, tmp_path):
    good = (trained / 'ckpt.pt').read_bytes()
    cases = {'truncated': good[:len(good) // 2], 'text': b'hello, not a checkpoint\n', 'empty': b''}
    for name, content in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / 'ckpt.pt').write_bytes(content)
        for proc in (run('sample.py', f'--out_dir={tmp_path / name}', check=False),
                     run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / name}',
                         '--init_from=resume', '--max_iters=3', check=False)):
            assert proc.returncode != 0 and 'Traceback' not in proc.out, proc.out
            assert 'it is truncated or not a PyTorch checkpoint' in proc.out
    checkpoint = load(trained / 'ckpt.pt')
    checkpoint['ema']['final.weight'][0, 0] = float('nan')  # what a diverged run would have saved
    (tmp_path / 'nan').mkdir()
    torch.save(checkpoint, tmp_path / 'nan/ckpt.pt')
    proc = run('sample.py', f'--out_dir={tmp_path}/nan', check=False)
    assert proc.returncode != 0 and 'holds non-finite weights' in proc.out


def test_a_full_disk_at_a_save_keeps_the_previous_checkpoint(trained, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes((trained / 'ckpt.pt').read_bytes())
    size = (out / 'ckpt.pt').stat().st_size

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    proc = subprocess.run([sys.executable, 'pixeldlm.py', f'--out_dir={out}', '--init_from=resume', '--max_iters=3'],
                          cwd=REPO, capture_output=True, text=True, preexec_fn=small_disk,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode != 0 and 'iteration 3: could not save' in proc.stderr, proc.stdout + proc.stderr
    assert 'the previous checkpoint is as it was' in proc.stderr and 'Traceback' not in proc.stderr
    assert (out / 'ckpt.pt').read_bytes() == (trained / 'ckpt.pt').read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ['ckpt.pt', 'lock']


def test_checkpoints_from_before_a_config_key_existed_still_load(data_dir, tmp_path):
    # weights as those runs made them (the v head, rows, no rotary positions), then their config without the new keys
    run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/made', '--max_iters=2', '--objective=v',
        '--pixel_order=row', '--rope=none')
    checkpoint = load(tmp_path / 'made/ckpt.pt')
    for key in ('objective', 'time_shift', 'guidance', 'pair_fraction', 'cond_drop', 'pixel_order', 'rope', 'eta',
                'time_delay', 'renoise_above', 'sample_steps', 'draw_below'):
        del checkpoint['config'][key]
    (tmp_path / 'old').mkdir()
    torch.save(checkpoint, tmp_path / 'old/ckpt.pt')
    assert run('sample.py', f'--out_dir={tmp_path}/old', '--steps=2').out.count('---------- sample') == 3
    proc = run('sample.py', f'--out_dir={tmp_path}/old', '--draw_below=0.5', check=False)
    assert proc.returncode != 0 and 'needs a classifying head' in proc.out and 'Traceback' not in proc.out
    run('pixeldlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/tuned', '--max_iters=1',
        f'--init_from={tmp_path}/old/ckpt.pt')
    run('pixeldlm.py', f'--out_dir={tmp_path}/old', '--init_from=resume', '--max_iters=3')
    resumed = load(tmp_path / 'old/ckpt.pt')['config']  # added in later versions: what those runs used
    assert (resumed['objective'], resumed['pixel_order'], resumed['rope'], resumed['eta'], resumed['time_delay'],
            resumed['renoise_above'], resumed['sample_steps'], resumed['draw_below']) == ('v', 'row', 'none', 0.0, 0.0,
                                                                                          1.0, 20, 0.0)
    checkpoint['config']['rope'] = True  # before rotary positions came in kinds: on the grid
    torch.save(checkpoint, tmp_path / 'old/ckpt.pt')
    assert pixeldlm.load_checkpoint(tmp_path / 'old/ckpt.pt')['config']['rope'] == 'grid'
    checkpoint['config']['self_cond'] = True  # a feature that left the code
    torch.save(checkpoint, tmp_path / 'old/ckpt.pt')
    proc = run('sample.py', f'--out_dir={tmp_path}/old', check=False)
    assert proc.returncode != 0 and 'self-conditioning' in proc.out and 'Traceback' not in proc.out


def test_eval_on_data_of_another_encoding_is_a_clear_error(trained, tmp_path):
    run('prepare_data.py', '--encoding=bytes', f'--out_dir={tmp_path}/bytes')
    proc = run('sample.py', f'--out_dir={trained}', '--eval', f'--data_dir={tmp_path}/bytes', check=False)
    assert proc.returncode != 0 and 'holds bytes ids' in proc.out and 'Traceback' not in proc.out


def test_bad_tokenizers_and_inputs_for_prepare_data_are_one_line_errors(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    offline = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / 'cache'), HTTPS_PROXY='http://127.0.0.1:9',
                   HTTP_PROXY='http://127.0.0.1:9')  # a download that cannot happen, as on an offline machine
    for args, message, env in [(['--encoding=nonexistent'], "cannot load the tokenizer 'nonexistent'", None),
                               (['--encoding=gpt2'], "cannot load the tokenizer 'gpt2'", offline),
                               ([f'--input={empty}'], 'holds no .txt, .jsonl', None),
                               (['--num_proc=0'], '--num_proc must be at least 1', None)]:
        proc = subprocess.run([sys.executable, 'prepare_data.py', *args, f'--out_dir={tmp_path}/d'], cwd=REPO,
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
        assert message in proc.stderr.strip().splitlines()[-1] and not (tmp_path / 'd').exists()


def test_sample_py_samples_in_batches_and_a_batch_size_changes_nothing(trained, monkeypatch, capsys):
    import runpy
    sizes, sampler = [], pixeldlm.ddim_sample

    def counting_sampler(model, noise, *args, **kwargs):
        sizes.append(len(noise))
        return sampler(model, noise, *args, **kwargs)
    monkeypatch.setattr(pixeldlm, 'ddim_sample', counting_sampler)
    texts = {}
    for batch_size in (2, 5):
        monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={trained}', '--num_samples=5', '--steps=2',
                                          f'--batch_size={batch_size}', '--device=cpu'])
        runpy.run_path(os.path.join(REPO, 'sample.py'), run_name='__main__')
        texts[batch_size] = capsys.readouterr().out.rsplit('----------', 1)[0]
    assert sizes == [2, 2, 1, 5]  # memory holds one batch, not --num_samples
    assert texts[2] == texts[5] and texts[2].count('---------- sample') == 5
    reports = {}
    for flags in (['--batch_size=2'], []):  # --eval: all at once unless told
        sizes.clear()
        monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={trained}', '--eval', '--num_samples=5',
                                          '--steps=2', '--device=cpu', *flags])
        with pytest.raises(SystemExit):
            runpy.run_path(os.path.join(REPO, 'sample.py'), run_name='__main__')
        reports[len(flags)] = [line for line in capsys.readouterr().out.splitlines() if 's/sample' not in line]
        assert sizes == ([2, 2, 1] if flags else [5])
    assert reports[0] == reports[1] and any(line.startswith('word hits') for line in reports[0])


def test_eval_refuses_the_flags_it_would_ignore(trained, tmp_path):
    for flag in (f'--png={tmp_path}/x.png', '--show_steps', '--prompt=hello', f'--prompt_file={tmp_path}/p.txt'):
        proc = run('sample.py', f'--out_dir={trained}', '--eval', flag, check=False)
        assert proc.returncode != 0 and '--eval prints the quality report only' in proc.out, proc.out
        assert flag.split('=')[0] in proc.out.strip().splitlines()[-1] and 'Traceback' not in proc.out
    assert not (tmp_path / 'x.png').exists()


@pytest.mark.parametrize('key, flag, saved, given, shown', [
    ('time_delay', 'time_delay', 0.4, 0.0, 'time delay {:g}'),  # 0: a flag that is falsy still wins
    ('renoise_above', 'renoise_above', 0.4, 0.0, 'renoise above {:g}'),
    ('draw_below', 'draw_below', 0.4, 0.0, 'draw below {:g}'),
    ('sample_steps', 'steps', 3, 2, '{} DDIM steps'),  # the classroom preset saves 100
])
def test_sample_py_gives_the_sampler_the_checkpoints_settings_or_the_flags(trained, tmp_path, monkeypatch, capsys,
                                                                          key, flag, saved, given, shown):
    import inspect
    import runpy
    checkpoint = load(trained / 'ckpt.pt')
    checkpoint['config']['sample_steps'] = 2  # quick, unless the key under test says otherwise
    checkpoint['config'][key] = saved
    torch.save(checkpoint, tmp_path / 'ckpt.pt')
    argument = 'steps' if key == 'sample_steps' else key  # ddim_sample's name for it
    seen, sampler = [], pixeldlm.ddim_sample

    def recording_sampler(*args, **kwargs):
        seen.append(inspect.signature(sampler).bind(*args, **kwargs).arguments.get(argument))
        return sampler(*args, **kwargs)
    monkeypatch.setattr(pixeldlm, 'ddim_sample', recording_sampler)
    for flags, expected in [([], saved), ([f'--{flag}={given}'], given), (['--eval'], saved),
                            (['--eval', f'--{flag}={given}'], given)]:
        seen.clear()
        monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={tmp_path}', '--num_samples=2', '--device=cpu',
                                          *flags])
        try:
            runpy.run_path(os.path.join(REPO, 'sample.py'), run_name='__main__')
        except SystemExit as e:  # --eval ends with sys.exit(0)
            assert e.code == 0
        out = capsys.readouterr().out
        assert seen and set(seen) == {expected}, (flags, seen)
        assert '--eval' not in flags or shown.format(expected) in out


def test_show_steps_prints_every_step_and_draws_z_and_x_hat_of_each(trained, tmp_path, capsys):
    png = tmp_path / 'steps.png'
    proc = run('sample.py', f'--out_dir={trained}', '--num_samples=2', '--steps=3', '--show_steps', f'--png={png}')
    for k in range(2):
        block = proc.out.split(f'sample {k}, step by step')[1].split('----------')[0].strip().splitlines()
        assert [line.split(' t=')[0] for line in block[1:]] == ['step  1', 'step  2', 'step  3']
    assert 't=0.00' in proc.out  # the first x_hat is made from pure noise
    data = png.read_bytes()
    width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    assert (width, height) == ((3 * (8 + 1 + 8) + 2 * 4) * 8, (2 * 8 + 4) * 8)  # z_t | x_hat per step, per sample
    enc = get_encoding('bytes')  # what a line shows: the text of that step's x_hat, kept on one line
    x = ids_to_image(torch.tensor([list(b'hi\tthere\nyou') + [300] + [256] * 51]), 7)
    sample.show_steps([(0.0, torch.randn_like(x), x * 0), (0.5, torch.randn_like(x), x)], 7, 1, enc, first=4, width=80)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('---------- sample 4') and lines[2] == 'step  2 t=0.50 | hi→there↵you·'


def test_word_hits_put_real_text_at_the_ceiling_and_letter_soup_at_the_floor(tmp_path):
    run('prepare_data.py', '--encoding=bytes', f'--out_dir={tmp_path}/bytes')
    enc, rng = get_encoding('bytes'), np.random.default_rng(0)
    train = pixeldlm.load_tokens(tmp_path / 'bytes', 'train')
    real, _ = pixeldlm.get_batch(pixeldlm.load_tokens(tmp_path / 'bytes', 'val'), rng, 16, 256, 256)
    real = [text_part(row, 256) for row in real.tolist()]
    assert sample.words("Lists, tuples3 and x-ray ok") == ['lists', 'tuples', 'and', 'ray']
    letters = np.bincount(np.asarray(train), minlength=257).astype(float)
    letters[256] = 0
    floor = rng.choice(257, size=10_000, p=letters / letters.sum()).tolist()  # bytes drawn independently
    same = sample.word_statistics(real, real, floor, train, enc)
    assert same['word_hits'] == same['word_ceiling'] > 0.8 > 0.2 > same['word_floor']
    soup = rng.choice(257, size=(16, 256), p=letters / letters.sum()).tolist()
    stats = sample.word_statistics(soup, real, floor, train, enc)
    assert abs(stats['word_hits'] - stats['word_floor']) < 0.05
    words = [list(b' '.join(w.encode() for w in ['the', 'list', 'zqxv', 'value'] * 20))]  # 3 of 4 words known
    assert sample.word_statistics(words, real, floor, train, enc)['word_hits'] == 0.75
