"""
Show what the model learns from a conversation: trained tokens (mask 1) highlighted in green, the rest dim.

    python prepare/show_mask.py data/alpaca                 # conversation 0 of a prepared chat source
    python prepare/show_mask.py data/alpaca --index=5 --split=val
    python prepare/show_mask.py my_chats.jsonl --tokenizer=data/tokenizer.json   # render a JSONL file first

Reads exactly the token and mask files train.py reads, so what is green here is what the loss counts.
--plain marks trained text with [[ ]] instead of colours (for logs and pipes).
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from data import open_tokens, read_meta  # noqa: E402
from prepare.common import load_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------------------------------
source = ""  # a prepared chat source folder (data/<name>) or a JSONL file of conversations (the first argument)
index = 0  # which conversation
split = "train"  # train or val (prepared sources)
tokenizer = "data/tokenizer.json"  # tokenizer file (JSONL input)
plain = False  # mark trained text with [[ ]] instead of colours (always so when the output is not a terminal)
# -----------------------------------------------------------------------------------------------------

GREEN, DIM, RESET = "\033[30;42m", "\033[2m", "\033[0m"


def conversation_from_source(source_dir, split, index):
    """(tokenizer, ids, mask) of conversation `index` of a prepared chat source."""
    try:
        meta = read_meta(source_dir)
        tokens = open_tokens(source_dir, split, meta)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if meta["format"] == "text":
        fail(f"{source_dir} holds text data; the mask exists only for chat and choice data")
    tok = load_tokenizer(os.path.join(source_dir, "tokenizer.json"))
    mask = open_tokens(source_dir, split, meta, mask=True)
    starts = np.append(np.flatnonzero(tokens == tok.bos_id), len(tokens))
    if not 0 <= index < len(starts) - 1:
        fail(f"{source_dir} {split} has {len(starts) - 1} conversations; --index={index} is out of range")
    span = slice(starts[index], starts[index + 1])
    return tok, tokens[span].tolist(), mask[span].tolist()


def conversation_from_jsonl(path, tokenizer_path, index):
    tok = load_tokenizer(tokenizer_path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        fail(f"{path}: {e.strerror} (expected a prepared chat folder or a JSONL file of conversations)")
    if not 0 <= index < len(lines):
        fail(f"{path} has {len(lines)} conversations; --index={index} is out of range")
    try:
        messages = json.loads(lines[index])["messages"]
    except (json.JSONDecodeError, KeyError, TypeError):
        fail(f"{path}: conversation {index} is not a JSON object with a 'messages' list")
    try:
        ids, mask = tok.render_conversation(messages)
    except ValueError as e:
        fail(f"{path}: conversation {index}: {e}")
    return tok, ids, mask


def render(tokenizer, ids, mask, plain=False):
    """The conversation as text, each token's piece coloured (or bracketed) by its mask value."""
    pieces = []
    for token, trained in zip(ids, mask):
        text = tokenizer.decode([token])
        if tokenizer.is_special(token) and text.endswith(("_end|>", "bos|>")):
            text += "\n"  # one turn per line reads better
        if plain:
            pieces.append(f"[[{text}]]" if trained else text)
        else:
            pieces.append(f"{GREEN if trained else DIM}{text}{RESET}")
    text = "".join(pieces)
    return text.replace("]][[", "") if plain else text


def main():
    if not source:
        fail("which conversations? e.g. python prepare/show_mask.py data/alpaca (a chat folder or a JSONL file)")
    if os.path.isdir(source):
        tok, ids, mask = conversation_from_source(source, split, index)
    else:
        tok, ids, mask = conversation_from_jsonl(source, tokenizer, index)
    print(render(tok, ids, mask, plain=plain or not sys.stdout.isatty()))
    print(f"\n{sum(mask)} of {len(ids)} tokens are trained (mask 1)", file=sys.stderr)


if __name__ == "__main__":
    configure(globals(), positional="source")
    main()
