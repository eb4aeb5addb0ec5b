"""
Generate text with a trained PixelDLM checkpoint (its EMA weights), or print its quality report.

$ python sample.py --out_dir=out-classroom
$ python sample.py --out_dir=out --num_samples=8 --steps=50 --seed=7 --png=samples.png
$ python sample.py --out_dir=out-reverse --prompt "apple river stone"    # a checkpoint trained on pairs
$ python sample.py --out_dir=out-reverse --prompt_file=prompts.txt --guidance=2 --png=answers.png
$ python sample.py --out_dir=out-classroom --eval                        # the quality report
"""
import argparse
import math
import os
import re
import shutil
import struct
import sys
import time
import zlib

import numpy as np
import torch

from pixeldlm import (autocast_for, diffusion_loss, generate, get_batch, ids_to_image, image_to_ids, load_checkpoint,
                      load_meta, load_pairs, load_tokens, model_from_config, prompt_images, setup_device, to_grid)
from prepare_data import get_encoding


# -----------------------------------------------------------------------------
# ids -> text

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


def visible(ids, enc):
    """Ids as one line of text, up to the end-of-text, for lines that stay aligned: an id that decodes to
    nothing shows as '·', a line end as '↵', a tab as '→', any other control character as '·'."""
    raw = b''.join(token_bytes(i, enc) or '·'.encode() for i in text_part(ids, enc.eot_token))
    return ''.join('↵' if c == '\n' else '→' if c == '\t' else c if c.isprintable() else '·'
                   for c in raw.decode('utf-8', errors='replace'))


def show_steps(trajectory, base, tile, enc, first, width):
    """Watch text come out of noise: for each sample, the text that every DDIM step's x_hat decodes to,
    one line per step."""
    for k in range(len(trajectory[0][1])):
        print(f"---------- sample {first + k}, step by step: the text of x_hat at each t")
        for step, (t, _, x_hat) in enumerate(trajectory, 1):
            text = visible(image_to_ids(x_hat[k:k + 1], base, tile)[0].tolist(), enc)
            print(f"step {step:2d} t={t:.2f} | {text[:width]}")


def note(message):  # progress of long runs goes to stderr, so stdout holds just the results
    print(message, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# the quality report (--eval): does it write text?

RECOVERY_TS = (0.3, 0.5, 0.7, 0.9)  # the noise levels token recovery is measured at


@torch.no_grad()
def recovery_accuracy(model, ids, mask, t, noise, base, eot_id, tile=1):
    """Noise clean texts to time t and decode ONE x_hat, the model's output (a classifying head's mean color, not
    the sampler's last-step argmax): (fraction of text tokens recovered exactly, fraction of texts ending inside
    the image whose end-of-text comes back at the right place)."""
    x = ids_to_image(ids, base, tile)
    x_hat = model(t * x + (1 - t) * noise, torch.full((len(x),), t, device=x.device))
    predicted = image_to_ids(x_hat, base, tile)
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


def words(text):  # runs of three or more letters, in lower case
    return re.findall(r'[a-z]{3,}', text.lower())


def decode_all(ids, enc):
    """A stream of ids (documents ended by end-of-text) -> one text, the documents a line apart."""
    ids = np.asarray(ids, dtype=np.int64)
    if enc.name == 'bytes':  # the fast way for the byte vocabulary
        return bytes(np.where(ids == enc.eot_token, 10, ids).astype(np.uint8)).decode('utf-8', errors='replace')
    return '\n'.join(enc.decode(part.tolist()) for part in np.split(ids, np.flatnonzero(ids == enc.eot_token)))


def word_statistics(texts, real_texts, soup, train_tokens, enc):
    """The share of sampled words (runs of 3+ letters) that occur in the training text, beside
    held-out real text of the same length (the ceiling) and the soup of ids drawn independently from the training
    unigram distribution (the floor: letter soup with the right letters and spaces for bytes; for a vocabulary of
    whole words, such as cl100k_base, random tokens that are often words already)."""
    known = set(words(decode_all(train_tokens[:20_000_000], enc)))
    sampled = '\n'.join(ids_to_text(text, enc)[0] for text in texts)
    real = '\n'.join(ids_to_text(text, enc)[0] for text in real_texts)[:max(len(sampled), 1)]
    hits = {}
    for name, text in ('word_hits', sampled), ('word_ceiling', real), ('word_floor', ids_to_text(soup, enc)[0]):
        found = words(text)
        hits[name] = sum(w in known for w in found) / len(found) if found else 0.0
    return hits


def sample_statistics(sample_ids, real_ids, train_tokens, enc, rng):
    """Unconditional samples against real windows of the same size: valid ids, texts that end, unigram
    entropy (against as many real tokens), the word hit rate (word_statistics), and the bigram hit rate: the
    fraction of sampled neighbour pairs found anywhere in the training data, beside real text (the ceiling)
    and ids drawn independently from the training unigram distribution (the floor, the same soup as the words')."""
    def valid(i):
        return token_bytes(i, enc) is not None
    texts = [text_part(row, enc.eot_token) for row in sample_ids]
    real_texts = [text_part(row, enc.eot_token) for row in real_ids]
    n_ids = sum(len(text) for text in texts)
    stats = {'valid_ids': sum(valid(i) for text in texts for i in text) / max(n_ids, 1),
             'ended': float(np.mean([enc.eot_token in list(row) for row in sample_ids])),
             'ended_real': float(np.mean([enc.eot_token in list(row) for row in real_ids]))}
    vocab = enc.n_vocab
    train_tokens = np.asarray(train_tokens[:100_000_000], dtype=np.int64)  # enough to find any common pair
    unigram = np.bincount(train_tokens, minlength=vocab).astype(np.float64)
    unigram[enc.eot_token] = 0
    soup = rng.choice(vocab, size=max(n_ids, 10_000), p=unigram / unigram.sum())
    stats.update(word_statistics(texts, real_texts, soup.tolist(), train_tokens, enc))
    texts = [[i for i in text if valid(i)] for text in texts]  # invalid ids have no bigrams to look up
    sampled = [i for text in texts for i in text]
    real = [i for text in real_texts for i in text][:max(len(sampled), 1)]
    stats['entropy'], stats['entropy_real'] = entropy_bits(sampled or [0]), entropy_bits(real)
    known = np.unique(bigrams([train_tokens], vocab))
    for name, group in ('bigram_hits', texts), ('bigram_ceiling', real_texts), ('bigram_floor', [soup]):
        keys = bigrams(group, vocab)
        stats[name] = float(np.isin(keys, known).mean()) if len(keys) else 0.0
    return stats


def generate_ids(model, n, steps, seed, base, eot_id, time_shift, prompts=None, guidance=1.0, batch_size=None,
                 **sampler):
    """The ids of n samples (or of the answers to n prompts), batch_size at a time (None: all at once): each
    sample's noise depends on its index alone, so the batches change nothing but the memory."""
    batch_size = batch_size or n
    return torch.cat([generate(model, min(batch_size, n - first), steps, seed, base, eot_id, time_shift,
                               None if prompts is None else prompts[first:first + batch_size], guidance, first,
                               **sampler)[1] for first in range(0, n, batch_size)])


@torch.no_grad()
def answer_accuracy(model, enc, pairs, base, steps, time_shift, guidance, n_prompts=200, seed=0, batch_size=None,
                    **sampler):
    """Answer the first n_prompts held-out prompts: (exact-match rate: the answer's text is the reference,
    token accuracy: over the reference's tokens and its end-of-text, seconds per answer). sampler: eta,
    time_delay, renoise_above, draw_below for generate."""
    stream, bounds = pairs
    bounds = bounds[:n_prompts]
    clock = time.time()
    ids = generate_ids(model, len(bounds), steps, seed, base, enc.eot_token, time_shift,
                       [stream[a:b].tolist() for a, b, _, _ in bounds], guidance, batch_size, **sampler)
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
                   n_windows=64, n_samples=32, batch_size=None, **sampler):
    """Seeded numbers for one checkpoint. On text: validation loss (t ~ logit-normal(t_mean, t_std) as in
    training), token recovery at fixed t, and statistics of n_samples unconditional samples. On held-out
    prompt/answer pairs: answer accuracy without guidance (w = 1) and with it. batch_size: samples or answers
    generated at once (None: all)."""
    meta = load_meta(data_dir)
    report = {}
    if meta.get('val_pairs'):
        pairs = load_pairs(data_dir, 'val', enc.eot_token)
        for w in sorted({1.0, guidance}):
            note(f"eval: answering held-out prompts with guidance w={w:g}")
            report[f'answers_w{w:g}'] = answer_accuracy(model, enc, pairs, base, steps, time_shift, w, seed=seed,
                                                        batch_size=batch_size, **sampler)
    if not meta['val_tokens']:
        return report
    dev = model.pos_embed.device
    side, tile = model.grid * model.patch_size, model.tile
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    ids, mask = map(torch.from_numpy, get_batch(load_tokens(data_dir, 'val'), rng, n_windows, side * side,
                                                 enc.eot_token))
    noise = torch.randn(len(ids), 3, side, side, generator=gen).to(dev)
    t_val = torch.sigmoid(torch.randn(len(ids), generator=gen) * t_std + t_mean).to(dev)
    ids, mask = ids.to(dev), mask.to(dev)
    note(f"eval: validation loss and token recovery on {n_windows} held-out windows")
    x, mask_image = ids_to_image(ids, base, tile), to_grid(mask[..., None].float(), tile)
    report['val_loss'] = diffusion_loss(model, x, mask_image, t_val, noise, model.digit_classes,
                                        token_classes=model.token_classes).item()
    for t in RECOVERY_TS:
        report[f'recovery_t{t}'], report[f'eot_position_t{t}'] = recovery_accuracy(model, ids, mask, t, noise,
                                                                                  base, enc.eot_token, tile)
    note(f"eval: {n_samples} samples of {steps} DDIM steps")
    clock = time.time()
    sample_ids = generate_ids(model, n_samples, steps, seed, base, enc.eot_token, time_shift, batch_size=batch_size,
                              **sampler)
    report['seconds_per_sample'], report['n_samples'] = (time.time() - clock) / n_samples, n_samples
    note("eval: statistics against the training text")
    report.update(sample_statistics(sample_ids.tolist(), ids.tolist(), load_tokens(data_dir, 'train'), enc, rng))
    return report


def write_png(path, rgb):
    """(H, W, 3) uint8 array -> PNG file, with zlib alone (no PIL)."""
    height, width, _ = rgb.shape
    rows = b''.join(b'\x00' + rgb[y].tobytes() for y in range(height))  # each row: filter 0, then pixels

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows))
                + chunk(b'IEND', b''))


def join(images, dim, gap):
    """uint8 images (3, h, w) side by side (dim=2) or one above the other (dim=1), `gap` white pixels apart."""
    shape = list(images[0].shape)
    shape[dim] = gap
    white = torch.full(shape, 255, dtype=torch.uint8)
    return torch.cat([part for image in images for part in (image, white)][:-1], dim=dim)


def to_pixels(images):  # (B, 3, S, S) in [-1, 1] -> uint8
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()


def print_report(r, ckpt_path, seed, steps, time_shift, sampler):
    samples = f", {r['n_samples']} samples" if 'n_samples' in r else ''
    eta = f"eta {sampler['eta']:g}, " if sampler['renoise_above'] > 0 else ''  # renoising every step leaves it idle
    print(f"quality report: {ckpt_path}, seed {seed}, {steps} DDIM steps (time shift {time_shift:g}, {eta}time delay "
          f"{sampler['time_delay']:g}, renoise above {sampler['renoise_above']:g}, draw below "
          f"{sampler['draw_below']:g}){samples}")
    for key in [k for k in r if k.startswith('answers_w')]:
        exact, per_token, seconds = r[key]
        print(f"held-out prompts, guidance w={key[9:]:4s} exact match {exact:6.1%}, token accuracy "
              f"{per_token:6.1%} ({seconds:.3f} s/answer)")
    if 'val_loss' not in r:
        return
    percent = lambda v: '   n/a' if math.isnan(v) else f"{v:6.1%}"  # n/a: no window ends inside its image
    way = lambda kind: (r[f'{kind}_hits'] - r[f'{kind}_floor']) / max(r[f'{kind}_ceiling'] - r[f'{kind}_floor'], 1e-9)
    print(f"word hits             {r['word_hits']:.1%} of sampled words occur in the training text (floor "
          f"{r['word_floor']:.1%}, ceiling {r['word_ceiling']:.1%}: {way('word'):.0%} of the way)")
    print(f"validation loss       {r['val_loss']:.4f}")
    print("token recovery        " + "  ".join(f"t={t}: {percent(r[f'recovery_t{t}'])}" for t in RECOVERY_TS))
    print("end-of-text position  " + "  ".join(f"t={t}: {percent(r[f'eot_position_t{t}'])}" for t in RECOVERY_TS))
    print(f"samples               {r['seconds_per_sample']:.3f} s/sample")
    print(f"valid ids             {r['valid_ids']:.1%}")
    print(f"ended with end-of-text {r['ended']:.1%} (real windows of this size: {r['ended_real']:.1%})")
    print(f"unigram entropy       {r['entropy']:.2f} bits (real text: {r['entropy_real']:.2f})")
    print(f"bigram hit rate       {r['bigram_hits']:.1%} (floor {r['bigram_floor']:.1%}, ceiling "
          f"{r['bigram_ceiling']:.1%}: {way('bigram'):.0%} of the way)")


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out_dir', default='out', help='the folder holding ckpt.pt')
    parser.add_argument('--num_samples', type=int, help='samples to print (default 3), or for --eval (default 32)')
    parser.add_argument('--batch_size', type=int,
                        help='samples generated at once (default 64; --eval: all at once); memory grows with it')
    parser.add_argument('--steps', type=int, help="DDIM steps (default: the checkpoint's sample_steps)")
    parser.add_argument('--time_shift', type=float, help="the sampler's grid (default: the checkpoint's)")
    parser.add_argument('--eta', type=float, help="0: deterministic DDIM, 1: DDPM steps (default: the checkpoint's)")
    parser.add_argument('--time_delay', type=float,
                        help="the model is told t minus this, a noisier time (default: the checkpoint's)")
    parser.add_argument('--renoise_above', type=float, help="steps to a t above this draw z afresh from x_hat and "
                        "new noise; 1: none, 0: all (default: the checkpoint's)")
    parser.add_argument('--draw_below', type=float, help="steps at a t below this draw each pixel of x_hat from the "
                        "head's distribution instead of taking its mean; 0: none (default: the checkpoint's)")
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    parser.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float32'],
                        help="'auto': bfloat16 autocast on CUDA and on CPUs with bf16 instructions, else float32")
    parser.add_argument('--png', help='also write the generated images, side by side, to this PNG file')
    parser.add_argument('--show_steps', action='store_true',
                        help="print the text of every step's x_hat; with --png, draw z_t and x_hat of every step")
    parser.add_argument('--prompt', help='text to answer (needs a checkpoint trained on prompt/answer pairs)')
    parser.add_argument('--prompt_file', help='a file of prompts to answer, one per line')
    parser.add_argument('--guidance', type=float, help="classifier-free guidance scale (default: the checkpoint's)")
    parser.add_argument('--eval', action='store_true', help='print the quality report instead of samples')
    parser.add_argument('--data_dir', help="data for --eval (default: the checkpoint's training data)")
    args = parser.parse_args()
    for key in ('steps', 'num_samples', 'batch_size'):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1, not {getattr(args, key)}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, not {args.seed}")
    if args.time_shift is not None and not 0 < args.time_shift < math.inf:
        parser.error(f"--time_shift must be a finite number > 0, not {args.time_shift}")
    sampler_keys = ('eta', 'time_delay', 'renoise_above', 'draw_below')  # the checkpoint's, which flags override
    for key in sampler_keys:
        if getattr(args, key) is not None and not 0 <= getattr(args, key) <= 1:
            parser.error(f"--{key} must be between 0 and 1, not {getattr(args, key)}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        parser.error(f"--guidance must be finite, not {args.guidance}")
    ignored = [flag for flag, given in (('--png', args.png), ('--show_steps', args.show_steps),
                                        ('--prompt', args.prompt is not None), ('--prompt_file', args.prompt_file))
               if given]
    if args.eval and ignored:
        parser.error(f"--eval prints the quality report only (its prompts are the data's held-out ones); drop "
                     f"{', '.join(ignored)}")
    if args.png and (os.path.isdir(args.png) or not os.path.isdir(os.path.dirname(os.path.abspath(args.png)))):
        parser.error(f"--png={args.png}: give a file path in a folder that exists")

    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        sys.exit(f"error: {ckpt_path} not found; train a model first (python pixeldlm.py --preset=classroom) "
                 f"or point --out_dir at a folder with ckpt.pt")
    prompts = None
    if args.prompt is not None or args.prompt_file:
        prompts = [args.prompt] if args.prompt is not None else []
        if args.prompt_file:
            try:
                with open(args.prompt_file, encoding='utf-8') as f:
                    prompts += [line.rstrip('\n') for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                sys.exit(f"error: cannot read --prompt_file {args.prompt_file}: {e}")
            if not prompts:
                sys.exit(f"error: {args.prompt_file} holds no prompts")
    device = setup_device(args.device)
    checkpoint = load_checkpoint(ckpt_path, device)
    config, meta = checkpoint['config'], checkpoint['meta']
    if prompts and not meta.get('train_pairs'):
        sys.exit(f"error: {ckpt_path} was trained on plain text only; --prompt needs a checkpoint trained on "
                 f"prompt/answer pairs (prepare_data.py writes them from {{\"prompt\", \"answer\"}} lines)")
    if args.draw_below and config['objective'] == 'v':
        sys.exit(f"error: --draw_below needs a classifying head, and {ckpt_path} regresses colors (--objective=v)")
    model = model_from_config(config).to(device)
    model.load_state_dict(checkpoint['ema'])
    model.eval()
    enc = get_encoding(meta['encoding'])
    steps = config['sample_steps'] if args.steps is None else args.steps
    time_shift = config['time_shift'] if args.time_shift is None else args.time_shift
    guidance = config['guidance'] if args.guidance is None else args.guidance
    tile = model.tile
    sampler = {key: config[key] if getattr(args, key) is None else getattr(args, key)
               for key in sampler_keys}
    autocast = autocast_for(device, args.dtype)

    if args.eval:
        data_dir = args.data_dir or config['data_dir']
        data_encoding = load_meta(data_dir)['encoding']
        if data_encoding != meta['encoding']:
            sys.exit(f"error: {data_dir} holds {data_encoding} ids but {ckpt_path} was trained on "
                     f"{meta['encoding']} ids; give --data_dir data in the same encoding")
        with autocast:
            report = quality_report(model, enc, data_dir, config['color_base'], config['P_mean'], config['P_std'],
                                    args.seed, steps, time_shift, guidance, n_samples=args.num_samples or 32,
                                    batch_size=args.batch_size, **sampler)
        print_report(report, ckpt_path, args.seed, steps, time_shift, sampler)
        sys.exit(0)
    prompt_ids = None if prompts is None else [enc.encode_ordinary(p) for p in prompts]
    n_samples = (args.num_samples or 3) if prompts is None else len(prompts)
    cells, clock = [], time.time()  # cells: what --png shows of each sample
    batch_size = args.batch_size or 64
    for first in range(0, n_samples, batch_size):  # one batch at a time: memory does not grow with n_samples
        n = min(batch_size, n_samples - first)
        trajectory = [] if args.show_steps else None
        try:
            with autocast:
                images, ids = generate(model, n, steps, args.seed, config['color_base'], enc.eot_token,
                                       time_shift, None if prompts is None else prompt_ids[first:first + n],
                                       guidance, first, trajectory, **sampler)
        except ValueError as e:  # a prompt too long for the condition image
            sys.exit(f"error: {e}")
        if args.show_steps:
            show_steps(trajectory, config['color_base'], tile, enc, first, shutil.get_terminal_size().columns - 16)
        for i, row in enumerate(ids.tolist(), first):
            text, n_invalid = ids_to_text(row, enc)
            about = f"{steps} DDIM steps, seed {args.seed}, {n_invalid} invalid ids"
            if prompts is None:
                print(f"---------- sample {i} ({about})")
            else:
                print(f"---------- prompt {i}: {prompts[i]!r} (guidance {guidance:g}, {about})")
            print(text)
        if args.png and args.show_steps:  # a row per sample: z_t and x_hat at every step
            frames = [(to_pixels(z), to_pixels(x_hat)) for _, z, x_hat in trajectory]
            cells += [join([join([z[k], x_hat[k]], 2, 1) for z, x_hat in frames], 2, 4) for k in range(n)]
        elif args.png and prompts is not None:  # each prompt left of its answer
            side = images.shape[-1]
            asked = to_pixels(prompt_images(prompt_ids[first:first + n], side, config['color_base'], enc.eot_token,
                                            tile))
            cells += [join([p, a], 2, 1) for p, a in zip(asked, to_pixels(images))]
        elif args.png:
            cells += list(to_pixels(images))
        if n_samples > batch_size:
            done, seconds = first + n, time.time() - clock
            note(f"sampled {done} of {n_samples} in {seconds:.0f} s, ETA {seconds / done * (n_samples - done):.0f} s")
    seconds = time.time() - clock
    print(f"---------- {n_samples} sample(s) in {seconds:.2f} s ({seconds / n_samples:.3f} s each, {device})")
    if args.png:
        grid = join(cells, 1, 4) if args.show_steps else join(cells, 2, 2)
        scale = max(1, (64 if args.show_steps else 256) // images.shape[-1])  # so that every pixel shows
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        write_png(args.png, grid.permute(1, 2, 0).contiguous().numpy())
        print(f"wrote {args.png}")
