"""
PixelDLM: a pixel diffusion language model in one file.

Text -> token ids (tiktoken) -> one RGB pixel per token -> a square image (64x64 holds 4096 tokens)
-> a plain Vision Transformer (JiT-B/4) learns to recover the clean image from a noisy one
-> a DDIM sampler turns Gaussian noise into an image -> pixels -> ids -> text.

Read top to bottom: config, codec, model, diffusion (loss and sampler), data, training loop; the plumbing at the
end (command line, checkpoint files, devices, the guards of a long run) can wait for a second reading.

One process (picks CUDA, else MPS, else CPU):
$ python pixeldlm.py --preset=classroom
One node with 8 GPUs, bf16 (train_8gpu.sh; NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host for two nodes):
$ torchrun --standalone --nproc_per_node=8 pixeldlm.py
Continue a run from out_dir/ckpt.pt (also after SIGTERM/SIGUSR1, which save before they stop):
$ python pixeldlm.py --init_from=resume
Fine-tune those weights on prompt/answer pairs (prepare_data.py writes them from {"prompt", "answer"} lines):
$ python pixeldlm.py --init_from=out/ckpt.pt --data_dir=data/my_pairs --out_dir=out-pairs
"""
import ast
import copy
import ctypes
import difflib
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
try:
    import fcntl
except ImportError:  # Windows: no lock on out_dir
    fcntl = None

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
# the base of the digits: each channel holds one digit of the id, 0 to color_base - 1; 0 picks the smallest base
# that covers the vocabulary (47 for cl100k_base). The original design's 256 learned nothing of cl100k_base in a
# GPU run (README, "The 8-GPU defaults")
color_base = 0
objective = 'digits'  # cross-entropy on each channel's 'digits', on whole 'tokens', or 'v': JiT's v-loss on pixels
pixel_order = 'patch'  # ids fill the image patch by patch (a patch holds consecutive tokens); 'row': row by row
rope = 'text'  # rotary positions in attention: a patch's place in the 'text' (reading order), its 'grid' row and
               # column (JiT's 2D), or 'none'; on top of the fixed sin-cos table
# diffusion: t ~ logit-normal(P_mean, P_std), t=0 is pure noise and t=1 the clean image
P_mean = 0.0  # t centred on 0.5; JiT's -0.8 (noisier t) learned less of cl100k_base and of bytes
P_std = 0.8
# sampling: training does not use these; they are saved with the run as sample.py's defaults
sample_steps = 20  # the sampler's steps from noise to text (sample.py --steps overrides it)
time_shift = 1.0  # the sampler's grid: 1 spaces its steps evenly in t; s > 1 packs them towards the clean end
eta = 0.0  # the sampler's noise: 0 is deterministic DDIM, 1 draws each step from the DDPM posterior
time_delay = 0.0  # the sampler tells the model t - time_delay, a noisier time than z_t's: sharper samples
renoise_above = 1.0  # the sampler's steps to a t above this draw z afresh from x_hat and new noise (1: none, 0: all)
draw_below = 0.0  # the sampler's steps at a t below this draw each pixel of x_hat from the head, not its mean (0: none)
guidance = 1.0  # the sampler's classifier-free guidance scale for prompts: 1 is the plain conditional answer
# adamw optimizer (JiT: lr 5e-5 * global_batch / 256, betas 0.9/0.95, no weight decay, no clipping)
learning_rate = 2e-4
max_iters = 100000
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0  # clip the gradient norm at this value; 0 disables
# > 0: the weight matrices of attention and the MLPs step with Muon (momentum made orthogonal: torch.optim.Muon) at
# this lr, following the schedule below in proportion; the rest stays on AdamW. 0: AdamW for everything, as JiT
muon_lr = 0.0
ema_decay = 0.9999  # the EMA weights are what we evaluate, save for sampling, and sample from
# learning rate: linear warmup, then constant (JiT) or cosine down to min_lr
warmup_iters = 5000
decay_lr = False
lr_decay_iters = 100000
min_lr = 2e-5
# system
device = 'auto'  # 'auto' picks cuda, then mps, then cpu; or name one: 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto': bfloat16 autocast on CUDA and on CPUs with bf16 instructions, else float32
compile = True  # torch.compile the model (worth it on GPUs; slow to start on a CPU)
seed = 1337
peak_flops = 0.0  # the device's peak FLOP/s for the MFU printout; 0 looks it up in PEAK_FLOPS
collective_timeout = 600  # seconds a process waits for the others before it stops the run, naming who is missing
preset = ''  # start from a named set of values below; every other --key=value flag wins over it
# -----------------------------------------------------------------------------
# configure() (in the plumbing at the end) applies the preset, then a resumed run's saved values, then the flags
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]

presets = {
    # a small model that learns the built-in corpus on a 2-core laptop CPU in minutes. Its choices, each measured
    # in README: a token head; t in a narrow band nearer the clean end; Muon; width 128 (on a CPU without bf16 it
    # wrote more words per minute than 192 or 256); a sampler that draws z afresh from x_hat and new noise at every
    # step, most of them late, above the band the model trained on, where it keeps revising letters instead of
    # copying them; 100 steps, not 20 (more revisions, more words, for 0.35 s a sample); x_hat drawn, not the
    # mean, below t = 0.95 (a quarter to a twelfth as many runs of one character: more entropy, as many words).
    # Data: prepare_data.py --encoding=bytes
    'classroom': dict(out_dir='out-classroom', data_dir='data/bytes', objective='tokens', P_mean=0.8, P_std=0.1,
                      sample_steps=100, time_shift=8.0, renoise_above=0.0, draw_below=0.95,
                      img_size=16, patch_size=2, n_layer=6, n_head=2, n_embd=128,
                      batch_size=32, gradient_accumulation_steps=1, learning_rate=1e-3, muon_lr=0.02, max_iters=1200,
                      warmup_iters=100, ema_decay=0.999, eval_interval=400, eval_iters=10, log_interval=100,
                      compile=False),
}
# what the weights fix: a resumed or fine-tuned run takes these from its checkpoint whatever the command line says
MODEL_KEYS = ('img_size', 'patch_size', 'n_layer', 'n_head', 'n_embd', 'color_base', 'objective', 'pixel_order', 'rope')
# what runs used before a key existed, so that their checkpoints still load
LEGACY_CONFIG = {'objective': 'v', 'time_shift': 1.0, 'guidance': 1.0, 'pair_fraction': 0.5, 'cond_drop': 0.1,
                 'pixel_order': 'row', 'rope': 'none', 'eta': 0.0, 'time_delay': 0.0, 'muon_lr': 0.0,
                 'renoise_above': 1.0, 'sample_steps': 20, 'draw_below': 0.0}


# -----------------------------------------------------------------------------
# codec: token id <-> three base-b digits <-> one RGB pixel in [-1, 1]; ids fill an image row by row, or tile by
# tile (pixel_order='patch': tile = patch_size, so each patch of the model holds consecutive tokens)

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


def ids_to_image(ids, base, tile=1):
    """(B, S*S) ids -> (B, 3, S, S) image, filled tile by tile (to_grid); tile 1: row by row."""
    return to_grid(ids_to_pixels(ids, base), tile)


def image_to_ids(image, base, tile=1):
    """(B, 3, S, S) image -> (B, S*S) ids, read in the order ids_to_image fills it."""
    return pixels_to_ids(from_grid(image, tile), base)


def to_grid(seq, tile):
    """(B, S*S, C) values in reading order -> (B, C, S, S), placed tile by tile (row by row inside a tile, tiles
    row by row), so that with tile = patch_size a patch of the model holds consecutive tokens."""
    B, n, C = seq.shape
    g = math.isqrt(n) // tile
    return seq.reshape(B, g, g, tile, tile, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * tile, g * tile)


def from_grid(image, tile):
    """(B, C, S, S) -> (B, S*S, C) in reading order: to_grid undone."""
    B, C, side, _ = image.shape
    g = side // tile
    return image.reshape(B, C, g, tile, g, tile).permute(0, 2, 4, 3, 5, 1).reshape(B, side * side, C)


def pad_texts(stream, starts, ends, n_pixels, eot_id):
    """The texts stream[starts[k]:ends[k]] -> (k, n_pixels) ids of their images: each text, its end-of-text,
    then padding (which repeats the end-of-text). A text with no room for its end-of-text is an error, never
    cut silently."""
    lengths = np.asarray(ends) - np.asarray(starts)
    if len(lengths) and lengths.max() >= n_pixels:
        raise ValueError(f"a text of {lengths.max()} tokens does not fit an image of {n_pixels} pixels with its "
                         f"end-of-text (at most {n_pixels - 1} tokens); shorten it or train with a larger img_size")
    offsets = np.arange(n_pixels)
    ids = stream[np.minimum(np.asarray(starts)[:, None] + offsets, len(stream) - 1)].astype(np.int64)
    return np.where(offsets < lengths[:, None], ids, eot_id)


def prompt_images(prompts, img_size, base, eot_id, tile=1):
    """Token lists (what sample.py encodes from text) -> condition images (B, 3, S, S), built by pad_texts."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    stream = np.array([i for p in prompts for i in p] + [eot_id], dtype=np.int64)
    ids = pad_texts(stream, np.cumsum(lengths) - lengths, np.cumsum(lengths), img_size ** 2, eot_id)
    return ids_to_image(torch.from_numpy(ids), base, tile)


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

    def forward(self, x, rotary=None):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        # on a CPU under bf16 autocast, the rest (qk-norm to output projection) runs in fp32: in bf16 it cost the
        # classroom model words (README, "bf16 on a CPU"). A GPU keeps bf16 for flash attention (not measured for words)
        on_cpu = x.device.type == 'cpu'
        with torch.autocast('cpu', enabled=False) if on_cpu else nullcontext():
            inner = torch.float32 if on_cpu else v.dtype  # not the config's dtype: what attention runs in
            # norms in fp32: under bf16 autocast, a bf16 input with the fp32 weight would miss the fused CUDA kernel
            q, k, v = self.q_norm(q.float()).to(inner), self.k_norm(k.float()).to(inner), v.to(inner)
            if rotary is not None:
                q, k = rotate(q, *rotary), rotate(k, *rotary)
            x = F.scaled_dot_product_attention(q, k, v)  # no mask: flash attention
            return self.proj(x.transpose(1, 2).reshape(B, L, D))


def rotate(x, cos, sin):  # rotary positions: each pair of channels (i, i + d/2) turns by its angle
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


ROPE_HEAD_MULTIPLE = {'text': 2, 'grid': 4, 'none': 1}  # each kind of rotary positions: what the head size divides by


def rotary_angles(kind, head_dim, rows, cols):
    """cos and sin of the rotary positions of a grid of patches, row by row. 'text': every channel pair turns with
    the patch's place in the reading order, so attention sees how far apart two pieces of text are, across the end
    of a row too; base 1000, not a language model's 10000, under which most pairs hardly turn over a short prompt
    (README: sort learned far slower). 'grid': half the pairs turn with the row, half with the column, base 100."""
    if kind == 'text':
        omega = 1.0 / 1000 ** (torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))
        angles = torch.arange(rows * cols)[:, None] * omega
    else:
        omega = 1.0 / 100 ** (torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij')
        angles = torch.cat([r.flatten()[:, None] * omega, c.flatten()[:, None] * omega], dim=1)
    return torch.cos(angles).float(), torch.sin(angles).float()


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

    def forward(self, x, t_emb, rotary=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(t_emb).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(rms_norm(x), shift1, scale1), rotary)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(rms_norm(x), shift2, scale2))
        return x


class JiT(nn.Module):
    """Predicts the clean image x from a noisy image z_t. An optional clean condition image (a prompt)
    goes in front of the target in the same sequence, as if the two were stacked into one tall image.
    model_from_config builds it from a run's config; its own defaults are a plain regression model."""

    def __init__(self, img_size, patch_size, n_layer, n_head, n_embd, digit_classes=0, token_classes=0, rope='none',
                 tile=1):
        super().__init__()
        assert img_size % patch_size == 0, "img_size must be a multiple of patch_size"
        assert n_embd % n_head == 0 and n_embd % 4 == 0, "n_embd must be a multiple of n_head and of 4"
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.tile = tile  # how its ids fill an image (ids_to_image), which the weights were trained for
        patch_dim = 3 * patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, n_embd)
        self.t_embed = nn.Sequential(nn.Linear(256, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))
        # fixed 2D sin-cos positions of a (2*grid x grid) canvas: the condition's rows on top, the target's below;
        # rotary positions also tell attention how far apart two patches are, which spelling needs
        self.register_buffer('pos_embed', sincos_2d(n_embd, 2 * self.grid, self.grid), persistent=False)
        self.has_rope = rope != 'none'
        if self.has_rope:
            assert n_embd // n_head % ROPE_HEAD_MULTIPLE[rope] == 0, "rotary positions: an even head size (4k: grid)"
            tables = rotary_angles(rope, n_embd // n_head, 2 * self.grid, self.grid)
            for name, table in zip(('rope_cos', 'rope_sin'), tables):
                self.register_buffer(name, table, persistent=False)
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.final_adaLN = nn.Linear(n_embd, 2 * n_embd)
        # the head regresses pixel values, or (digit_classes = b) gives logits for each channel's base-b digit, or
        # (token_classes = b**3) logits for every color, that is every id
        self.digit_classes, self.token_classes = digit_classes, token_classes
        if token_classes:
            colors = ids_to_pixels(torch.arange(token_classes), round(token_classes ** (1 / 3)))
            self.register_buffer('token_colors', colors, persistent=False)  # (V, 3): the color of each id
        self.final = nn.Linear(n_embd, patch_size ** 2 * token_classes if token_classes else
                               patch_dim * max(digit_classes, 1))
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

    def run_blocks(self, x, t_emb):  # rotary (cos, sin) of the last x.shape[1] patches: a target is the lower half
        rotary = (self.rope_cos[-x.shape[1]:], self.rope_sin[-x.shape[1]:]) if self.has_rope else None
        for block in self.blocks:
            x = block(x, t_emb, rotary)
        return x

    def patchify(self, img):  # (B, 3, H, W) -> (B, grid*grid, 3*p*p)
        B, p, g = img.shape[0], self.patch_size, self.grid
        return img.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p)

    def unpatchify(self, x):  # (B, grid*grid, C*p*p) -> (B, C, H, W)
        B, p, g = x.shape[0], self.patch_size, self.grid
        return x.reshape(B, g, g, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, g * p, g * p)

    def forward(self, z, t, cond=None, logits=False):
        """z: (B, 3, H, W) noisy image at time t: (B,). cond: clean prompt images (B_c, 3, H, W) for the first
        B_c <= B samples; the other samples have no condition (text, or a dropped prompt) and run on their
        target patches alone: no compute goes to empty condition slots, and no attention mask is needed.
        Returns x_hat (B, 3, H, W); a classifying head returns the expected color, or with logits=True its
        logits: (B, digit_classes, 3, H, W) for digits, (B, patches, p*p, token_classes) for tokens (to_grid tiles)."""
        n = self.grid ** 2
        x = self.patch_embed(self.patchify(z)) + self.pos_embed[n:]
        t_emb = F.silu(self.t_embed(timestep_embedding(t)))  # what every adaLN reads (DiT calls it c)
        if cond is None:
            x = self.run_blocks(x, t_emb)
        else:  # [condition, target] for the first k samples; only the target's outputs go on to the head
            k = len(cond)
            prompted = torch.cat([self.patch_embed(self.patchify(cond)) + self.pos_embed[:n], x[:k]], dim=1)
            parts = [self.run_blocks(prompted, t_emb[:k])[:, n:]]
            if k < len(x):
                parts.append(self.run_blocks(x[k:], t_emb[k:]))
            x = torch.cat(parts)
        shift, scale = self.final_adaLN(t_emb).float().chunk(2, dim=-1)
        with torch.autocast(z.device.type, enabled=False):  # in bf16 the output would be off by up to half a color
            x = modulate(rms_norm(x.float()), shift, scale)
            if self.token_classes:  # the head's rows go id by id, (V, p*p) as in checkpoints; read pixel by pixel,
                # each pixel's V logits lie side by side, where a softmax over them runs 3x faster
                V, weight, bias = self.token_classes, self.final.weight, self.final.bias
                token_logits = F.linear(x, weight.unflatten(0, (V, -1)).transpose(0, 1).flatten(0, 1),
                                        bias.view(V, -1).T.flatten()).unflatten(-1, (-1, V))  # (B, patches, p*p, V)
                if logits:
                    return token_logits
                colors = token_logits.softmax(dim=-1) @ self.token_colors  # (B, patches, p*p, 3)
                return to_grid(colors.flatten(1, 2), self.patch_size)  # a patch's pixels are one tile
            x = self.final(x)
        if not self.digit_classes:
            return self.unpatchify(x)
        B, C = len(x), self.digit_classes
        digit_logits = self.unpatchify(x.view(B, n, -1, C).permute(0, 3, 1, 2).flatten(0, 1)).unflatten(0, (B, C))
        if logits:
            return digit_logits
        colors = digit_values(torch.arange(C, device=x.device), C).view(1, C, 1, 1, 1)
        return (digit_logits.softmax(dim=1) * colors).sum(dim=1)


def tile_of(config):
    """The tile that ids fill the image by (ids_to_image): a whole patch, or one pixel (row by row)."""
    return config['patch_size'] if config['pixel_order'] == 'patch' else 1


def model_from_config(config):
    """The JiT that a dict of config values (this module's, or a checkpoint's) describes."""
    return JiT(config['img_size'], config['patch_size'], config['n_layer'], config['n_head'], config['n_embd'],
               digit_classes=config['color_base'] if config['objective'] == 'digits' else 0,
               token_classes=config['color_base'] ** 3 if config['objective'] == 'tokens' else 0, rope=config['rope'],
               tile=tile_of(config))


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

def diffusion_loss(model, x, mask, t, noise, digit_classes=0, cond=None, token_classes=0):
    """JiT's v-loss on an x-prediction: ||x_pred - x||^2 / max(1-t, 0.05)^2, which is the squared error of
    the velocity (x - z)/(1-t). The clamp keeps the weight finite near t = 1 (bf16 NaNs without it).
    A digit head (digit_classes = base) is trained instead with cross-entropy on each channel's digit, a token
    head (token_classes = base**3) with cross-entropy on the id.
    Padding pixels (mask 0) count zero; the end-of-text pixel is part of the text and counts. cond: prompt
    images, as JiT.forward takes them; a prompt itself is never a target."""
    t4 = t.view(-1, 1, 1, 1)
    z = t4 * x + (1 - t4) * noise
    if token_classes:
        logits = model(z, t, cond, logits=True).float()  # (B, patches, p*p, V)
        tile = math.isqrt(logits.shape[2])  # the ids and the mask read patch by patch too, as the logits
        ids = image_to_ids(x, round(token_classes ** (1 / 3)), tile).view(-1)
        per_pixel = F.cross_entropy(logits.view(-1, token_classes), ids, reduction='none')
        return (from_grid(mask, tile).view(-1) * per_pixel).sum() / mask.sum()
    if digit_classes:
        digits = torch.round((x + 1) / 2 * (digit_classes - 1)).long()
        logits = model(z, t, cond, logits=True).float()
        return (mask * F.cross_entropy(logits, digits, reduction='none')).sum() / (3 * mask.sum())
    x_pred = model(z, t, cond).float()
    weight = mask / (1 - t4).clamp(min=0.05) ** 2
    return (weight * (x_pred - x) ** 2).sum() / (3 * mask.sum())


def predict(model, z, t, cond=None, guidance=1.0, logits=False):
    """The model's x_hat for z at t (or its head's logits). With prompt images, classifier-free guidance:
    x_u + w * (x_c - x_u), where w = 1 is the plain conditional prediction and w = 0 the unconditional one.
    Both halves come from one call: the batch is z twice, prompts for the first half."""
    if cond is None or guidance == 1:
        return model(z, t, cond, logits=logits).float()
    x_c, x_u = model(torch.cat([z, z]), torch.cat([t, t]), cond, logits=logits).float().chunk(2)
    return x_u + guidance * (x_c - x_u)


def decide(model, z, t, cond, guidance, uniform=None):
    """Each pixel's most likely color under a classifying head (digit by digit, or the whole token), or, given
    uniform (B, 3, H, W) in [0, 1), one drawn from the head's distribution: each channel's digit by that channel's
    uniform, a token (one per pixel) by the pixel's first channel's."""
    logits = predict(model, z, t, cond, guidance, logits=True)
    if model.token_classes:
        if uniform is None:
            ids = logits.argmax(dim=-1)
        else:
            ids = draw_class(logits, from_grid(uniform[:, :1], model.patch_size).view(*logits.shape[:-1], 1), dim=-1)
        return to_grid(model.token_colors[ids].flatten(1, 2), model.patch_size)
    digits = logits.argmax(dim=1) if uniform is None else draw_class(logits, uniform.unsqueeze(1), dim=1)
    return digit_values(digits, model.digit_classes)


def draw_class(logits, u, dim):
    """The class whose share of the cumulative probability first passes u: a draw from softmax(logits) (the
    inverse CDF), with u scaled by the total, which a float32 sum can miss 1 by."""
    cdf = logits.softmax(dim=dim).cumsum(dim=dim)
    return (cdf < u * cdf.narrow(dim, cdf.shape[dim] - 1, 1)).sum(dim=dim)


@torch.no_grad()
def ddim_sample(model, noise, steps, time_shift=1.0, cond=None, guidance=1.0, trajectory=None, eta=0.0,
                step_noise=None, time_delay=0.0, renoise_above=1.0, draw_below=0.0):
    """DDIM from pure noise at t = 0 to an image at t = 1. Each step asks for x_hat and moves z to t_next,
    keeping x_hat and the noise it implies, eps = (z_t - t*x_hat)/(1-t): z_next = t_next*x_hat + (1-t_next)*eps.
    eta = 0 is deterministic (the Euler step of the flow ODE); eta = 1 swaps part of eps for fresh noise
    step_noise(step), so that z_next is drawn from the posterior q(z_next | z_t, x = x_hat), a DDPM step.
    The last step returns x_hat itself; a classifying head answers there with its most likely colors (the mean
    of two likely digits is a third one). The grid is u = 0, 1/steps, ..., 1 mapped to t = s*u / (1 + (s-1)*u)
    (SD3's shift formula, on t, the clean share, where SD3 shifts the noise level: so here s = time_shift > 1
    puts more steps late, near the clean end, where the colors are decided). time_delay > 0 tells the model
    t - time_delay (at least 0), a noisier time than z_t has (the asymmetric time intervals of Bit Diffusion, Chen
    et al. 2022): its guesses get sharper. A step to t_next > renoise_above (0: every step) keeps nothing of the
    path but x_hat: z_next = t_next*x_hat + (1-t_next)*noise, all of it fresh (DDIM's largest sigma). The model
    then decides again what it was unsure of (a mixed color in x_hat) instead of keeping the old noise; above the
    t it trained on (the classroom preset's narrow band) that is where its words come from.
    At a step from a t below draw_below, a classifying head's x_hat is not its mean color but one color per pixel
    drawn from its distribution, as a discrete diffusion's ancestral sampler draws x: a mean of unlike tokens is
    the color of a third one, a draw is always one of them. The late steps keep the mean, where drawn misspellings
    would stay (a regression head has no distribution: it always gives its x_hat).
    cond, guidance: see predict. trajectory: a list that gets (t, z_t, x_hat) of every step (sample.py
    --show_steps)."""
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    ts = (time_shift * u / (1 + (time_shift - 1) * u)).tolist()
    z = noise
    step_noise = step_noise or (lambda step: torch.randn_like(noise))
    classify = model.digit_classes or model.token_classes
    for step in range(steps):
        t, t_next = ts[step], ts[step + 1]
        t_batch = torch.full((len(z),), max(t - time_delay, 0.0), device=z.device)
        last = step == steps - 1  # by its index: a shifted grid's last t can miss 1.0 by a rounding error
        if last and classify:
            x_hat = decide(model, z, t_batch, cond, guidance)
        elif t < draw_below and classify:  # uniforms from noise of its own: step_noise(steps + step) is never added
            uniform = torch.special.ndtr(step_noise(steps + step).to(z.device))  # Phi: normal -> uniform
            x_hat = decide(model, z, t_batch, cond, guidance, uniform)
        else:
            x_hat = predict(model, z, t_batch, cond, guidance)
        if trajectory is not None:
            trajectory.append((t, z, x_hat))
        if last:
            return x_hat
        eps = (z - t * x_hat) / (1 - t)
        # eta^2 times the posterior's variance (DDIM's sigma^2), written with sigma_t = 1 - t and alpha_t = t
        var = eta ** 2 * (1 - t_next) ** 2 * (1 - (t * (1 - t_next) / (t_next * (1 - t))) ** 2)
        if t_next > renoise_above:
            var = (1 - t_next) ** 2  # all of z_next's noise fresh: z_next ~ q(z_next | x = x_hat)
        z = t_next * x_hat + math.sqrt((1 - t_next) ** 2 - var) * eps
        if var > 0:
            z = z + math.sqrt(var) * step_noise(step).to(z.device)
    return z


def sample_noise(seed, first, n, side, step=None):
    """Starting noise for samples first .. first+n-1, or with `step` the fresh noise of that sampler step: sample
    k's noise depends on (seed, k, step) alone, so a seed gives the same samples on every device and in batches
    of any size. (1 + step: numpy pads seeds with zeros, so [seed, k, 0] would repeat the starting noise.)"""
    keys = [[seed, k] if step is None else [seed, k, 1 + step] for k in range(first, first + n)]
    return torch.from_numpy(np.stack([np.random.default_rng(key).standard_normal((3, side, side), dtype=np.float32)
                                      for key in keys]))


@torch.no_grad()
def generate(model, num_samples, steps, seed, base, eot_id, time_shift=1.0, prompts=None, guidance=1.0,
             first=0, trajectory=None, eta=0.0, time_delay=0.0, renoise_above=1.0, draw_below=0.0):
    """Sample one batch: returns images (B, 3, S, S) and their ids (B, S*S), from nothing, or as answers
    to prompts (token lists, one sample each). first: the index of the batch's first sample, which picks
    its noise (sample_noise). sample.py turns the ids into text."""
    side = model.grid * model.patch_size
    dev = model.pos_embed.device
    cond = None if prompts is None else prompt_images(prompts, side, base, eot_id, model.tile).to(dev)
    n = num_samples if prompts is None else len(prompts)
    noise = sample_noise(seed, first, n, side).to(dev)
    images = ddim_sample(model, noise, steps, time_shift, cond, guidance, trajectory, eta,
                         lambda step: sample_noise(seed, first, n, side, step), time_delay,
                         renoise_above, draw_below)
    return images, image_to_ids(images, base, model.tile)


# -----------------------------------------------------------------------------
# data: the token streams prepare_data.py writes, cut into micro-batches by numpy on a background thread

def load_meta(data_dir):
    """meta.json, once the folder is checked to hold exactly the files it lists at the sizes it lists: a run never
    starts on a folder that an interrupted or mixed write left behind."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found; run `python prepare_data.py` first (it writes data/<encoding>; "
                 f"--encoding=bytes for data/bytes), or point --data_dir at its output")
    try:
        with open(path) as f:
            meta = json.load(f)
        listed = meta['files']
    except (ValueError, KeyError, TypeError):  # not JSON, or written before meta.json listed its files
        sys.exit(f"error: {path} is not what this prepare_data.py writes; run prepare_data.py again")
    found = {name: os.path.getsize(os.path.join(data_dir, name)) for name in os.listdir(data_dir)
             if name.endswith('.bin')}
    if found != listed:
        sys.exit(f"error: {data_dir} holds {found} (file: bytes) but its meta.json lists {listed}: prepare_data.py "
                 f"did not finish this folder; run it again")
    return meta


def load_tokens(data_dir, split):
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint32, mode='r')


def load_pairs(data_dir, split, eot_id):
    """{split}_pairs.bin holds prompt, end-of-text, answer, end-of-text, ... -> (stream, bounds), where
    bounds[k] = (prompt start, prompt end, answer start, answer end) of pair k, ends exclusive."""
    stream = np.fromfile(os.path.join(data_dir, f'{split}_pairs.bin'), dtype=np.uint32)
    ends = np.flatnonzero(stream == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return stream, np.stack([starts, ends], axis=1).reshape(-1, 4)


def load_data():
    """What the batches are cut from, checked against the config before anything starts: the text streams, the
    prompt/answer pairs, and how many pairs each micro-batch takes."""
    meta = load_meta(data_dir)
    if color_base ** 3 < meta['vocab_size']:
        sys.exit(f"error: color_base={color_base} gives {color_base ** 3} colors, fewer than the "
                 f"{meta['vocab_size']} ids of {meta['encoding']}")
    data = {'meta': meta, 'eot_id': meta['eot_id']}
    for split in ('train', 'val'):
        data[split] = load_tokens(data_dir, split) if meta[f'{split}_tokens'] else None
        data[f'{split}_pairs'] = load_pairs(data_dir, split, meta['eot_id']) if meta[f'{split}_pairs'] else None
    if data['train_pairs']:
        longest = max(int((bounds[:, 1::2] - bounds[:, ::2]).max())
                      for _, bounds in filter(None, (data['train_pairs'], data['val_pairs'])))
        if longest >= img_size ** 2:
            sys.exit(f"error: {data_dir} holds a prompt or answer of {longest} tokens, but a {img_size}x{img_size} "
                     f"image has room for {img_size ** 2 - 1} and the end-of-text; raise --img_size or shorten it")
    if not data['train_pairs']:
        data['n_pairs'] = 0
    elif meta['train_tokens']:
        data['n_pairs'] = round(pair_fraction * batch_size)
    else:
        data['n_pairs'] = batch_size  # pairs only
    return data


def mask_after_eot(ids, eot_id):
    """(B, n) ids -> (ids, mask). A text ends at its first end-of-text; everything after it is padding,
    which repeats the end-of-text id. The mask is True on the text and its end-of-text, False on padding."""
    is_eot = ids == eot_id
    padding = np.cumsum(is_eot, axis=1) - is_eot > 0
    return np.where(padding, eot_id, ids), ~padding


def get_batch(tokens, rng, n_windows, n_pixels, eot_id):
    """n_windows windows of n_pixels tokens from random offsets -> (ids, mask), each (B, n_pixels). A window
    that reaches the end of its document stops there, so the model sees texts end and learns to stop."""
    starts = rng.integers(0, len(tokens), size=n_windows)
    ids = tokens[np.minimum(starts[:, None] + np.arange(n_pixels), len(tokens) - 1)]  # the stream ends with eot
    return mask_after_eot(ids.astype(np.int64), eot_id)


def get_pair_batch(pairs, rng, n, n_pixels, eot_id, cond_drop):
    """n random prompt/answer pairs -> (prompt ids, answer ids, answer mask). Each pair loses its prompt with
    probability cond_drop, which teaches the same model the unconditional answer that guidance needs; the kept
    prompts belong to the first answers, as JiT.forward wants. The number kept is rounded at random, so the
    rate is exact on average and a batch has only two possible shapes."""
    stream, bounds = pairs
    rows = bounds[rng.integers(0, len(bounds), size=n)]
    n_keep = n - int(cond_drop * n + rng.random())
    prompts = pad_texts(stream, rows[:n_keep, 0], rows[:n_keep, 1], n_pixels, eot_id)
    return (prompts, *mask_after_eot(pad_texts(stream, rows[:, 2], rows[:, 3], n_pixels, eot_id), eot_id))


def make_batch(data, split, key, pin=False):
    """One micro-batch as a pure function of (seed, key), so processes can share out an iteration's micro-steps
    and a resumed run replays exactly what it would have seen: n_pairs answers (with their kept prompts), then
    text windows, as CPU tensors, and a seed for the t and noise that the device draws itself."""
    rng = np.random.default_rng([seed, *key])
    n_pixels, eot_id, n_pairs = img_size ** 2, data['eot_id'], data['n_pairs']
    prompts, ids, mask = np.zeros((0, n_pixels), dtype=np.int64), [], []
    if n_pairs:
        prompts, pair_ids, pair_mask = get_pair_batch(data[f'{split}_pairs'], rng, n_pairs, n_pixels, eot_id,
                                                      cond_drop)
        ids, mask = [pair_ids], [pair_mask]
    if n_pairs < batch_size:
        text_ids, text_mask = get_batch(data[split], rng, batch_size - n_pairs, n_pixels, eot_id)
        ids, mask = ids + [text_ids], mask + [text_mask]
    tensors = {'ids': np.concatenate(ids).astype(np.int32), 'mask': np.concatenate(mask),
               'cond': prompts.astype(np.int32) if len(prompts) else None}
    batch = {k: None if v is None else torch.from_numpy(v) for k, v in tensors.items()}
    if pin:  # pinned memory lets the copy to the GPU overlap with its work
        batch = {k: None if v is None else v.pin_memory() for k, v in batch.items()}
    batch.update(noise_seed=int(rng.integers(2 ** 62)), n_tokens=int(tensors['mask'].sum()), n_prompts=len(prompts))
    return batch


def prefetch(make, keys, depth=2):
    """Yields (make(key), seconds the caller waited for it) for each key, building `depth` batches ahead on a
    background thread while the caller trains (numpy and pinning release the GIL)."""
    def wait(future):
        clock = time.perf_counter()
        return future.result(), time.perf_counter() - clock
    with ThreadPoolExecutor(1) as pool:
        ahead = deque()
        for key in keys:
            ahead.append(pool.submit(make, key))
            if len(ahead) > depth:
                yield wait(ahead.popleft())
        while ahead:
            yield wait(ahead.popleft())


# -----------------------------------------------------------------------------
# training

PEAK_FLOPS = {  # dense bf16 peak FLOP/s (the yardstick of fp32 runs too); the first name in the GPU's name wins
    'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12, 'B200': 2250e12, 'A100': 312e12,
    'L40S': 362e12, 'L40': 181e12, 'L4': 121e12, 'A10': 125e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12,
}
stop_signals = []  # SIGTERM or SIGUSR1 (a cluster taking the node back): save at the end of this iteration, then stop


def catch_stop_signals():  # only once training runs: before that, a signal ends the process at once, as usual
    for name in ('SIGTERM', 'SIGUSR1'):
        if hasattr(signal, name):  # not on Windows
            signal.signal(getattr(signal, name), lambda signum, frame: stop_signals.append(signum))


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


OPTIMIZER_KEYS = ('optimizer', 'muon')  # where a checkpoint keeps AdamW's state, and Muon's when it has one


def muon_matrices(model):
    """What Muon steps: the weight matrices of attention and the MLPs. The embeddings, the head, adaLN (Muon there
    learned less and cost 20% more time, README), biases and norms stay on AdamW."""
    return [p for n, p in model.named_parameters() if p.ndim == 2 and ('.attn.' in n or '.mlp.' in n)]


class Muon(torch.optim.Muon):
    """torch.optim.Muon (the same update with its default scaling, the same settings and saved state) with its
    Newton-Schulz iterations in ns_dtype. torch's run them in bf16 always, which a CPU without bf16 instructions
    emulates many times slower than fp32: on a 2-core AVX2 EPYC, 10.5 s a step for a 6x256 model whose forward
    and backward took 0.9 s; 0.25-0.3 s in fp32."""

    def __init__(self, params, ns_dtype, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum, (a, b, c) = group['lr'], group['momentum'], group['ns_coefficients']
            params = [p for p in group['params'] if p.grad is not None]
            grads = [p.grad for p in params]
            for p in params:
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
            buffers = [self.state[p]['momentum_buffer'] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group['nesterov'] else buffers
            # iterate on the wide form (X X^T is the smaller square), the matrices of one shape (a layer of every
            # block) in one batch: one matmul where there were n_layer, a step 30% faster for the classroom model
            by_shape = {}
            for p, update in zip(params, updates):
                by_shape.setdefault(update.shape, []).append((p, update))
            for (rows, cols), pairs in by_shape.items():
                wide = rows <= cols
                X = torch.stack([update if wide else update.T for _, update in pairs]).to(self.ns_dtype)
                X = X / X.norm(dim=(1, 2), keepdim=True).clamp(min=group['eps'])  # spectral norm at most 1
                for _ in range(group['ns_steps']):  # X <- a X + (b A + c A^2) X, A = X X^T: singular values -> ~1
                    A = X @ X.mT
                    X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
                for (p, _), x in zip(pairs, X):
                    p.mul_(1 - lr * group['weight_decay'])
                    # Keller Jordan's scaling by the shape (torch's 'original'), for which lr 0.02 is the usual
                    p.add_(x if wide else x.T, alpha=-lr * max(1, p.shape[0] / p.shape[1]) ** 0.5)


def build_model(checkpoint, dev):
    """(model, its EMA, optimizers, iteration): fresh, resumed from a checkpoint, or (fine-tuning) started from
    its EMA weights with fresh optimizers at iteration 0. The optimizers: AdamW, then Muon where muon_lr > 0."""
    torch.manual_seed(seed)
    model = model_from_config(globals()).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    matrices = muon_matrices(model) if muon_lr > 0 else []
    others = [p for p in model.parameters() if not any(p is m for m in matrices)]
    optimizers = [torch.optim.AdamW(others, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay,
                                    fused=not dev.startswith('mps'))]
    if matrices:
        optimizers.append(Muon(matrices, torch.bfloat16 if bf16_is_fast(dev) else torch.float32, lr=muon_lr,
                               weight_decay=weight_decay))
    if checkpoint is None:
        return model, ema, optimizers, 0
    try:
        if init_from == 'resume':
            model.load_state_dict(checkpoint['model'])
            for optimizer, key in zip(optimizers, OPTIMIZER_KEYS):
                optimizer.load_state_dict(checkpoint[key])  # which brings back the saved settings too, so
                for group in optimizer.param_groups:  # the config's win again (the loop sets the lr)
                    group['weight_decay'] = weight_decay
                    if 'betas' in group:
                        group['betas'] = (beta1, beta2)
        else:  # the EMA weights are the pretrained model's best
            model.load_state_dict(checkpoint['ema'])
        ema.load_state_dict(checkpoint['ema'])
    except (RuntimeError, ValueError, KeyError) as e:
        sys.exit(f"error: the weights in {start_checkpoint_path()} do not fit the model its config describes "
                 f"({str(e).strip().splitlines()[0][:200]})")
    return model, ema, optimizers, checkpoint['iter_num'] if init_from == 'resume' else 0


def batch_loss(net, batch, dev, autocast):
    """The loss of one micro-batch (make_batch) on the device, which draws the batch's t and noise itself."""
    tile = tile_of(globals())
    x = ids_to_image(batch['ids'].to(dev, non_blocking=True), color_base, tile)
    mask = to_grid(batch['mask'].to(dev, non_blocking=True)[..., None].float(), tile)
    cond = None if batch['cond'] is None else ids_to_image(batch['cond'].to(dev, non_blocking=True), color_base, tile)
    gen = torch.Generator(dev).manual_seed(batch['noise_seed'])
    t = torch.sigmoid(torch.randn(len(x), generator=gen, device=dev) * P_std + P_mean)
    noise = torch.randn(x.shape, generator=gen, device=dev)
    with autocast:
        return diffusion_loss(net, x, mask, t, noise, color_base if objective == 'digits' else 0, cond,
                              color_base ** 3 if objective == 'tokens' else 0)


@torch.no_grad()
def estimate_loss(ema, data, dev, autocast, rank, world_size, progress):
    """Loss of the EMA weights on the same eval_iters batches of each split every time, shared out among processes."""
    losses = {}
    for split_index, split in enumerate(['train', 'val']):
        total = torch.zeros(2, device=dev)  # (sum of losses, number of batches)
        for k in range(rank, eval_iters, world_size):
            progress['count'] += 1
            loss = batch_loss(ema, make_batch(data, split, (1 + split_index, k)), dev, autocast)
            total += torch.stack([loss.float(), torch.ones((), device=dev)])
        if world_size > 1:
            dist.all_reduce(total)
        losses[split] = (total[0] / total[1]).item()
    return losses


def duration(seconds):
    seconds = int(seconds)
    hours, minutes = seconds // 3600, seconds % 3600 // 60
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds % 60:02d}s"


def setup_processes(ddp, local_rank):
    """This process's device and its autocast (bf16 or none), and under torchrun the process group (its timeout
    comes after the watchdog's, which says who is missing)."""
    dev = setup_device(device, local_rank, ddp)
    if dev.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo',
                                timeout=timedelta(seconds=collective_timeout + 60),
                                device_id=torch.device(dev) if dev.startswith('cuda') else None)
    return dev, autocast_for(dev, dtype)


def autocast_for(dev, dtype):
    """bf16 autocast where --dtype asks for it ('auto': on CUDA, and on a CPU with bf16 matrix instructions,
    where bf16 matmuls outrun fp32 ones), else nothing (fp32). sample.py uses it too."""
    use_bf16 = dtype == 'bfloat16' or (dtype == 'auto' and bf16_is_fast(dev))
    return torch.autocast(dev.split(':')[0], dtype=torch.bfloat16) if use_bf16 else nullcontext()


def bf16_is_fast(dev):
    return dev.startswith('cuda') or dev == 'cpu' and cpu_has_bf16()


def cpu_has_bf16():
    """AVX512-BF16 or AMX (recent Xeons and EPYCs). Elsewhere a CPU emulates bf16, more slowly than fp32.
    Private functions of torch.cpu: a version without them gets fp32."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ('_is_avx512_bf16_supported',
                                                                     '_is_amx_tile_supported'))


def describe_run(model, data, dev, world_size, autocast, iter_num):
    n_params = sum(p.numel() for p in model.parameters())
    print(f"JiT: {n_params:,} parameters ({n_params / 1e6:.2f}M); {img_size}x{img_size} images, patch "
          f"{patch_size}, {data['meta']['encoding']} ids in base {color_base}")
    precision = 'fp32' if not isinstance(autocast, torch.autocast) else \
        'bf16 autocast' + (' (attention in fp32 after its qkv projection)' if dev == 'cpu' else '')
    print(f"device {dev} x {world_size} process(es), {precision}, global batch "
          f"{batch_size * gradient_accumulation_steps} = {batch_size} x {gradient_accumulation_steps} micro-steps, "
          f"from iter {iter_num}")
    if muon_lr > 0:
        n_muon = sum(p.numel() for p in muon_matrices(model))
        print(f"optimizer: Muon (lr {muon_lr:g}) for the {n_muon:,} weights of the attention and MLP matrices, AdamW "
              f"(lr {learning_rate:g}) for the other {n_params - n_muon:,} parameters")
    if data['n_pairs']:
        print(f"data: {data['meta']['train_pairs']:,} prompt/answer pairs, {data['n_pairs']} per micro-batch, prompt "
              f"dropped {cond_drop:.0%} of the time"
              + ("; text windows fill the rest" if data['n_pairs'] < batch_size else ''))


def log_line(iter_num, lossf, grad_normf, lr, meter, world_size, dev):
    """nanoGPT's log line, and what a long run needs besides: progress, ETA, data wait, memory. meter: what
    this process did since the last line (seconds are counted from meter['clock'])."""
    seconds = time.time() - meter['clock']
    gpu = torch.cuda.get_device_name(dev) if dev.startswith('cuda') else ''
    peak = peak_flops or next((flops for name, flops in PEAK_FLOPS.items() if name in gpu), 0.0)
    mfu = f"{meter['flops'] / seconds / peak * 100:.1f}%" if peak else '-'  # this rank's: every rank does the same work
    memory = f"{torch.cuda.max_memory_allocated(dev) / 2 ** 30:.1f} GiB, " if dev.startswith('cuda') else ''
    return (f"iter {iter_num}/{max_iters} ({iter_num / max_iters:.0%}): loss {lossf:.4f}, grad norm {grad_normf:.3f}, "
            f"lr {lr:.2e}, {seconds / meter['iters'] * 1000:.0f} ms/iter, "
            f"{meter['iters'] * batch_size * gradient_accumulation_steps / seconds:.1f} img/s, "
            f"{meter['tokens'] * world_size / seconds:,.0f} tok/s, data wait {meter['waited'] / seconds:.1%}, "
            f"mfu {mfu}, {memory}ETA {duration((max_iters - iter_num) * seconds / meter['iters'])}")


def accumulate_gradients(net, batches, accum_steps, dev, autocast, meter, progress, flops):
    """One iteration's micro-steps in this process: forward and backward of each, with the gradients
    all-reduced (under DDP) only on the last. Returns the mean loss, on the device."""
    loss_sum = torch.zeros((), device=dev)
    for micro in range(accum_steps):
        batch, waited = next(batches)
        progress['count'] += 1
        if isinstance(net, DDP):
            net.require_backward_grad_sync = micro == accum_steps - 1
        loss = batch_loss(net, batch, dev, autocast)
        (loss / accum_steps).backward()
        loss_sum += loss.detach() / accum_steps
        meter['waited'] += waited
        meter['tokens'] += batch['n_tokens']
        meter['flops'] += batch['n_prompts'] * flops[1] + (batch_size - batch['n_prompts']) * flops[0]
    return loss_sum


def agree(problem, dev, ddp):
    """Whether any process has a problem (a non-empty string), known to every process."""
    failed = torch.tensor(float(bool(problem)), device=dev)
    if ddp:
        dist.all_reduce(failed)
    return failed.item() > 0


def finish(master, stop_processes, message, exit_code):
    """Every process stops here together; the master says why."""
    if master:
        print(message, file=sys.stderr if exit_code else sys.stdout, flush=True)
    if stop_processes:  # under DDP
        stop_processes()
    sys.exit(exit_code)


def new_meter():
    return {'clock': time.time(), 'iters': 0, 'tokens': 0, 'flops': 0, 'waited': 0.0}


def train():
    """nanoGPT's loop, over one process or torchrun's, with EMA weights. A NaN, a signal or a process that stops
    answering never damages a saved checkpoint (a signal saves one first; a NaN stops before its step). Returns
    the model (its last weights; the EMA's are in the checkpoint)."""
    ddp = 'RANK' in os.environ  # one of several processes started by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE)
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    master = rank == 0
    accum_steps = gradient_accumulation_steps // world_size
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    lock = claim_out_dir() if master else None  # held until this process ends
    checkpoint = None if init_from == 'scratch' else load_checkpoint(start_checkpoint_path(), mmap=True)
    data = load_data()
    if checkpoint and init_from == 'resume' and checkpoint['iter_num'] >= max_iters:
        print(f"{ckpt_path} is at iteration {checkpoint['iter_num']} already (max_iters={max_iters}); nothing to "
              f"do, raise --max_iters to train on")
        return None
    dev, autocast = setup_processes(ddp, local_rank)
    model, ema, optimizers, iter_num = build_model(checkpoint, dev)
    checkpoint = None  # free it
    train_model = torch.compile(model) if compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[torch.device(dev).index] if dev.startswith('cuda') else None)
    if master:
        describe_run(model, data, dev, world_size, autocast, iter_num)
    progress = {'count': 0, 'iter': iter_num}  # how far this process got, for the watchdog
    stop_processes = start_watchdog(rank, world_size, progress) if ddp else None
    catch_stop_signals()

    # a micro-batch is named by (iteration, its index among the iteration's micro-steps), whatever process runs it:
    # any number of processes, and a resumed run, train on exactly the batches one process would have
    keys = ((0, it, rank * accum_steps + micro) for it in range(iter_num, max_iters) for micro in range(accum_steps))
    batches = prefetch(lambda key: make_batch(data, 'train', key, pin=dev.startswith('cuda')), keys)
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    flops = flops_per_image(model), flops_per_image(model, conditional=True)  # without, with a prompt
    advice = f"Try a lower --learning_rate (now {learning_rate:g}) or --grad_clip=1, then --init_from=resume"
    meter = new_meter()
    while iter_num < max_iters:
        lr = get_lr(iter_num)
        muon_now = muon_lr * lr / learning_rate if learning_rate else 0.0  # Muon follows the same schedule
        for optimizer, optimizer_lr in zip(optimizers, (lr, muon_now)):
            for group in optimizer.param_groups:
                group['lr'] = optimizer_lr
        loss_sum = accumulate_gradients(train_model, batches, accum_steps, dev, autocast, meter, progress, flops)
        grad_norm = torch.nn.utils.clip_grad_norm_(model_params, grad_clip or math.inf)
        # one all-reduce tells every process the mean loss, the gradient norm and whether any process got a signal
        shared = torch.stack([loss_sum, grad_norm.float(), torch.tensor(float(len(stop_signals)), device=dev)])
        if ddp:
            dist.all_reduce(shared)
        lossf, grad_normf, stop = (shared / world_size).tolist()
        if not (math.isfinite(lossf) and math.isfinite(grad_normf)):
            finish(master, stop_processes, f"error: iteration {iter_num}: loss {lossf}, gradient norm "
                   f"{grad_normf}: the step was not taken and nothing was saved. {advice}", 1)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # a young EMA would mostly remember the random init, so its decay ramps up
            torch._foreach_lerp_(ema_params, model_params, 1 - min(ema_decay, (1 + iter_num) / (10 + iter_num)))
        iter_num += 1
        meter['iters'] += 1
        progress['iter'] = iter_num

        if iter_num % log_interval == 0 and master:
            print(log_line(iter_num, lossf, grad_normf, lr, meter, world_size, dev))
            meter = new_meter()
        if iter_num % eval_interval == 0 or iter_num == max_iters or stop:
            losses = None if stop else estimate_loss(ema, data, dev, autocast, rank, world_size, progress)
            if losses and not all(map(math.isfinite, losses.values())):
                finish(master, stop_processes, f"error: iteration {iter_num}: the EMA weights give losses "
                       f"{losses}: nothing was saved. {advice}", 1)
            problem = save_checkpoint({'model': model.state_dict(), 'ema': ema.state_dict(),
                                       **dict(zip(OPTIMIZER_KEYS, (o.state_dict() for o in optimizers))),
                                       'iter_num': iter_num, 'meta': data['meta'],
                                       'config': {k: globals()[k] for k in config_keys}}, ckpt_path) if master else ''
            if agree(problem, dev, ddp):  # the others wait here until the master has saved
                finish(master, stop_processes, f"error: iteration {iter_num}: {problem}; the previous checkpoint "
                       f"is as it was", 1)
            if master and losses:
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                      f"(EMA weights), saved {ckpt_path}")
            if stop:
                name = signal.Signals(stop_signals[0]).name if stop_signals else 'a signal to another process'
                finish(master, stop_processes, f"iter {iter_num}: stopped on {name}; saved {ckpt_path}. Continue "
                       f"with --init_from=resume", 0)
            meter = new_meter()  # evaluation is not timed
    if ddp:
        stop_processes()
    return model


# -----------------------------------------------------------------------------
# plumbing: the command line, checkpoint files, devices, and the guards that keep a real run from losing
# work (read the method above first; train() and configure() call these)

def configure(args):
    """The run's configuration, settled before anything starts: the defaults above, then the preset, then what a
    resumed run saved (or, to fine-tune, what the weights fix), then --key=value flags, except over what the
    weights fix (MODEL_KEYS: a note says so); then every value is checked against its range, so a bad value is
    one line naming the flag, never a traceback."""
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
        if key not in config_keys:
            close = difflib.get_close_matches(key, config_keys, n=3)
            hint = f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ''
            sys.exit(f"error: unknown config key --{key}{hint}; see the config block at the top of pixeldlm.py")
        flags.append((key, value))
    for key, value in flags:
        if key == 'preset':
            if value not in presets:
                sys.exit(f"error: unknown preset {value!r}; known presets: {', '.join(presets)}")
            globals().update(presets[value])
    given = {key: parse_value(key, value) for key, value in flags}
    globals().update(given)
    if init_from != 'scratch':
        checkpoint = load_checkpoint(start_checkpoint_path(), mmap=True)
        saved = checkpoint['config']
        for key in MODEL_KEYS:  # said once, by torchrun's first process (or the only one)
            if key in given and given[key] != saved[key] and os.environ.get('RANK', '0') == '0':
                print(f"note: --{key}={given[key]} is not used: the weights of {start_checkpoint_path()} fix "
                      f"{key}={saved[key]}")
        settled = MODEL_KEYS if init_from != 'resume' else [k for k in config_keys if k not in given or k in MODEL_KEYS]
        globals().update({k: saved[k] for k in settled if k in saved and k not in ('init_from', 'out_dir')})
        if init_from == 'resume' and (muon_lr > 0) != (saved['muon_lr'] > 0):
            sys.exit(f"error: {start_checkpoint_path()} saved the optimizer state of a run with --muon_lr="
                     f"{saved['muon_lr']:g}; resume it with Muon {'on' if saved['muon_lr'] > 0 else 'off'} as well")
    meta = load_meta(data_dir) if init_from != 'scratch' or color_base == 0 else None
    if init_from != 'scratch' and checkpoint['meta']['encoding'] != meta['encoding']:
        sys.exit(f"error: {start_checkpoint_path()} was trained on {checkpoint['meta']['encoding']} ids but "
                 f"{data_dir} holds {meta['encoding']} ids; give it data in the same encoding")
    if color_base == 0:
        globals()['color_base'] = math.ceil(meta['vocab_size'] ** (1 / 3) - 1e-9)
    check_config()


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
        value = float(text) if text.lower() in ('nan', 'inf', '-inf') else None  # caught as out of range below
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        sys.exit(f"error: --{key} takes a {type(default).__name__} like {default!r}, not {text!r}")
    return value


def check_config():
    def require(ok, key, allowed):  # comparisons with nan are False, so nan never passes
        if not ok:
            sys.exit(f"error: --{key}={globals()[key]!r} is out of range: it must be {allowed}")
    for key in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters',
                'max_iters', 'lr_decay_iters', 'img_size', 'patch_size', 'n_layer', 'n_head', 'n_embd', 'sample_steps'):
        require(globals()[key] >= 1, key, 'at least 1')
    for key in ('warmup_iters', 'seed', 'learning_rate', 'muon_lr', 'min_lr', 'weight_decay', 'grad_clip',
                'peak_flops'):
        require(0 <= globals()[key] < math.inf, key, 'a finite number >= 0')
    for key in ('ema_decay', 'cond_drop', 'pair_fraction', 'eta', 'time_delay', 'renoise_above', 'draw_below'):
        require(0 <= globals()[key] <= 1, key, 'between 0 and 1')
    for key in ('beta1', 'beta2'):
        require(0 <= globals()[key] < 1, key, 'at least 0 and below 1')
    for key in ('P_std', 'time_shift', 'collective_timeout'):
        require(0 < globals()[key] < math.inf, key, 'a finite number > 0')
    for key in ('P_mean', 'guidance'):
        require(-math.inf < globals()[key] < math.inf, key, 'finite')
    require(color_base == 0 or color_base >= 2, 'color_base', '0 (the smallest base for the vocabulary) or >= 2')
    require(objective in ('v', 'digits', 'tokens'), 'objective', "'v', 'digits' or 'tokens'")
    require(objective != 'tokens' or color_base ** 3 <= 4096, 'color_base', "at most 16 with --objective=tokens "
            "(a softmax over color_base ** 3 ids per pixel: vocabularies of at most 4096 ids, such as bytes)")
    require(pixel_order in ('row', 'patch'), 'pixel_order', "'row' or 'patch'")
    require(dtype in ('auto', 'bfloat16', 'float32'), 'dtype', "'auto', 'bfloat16' or 'float32'")
    require(img_size % patch_size == 0, 'img_size', f"a multiple of --patch_size={patch_size}")
    require(n_embd % n_head == 0 and n_embd % 4 == 0, 'n_embd', f"a multiple of 4 and of --n_head={n_head}")
    require(rope in ROPE_HEAD_MULTIPLE, 'rope', "'text', 'grid' or 'none'")
    require(n_embd // n_head % ROPE_HEAD_MULTIPLE.get(rope, 1) == 0, 'n_head', "such that --n_embd / "
            "--n_head is a multiple of 4 (rotary positions on the grid) or 2 (on the text), or --rope=none")
    require(not decay_lr or lr_decay_iters > warmup_iters, 'lr_decay_iters', f"above --warmup_iters={warmup_iters}")
    processes = int(os.environ.get('WORLD_SIZE', 1))  # torchrun's
    require(gradient_accumulation_steps % processes == 0, 'gradient_accumulation_steps',
            f"a multiple of the number of processes ({processes}), which share out its micro-steps")


def start_checkpoint_path():
    """The checkpoint a run starts from: out_dir/ckpt.pt to resume, or another run's to fine-tune."""
    if init_from == 'resume':
        path = os.path.join(out_dir, 'ckpt.pt')
        if not os.path.exists(path):
            sys.exit(f"error: --init_from=resume but {path} does not exist; train with --init_from=scratch first")
        return path
    if not os.path.isfile(init_from):
        sys.exit(f"error: --init_from must be 'scratch', 'resume' or a checkpoint file, and {init_from!r} is none "
                 f"of these")
    return init_from


def load_checkpoint(path, map_location='cpu', mmap=False):
    """A checkpoint, checked, or one line that says why not: tensors, numbers and strings only (weights_only=True,
    so a file can never run code), every part this version needs (a file from before a config key existed gets
    the value its run used), and finite weights (a diverged run's are refused)."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        sys.exit(f"error: refusing to load {path}: it holds more than tensors, numbers and strings "
                 f"({str(e).strip().splitlines()[-1]})")
    except Exception as e:  # a truncated file, a text file, an empty one, ...
        sys.exit(f"error: cannot read {path}: it is truncated or not a PyTorch checkpoint ({type(e).__name__}: "
                 f"{(str(e).splitlines() or [''])[0][:160]})")
    needed = {'model', 'ema', 'optimizer', 'config', 'meta', 'iter_num'}
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        sys.exit(f"error: {path} is not a PixelDLM checkpoint (it needs {', '.join(sorted(needed))})")
    checkpoint['config'] = {**LEGACY_CONFIG, **checkpoint['config']}
    if isinstance(checkpoint['config']['rope'], bool):  # before rotary positions came in kinds, True was the grid
        checkpoint['config']['rope'] = 'grid' if checkpoint['config']['rope'] else 'none'
    if checkpoint['config'].get('self_cond'):
        sys.exit(f"error: {path} was trained with self-conditioning, which left the code in 85a85de "
                 f"(`git checkout a1550de` has it)")
    if not all(w.isfinite().all() for w in checkpoint['ema'].values() if w.is_floating_point()):
        sys.exit(f"error: {path} holds non-finite weights (its run diverged); use an earlier checkpoint")
    return checkpoint


def save_checkpoint(state, path):
    """Atomic and durable: a temporary file of this process's own, flushed to the disk, then renamed over path,
    so a crash or a full disk never leaves a broken ckpt.pt. Returns None, or what went wrong."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        return f"could not save {path} ({str(e).strip().splitlines()[0][:200]})"


def setup_device(name, local_rank=0, ddp=False):
    """--device -> the device this process uses, checked. A GPU goes by its index (torch.cuda.set_device refuses
    a bare 'cuda'): under torchrun every process takes the GPU of its LOCAL_RANK, alone it takes GPU 0."""
    if not re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', name):
        sys.exit(f"error: --device={name!r} is not a device: it must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name == 'mps' and not torch.backends.mps.is_available():
        sys.exit("error: --device=mps but this PyTorch sees no MPS device (Apple GPUs only); use --device=cpu")
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            sys.exit(f"error: --device={name} but this PyTorch sees no CUDA GPU; use --device=cpu")
        if name == 'cuda':
            name = f'cuda:{local_rank}'
        elif ddp:
            sys.exit(f"error: --device={name}: under torchrun every process takes the GPU of its LOCAL_RANK; "
                     f"pass --device=cuda, and pick GPUs with CUDA_VISIBLE_DEVICES")
        if int(name[5:]) >= torch.cuda.device_count():
            sys.exit(f"error: --device={name} but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(name)
    if name == 'cpu':
        keep_freed_memory()
    return name


def keep_freed_memory():
    """glibc hands big freed buffers back to the kernel (munmap, or a trimmed heap), so every CPU step faults its
    tensors' pages in afresh: 5,500 faults (22 MB) a step for the 6x128 classroom model, a tenth of its time on 2 cores
    (README). PyTorch's tuning guide swaps in jemalloc or TCMalloc; two glibc settings do it too: buffers up to
    32 MB (its most) come from the heap, and the heap keeps what it has. Other C libraries are left alone."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: return memory only when 1 GB lies free at the top


def start_watchdog(rank, world_size, progress):
    """Under DDP a process that stops answering (stopped, hung in I/O, or on a dead node) would leave the others
    waiting inside a collective forever. A thread in every process publishes, each second, a heartbeat and how
    far it got (progress['count']: micro-steps and evaluation batches) to the store torchrun set up. When its own
    progress stalls for collective_timeout seconds, it names the processes whose heartbeat stopped, or that are
    behind, and ends this one. Returns what ends the thread, then the process group."""
    store = dist.distributed_c10d._get_default_store()  # torchrun's rendezvous store (a private accessor)
    keys = [f'pixeldlm/{r}' for r in range(world_size)]

    def read_all():  # [(heartbeat, progress)] of every rank
        return [tuple(map(int, store.get(k).split())) if store.check([k]) else (-1, -1) for k in keys]

    def watch():
        beat, last_count, since, first_look = 0, -1, time.time(), None
        while not stopped.wait(1):
            beat += 1
            try:
                store.set(keys[rank], f"{beat} {progress['count']}")
            except Exception:  # the store lives with node 0; the timeout below still ends this process
                pass
            if progress['count'] != last_count:
                last_count, since, first_look = progress['count'], time.time(), None
            elif time.time() - since > collective_timeout:
                try:
                    first_look = first_look or (beat, read_all())  # look again 5 heartbeats later: whose stopped?
                    if beat - first_look[0] < 5:
                        continue
                    now = read_all()
                    gone = [r for r in range(world_size) if now[r][0] == first_look[1][r][0]]
                    behind = [r for r in range(world_size) if now[r][1] < max(n[1] for n in now)]
                    who = (f"rank {', '.join(map(str, gone))} stopped (frozen, killed, or its node is down)" if gone
                           else f"rank {', '.join(map(str, behind))} is stuck in its own work" if behind
                           else "every rank is waiting at the same point")
                except Exception:
                    who = "the store on node 0 does not answer (node 0 is down)"
                print(f"error: rank {rank}: no progress for {collective_timeout:g} s at iteration {progress['iter']}; "
                      f"{who}. Saved checkpoints are intact: continue with --init_from=resume once every process "
                      f"is back", file=sys.stderr, flush=True)
                os._exit(1)
    stopped, thread = threading.Event(), threading.Thread(target=watch, daemon=True)
    thread.start()

    def stop():  # Python 3.11 ends a daemon thread still inside a store call at exit with std::terminate (abort)
        stopped.set()
        thread.join(timeout=10)
        dist.destroy_process_group()
    return stop


def claim_out_dir():
    """Before the master process writes to out_dir: one trainer per out_dir (an exclusive lock on out_dir/lock,
    which the OS drops when the process ends, however it ends, so a crashed run never leaves it stuck; returned,
    keep it open), no leftovers of a save that a kill interrupted, and only a resumed run writes over a checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, 'lock'), 'w')
    try:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"error: another trainer is using {out_dir} (it holds {out_dir}/lock); wait for it to end or "
                 f"pick another --out_dir")
    for name in os.listdir(out_dir):
        if name.startswith('ckpt.pt.tmp'):
            os.remove(os.path.join(out_dir, name))
    if init_from != 'resume' and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):  # a fresh run or a fine-tune
        sys.exit(f"error: {out_dir}/ckpt.pt already exists; continue it with --init_from=resume or pick another "
                 f"--out_dir")
    return lock


if __name__ == '__main__':
    sys.stdout.reconfigure(line_buffering=True)  # log lines show up at once, also through `| tee log.txt`
    configure(sys.argv[1:])
    train()
