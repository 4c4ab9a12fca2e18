"""
What every prepare/ script shares: downloads, the tokenizer, reading records and documents, and tokenizing on
several processes into the token files of data.py. The settings every script has (source, tokenizer, data_dir,
out, num_proc) are declared in each script's own header, so that its --help lists them.
"""

import codecs
import collections
import contextlib
import http.client
import json
import multiprocessing
import os
import random
import re
import shutil
import urllib.error
import urllib.request

import numpy as np

from common import Progress, fail, file_sha256, progress_bar
from data import TokenWriter, write_meta
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------------
# where the data comes from: the repository's sample, a local copy, a mirror, or the official URL (downloaded
# into a cache: resumable, with progress, checksummed where the whole file is pinned; only the start of a large
# text file when a preset uses only its start)

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")  # see sample/MANIFEST.md


def local_source(source):
    """--source=sample means the repository's sample folder (prepare/sample); anything else is kept as given."""
    return SAMPLE_DIR if source == "sample" else source


def default_cache_dir():
    return os.environ.get("NANOLLAMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanollama"))


def download(url, sha256=None, max_bytes=0, cache_dir=None, filename=None):
    """
    Fetch url into the cache and return the local path. A url that is a local file is returned as it is.
    The whole file: an interrupted download resumes from its .part file (HTTP Range), the finished file is
    checked against sha256 when given, and a file already cached is reused.
    max_bytes > 0 (text files only): just the whole lines of the first max_bytes bytes, cached as
    <name>.first-<max_bytes> (resumable too; a longer start already cached serves as well, a shorter one is
    continued); a server that ignores Range is read as a stream and cut at max_bytes. A start has no checksum.
    """
    if os.path.exists(url):
        if sha256 and file_sha256(url) != sha256:
            raise ValueError(f"{url}: sha256 does not match the expected {sha256}")
        return url
    if "://" not in url:
        raise FileNotFoundError(f"{url}: no such file or folder (--source takes a local file or folder, the "
                                "word 'sample', or an http(s) URL)")
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    whole = os.path.join(cache_dir, filename or url.rstrip("/").split("/")[-1])
    if os.path.exists(whole):
        if sha256 is None or file_sha256(whole) == sha256:
            return whole
        os.remove(whole)  # a corrupt cached copy: fetch it again
    starts = cached_starts(whole)  # {bytes asked: path} of the starts of this file fetched before
    fitting = [n for n in starts if max_bytes and n >= max_bytes]
    if fitting:
        return starts[min(fitting)]
    path = f"{whole}.first-{max_bytes}" if max_bytes else whole
    shorter = [n for n in starts if not max_bytes or n < max_bytes]
    if shorter and not os.path.exists(path + ".part"):
        os.replace(starts[max(shorter)], path + ".part")  # a start is a prefix of the file: go on from its end
    fetch(url, path + ".part", max_bytes)
    if max_bytes:
        keep_whole_lines(path + ".part")
    elif sha256 and file_sha256(path + ".part") != sha256:
        os.remove(path + ".part")
        raise ValueError(f"{url}: the downloaded file's sha256 does not match the expected {sha256}; removed it, "
                         "run again to fetch it anew (or pass --source with a local copy)")
    os.replace(path + ".part", path)
    return path


def cached_starts(whole):
    """{max_bytes: path} of the starts of a file in the cache (<whole>.first-<max_bytes>)."""
    folder, prefix = os.path.dirname(whole), os.path.basename(whole) + ".first-"
    return {int(n[len(prefix):]): os.path.join(folder, n) for n in os.listdir(folder)
            if n.startswith(prefix) and n[len(prefix):].isdigit()}


def fetch(url, part, max_bytes=0):
    """Append url's bytes to part from where it ends (HTTP Range), up to max_bytes (0: to the end), with progress."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if max_bytes and have >= max_bytes:
        return
    wanted = f"bytes={have}-{max_bytes - 1}" if max_bytes else f"bytes={have}-"
    request = urllib.request.Request(url, headers={"Range": wanted} if have or max_bytes else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if response.status != 206:  # the server ignored Range: the body is the whole file from its start
                have = 0
            length = int(response.headers.get("Content-Length") or 0)
            total = min(have + length, max_bytes) if length and max_bytes else (have + length or max_bytes)
            progress = Progress(os.path.basename(part[:-len(".part")]),
                                lambda n, seconds: download_line(have + n, total))
            with open(part, "ab" if have else "wb") as f:
                while not max_bytes or have + progress.done < max_bytes:
                    want = 1 << 20 if not max_bytes else min(1 << 20, max_bytes - have - progress.done)
                    block = response.read(want)
                    if not block:
                        break
                    f.write(block)
                    progress.update(len(block))
            progress.close()
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after what we have: the .part file is the whole file
            return
        raise OSError(f"download of {url} failed (HTTP {e.code} {e.reason}); pass --source with a local copy "
                      "or a mirror") from None
    except (OSError, http.client.HTTPException) as e:  # offline, refused, timed out, cut off
        reason = getattr(e, "reason", None) or e
        raise OSError(f"download of {url} failed ({reason}); run again to resume, or pass --source with a local "
                      "copy or a mirror (offline: --source=sample, the repository's small sample)") from None


def keep_whole_lines(path):
    """Cut a downloaded start of a text file after its last line break, so that no line (or character) is cut."""
    size = os.path.getsize(path)
    with open(path, "rb+") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        newline = tail.rfind(b"\n")
        if newline >= 0:
            f.truncate(size - len(tail) + newline + 1)


def download_line(done_bytes, total_bytes):
    """[=========               ]  32% 12.3/38.0 MB (or just the MB when the server sends no length)"""
    if not total_bytes:
        return f"{done_bytes / 1e6:.1f} MB"
    return f"{progress_bar(done_bytes, total_bytes)} {done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB"


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
# what every prepare/ script does: the output folder, the tokenizer, reading records, tokenizing in parallel


# The output folder is written aside (<folder>.tmp-<pid>) and swapped in whole at the end: a failure (disk full,
# an empty split, Ctrl-C) leaves the old folder as it was, never new token files beside an old meta.json.
PREPARED_SUFFIXES = (".bin", ".json", ".jsonl", ".tmp")  # what prepare/ scripts write into an output folder


def output_dir(out, data_dir, name):
    """
    The folder to write: out, or <data_dir>/<name> when out is empty. Refused (exit 1) when it holds files that
    no prepare/ script writes, because preparing replaces the folder whole. Nothing is written yet.
    """
    folder = os.path.normpath(out or os.path.join(data_dir, name))
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"{folder}: a file is in the way of the output folder; choose another --out or --data_dir")
    if os.path.isdir(folder):
        foreign = sorted(n for n in os.listdir(folder) if not n.endswith(PREPARED_SUFFIXES))
        if foreign:
            fail(f"{folder} holds files that no prepare/ script writes ({', '.join(foreign[:3])}); preparing "
                 "replaces the folder whole: move them, or choose another --out")
    return folder


@contextlib.contextmanager
def written_aside(folder):
    """
    with written_aside(folder) as work: ... writes into an empty folder beside folder; when the block ends
    well, work takes folder's name (the old folder, if any, is removed); when it fails, work is removed and
    folder is untouched. Left-overs of earlier runs that died (.tmp-<pid>, .old-<pid>) are cleaned up first.
    """
    clean_stale_folders(folder)
    work = f"{folder}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    except OSError as e:
        fail(f"{folder}: cannot write there ({e.strerror}); choose another --out or --data_dir")
    try:
        yield work
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, a file that vanished: one line, the old folder as it was
            fail(f"{e.strerror or e} while writing {folder}" + (f" ({e.filename})" if e.filename else "") +
                 (f"; {folder} is unchanged" if os.path.exists(folder) else ""))
        raise
    old = f"{folder}.old-{os.getpid()}"
    try:
        if os.path.exists(folder):
            os.rename(folder, old)  # between these two renames a crash leaves old: clean_stale_folders restores it
        os.rename(work, folder)
    except OSError as e:
        fail(f"{folder}: could not replace it ({e.strerror}); the new files are in {work}")
    shutil.rmtree(old, ignore_errors=True)


def clean_stale_folders(folder):
    """Remove <folder>.tmp-<pid> of processes that no longer run; put back a <folder>.old-<pid> left alone."""
    parent, base = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        kind, _, pid = name[len(base):].rpartition("-")
        if not name.startswith(base) or kind not in (".tmp", ".old") or not pid.isdigit() or process_alive(int(pid)):
            continue
        path = os.path.join(parent, name)
        if kind == ".old" and not os.path.exists(folder):
            os.rename(path, folder)  # the run died between its two renames: the old folder is the good one
        else:
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid):
    if pid == os.getpid():
        return False  # a left-over of an earlier process that had our number
    if os.name == "nt":
        return True  # os.kill would end the process there: leave its folder alone
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_tokenizer(path):
    """The tokenizer of --tokenizer, or a clear error (exit 1) when it is missing or not a tokenizer file."""
    try:
        return Tokenizer.from_file(path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    except Exception as e:  # 'gpt2' with no internet and no tiktoken cache
        fail(f"tokenizer {path!r} could not be loaded ({e})")


def read_json_records(path, skip_bad=False, counts=None):
    """
    The records of a JSON file (a list of objects) or a JSONL file (one object a line), as (where, record):
    where is 'path:line' (JSONL) or 'path: record N' (a JSON list). A line that is not UTF-8 or not JSON is an
    error naming path:line; with skip_bad it is skipped and counted in counts["bad"]. A UTF-8 byte-order mark
    is dropped. Lines end at '\\n' only (a JSON string may hold U+2028 and the other breaks of str.splitlines).
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(codecs.BOM_UTF8)
    if head.lstrip().startswith(b"["):  # one JSON document holding a list
        with open(path, "rb") as f:
            text = decode_utf8(f.read(), path)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a list of objects") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records (or JSONL, one record a line)")
        for i, record in enumerate(records):
            yield f"{path}: record {i + 1}", record  # a JSON list has no useful line numbers: the position
        return
    with open(path, "rb") as f:  # bytes, split at b"\n" only, each line decoded on its own
        for number, raw in enumerate(f, 1):
            try:
                line = raw.removeprefix(codecs.BOM_UTF8 if number == 1 else b"").decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if skip_bad:
                    if counts is not None:
                        counts["bad"] = counts.get("bad", 0) + 1
                    continue
                what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"invalid JSON ({e.msg})"
                raise ValueError(f"{path}:{number}: {what}; expected one JSON object per line "
                                 "(or pass --skip_bad to skip such lines)") from None
            yield f"{path}:{number}", record


def decode_utf8(data, path):
    """The text of a file's bytes (a leading byte-order mark dropped); not UTF-8 is an error naming path:line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def read_text(path):
    """
    A whole UTF-8 text file, its line ends read as Python's text mode reads them ('\\r\\n' and '\\r' become
    '\\n'); a byte-order mark is dropped, and a file that is not UTF-8 is an error naming path:line.
    """
    with open(path, "rb") as f:
        return decode_utf8(f.read(), path).replace("\r\n", "\n").replace("\r", "\n")


def not_utf8_error(path):
    """The ValueError for a text file that failed to decode while streamed: it names the first bad line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8")
    return ValueError(f"{path}: not UTF-8 text; save the file as UTF-8")


def split_train_val(items, val_fraction=None, val_count=None, seed=1337):
    """
    (train, val): a seeded random choice of val_count (when > 0, else val_fraction of the) items for val, order
    kept.
    """
    n = len(items)
    n_val = val_count if val_count else int(round(n * (val_fraction or 0.0)))
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


def tokenizing_line(done_bytes, seconds, total_bytes, tokens):
    """45% 12.3 MB, 3,456,789 tokens (4.1 MB/s): the progress of tokenizing a source."""
    share = f"{done_bytes / total_bytes:4.0%} " if total_bytes else ""
    rate = done_bytes / 1e6 / max(seconds, 1e-9)
    return f"{share}{done_bytes / 1e6:,.1f} MB, {tokens:,} tokens ({rate:.1f} MB/s)"


def write_text_splits(out_dir, tokenizer, splits, source, num_proc=1, batch_size=1024, total_bytes=None):
    """
    Tokenize {split: iterable of documents} into out_dir/<split>.bin (each document starts with <|bos|>),
    write meta.json and the tokenizer copy, print the counts. The folder is written aside and replaces out_dir
    only when every split has documents (an empty split is an error that leaves out_dir as it was).
    A document is a string, or (text, starts_document) for the pieces of a document too long to hold at once.
    """
    counts, tokens_written = {}, 0
    progress = Progress(f"tokenizing {source}",
                        lambda done, seconds: tokenizing_line(done, seconds, total_bytes, tokens_written))
    with written_aside(out_dir) as work:
        try:
            for split, documents in splits.items():
                writer = TokenWriter(work, split, tokenizer.vocab_size)
                pieces = ((d, True) if isinstance(d, str) else d for d in documents)
                for ids, n_documents, n_bytes in parallel_map(_encode_documents, batched(pieces, batch_size),
                                                              tokenizer, num_proc):
                    writer.add(ids, n_bytes, documents=n_documents)
                    tokens_written += len(ids)
                    progress.update(n_bytes)
                counts[split] = writer.close()
        except ValueError as e:  # a file that is not UTF-8 (named with its line), a token outside the vocabulary
            fail(str(e))
        progress.close()
        meta = finish_source(work, tokenizer, counts, source, "text")
    print_counts(out_dir, meta)
    return meta


def write_chat_splits(out_dir, tokenizer, splits, source, num_proc=1, batch_size=64):
    """Render {split: list of conversations} into tokens + loss masks, write meta.json, print the counts (the
    folder is written aside and replaces out_dir at the end, as in write_text_splits)."""
    counts, tokens_written = {}, 0
    progress = Progress(f"rendering {source}",
                        lambda done, seconds: tokenizing_line(done, seconds, None, tokens_written))
    with written_aside(out_dir) as work:
        for split, conversations in splits.items():
            writer = TokenWriter(work, split, tokenizer.vocab_size, with_mask=True)
            for ids, mask, n_conversations, n_bytes in parallel_map(_render_conversations,
                                                                    batched(conversations, batch_size),
                                                                    tokenizer, num_proc):
                writer.add(ids, n_bytes, mask, documents=n_conversations)
                tokens_written += len(ids)
                progress.update(n_bytes)
            counts[split] = writer.close()
        progress.close()
        meta = finish_source(work, tokenizer, counts, source, "chat")
    print_counts(out_dir, meta)
    return meta


def write_choice_splits(out_dir, tokenizer, splits, source):
    """
    Write {split: list of questions} as a choice source: a question is (rows, answer), a row (ids, mask) for
    one choice (it starts with <|bos|>; mask 1 on the choice's own tokens). Tokens, masks, <split>.choices.bin
    and meta.json, written aside as in write_text_splits.
    """
    counts = {}
    with written_aside(out_dir) as work:
        for split, questions in splits.items():
            writer = TokenWriter(work, split, tokenizer.vocab_size, with_mask=True, with_choices=True)
            for rows, answer, n_bytes in questions:  # n_bytes: the UTF-8 bytes of the question and its choices
                for i, (ids, mask) in enumerate(rows):
                    writer.add(ids, n_bytes if i == 0 else 0, mask)
                writer.add_question(len(rows), answer)
            counts[split] = writer.close()
        meta = finish_source(work, tokenizer, counts, source, "choice")
    print_counts(out_dir, meta)
    return meta


def finish_source(out_dir, tokenizer, counts, source, fmt):
    """meta.json and the tokenizer copy; an empty split is an error (exit 1) before anything replaces the old folder."""
    for split, c in counts.items():
        if c["documents"] == 0:
            fail(f"{source}: the {split} split is empty (no documents); check --source (a val split needs enough "
                 "text: more input, or a larger --val_fraction)")
    return write_meta(out_dir, tokenizer, counts, source, fmt=fmt)


def print_counts(out_dir, meta):
    for split, c in meta["splits"].items():
        mask_part = ""
        if meta["format"] != "text":
            trained = int(np.fromfile(os.path.join(out_dir, f"{split}.mask.bin"), dtype=np.uint8).sum())
            mask_part = f", {trained:,} trained (mask 1)"
        what = {"chat": "conversations", "choice": f"rows (the choices of {c.get('questions', 0):,} questions)"}.get(
            meta["format"], "documents")
        print(f"{out_dir}/{split}.bin: {c['documents']:,} {what}, {c['tokens']:,} tokens{mask_part}, "
              f"{c['bytes']:,} bytes ({c['bytes'] / max(c['tokens'], 1):.2f} bytes/token)")


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
    pattern = DOCUMENT_SEPARATORS[separator] if separator in DOCUMENT_SEPARATORS else re.escape(separator)
    return re.compile(pattern) if pattern else None


def read_documents(path, separator, start=0, end=None, block_chars=1 << 20):
    """
    Documents of the text between character offsets [start, end) of a UTF-8 file, streamed: yields str, or
    (piece, starts_document) pieces for documents longer than MAX_PIECE_CHARS. Documents are stripped of
    surrounding whitespace; empty ones are dropped. A text that is not UTF-8 is a ValueError naming path:line.
    """
    try:
        yield from _read_documents(path, separator, start, end, block_chars)
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None


def _read_documents(path, separator, start, end, block_chars):
    pattern = separator_regex(separator)
    margin = 64  # a separator match this close to the buffer's end might grow with the next block
    with open(path, encoding="utf-8-sig", newline="") as f:
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
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for block in iter(lambda: f.read(1 << 20), ""):
                n += len(block)
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None
    return n


def end_of_first_bytes(path, start, max_bytes):
    """
    The character offset where the first max_bytes bytes (UTF-8) of a file's text from character offset start
    end, moved back to just after a line break so that only whole lines are kept; None when the rest of the
    file is no longer than max_bytes.
    """
    try:
        return _end_of_first_bytes(path, start, max_bytes)
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None


def _end_of_first_bytes(path, start, max_bytes):
    with open(path, encoding="utf-8-sig", newline="") as f:
        skip_chars(f, start)
        position, used, after_last_break = start, 0, start
        for block in iter(lambda: f.read(1 << 20), ""):
            encoded = block.encode("utf-8")
            if used + len(encoded) > max_bytes:
                # the characters of the bytes that still fit (a character cut in half is dropped)
                block = encoded[:max_bytes - used].decode("utf-8", errors="ignore")
                newline = block.rfind("\n")
                return position + newline + 1 if newline >= 0 else after_last_break
            newline = block.rfind("\n")
            if newline >= 0:
                after_last_break = position + newline + 1
            position, used = position + len(block), used + len(encoded)
    return None


def split_point(path, separator, val_fraction):
    """The character offset where the last val_fraction of a file begins, moved to the next document start (the
    end of the file when no document starts there)."""
    total = count_chars(path)
    start = int(total * (1 - val_fraction))
    pattern = separator_regex(separator)
    with open(path, encoding="utf-8-sig", newline="") as f:
        skip_chars(f, start)  # count_chars read the whole file already: no decoding error left to meet
        window = f.read(1 << 20)
    if pattern is None:  # the file is one document: cut it at a paragraph, else at a line, else anywhere
        match = separator_regex("blank").search(window) or separator_regex("line").search(window)
        return start + match.end() if match else start
    match = pattern.search(window)
    # no document starts in the last part: nothing for val (never half a document), which the caller refuses
    return start + match.end() if match else total
