"""
Tokenize text into the token streams pixeldlm.py trains on: train.bin and val.bin (uint32 ids, every
document followed by end-of-text) and meta.json (encoding name, vocabulary size, end-of-text id).

$ python prepare_data.py                            # built-in corpus: CPython's own documentation, no network
$ python prepare_data.py --input notes.txt web.jsonl  # each .txt is one document; each .jsonl line {"text": ...}
$ python prepare_data.py --encoding=bytes           # 256 byte ids + end-of-text: what a CPU learns in minutes
$ python prepare_data.py --encoding=gpt2            # any tiktoken encoding (cl100k_base ships offline)
"""
import argparse
import json
import os
import sys

import numpy as np

from pixeldlm import get_encoding


def read_documents(paths):
    documents = []
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
            if not isinstance(record, dict) or not isinstance(record.get('text'), str):
                sys.exit(f'error: {path} line {line_number} needs a "text" field holding a string')
            documents.append(record['text'])
    return documents


def write_atomically(path, data):  # a crash or an error never leaves a half-written file behind
    with open(path + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(path + '.tmp', path)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', nargs='+', help='.txt or .jsonl files (default: the built-in corpus)')
    parser.add_argument('--out_dir', help='default: data/<encoding>')
    parser.add_argument('--encoding', default='cl100k_base', help='a tiktoken encoding name')
    parser.add_argument('--val_fraction', type=float, default=0.1, help='the last part of the stream held out')
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be between 0 and 1, not {args.val_fraction}")

    if args.input:
        documents = read_documents(args.input)
    else:  # the text of every `help('topic')` page of the Python that runs this: ~465 KB of English
        from pydoc_data.topics import topics
        documents = [topics[name] for name in sorted(topics)]
    documents = [d for d in documents if d.strip()]
    if not documents:
        sys.exit("error: the input holds no text")
    enc = get_encoding(args.encoding)
    args.out_dir = args.out_dir or os.path.join('data', args.encoding)
    stream = []
    for ids in enc.encode_ordinary_batch(documents):
        stream += ids + [enc.eot_token]  # end-of-text after every document, so the model learns to stop
    # nanoGPT-style split of the stream; the train part gets an end-of-text where the cut falls
    split = int(len(stream) * (1 - args.val_fraction))
    train_ids, val_ids = stream[:split], stream[split:]
    if not train_ids or len(val_ids) < 2:
        sys.exit(f"error: {len(stream)} tokens are too few to split into train and val; give more text")
    if train_ids[-1] != enc.eot_token:
        train_ids.append(enc.eot_token)

    meta = {'encoding': args.encoding, 'vocab_size': enc.n_vocab, 'eot_id': enc.eot_token,
            'train_tokens': len(train_ids), 'val_tokens': len(val_ids), 'documents': len(documents)}
    os.makedirs(args.out_dir, exist_ok=True)
    write_atomically(os.path.join(args.out_dir, 'train.bin'), np.array(train_ids, dtype=np.uint32).tobytes())
    write_atomically(os.path.join(args.out_dir, 'val.bin'), np.array(val_ids, dtype=np.uint32).tobytes())
    write_atomically(os.path.join(args.out_dir, 'meta.json'), (json.dumps(meta, indent=1) + '\n').encode())
    print(f"{len(documents)} documents -> {len(train_ids):,} train and {len(val_ids):,} val tokens "
          f"({args.encoding}, {enc.n_vocab:,} ids) in {args.out_dir}/")
