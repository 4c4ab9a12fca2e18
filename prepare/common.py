"""
What every prepare/ script shares: downloads, flags, the tokenizer, reading records and documents, and tokenizing
on several processes into the token files of data.py.
"""

import json
import os

import numpy as np

from common import file_sha256
from data import TokenWriter, write_meta


# ----------------------------------------------------------------------------------------------------
# downloads: a cache with checksums, resume and progress; --source replaces the official URL


def default_cache_dir():
    return os.environ.get("NANOLLAMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanollama"))


def progress_bar(done, total, prefix="", width=30):
    """One line, redrawn in place: prefix [=====     ] 45% 12.3/27.0 MB."""
    import sys
    if total:
        filled = int(width * done / total)
        line = f"\r{prefix} [{'=' * filled}{' ' * (width - filled)}] {done / total:4.0%} {done / 1e6:.1f}/{total / 1e6:.1f} MB"
    else:
        line = f"\r{prefix} {done / 1e6:.1f} MB"
    sys.stderr.write(line)
    sys.stderr.flush()


def download(url, sha256=None, cache_dir=None, filename=None):
    """
    Fetch url into the cache and return the local path. An interrupted download resumes from its .part file
    (HTTP Range); a finished one is checked against sha256 when given; a file already cached is reused.
    A url that is a local path is returned as it is (after the checksum check).
    """
    import urllib.request
    if os.path.exists(url):
        if sha256 and file_sha256(url) != sha256:
            raise ValueError(f"{url}: sha256 does not match the expected {sha256}")
        return url
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, filename or url.rstrip("/").split("/")[-1])
    if os.path.exists(path):
        if sha256 is None or file_sha256(path) == sha256:
            return path
        os.remove(path)  # a corrupt cached copy: fetch it again
    part = path + ".part"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if done and response.status != 206:  # the server ignored Range: start over
                done = 0
            total = int(response.headers.get("Content-Length", 0)) + done
            with open(part, "ab" if done else "wb") as f:
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    progress_bar(done, total, prefix=os.path.basename(path))
    except OSError as e:
        raise OSError(f"download of {url} failed ({e}); run again to resume, or pass --source with a local copy "
                      "or a mirror") from None
    import sys
    sys.stderr.write("\n")
    if sha256 and file_sha256(part) != sha256:
        os.remove(part)
        raise ValueError(f"{url}: downloaded file's sha256 does not match the expected {sha256}; removed it")
    os.replace(part, path)
    return path


def resolve_source(source, candidates, url, sha256=None):
    """
    The local file to read: with --source a folder, the first of its candidate relative paths that exists;
    with --source a file or URL, that; without --source, the official url (downloaded to the cache).
    """
    if source:
        if os.path.isdir(source):
            for relative in candidates:
                path = os.path.join(source, relative)
                if os.path.exists(path):
                    return path
            raise FileNotFoundError(f"--source {source}: none of {candidates} found in it")
        return download(source, sha256)
    return download(url, sha256)


# ----------------------------------------------------------------------------------------------------
# what every prepare/ script does: flags, the tokenizer, reading records, tokenizing on several processes


def fail(message):
    """A user error: print it and exit 1, no traceback."""
    import sys
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


def add_common_args(parser, name):
    """The flags every prepare/ script shares; --out defaults to <data_dir>/<name>."""
    parser.add_argument("--source", default=None,
                        help="a local copy (file or folder) or a mirror URL instead of the official download")
    parser.add_argument("--tokenizer", default="data/tokenizer.json",
                        help="tokenizer file from prepare/tokenizer.py, or 'gpt2' or 'bytes' (default data/tokenizer.json)")
    parser.add_argument("--data_dir", default="data", help="folder of the prepared sources (default data)")
    parser.add_argument("--out", default=None, help=f"output folder (default <data_dir>/{name})")
    parser.add_argument("--num_proc", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="processes that tokenize (default: the CPU count, at most 8)")
    return parser


def output_dir(args, name):
    out = args.out or os.path.join(args.data_dir, name)
    os.makedirs(out, exist_ok=True)
    return out


def load_tokenizer(path):
    """The tokenizer of --tokenizer, or a clear error (exit 1) when it is missing or not a tokenizer file."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tokenizer import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    except Exception as e:  # 'gpt2' with no internet and no tiktoken cache
        fail(f"tokenizer {path!r} could not be loaded ({e})")


def read_json_records(path, skip_bad=False, counts=None):
    """
    The records of a JSON file (a list of objects) or a JSONL file (one object a line), as (where, record):
    where is 'path:line' (JSONL) or 'path: record N' (a JSON list). A malformed line is an error naming
    path:line; with skip_bad it is skipped and counted in counts["bad"].
    """
    with open(path, encoding="utf-8") as f:
        first = f.read(1 << 16).lstrip()
    if first.startswith("["):  # one JSON document holding a list
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a list of objects") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records (or JSONL, one record a line)")
        for i, record in enumerate(records):
            yield f"{path}: record {i + 1}", record  # a JSON list has no useful line numbers: the position
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad:
                    if counts is not None:
                        counts["bad"] = counts.get("bad", 0) + 1
                    continue
                raise ValueError(f"{path}:{number}: invalid JSON ({e.msg}); expected one JSON object per line "
                                 "(or pass --skip_bad to skip such lines)") from None
            yield f"{path}:{number}", record


def split_train_val(items, val_fraction=None, val_count=None, seed=1337):
    """(train, val): a seeded random choice of val_count (or val_fraction of the) items for val, order kept."""
    import random
    n = len(items)
    n_val = val_count if val_count is not None else int(round(n * (val_fraction or 0.0)))
    if n_val <= 0 or n_val >= n:
        raise ValueError(f"{n} records: cannot hold out {n_val} for validation (need 0 < val < {n})")
    val_indices = set(random.Random(seed).sample(range(n), n_val))
    train = [x for i, x in enumerate(items) if i not in val_indices]
    val = [x for i, x in enumerate(items) if i in val_indices]
    return train, val


# Tokenizing runs in worker processes, each with its own copy of the tokenizer; the main process reads the
# source and writes the files in order. At most 2 batches per worker are in flight, so memory stays bounded
# however large the source is.

_worker_tokenizer = None


def _init_worker(tokenizer_json, tokenizer_name):
    global _worker_tokenizer
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tokenizer import Tokenizer
    _worker_tokenizer = Tokenizer.from_file(tokenizer_name) if tokenizer_name in ("gpt2", "bytes") \
        else Tokenizer.from_json(tokenizer_json)


def _encode_documents(pieces):
    """
    Worker: [(text, starts_document)] -> (all their tokens joined, as one int64 array, <|bos|> first where a
    document starts; number of documents started; bytes). One array per batch: sending Python lists of ints
    between processes would cost more than the encoding.
    """
    ids = _worker_tokenizer.encode_batch([text for text, _ in pieces], num_threads=1)
    bos = _worker_tokenizer.bos_id
    joined = np.fromiter((t for x, (_, starts) in zip(ids, pieces) for t in ([bos] + x if starts else x)), dtype=np.int64)
    return joined, sum(starts for _, starts in pieces), sum(len(text.encode("utf-8")) for text, _ in pieces)


def _render_conversations(conversations):
    """Worker: conversations -> (tokens joined, loss mask joined, number of conversations, bytes of their text)."""
    all_ids, all_mask, n_bytes = [], [], 0
    for messages in conversations:
        ids, mask = _worker_tokenizer.render_conversation(messages)
        all_ids += ids
        all_mask += mask
        n_bytes += sum(len(part["text"].encode("utf-8")) if isinstance(part, dict) else len(part.encode("utf-8"))
                       for m in messages for part in ([m["content"]] if isinstance(m["content"], str) else m["content"]))
    return np.array(all_ids, dtype=np.int64), np.array(all_mask, dtype=np.uint8), len(conversations), n_bytes


def batched(items, batch_size, max_chars=1 << 20):
    """Lists of at most batch_size items and (for text items) about max_chars characters."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[0]) if isinstance(item, tuple) else 0
        if len(batch) == batch_size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def parallel_map(function, batches, tokenizer, num_proc):
    """function over batches in num_proc worker processes, results in order, with bounded memory."""
    import collections
    import multiprocessing
    tokenizer_name = tokenizer.name if tokenizer.name in ("gpt2", "bytes") else None
    if num_proc <= 1:
        _init_worker(tokenizer.to_json() if tokenizer_name is None else None, tokenizer_name)
        for batch in batches:
            yield function(batch)
        return
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with context.Pool(num_proc, initializer=_init_worker,
                      initargs=(tokenizer.to_json() if tokenizer_name is None else None, tokenizer_name)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(function, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """A one-line progress report on stderr, redrawn at most a few times a second."""

    def __init__(self, prefix, total_bytes=None):
        import time
        self.prefix, self.total, self.done = prefix, total_bytes, 0
        self.start = self.last = time.time()
        self.shown = False

    def update(self, n_bytes, tokens=None):
        import sys
        import time
        self.done += n_bytes
        now = time.time()
        if now - self.last < 0.5:
            return
        self.last, self.shown = now, True
        rate = self.done / max(now - self.start, 1e-9) / 1e6
        share = f" {self.done / self.total:4.0%}" if self.total else ""
        token_part = f", {tokens:,} tokens" if tokens is not None else ""
        sys.stderr.write(f"\r{self.prefix}:{share} {self.done / 1e6:,.1f} MB{token_part} ({rate:.1f} MB/s)   ")
        sys.stderr.flush()

    def close(self):
        import sys
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def write_text_splits(out_dir, tokenizer, splits, source, num_proc=1, batch_size=1024, total_bytes=None):
    """
    Tokenize {split: iterable of documents} into out_dir/<split>.bin (each document starts with <|bos|>),
    write meta.json and the tokenizer copy, print the counts. An empty split is an error.
    A document is a string, or (text, starts_document) for the pieces of a document too long to hold at once.
    """
    counts = {}
    progress = Progress(f"tokenizing {source}", total_bytes)
    for split, documents in splits.items():
        writer = TokenWriter(out_dir, split, tokenizer.vocab_size)
        pieces = ((d, True) if isinstance(d, str) else d for d in documents)
        for ids, n_documents, n_bytes in parallel_map(_encode_documents, batched(pieces, batch_size), tokenizer, num_proc):
            writer.add(ids, n_bytes, documents=n_documents)
            progress.update(n_bytes, writer.counts["tokens"])
        counts[split] = writer.close()
    progress.close()
    return finish_source(out_dir, tokenizer, counts, source, "text")


def write_chat_splits(out_dir, tokenizer, splits, source, num_proc=1, batch_size=64):
    """Render {split: list of conversations} into tokens + loss masks, write meta.json, print the counts."""
    counts = {}
    progress = Progress(f"rendering {source}")
    for split, conversations in splits.items():
        writer = TokenWriter(out_dir, split, tokenizer.vocab_size, with_mask=True)
        for ids, mask, n_conversations, n_bytes in parallel_map(_render_conversations, batched(conversations, batch_size),
                                                                tokenizer, num_proc):
            writer.add(ids, n_bytes, mask, documents=n_conversations)
            progress.update(n_bytes, writer.counts["tokens"])
        counts[split] = writer.close()
    progress.close()
    return finish_source(out_dir, tokenizer, counts, source, "chat")


def finish_source(out_dir, tokenizer, counts, source, fmt):
    for split, c in counts.items():
        if c["documents"] == 0:
            fail(f"{source}: the {split} split is empty (no documents); check --source")
    meta = write_meta(out_dir, tokenizer, counts, source, fmt=fmt)
    for split, c in counts.items():
        mask_part = ""
        if fmt == "chat":
            trained = int(np.fromfile(os.path.join(out_dir, f"{split}.mask.bin"), dtype=np.uint8).sum())
            mask_part = f", {trained:,} trained (mask 1)"
        print(f"{out_dir}/{split}.bin: {c['documents']:,} {'conversations' if fmt == 'chat' else 'documents'}, "
              f"{c['tokens']:,} tokens{mask_part}, {c['bytes']:,} bytes ({c['bytes'] / max(c['tokens'], 1):.2f} bytes/token)")
    return meta


# ----------------------------------------------------------------------------------------------------
# reading large text files as a stream of documents, without holding the file in memory

DOCUMENT_SEPARATORS = {
    "line": r"\r?\n",                  # every line is a document
    "blank": r"\r?\n[ \t]*\r?\n",       # paragraphs separated by blank lines
    "story": r"(?<!\n)\n(?!\n)",        # TinyStories without delimiters: a single newline ends a story
    # WikiText: an article starts at a ' = Title = ' line after a blank line (' = = Section = = ' lines and
    # the odd ' = ' inside an equation are not titles); 'wikitext_noblank' for copies with the blank lines dropped
    "wikitext": r"\n[ \t]*\r?\n(?= = [^=\n][^\n]* = *\r?\n[ \t]*\r?\n)",
    "wikitext_noblank": r"\r?\n(?= = [^=\n][^\n]* = *\r?\n)",
    "file": None,                       # the whole file (or split) is one document
}
MAX_PIECE_CHARS = 1 << 20  # a document longer than this is tokenized in pieces (cut at a line break)


def separator_regex(separator):
    """A document separator: a name of DOCUMENT_SEPARATORS or a literal string such as '<|endoftext|>'."""
    import re
    pattern = DOCUMENT_SEPARATORS[separator] if separator in DOCUMENT_SEPARATORS else re.escape(separator)
    return re.compile(pattern) if pattern else None


def read_documents(path, separator, start=0, end=None, block_chars=1 << 20):
    """
    Documents of the text between character offsets [start, end) of a UTF-8 file, streamed: yields str, or
    (piece, starts_document) pieces for documents longer than MAX_PIECE_CHARS. Documents are stripped of
    surrounding whitespace; empty ones are dropped.
    """
    pattern = separator_regex(separator)
    margin = 64  # a separator match this close to the buffer's end might grow with the next block
    with open(path, encoding="utf-8", newline="") as f:
        skip_chars(f, start)
        position, buffer, continuing = start, "", False
        while True:
            want = block_chars if end is None else min(block_chars, end - position)
            block = f.read(want) if want > 0 else ""
            position += len(block)
            at_end = not block
            buffer += block
            cut = 0
            if pattern is not None:
                for match in pattern.finditer(buffer):
                    if not at_end and match.end() > len(buffer) - margin:
                        break
                    document = buffer[cut:match.start()]
                    document = document.rstrip() if continuing else document.strip()
                    if document:
                        yield (document, False) if continuing else document
                    continuing = False
                    cut = match.end()
                buffer = buffer[cut:]
            if at_end:
                document = buffer.rstrip() if continuing else buffer.strip()
                if document:
                    yield (document, False) if continuing else document
                return
            if len(buffer) > MAX_PIECE_CHARS:
                # one document larger than a piece: hand over its first part now, cut after a line break that is
                # followed by a non-space character (the pre-split never joins across such a break, so the
                # tokens are the same as for the whole document)
                cut = len(buffer) - margin
                while True:
                    newline = buffer.rfind("\n", 0, cut)
                    if newline < 0:
                        cut = len(buffer) - margin  # no line break at all: cut anywhere
                        break
                    if not buffer[newline + 1:newline + 2].isspace():
                        cut = newline + 1
                        break
                    cut = newline
                yield (buffer[:cut], False) if continuing else (buffer[:cut].lstrip(), True)
                buffer, continuing = buffer[cut:], True


def skip_chars(f, n):
    while n > 0:
        block = f.read(min(n, 1 << 20))
        if not block:
            return
        n -= len(block)


def count_chars(path):
    """Characters of a UTF-8 file, read in blocks."""
    n = 0
    with open(path, encoding="utf-8", newline="") as f:
        for block in iter(lambda: f.read(1 << 20), ""):
            n += len(block)
    return n


def split_point(path, separator, val_fraction):
    """The character offset where the last val_fraction of a file begins, moved to the next document start."""
    total = count_chars(path)
    start = int(total * (1 - val_fraction))
    pattern = separator_regex(separator)
    with open(path, encoding="utf-8", newline="") as f:
        skip_chars(f, start)
        window = f.read(1 << 20)
    if pattern is None:
        pattern = separator_regex("blank")
    match = pattern.search(window)
    if match is None:
        match = separator_regex("line").search(window)
    return start + match.end() if match else start
