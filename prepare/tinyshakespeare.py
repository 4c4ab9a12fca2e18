"""
Tiny Shakespeare (1.1 MB, Karpathy's char-rnn file) -> data/tinyshakespeare/{train,val}.bin.

    python prepare/tinyshakespeare.py                                           # download (1.1 MB)
    python prepare/tinyshakespeare.py --source ../shared/data/tinyshakespeare   # a local copy

As in nanoGPT, the first 90% of the text is train and the last 10% val (cut at a blank line); each split is
one document, starting with <|bos|>.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.common import (add_common_args, fail, load_tokenizer, output_dir, read_documents,  # noqa: E402
                            resolve_source, split_point, write_text_splits)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
                             "tinyshakespeare")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last part of the text for val (default 0.1)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        # the checksum is the official file's; a --source file may be another text, so it is not checked
        path = resolve_source(args.source, ["input.txt", "tinyshakespeare/input.txt"], URL,
                              sha256=None if args.source else SHA256)
    except (OSError, ValueError) as e:
        fail(str(e))
    cut = split_point(path, "file", args.val_fraction)
    splits = {"train": read_documents(path, "file", 0, cut), "val": read_documents(path, "file", cut)}
    write_text_splits(output_dir(args, "tinyshakespeare"), tokenizer, splits, source="tinyshakespeare",
                      num_proc=args.num_proc, total_bytes=os.path.getsize(path))


if __name__ == "__main__":
    main()
