"""
Tokenize text into what pixeldlm.py trains on: train.bin and val.bin (uint32 ids, every document followed
by end-of-text), train_pairs.bin and val_pairs.bin (prompt, end-of-text, answer, end-of-text, ...) and
meta.json (encoding name, vocabulary size, end-of-text id, sizes).

$ python prepare_data.py                            # built-in corpus: CPython's own documentation, no network
$ python prepare_data.py --input notes.txt web.jsonl  # each .txt is one document; each .jsonl line is
                                                    # {"text": ...} or {"prompt": ..., "answer": ...}
$ python prepare_data.py --encoding=bytes           # 256 byte ids + end-of-text: what a CPU learns in minutes
$ python prepare_data.py --encoding=gpt2            # any tiktoken encoding (cl100k_base ships offline)
$ python prepare_data.py --task=reverse --encoding=bytes  # checkable pairs: copy, reverse or sort
"""
import argparse
import json
import math
import os
import random
import re
import sys
from collections import Counter

import numpy as np

from pixeldlm import get_encoding


def read_inputs(paths):
    """.txt and .jsonl files -> (documents, [(prompt, answer)])."""
    documents, pairs = [], []
    for path in paths:
        try:
            with open(path, encoding='utf-8') as f:
                content = f.read()
        except FileNotFoundError:
            sys.exit(f"error: input file {path} not found")
        except UnicodeDecodeError as e:
            sys.exit(f"error: {path} is not UTF-8 text (byte {e.start}); convert it first, e.g. "
                     f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`")
        if not content.strip():
            sys.exit(f"error: {path} is empty; give files that hold text")
        if not path.endswith('.jsonl'):
            documents.append(content)
            continue
        for line_number, line in enumerate(content.split('\n'), 1):  # JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path} line {line_number} is not JSON ({e.msg})")
            if isinstance(record, dict) and isinstance(record.get('text'), str):
                documents.append(record['text'])
            elif isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ('prompt', 'answer')):
                pairs.append((record['prompt'], record['answer']))
            else:
                sys.exit(f'error: {path} line {line_number} needs a "text" string, or "prompt" and "answer" strings')
    return documents, pairs


def builtin_corpus():  # the text of every `help('topic')` page of the Python that runs this: ~465 KB of English
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


def task_pairs(task, n, seed=1337):
    """n distinct prompts with answers a program can check: copy them, reverse their words, or sort their
    numbers. Words are the 500 commonest short words of the built-in corpus."""
    counts = Counter(re.findall(r'\b[a-z]{3,6}\b', ' '.join(builtin_corpus())))
    words = [w for w, _ in counts.most_common(500)]
    rng, seen, pairs = random.Random(seed), set(), []
    while len(pairs) < n:
        if task == 'sort':
            items = [str(rng.randrange(100)) for _ in range(rng.randint(3, 8))]
            answer = sorted(items, key=int)
        else:
            items = rng.sample(words, rng.randint(2, 6))
            answer = items if task == 'copy' else items[::-1]
        prompt = ' '.join(items)
        if prompt not in seen:  # distinct prompts: the held-out ones were never trained on
            seen.add(prompt)
            pairs.append((prompt, ' '.join(answer)))
    return pairs


def write_atomically(path, data):  # a crash or an error never leaves a half-written file behind
    with open(path + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(path + '.tmp', path)


def split(items, val_fraction):  # nanoGPT-style: the last part is held out
    cut = int(len(items) * (1 - val_fraction))
    return items[:cut], items[cut:]


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', nargs='+', help='.txt or .jsonl files (default: the built-in corpus)')
    parser.add_argument('--task', choices=['copy', 'reverse', 'sort'], help='generate checkable pairs instead')
    parser.add_argument('--num_pairs', type=int, default=20000, help='how many pairs --task generates')
    parser.add_argument('--out_dir', help='default: data/<encoding>, or data/<task>_<encoding>')
    parser.add_argument('--encoding', default='cl100k_base', help="a tiktoken encoding name, or 'bytes'")
    parser.add_argument('--val_fraction', type=float, default=0.1, help='the last part of the data held out')
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be between 0 and 1, not {args.val_fraction}")
    if args.task and args.input:
        parser.error("give --input or --task, not both")
    if args.num_pairs < 2:
        parser.error("--num_pairs must be at least 2")

    if args.task:
        documents, pairs = [], task_pairs(args.task, args.num_pairs)
    elif args.input:
        documents, pairs = read_inputs(args.input)
    else:
        documents, pairs = builtin_corpus(), []
    documents = [d for d in documents if d.strip()]
    if not documents and not pairs:
        sys.exit("error: the input holds no text")
    enc = get_encoding(args.encoding)
    eot = enc.eot_token
    args.out_dir = args.out_dir or os.path.join('data', f'{args.task}_{args.encoding}' if args.task else args.encoding)
    files, meta = {}, {'encoding': args.encoding, 'vocab_size': enc.n_vocab, 'eot_id': eot,
                       'train_tokens': 0, 'val_tokens': 0, 'train_pairs': 0, 'val_pairs': 0}
    if documents:
        stream = []
        for ids in enc.encode_ordinary_batch(documents):
            stream += ids + [eot]  # end-of-text after every document, so the model learns to stop
        train_ids, val_ids = split(stream, args.val_fraction)
        if not train_ids or len(val_ids) < 2:
            sys.exit(f"error: {len(stream)} tokens are too few to split into train and val; give more text")
        if train_ids[-1] != eot:  # the train part gets an end-of-text where the cut falls
            train_ids.append(eot)
        files.update({'train.bin': train_ids, 'val.bin': val_ids})
        meta.update(train_tokens=len(train_ids), val_tokens=len(val_ids), documents=len(documents))
    if pairs:
        encoded = list(zip(enc.encode_ordinary_batch([p for p, _ in pairs]),
                           enc.encode_ordinary_batch([a for _, a in pairs])))
        train_pairs, val_pairs = split(encoded, args.val_fraction)
        if not train_pairs or not val_pairs:
            sys.exit(f"error: {len(pairs)} prompt/answer pairs are too few to split into train and val")
        files['train_pairs.bin'] = [i for p, a in train_pairs for i in p + [eot] + a + [eot]]
        files['val_pairs.bin'] = [i for p, a in val_pairs for i in p + [eot] + a + [eot]]
        meta.update(train_pairs=len(train_pairs), val_pairs=len(val_pairs))
        longest = max(len(ids) for pair in encoded for ids in pair)
        print(f"longest prompt or answer: {longest} tokens; with its end-of-text it needs an image of at least "
              f"{longest + 1} pixels (--img_size >= {math.isqrt(longest) + 1})")
    os.makedirs(args.out_dir, exist_ok=True)
    for name, ids in files.items():
        write_atomically(os.path.join(args.out_dir, name), np.array(ids, dtype=np.uint32).tobytes())
    write_atomically(os.path.join(args.out_dir, 'meta.json'), (json.dumps(meta, indent=1) + '\n').encode())
    print(f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val text tokens, {meta['train_pairs']:,} "
          f"train and {meta['val_pairs']:,} val prompt/answer pairs ({args.encoding}, {enc.n_vocab:,} ids) "
          f"in {args.out_dir}/")
