"""
Tiny Shakespeare (1.1 MB, Karpathy's char-rnn file) -> data/tinyshakespeare/{train,val}.bin.

    python prepare/tinyshakespeare.py --source=sample    # the copy in the repository's sample (prepare/sample)
    python prepare/tinyshakespeare.py                    # download (1.1 MB, checksummed)
    python prepare/tinyshakespeare.py --source=path/to/input.txt                # a local copy

As in nanoGPT, the first 90% of the text is train and the last 10% val (cut at a blank line); each split is
one document, starting with <|bos|>.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import (load_tokenizer, local_source, output_dir, read_documents,  # noqa: E402
                            resolve_source, split_point, write_text_splits)

# -----------------------------------------------------------------------------------------------------
source = ""  # 'sample', a local copy (input.txt, or a folder holding it) or a mirror URL; empty = download
tokenizer = "data/tokenizer.json"  # tokenizer file from prepare/tokenizer.py, or 'gpt2' or 'bytes'
data_dir = "data"  # folder of the prepared sources
out = ""  # output folder; empty = <data_dir>/tinyshakespeare
num_proc = max(1, min(8, os.cpu_count() or 1))  # processes that tokenize (the CPU count, at most 8)
val_fraction = 0.1  # the last part of the text for val
# -----------------------------------------------------------------------------------------------------

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def main():
    tok = load_tokenizer(tokenizer)
    folder = output_dir(out, data_dir, "tinyshakespeare")
    try:
        # the checksum is the official file's; a --source file may be another text, so it is not checked
        path = resolve_source(local_source(source), ["input.txt", "tinyshakespeare/input.txt"], URL,
                              sha256=None if source else SHA256)
        cut = split_point(path, "file", val_fraction)
    except (OSError, ValueError) as e:
        fail(str(e))
    splits = {"train": read_documents(path, "file", 0, cut), "val": read_documents(path, "file", cut)}
    write_text_splits(folder, tok, splits, source="tinyshakespeare", num_proc=num_proc,
                      total_bytes=os.path.getsize(path))


if __name__ == "__main__":
    configure(globals())
    main()
