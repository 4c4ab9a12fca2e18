"""
Mix prepared sources by weight into a new source: data/<out>/{train,val}.bin (+ masks for chat) + meta.json.

    python prepare/mix.py wikitext103:0.5 tinystories:0.5 --out=data/pretrain
    python prepare/mix.py alpaca:3,gsm8k:1,identity:0.1 --out=data/sft --train_tokens=2_000_000 --seed=1

Weights are shares of tokens (normalized to sum to 1). Documents (and conversations) are kept whole and
shuffled together; which ones are taken depends only on --seed. Without --train_tokens the mix is as large as
it can be without repeating any document; with it, a source too small for its share is repeated (and the
script says so). Val is mixed with the same weights from the sources' val splits. All sources must have been
prepared with the same tokenizer and the same format (text or chat). The realized share of each source is
printed and stored in meta.json.

train.py can also mix sources itself, per batch (--data=a:0.5,b:0.5); a prepared mix is a fixed, inspectable
file that other tools (and other people) can read.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from data import TokenWriter, open_tokens, read_meta, write_meta  # noqa: E402
from prepare.common import output_dir, written_aside  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# -----------------------------------------------------------------------------------------------------
sources = ""  # name:weight of prepared sources in data_dir, comma-separated (or as positional arguments)
out = ""  # output folder, e.g. data/pretrain
data_dir = "data"  # folder of the prepared sources
train_tokens = 0  # tokens of the train split; 0 = as many as possible without repeating a document
seed = 1337  # which documents, in which order
# -----------------------------------------------------------------------------------------------------


def parse_weights(specs):
    """['a:0.5', 'b:0.5'] -> [(name, weight)], weights normalized to sum to 1."""
    weights = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            fail(f"{spec!r}: expected name:weight with a number as the weight")
        if not name or weight <= 0:
            fail(f"{spec!r}: expected name:weight with a positive weight")
        weights.append((name, weight))
    if len({n for n, _ in weights}) != len(weights):
        fail("a source is named twice")
    total = sum(w for _, w in weights)
    return [(n, w / total) for n, w in weights]


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
    if not sources:
        fail("which sources? e.g. python prepare/mix.py wikitext103:0.5 tinystories:0.5 --out=data/pretrain")
    if not out:
        fail("--out: expected the output folder, e.g. --out=data/pretrain")
    weights = parse_weights(sources.split(","))

    metas = {}
    for name, _ in weights:
        try:
            metas[name] = read_meta(os.path.join(data_dir, name))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    shas = {metas[n]["tokenizer_sha256"] for n in metas}
    if len(shas) > 1:
        listing = ", ".join(f"{n}: {metas[n]['tokenizer_sha256'][:12]}" for n in metas)
        fail(f"the sources were prepared with different tokenizers ({listing}); prepare them all with the same one")
    formats = {metas[n]["format"] for n in metas}
    if len(formats) > 1:
        fail("the sources mix formats (" + ", ".join(f"{n}: {m['format']}" for n, m in metas.items()) + ")")
    fmt = formats.pop()
    if fmt == "choice":  # its questions file would need renumbering; train.py mixes them as they are
        fail("choice sources are mixed by train.py itself: --data=" + ",".join(n for n, _ in weights))
    first = os.path.join(data_dir, weights[0][0])
    tokenizer = Tokenizer.from_file(os.path.join(first, "tokenizer.json"))
    if tokenizer.sha256 != shas.copy().pop():
        fail(f"{first}/tokenizer.json does not match the tokenizer_sha256 in its meta.json")
    if os.path.abspath(out) in {os.path.abspath(os.path.join(data_dir, n)) for n in metas}:
        fail(f"--out {out} is one of the sources")
    folder = output_dir(out, "", "")

    with written_aside(folder) as work:  # the folder is replaced whole at the end, never half-written
        rng = np.random.default_rng(seed)
        split_counts, realized = {}, {}
        for split in ("train", "val"):
            spans, tokens, masks = {}, {}, {}
            for name, _ in weights:
                source_dir = os.path.join(data_dir, name)
                try:
                    tokens[name] = open_tokens(source_dir, split, metas[name])
                    masks[name] = open_tokens(source_dir, split, metas[name], mask=True) if fmt == "chat" else None
                except FileNotFoundError as e:
                    fail(str(e))
                spans[name] = document_spans(tokens[name], tokenizer.bos_id, f"{source_dir}/{split}.bin")
            available = {name: len(tokens[name]) for name in tokens}
            if split == "train":
                # --train_tokens, or the largest mix in which no source repeats a document
                total_target = train_tokens or min(available[name] / w for name, w in weights)
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
            writer = TokenWriter(work, split, tokenizer.vocab_size, with_mask=fmt == "chat")
            bytes_per_token = {n: metas[n]["splits"][split]["bytes"] / max(metas[n]["splits"][split]["tokens"], 1)
                               for n in metas}
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

        meta = write_meta(work, tokenizer, split_counts, source="mix: " + sources, fmt=fmt)
        meta["mix"] = {"weights": dict(weights), "realized": realized, "seed": seed}
        with open(os.path.join(work, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    print(f"wrote {out} ({fmt}); train.py: --data_dir={os.path.dirname(os.path.abspath(out))} "
          f"--data={os.path.basename(os.path.abspath(out))}")


if __name__ == "__main__":
    configure(globals(), positional="sources")
    main()
