"""
WikiText-103 or WikiText-2 (the raw, untokenized text) -> data/wikitext103/ or data/wikitext2/ {train,val,test}.bin.

    python prepare/wikitext.py                                   # WikiText-103 raw (download, 190 MB zip)
    python prepare/wikitext.py --version 2                       # WikiText-2 raw (4.7 MB zip)
    python prepare/wikitext.py --version 2 --source path/to/wikitext-2-raw      # a local copy (folder or zip)

Each Wikipedia article (from its ' = Title = ' line) is one document starting with <|bos|>. The test split is
written too, for evaluation. The files read are wiki.{train,valid,test}.raw (or the tokenized-form
{train,valid,test}.txt / wiki.*.tokens, which contain <unk>: prefer raw).
"""

import argparse
import os
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.common import (add_common_args, download, fail, load_tokenizer, output_dir,  # noqa: E402
                            read_documents, write_text_splits)

URLS = {"103": "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
        "2": "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"}
SPLIT_NAMES = {"train": "train", "val": "valid", "test": "test"}


def split_candidates(split):
    name = SPLIT_NAMES[split]
    return [f"wiki.{name}.raw", f"{name}.txt", f"wiki.{name}.tokens"]


def extract_zip(path):
    """Unpack a WikiText zip beside itself (once) and return the folder."""
    folder = path[:-len(".zip")]
    if not os.path.isdir(folder):
        with zipfile.ZipFile(path) as z:
            z.extractall(folder + ".part")
        os.replace(folder + ".part", folder)
    return folder


def find_split_files(source, version):
    """{split: path} from the official zip, a --source zip/URL, or a --source folder (searched recursively)."""
    if source is None or not os.path.isdir(source):
        source = extract_zip(download(source or URLS[version]))
    found = {}
    for split in SPLIT_NAMES:
        for folder, _, names in sorted(os.walk(source)):
            name = next((n for n in split_candidates(split) if n in names), None)
            if name:
                found[split] = os.path.join(folder, name)
                break
    if "train" not in found:
        fail(f"{source}: no train split in it (looked for {', '.join(split_candidates('train'))}); "
             "../shared/data/wikitext-2 holds only valid and test: download the full set or use prepare/text.py")
    return found


def articles(path):
    """The articles of a WikiText file: each begins at a ' = Title = ' line."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16)
    # copies with the blank lines removed cannot use the blank line before a title to tell it from an equation
    blank_lines = "\n \n" in head or "\n\n" in head or "\n \r\n" in head
    return read_documents(path, "wikitext" if blank_lines else "wikitext_noblank")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", choices=["103", "2"], default="103", help="WikiText-103 (default) or WikiText-2")
    args, _ = parser.parse_known_args()
    add_common_args(parser, f"wikitext{args.version}")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        files = find_split_files(args.source, args.version)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        fail(str(e))
    out = output_dir(args, f"wikitext{args.version}")
    total = sum(os.path.getsize(p) for p in files.values())
    write_text_splits(out, tokenizer, {split: articles(path) for split, path in files.items()},
                      source=f"wikitext{args.version}", num_proc=args.num_proc, total_bytes=total)


if __name__ == "__main__":
    main()
