"""
WikiText-103 or WikiText-2 (the raw, untokenized text) -> data/wikitext103/ or data/wikitext2/ {train,val,test}.bin.

    python prepare/wikitext.py                                   # WikiText-103 raw (download, 190 MB zip)
    python prepare/wikitext.py --version=2                       # WikiText-2 raw (4.7 MB zip)
    python prepare/wikitext.py --version=2 --source=path/to/wikitext-2-raw      # a local copy (folder or zip)

The sample (prepare/sample/wikitext-2) holds slices of the valid and test splits only, for tests; prepare a
source from them with prepare/text.py.

Each Wikipedia article (from its ' = Title = ' line) is one document starting with <|bos|>. The test split is
written too, for evaluation. The files read are wiki.{train,valid,test}.raw (or the tokenized-form
{train,valid,test}.txt / wiki.*.tokens, which contain <unk>: prefer raw).
"""

import os
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import (download, load_tokenizer, local_source, output_dir, read_documents,  # noqa: E402
                            write_text_splits)

# -----------------------------------------------------------------------------------------------------
version = "103"  # '103' (WikiText-103) or '2' (WikiText-2)
source = ""  # a local copy (a folder holding the split files, or the zip) or a mirror URL; empty = download
tokenizer = "data/tokenizer.json"  # tokenizer file from prepare/tokenizer.py, or 'gpt2' or 'bytes'
data_dir = "data"  # folder of the prepared sources
out = ""  # output folder; empty = <data_dir>/wikitext<version>
num_proc = max(1, min(8, os.cpu_count() or 1))  # processes that tokenize (the CPU count, at most 8)
# -----------------------------------------------------------------------------------------------------

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
    if not source or not os.path.isdir(source):
        source = extract_zip(download(source or URLS[version]))
    found = {}
    for split in SPLIT_NAMES:
        for folder, _, names in sorted(os.walk(source)):
            name = next((n for n in split_candidates(split) if n in names), None)
            if name:
                found[split] = os.path.join(folder, name)
                break
    if "train" not in found:
        fail(f"{source}: no train split in it (looked for {', '.join(split_candidates('train'))}); a copy with "
             "only valid and test splits (as the sample's) is for tests: download the full set, or use prepare/text.py")
    return found


def articles(path):
    """The articles of a WikiText file: each begins at a ' = Title = ' line."""
    with open(path, encoding="utf-8", errors="replace") as f:  # decoding errors are reported when tokenizing
        head = f.read(1 << 16)
    # copies with the blank lines removed cannot use the blank line before a title to tell it from an equation
    blank_lines = "\n \n" in head or "\n\n" in head or "\n \r\n" in head
    return read_documents(path, "wikitext" if blank_lines else "wikitext_noblank")


def main():
    if version not in URLS:
        fail(f"--version={version}: expected 103 (WikiText-103) or 2 (WikiText-2)")
    tok = load_tokenizer(tokenizer)
    folder = output_dir(out, data_dir, f"wikitext{version}")
    try:
        files = find_split_files(local_source(source), version)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        fail(str(e))
    total_bytes = sum(os.path.getsize(p) for p in files.values())
    write_text_splits(folder, tok, {split: articles(path) for split, path in files.items()},
                      source=f"wikitext{version}", num_proc=num_proc, total_bytes=total_bytes)


if __name__ == "__main__":
    configure(globals())
    main()
