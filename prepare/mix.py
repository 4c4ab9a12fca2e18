"""
Mix prepared sources by weight into a new source: data/<out>/{train,val}.bin (+ masks for chat) + meta.json.

    python prepare/mix.py --out data/pretrain wikitext103:0.5 tinystories:0.5
    python prepare/mix.py --out data/sft alpaca:3 gsm8k:1 identity:0.1 --train_tokens 2_000_000 --seed 1

Weights are shares of tokens (normalized to sum to 1). Documents (and conversations) are kept whole and
shuffled together; which ones are taken depends only on --seed. Without --train_tokens the mix is as large as
it can be without repeating any document; with it, a source too small for its share is repeated (and the
script says so). Val is mixed with the same weights from the sources' val splits. All sources must have been
prepared with the same tokenizer and the same format (text or chat). The realized share of each source is
printed and stored in meta.json.

train.py can also mix sources itself, per batch (--data=a:0.5,b:0.5); a prepared mix is a fixed, inspectable
file that other tools (and other people) can read.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import TokenWriter, open_tokens, read_meta, write_meta  # noqa: E402
from prepare.common import fail  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def parse_weights(specs):
    """['a:0.5', 'b:0.5'] -> [(name, weight)], weights normalized to sum to 1."""
    sources = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            fail(f"{spec!r}: expected name:weight with a number as the weight")
        if not name or weight <= 0:
            fail(f"{spec!r}: expected name:weight with a positive weight")
        sources.append((name, weight))
    if len({n for n, _ in sources}) != len(sources):
        fail("a source is named twice")
    total = sum(w for _, w in sources)
    return [(n, w / total) for n, w in sources]


def document_spans(tokens, bos_id, where):
    """(starts, lengths) of the documents of a token file: each starts with <|bos|>."""
    starts = np.flatnonzero(tokens == bos_id)
    if len(tokens) == 0:
        fail(f"{where} is empty")
    if len(starts) == 0 or starts[0] != 0:
        fail(f"{where}: does not start with <|bos|>; was it prepared by a prepare/ script?")
    return starts, np.diff(np.append(starts, len(tokens)))


def choose_documents(lengths, target_tokens, rng):
    """Indices of whole documents, in a random order, whose lengths add up to about target_tokens; the
    documents are cycled through again (in a new order) when one pass is not enough."""
    chosen, total = [], 0
    while total < target_tokens:
        for i in rng.permutation(len(lengths)):
            # stop at the document that brings the total closest to the target
            if total + lengths[i] / 2 > target_tokens:
                return chosen, total
            chosen.append(i)
            total += int(lengths[i])
    return chosen, total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="name:weight of prepared sources in --data_dir")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/pretrain")
    parser.add_argument("--data_dir", default="data", help="folder of the prepared sources (default data)")
    parser.add_argument("--train_tokens", type=lambda s: int(float(s.replace("_", ""))), default=None,
                        help="tokens of the train split (default: as many as possible without repeating)")
    parser.add_argument("--seed", type=int, default=1337, help="which documents, in which order")
    args = parser.parse_args()
    weights = parse_weights(args.sources)

    metas = {}
    for name, _ in weights:
        try:
            metas[name] = read_meta(os.path.join(args.data_dir, name))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    shas = {metas[n]["tokenizer_sha256"] for n in metas}
    if len(shas) > 1:
        listing = ", ".join(f"{n}: {metas[n]['tokenizer_sha256'][:12]}" for n in metas)
        fail(f"the sources were prepared with different tokenizers ({listing}); prepare them all with the same one")
    formats = {metas[n]["format"] for n in metas}
    if len(formats) > 1:
        fail("the sources mix text and chat data (" + ", ".join(f"{n}: {m['format']}" for n, m in metas.items()) + ")")
    fmt = formats.pop()
    first = os.path.join(args.data_dir, weights[0][0])
    tokenizer = Tokenizer.from_file(os.path.join(first, "tokenizer.json"))
    if tokenizer.sha256 != shas.copy().pop():
        fail(f"{first}/tokenizer.json does not match the tokenizer_sha256 in its meta.json")
    if os.path.abspath(args.out) in {os.path.abspath(os.path.join(args.data_dir, n)) for n in metas}:
        fail(f"--out {args.out} is one of the sources")
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(args.seed)
    split_counts, realized = {}, {}
    for split in ("train", "val"):
        spans, tokens, masks = {}, {}, {}
        for name, _ in weights:
            source_dir = os.path.join(args.data_dir, name)
            try:
                tokens[name] = open_tokens(source_dir, split, metas[name])
                masks[name] = open_tokens(source_dir, split, metas[name], mask=True) if fmt == "chat" else None
            except FileNotFoundError as e:
                fail(str(e))
            spans[name] = document_spans(tokens[name], tokenizer.bos_id, f"{source_dir}/{split}.bin")
        available = {name: len(tokens[name]) for name in tokens}
        if split == "train":
            # --train_tokens, or the largest mix in which no source repeats a document
            total_target = args.train_tokens or min(available[name] / w for name, w in weights)
            train_fraction_used = total_target / sum(available.values())
        else:
            # val takes the same fraction of the val tokens as train took of the train tokens (the largest mix
            # without repeats would shrink to nothing with a tiny source); a small source may repeat
            total_target = min(1.0, train_fraction_used) * sum(available.values())
        picks = []  # (source, document index)
        taken = {}
        for name, w in weights:
            chosen, n_tokens = choose_documents(spans[name][1], w * total_target, rng)
            if n_tokens > available[name]:
                print(f"note: {name} {split}: {available[name]:,} tokens for a share of {w * total_target:,.0f}: "
                      f"its documents repeat {n_tokens / available[name]:.1f} times")
            picks += [(name, i) for i in chosen]
            taken[name] = n_tokens
        order = rng.permutation(len(picks))
        writer = TokenWriter(args.out, split, tokenizer.vocab_size, with_mask=fmt == "chat")
        bytes_per_token = {n: metas[n]["splits"][split]["bytes"] / max(metas[n]["splits"][split]["tokens"], 1)
                           for n in metas}
        n_bytes = {n: 0.0 for n in metas}
        for k in order:
            name, i = picks[k]
            start, length = spans[name][0][i], spans[name][1][i]
            # bytes per document are not stored: each document counts its source's average bytes per token
            doc_bytes = length * bytes_per_token[name]
            writer.add(tokens[name][start:start + length], round(doc_bytes),
                       masks[name][start:start + length] if fmt == "chat" else None)
        split_counts[split] = writer.close()
        if split_counts[split]["documents"] == 0:
            fail(f"the {split} mix is empty")
        total = sum(taken.values())
        realized[split] = {name: taken[name] / total for name, _ in weights}
        print(f"{split}: {total:,} tokens, {split_counts[split]['documents']:,} documents")
        for name, w in weights:
            print(f"  {name:20s} asked {w:6.1%}  got {realized[split][name]:6.1%}  ({taken[name]:,} tokens)")

    meta = write_meta(args.out, tokenizer, split_counts, source="mix: " + ",".join(args.sources), fmt=fmt)
    meta["mix"] = {"weights": dict(weights), "realized": realized, "seed": args.seed}
    with open(os.path.join(args.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    print(f"wrote {args.out} ({fmt}); train.py: --data_dir={os.path.dirname(os.path.abspath(args.out))} "
          f"--data={os.path.basename(os.path.abspath(args.out))}")


if __name__ == "__main__":
    main()
