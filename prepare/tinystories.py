"""
TinyStories (V2, the GPT-4 stories) -> data/tinystories/{train,val}.bin + meta.json.

    python prepare/tinystories.py                                        # download (2.2 GB train, 22 MB valid)
    python prepare/tinystories.py --source ../shared/data/tinystories    # a local copy (here: a small subset)
    python prepare/tinystories.py --source TinyStoriesV2-GPT4-train.txt --val_fraction 0.01

Stories are separated by '<|endoftext|>' lines in the official files; files without that delimiter (the
subset in ../shared/data) end a story at a single newline, with blank lines between its paragraphs.
Each story is one document and starts with <|bos|>. Tokenizing streams the files on several processes.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.common import (add_common_args, download, fail, load_tokenizer, output_dir,  # noqa: E402
                            read_documents, split_point, write_text_splits)

BASE_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
# other layouts a --source folder may have (V1 files, the ../shared/data subset)
CANDIDATES = {"train": [FILES["train"], "TinyStories-train.txt", "tiny_stories.txt", "train.txt"],
              "val": [FILES["val"], "TinyStories-valid.txt", "tinystories_val.txt", "valid.txt", "val.txt"]}


def story_separator(path):
    """'<|endoftext|>' where the file uses it, else 'story' (a single newline ends a story)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 20)
    return "<|endoftext|>" if "<|endoftext|>" in head else "story"


def stories(path, start=0, end=None):
    """The stories of a TinyStories text file (between character offsets start and end)."""
    return read_documents(path, story_separator(path), start, end)


def find_split_files(source):
    """{split: (path, start, end)}: the official download, a folder with the files, or one file split by --val_fraction."""
    if source is None:
        return {split: (download(BASE_URL + name), 0, None) for split, name in FILES.items()}
    if os.path.isdir(source):
        found = {}
        for split, names in CANDIDATES.items():
            path = next((os.path.join(source, n) for n in names if os.path.exists(os.path.join(source, n))), None)
            if path:
                found[split] = (path, 0, None)
        if "train" not in found:
            fail(f"--source {source}: no train file in it (looked for {', '.join(CANDIDATES['train'])})")
        return found
    return {"train": (download(source), 0, None)}


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
                             "tinystories")
    parser.add_argument("--val_fraction", type=float, default=0.01,
                        help="share of the train file held out for val when the source has no val file (default 0.01)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        files = find_split_files(args.source)
    except (OSError, ValueError) as e:
        fail(str(e))
    if "val" not in files:
        path = files["train"][0]
        cut = split_point(path, story_separator(path), args.val_fraction)
        files = {"train": (path, 0, cut), "val": (path, cut, None)}
        print(f"{path}: no val file, holding out the last {args.val_fraction:.1%} of its stories for val")
    out = output_dir(args, "tinystories")
    splits = {split: stories(path, start, end) for split, (path, start, end) in files.items()}
    total = sum(os.path.getsize(path) for path, _, _ in files.values())
    write_text_splits(out, tokenizer, splits, source="tinystories", num_proc=args.num_proc, total_bytes=total)


if __name__ == "__main__":
    main()
