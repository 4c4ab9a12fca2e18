"""
TinyStories (V2, the GPT-4 stories) -> data/tinystories/{train,val}.bin + meta.json.

    python prepare/tinystories.py --source=sample                        # the repository's sample (1.8 MB)
    python prepare/tinystories.py --max_train_bytes=20_000_000 --max_val_bytes=1_000_000   # fetches 20 MB + 1 MB
    python prepare/tinystories.py                                        # download all (2.2 GB train, 22 MB valid)
    python prepare/tinystories.py --source=path/to/tinystories           # a local copy (a folder or one train file)
    python prepare/tinystories.py --source=TinyStoriesV2-GPT4-train.txt --val_fraction=0.01

Stories are separated by '<|endoftext|>' lines in the official files; files without that delimiter (the
train file of the sample) end a story at a single newline, with blank lines between its paragraphs.
Each story is one document and starts with <|bos|>. Tokenizing streams the files on several processes.
Downloading with --max_train_bytes / --max_val_bytes fetches only that start of each file (HTTP Range).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import (download, end_of_first_bytes, load_tokenizer, local_source,  # noqa: E402
                            output_dir, read_documents, split_point, write_text_splits)

# -----------------------------------------------------------------------------------------------------
source = ""  # 'sample' (prepare/sample), a local copy (a folder with the files, or one train file) or a mirror
#              URL; empty = download
tokenizer = "data/tokenizer.json"  # tokenizer file from prepare/tokenizer.py, or 'gpt2' or 'bytes'
data_dir = "data"  # folder of the prepared sources
out = ""  # output folder; empty = <data_dir>/tinystories
num_proc = max(1, min(8, os.cpu_count() or 1))  # processes that tokenize (the CPU count, at most 8)
val_fraction = 0.01  # share of the train file held out for val when the source has no val file
max_train_bytes = 0  # tokenize only the first this many bytes of the train file (whole lines); 0 = all of it
max_val_bytes = 0  # the same for the val file
# -----------------------------------------------------------------------------------------------------

BASE_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
# other layouts a --source folder may have (V1 files, the sample's subset, a folder laid out like the sample)
CANDIDATES = {"train": [FILES["train"], "TinyStories-train.txt", "tiny_stories.txt", "train.txt",
                        "tinystories/tiny_stories.txt"],
              "val": [FILES["val"], "TinyStories-valid.txt", "tinystories_val.txt", "valid.txt", "val.txt",
                      "tinystories/tinystories_val.txt"]}


def story_separator(path):
    """'<|endoftext|>' where the file uses it, else 'story' (a single newline ends a story)."""
    with open(path, encoding="utf-8", errors="replace") as f:  # decoding errors are reported when tokenizing
        head = f.read(1 << 20)
    return "<|endoftext|>" if "<|endoftext|>" in head else "story"


def stories(path, start=0, end=None):
    """The stories of a TinyStories text file (between character offsets start and end)."""
    return read_documents(path, story_separator(path), start, end)


def find_split_files(source, max_bytes):
    """
    {split: (path, start, end)}: the official download (only the first max_bytes[split] bytes when that is
    not 0), a folder with the files, or one file (split by --val_fraction later).
    """
    if not source:
        return {split: (download(BASE_URL + name, max_bytes=max_bytes[split]), 0, None)
                for split, name in FILES.items()}
    if os.path.isdir(source):
        found = {}
        for split, names in CANDIDATES.items():
            path = next((os.path.join(source, n) for n in names if os.path.exists(os.path.join(source, n))), None)
            if path:
                found[split] = (path, 0, None)
        if "train" not in found:
            fail(f"--source {source}: no train file in it (looked for {', '.join(CANDIDATES['train'])})")
        return found
    return {"train": (download(source, max_bytes=max_bytes["train"]), 0, None)}


def main():
    tok = load_tokenizer(tokenizer)
    folder = output_dir(out, data_dir, "tinystories")
    caps = {"train": max_train_bytes, "val": max_val_bytes}
    try:
        files = find_split_files(local_source(source), caps)
        if "val" not in files:
            path = files["train"][0]
            cut = split_point(path, story_separator(path), val_fraction)
            files = {"train": (path, 0, cut), "val": (path, cut, None)}
            print(f"{path}: no val file, holding out the last {val_fraction:.1%} of its stories for val")
        total_bytes = 0
        for split, max_bytes in caps.items():
            path, start, end = files[split]
            if max_bytes > 0:
                cut = end_of_first_bytes(path, start, max_bytes)
                if cut is not None and (end is None or cut < end):
                    files[split] = (path, start, cut)
                    print(f"{split}: the first {max_bytes:,} bytes of {path} (whole lines)")
            total_bytes += min(os.path.getsize(path), max_bytes or os.path.getsize(path))
    except (OSError, ValueError) as e:
        fail(str(e))
    splits = {split: stories(path, start, end) for split, (path, start, end) in files.items()}
    write_text_splits(folder, tok, splits, source="tinystories", num_proc=num_proc, total_bytes=total_bytes)


if __name__ == "__main__":
    configure(globals())
    main()
