"""
Show what the model learns from a conversation: trained tokens (mask 1) highlighted in green, the rest dim.

    python prepare/show_mask.py data/alpaca                 # conversation 0 of a prepared chat source
    python prepare/show_mask.py data/alpaca --index 5 --split val
    python prepare/show_mask.py my_chats.jsonl --tokenizer data/tokenizer.json   # render a JSONL file first

Reads exactly the token and mask files train.py reads, so what is green here is what the loss counts.
--plain marks trained text with [[ ]] instead of colours (for logs and pipes).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import open_tokens, read_meta  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

GREEN, DIM, RESET = "\033[30;42m", "\033[2m", "\033[0m"


def conversation_from_source(source_dir, split, index):
    """(tokenizer, ids, mask) of conversation `index` of a prepared chat source."""
    meta = read_meta(source_dir)
    if meta["format"] != "chat":
        sys.exit(f"error: {source_dir} holds {meta['format']} data; the mask exists only for chat data")
    tokenizer = Tokenizer.from_file(os.path.join(source_dir, "tokenizer.json"))
    tokens = open_tokens(source_dir, split, meta)
    mask = open_tokens(source_dir, split, meta, mask=True)
    starts = np.append(np.flatnonzero(tokens == tokenizer.bos_id), len(tokens))
    if not 0 <= index < len(starts) - 1:
        sys.exit(f"error: {source_dir} {split} has {len(starts) - 1} conversations; --index {index} is out of range")
    span = slice(starts[index], starts[index + 1])
    return tokenizer, tokens[span].tolist(), mask[span].tolist()


def conversation_from_jsonl(path, tokenizer_path, index):
    tokenizer = Tokenizer.from_file(tokenizer_path)
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if not 0 <= index < len(lines):
        sys.exit(f"error: {path} has {len(lines)} conversations; --index {index} is out of range")
    try:
        messages = json.loads(lines[index])["messages"]
    except (json.JSONDecodeError, KeyError, TypeError):
        sys.exit(f"error: {path}: conversation {index} is not a JSON object with a 'messages' list")
    try:
        ids, mask = tokenizer.render_conversation(messages)
    except ValueError as e:
        sys.exit(f"error: {path}: conversation {index}: {e}")
    return tokenizer, ids, mask


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a prepared chat source folder (data/<name>) or a JSONL file of conversations")
    parser.add_argument("--index", type=int, default=0, help="which conversation")
    parser.add_argument("--split", default="train", help="train or val (prepared sources)")
    parser.add_argument("--tokenizer", default="data/tokenizer.json", help="tokenizer file (JSONL input)")
    parser.add_argument("--plain", action="store_true", help="mark trained text with [[ ]] instead of colours")
    args = parser.parse_args()
    if os.path.isdir(args.source):
        tokenizer, ids, mask = conversation_from_source(args.source, args.split, args.index)
    else:
        tokenizer, ids, mask = conversation_from_jsonl(args.source, args.tokenizer, args.index)
    print(render(tokenizer, ids, mask, plain=args.plain or not sys.stdout.isatty()))
    print(f"\n{sum(mask)} of {len(ids)} tokens are trained (mask 1)", file=sys.stderr)


if __name__ == "__main__":
    main()
