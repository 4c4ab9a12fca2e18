"""
Your own text files -> data/<name>/{train,val}.bin, for pretraining on anything.

    python prepare/text.py notes.txt                                # -> data/notes/
    python prepare/text.py book1.txt book2.txt --name books --doc_sep blank
    python prepare/text.py corpus.txt --doc_sep '<|endoftext|>' --val_fraction 0.01

--doc_sep says where one document ends and the next begins (each document starts with <|bos|>):
  file    each file is one document (default; the val part of each file is one more)
  blank   paragraphs separated by blank lines
  line    every line
  any other string: a literal delimiter, e.g. '<|endoftext|>'
The last --val_fraction of each file (cut at a document boundary) goes to val. Files are streamed: a
2 GB file needs far less than 2 GB of memory.
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.common import (add_common_args, fail, load_tokenizer, output_dir, read_documents,  # noqa: E402
                            split_point, write_text_splits)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="UTF-8 text files")
    parser.add_argument("--name", default=None, help="the source's name, its folder under --data_dir (default: first file's name)")
    parser.add_argument("--doc_sep", default="file", help="file, blank, line or a literal delimiter (default file)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last part of each file for val (default 0.1)")
    args, _ = parser.parse_known_args()
    name = args.name or os.path.splitext(os.path.basename(args.files[0]))[0]
    add_common_args(parser, name)
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction {args.val_fraction}: expected a number between 0 and 1")
    for path in args.files:
        if not os.path.isfile(path):
            fail(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            fail(f"{path}: the file is empty")
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        cuts = [split_point(path, args.doc_sep, args.val_fraction) for path in args.files]
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text ({e})")
    splits = {"train": itertools.chain(*(read_documents(p, args.doc_sep, 0, c) for p, c in zip(args.files, cuts))),
              "val": itertools.chain(*(read_documents(p, args.doc_sep, c) for p, c in zip(args.files, cuts)))}
    total = sum(os.path.getsize(p) for p in args.files)
    try:
        write_text_splits(output_dir(args, name), tokenizer, splits, source=name, num_proc=args.num_proc,
                          total_bytes=total)
    except UnicodeDecodeError as e:
        fail(f"not UTF-8 text ({e})")


if __name__ == "__main__":
    main()
