"""
Token files and batches, for every stage. A prepared source is a folder:

    data/<name>/train.bin, val.bin        uint16 tokens (uint32 when the vocabulary exceeds 65,536), every
                                          document starting with <|bos|>; read through np.memmap
    data/<name>/train.mask.bin, ...       uint8 loss mask, chat data only: 1 where the model learns the token
    data/<name>/meta.json                 tokenizer identity, dtype, token and byte counts per split, source, format
    data/<name>/tokenizer.json            a copy of the tokenizer file, so the folder stands on its own

docs/formats.md has the details. prepare/ writes these folders (TokenWriter, write_meta); train.py and
eval.py read them.
"""

import json
import os

import numpy as np


# ----------------------------------------------------------------------------------------------------
# reading a prepared source

def read_meta(source_dir):
    """meta.json of a prepared source, with a clear error when the source is missing or incomplete."""
    path = f"{source_dir}/meta.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare this source first (see prepare/ and the README)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    for key in ("tokenizer_sha256", "vocab_size", "dtype", "splits", "format"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def token_file_path(source_dir, split, mask=False):
    return f"{source_dir}/{split}.mask.bin" if mask else f"{source_dir}/{split}.bin"


def open_tokens(source_dir, split, meta, mask=False):
    """np.memmap of a split's tokens (or its loss mask), read-only."""
    path = token_file_path(source_dir, split, mask)
    try:
        return np.memmap(path, dtype=np.uint8 if mask else np.dtype(meta["dtype"]), mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare this source first (see prepare/ and the README)") from None


# ----------------------------------------------------------------------------------------------------
# writing a prepared source (prepare/)


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

    def add(self, ids, n_bytes, mask=None, documents=1):
        """Append tokens (one document, or several already joined: say how many) and count them."""
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
        self.counts["documents"] += documents

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
