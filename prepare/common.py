"""
What every prepare/ script shares: writing token files and meta.json in the format of DESIGN.md.

    data/<name>/train.bin, val.bin        uint16 tokens (uint32 when the vocabulary exceeds 65,536)
    data/<name>/train.mask.bin, ...       uint8 loss mask, chat data only
    data/<name>/meta.json                 tokenizer identity, dtype, token and byte counts per split, source
    data/<name>/tokenizer.json            a copy of the tokenizer file, so the folder is self-contained
"""

import json
import os

import numpy as np


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


class TokenWriter:
    """Appends documents' token ids (and loss masks) to a split's files, counting tokens, bytes and documents."""

    def __init__(self, out_dir, split, vocab_size, with_mask=False):
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.path = os.path.join(out_dir, f"{split}.bin")
        self.tokens_file = open(self.path + ".tmp", "wb")
        self.mask_file = open(os.path.join(out_dir, f"{split}.mask.bin.tmp"), "wb") if with_mask else None
        self.counts = {"tokens": 0, "bytes": 0, "documents": 0}

    def add(self, ids, n_bytes, mask=None):
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"{self.path}: token id {int(array.max())} outside the vocabulary of {self.vocab_size}")
        self.tokens_file.write(array.astype(self.dtype).tobytes())
        if self.mask_file is not None:
            if mask is None or len(mask) != len(ids):
                raise ValueError(f"{self.path}: chat data needs a mask of the same length as the tokens")
            self.mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.counts["tokens"] += int(array.size)
        self.counts["bytes"] += int(n_bytes)
        self.counts["documents"] += 1

    def close(self):
        """Finish the files; they only take their real names once complete."""
        for f in (self.tokens_file, self.mask_file):
            if f is not None:
                f.close()
                os.replace(f.name, f.name[:-len(".tmp")])
        return self.counts


def write_meta(out_dir, tokenizer, split_counts, source, fmt="text"):
    """meta.json and a copy of the tokenizer file beside the token files."""
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    meta = {"format": fmt, "tokenizer_sha256": tokenizer.sha256, "tokenizer_name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
            "bos_id": tokenizer.bos_id, "splits": split_counts, "source": source}
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


# ----------------------------------------------------------------------------------------------------
# downloads: a cache with checksums, resume and progress; --source replaces the official URL


def default_cache_dir():
    return os.environ.get("NANOLLAMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanollama"))


def file_sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
