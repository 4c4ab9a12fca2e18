"""
Your own text files -> data/<name>/{train,val}.bin, for pretraining on anything.

    python prepare/text.py notes.txt                                # -> data/notes/
    python prepare/text.py book1.txt book2.txt --name=books --doc_sep=blank
    python prepare/text.py corpus.txt --doc_sep='<|endoftext|>' --val_fraction=0.01

--doc_sep says where one document ends and the next begins (each document starts with <|bos|>):
  file    each file is one document (default; the val part of each file is one more)
  blank   paragraphs separated by blank lines
  line    every line
  any other string: a literal delimiter, e.g. '<|endoftext|>'
The last --val_fraction of each file (cut at a document boundary) goes to val. Files are streamed: a
2 GB file needs far less than 2 GB of memory.
"""

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import (load_tokenizer, output_dir, read_documents, split_point,  # noqa: E402
                            write_text_splits)

# -----------------------------------------------------------------------------------------------------
source = ""  # UTF-8 text files, comma-separated (or given as positional arguments)
name = ""  # the source's name, its folder under data_dir; empty = the first file's name
doc_sep = "file"  # file, blank, line or a literal delimiter (see above)
val_fraction = 0.1  # the last part of each file for val
tokenizer = "data/tokenizer.json"  # tokenizer file from prepare/tokenizer.py, or 'gpt2' or 'bytes'
data_dir = "data"  # folder of the prepared sources
out = ""  # output folder; empty = <data_dir>/<name>
num_proc = max(1, min(8, os.cpu_count() or 1))  # processes that tokenize (the CPU count, at most 8)
# -----------------------------------------------------------------------------------------------------


def main():
    paths = [p for p in source.split(",") if p]
    if not paths:
        fail("no input files: give them as arguments (python prepare/text.py notes.txt) or as --source=a,b")
    if not 0 < val_fraction < 1:
        fail(f"--val_fraction={val_fraction}: expected a number between 0 and 1")
    for path in paths:
        if not os.path.isfile(path):
            fail(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            fail(f"{path}: the file is empty")
    source_name = name or os.path.splitext(os.path.basename(paths[0]))[0]
    tok = load_tokenizer(tokenizer)
    folder = output_dir(out, data_dir, source_name)
    try:
        cuts = [split_point(path, doc_sep, val_fraction) for path in paths]
    except ValueError as e:  # not UTF-8: the message names the file and line
        fail(str(e))
    splits = {"train": itertools.chain(*(read_documents(p, doc_sep, 0, c) for p, c in zip(paths, cuts))),
              "val": itertools.chain(*(read_documents(p, doc_sep, c) for p, c in zip(paths, cuts)))}
    total_bytes = sum(os.path.getsize(p) for p in paths)
    write_text_splits(folder, tok, splits, source=source_name, num_proc=num_proc, total_bytes=total_bytes)


if __name__ == "__main__":
    configure(globals(), positional="source")
    main()
