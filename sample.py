"""
Generate text with a trained PixelDLM checkpoint (its EMA weights).

$ python sample.py --out_dir=out-classroom
$ python sample.py --out_dir=out --num_samples=8 --steps=50 --seed=7 --png=samples.png
$ python sample.py --out_dir=out-reverse --prompt "apple river stone"    # a checkpoint trained on pairs
$ python sample.py --out_dir=out-reverse --prompt_file=prompts.txt --guidance=2 --png=answers.png
"""
import argparse
import math
import os
import struct
import sys
import zlib
from contextlib import nullcontext

import torch

from pixeldlm import generate, get_encoding, load_checkpoint, model_from_config, prompt_images, quality_report


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


def print_report(r, ckpt_path, seed, steps, time_shift):
    print(f"quality report: {ckpt_path}, seed {seed}, {steps} DDIM steps (time shift {time_shift:g})")
    for key in [k for k in r if k.startswith('answers_w')]:
        exact, per_token, seconds = r[key]
        print(f"held-out prompts, guidance w={key[9:]:4s} exact match {exact:6.1%}, token accuracy "
              f"{per_token:6.1%} ({seconds:.3f} s/answer)")
    if 'val_loss' not in r:
        return
    ts = (0.3, 0.5, 0.7, 0.9)
    percent = lambda v: '   n/a' if math.isnan(v) else f"{v:6.1%}"  # n/a: no window ends inside its image
    progress = (r['bigram_hits'] - r['bigram_floor']) / max(r['bigram_ceiling'] - r['bigram_floor'], 1e-9)
    print(f"validation loss       {r['val_loss']:.4f}")
    print("token recovery        " + "  ".join(f"t={t}: {percent(r[f'recovery_t{t}'])}" for t in ts))
    print("end-of-text position  " + "  ".join(f"t={t}: {percent(r[f'eot_position_t{t}'])}" for t in ts))
    print(f"samples               {r['seconds_per_sample']:.3f} s/sample")
    print(f"valid ids             {r['valid_ids']:.1%}")
    print(f"ended with end-of-text {r['ended']:.1%} (real windows of this size: {r['ended_real']:.1%})")
    print(f"unigram entropy       {r['entropy']:.2f} bits (real text: {r['entropy_real']:.2f})")
    print(f"bigram hit rate       {r['bigram_hits']:.1%} (floor {r['bigram_floor']:.1%}, ceiling "
          f"{r['bigram_ceiling']:.1%}: {progress:.0%} of the way)")


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out_dir', default='out', help='the folder holding ckpt.pt')
    parser.add_argument('--num_samples', type=int, default=3)
    parser.add_argument('--steps', type=int, default=20, help='DDIM steps')
    parser.add_argument('--time_shift', type=float, help="the sampler's grid (default: the checkpoint's)")
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'mps'")
    parser.add_argument('--png', help='also write the generated images, side by side, to this PNG file')
    parser.add_argument('--prompt', help='text to answer (needs a checkpoint trained on prompt/answer pairs)')
    parser.add_argument('--prompt_file', help='a file of prompts to answer, one per line')
    parser.add_argument('--guidance', type=float, help="classifier-free guidance scale (default: the checkpoint's)")
    parser.add_argument('--eval', action='store_true', help='print the quality report instead of samples')
    parser.add_argument('--data_dir', help="data for --eval (default: the checkpoint's training data)")
    args = parser.parse_args()
    if args.steps < 1 or args.num_samples < 1:
        parser.error("--steps and --num_samples must be at least 1")
    if args.time_shift is not None and args.time_shift <= 0:
        parser.error("--time_shift must be positive")

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
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    checkpoint = load_checkpoint(ckpt_path, device)
    config, meta = checkpoint['config'], checkpoint['meta']
    if prompts and not meta.get('train_pairs'):
        sys.exit(f"error: {ckpt_path} was trained on plain text only; --prompt needs a checkpoint trained on "
                 f"prompt/answer pairs (prepare_data.py writes them from {{\"prompt\", \"answer\"}} lines)")
    model = model_from_config(config).to(device)
    model.load_state_dict(checkpoint['ema'])
    model.eval()
    enc = get_encoding(meta['encoding'])
    time_shift = config.get('time_shift', 1.0) if args.time_shift is None else args.time_shift  # .get: older files
    guidance = config.get('guidance', 1.0) if args.guidance is None else args.guidance

    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.startswith('cuda') else nullcontext()
    if args.eval:
        with autocast:
            report = quality_report(model, enc, args.data_dir or config['data_dir'], config['color_base'],
                                    config['P_mean'], config['P_std'], args.seed, args.steps, time_shift, guidance)
        print_report(report, ckpt_path, args.seed, args.steps, time_shift)
        sys.exit(0)
    prompt_ids = None if prompts is None else [enc.encode_ordinary(p) for p in prompts]
    try:
        with autocast:
            images, ids, texts = generate(model, enc, args.num_samples, args.steps, args.seed, config['color_base'],
                                          time_shift, prompt_ids, guidance)
    except ValueError as e:  # a prompt too long for the condition image
        sys.exit(f"error: {e}")
    for i, (text, n_invalid) in enumerate(texts):
        about = f"{args.steps} DDIM steps, seed {args.seed}, {n_invalid} invalid ids"
        if prompts is None:
            print(f"---------- sample {i} ({about})")
        else:
            print(f"---------- prompt {i}: {prompts[i]!r} (guidance {guidance:g}, {about})")
        print(text)
    print('----------')
    if args.png:
        if prompts is not None:  # each prompt left of its answer
            side = images.shape[-1]
            prompt_pictures = prompt_images(prompt_ids, side, config['color_base'], enc.eot_token)
            images = torch.cat([prompt_pictures, torch.ones(len(images), 3, side, 1), images.cpu()], dim=3)
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()  # base 256: color = digits
        gap = torch.full((3, pixels.shape[2], 2), 255, dtype=torch.uint8)
        strip = torch.cat([torch.cat([img, gap], dim=2) for img in pixels], dim=2)[:, :, :-2]
        scale = max(1, 256 // pixels.shape[2])  # nearest-neighbour upscale so small images are visible
        strip = strip.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        write_png(args.png, strip.permute(1, 2, 0).contiguous().numpy())
        print(f"wrote {args.png}")
