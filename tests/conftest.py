"""Shared test fixtures: the repository's sample of real data, a small prepared source, and helpers to run stages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# real data: the sample in the repository (prepare/sample, see its MANIFEST.md for what each file holds), so that
# a fresh clone tests offline. NANOLLAMA_DATA points the tests at another folder laid out the same way (a copy of
# the sample); the counts the tests assert are the sample's.
SAMPLE_DATA = Path(os.environ.get("NANOLLAMA_DATA") or REPO / "prepare" / "sample")

from model import ModelArgs, Transformer  # noqa: E402
from data import TokenWriter, write_meta  # noqa: E402
from tokenizer import count_chunks, train_bpe  # noqa: E402


def sample_file(relative):
    """A file of the sample (prepare/sample/<relative>)."""
    path = SAMPLE_DATA / relative
    if not path.exists():
        where = "NANOLLAMA_DATA" if os.environ.get("NANOLLAMA_DATA") else "the repository's sample, prepare/sample"
        raise FileNotFoundError(f"{path} not found: the tests read real data from {where} (see its MANIFEST.md)")
    return path


def random_model(seed=0, **overrides):
    """A tiny model with every weight random (the zero-initialized projections too), in eval mode."""
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64)
    args.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model.eval()


def prepare_text_source(out_dir, text, tokenizer, val_fraction=0.1, name="test"):
    """Tokenize text into out_dir/{train,val}.bin + meta.json (a document per blank-line-separated block)."""
    os.makedirs(out_dir, exist_ok=True)
    split_at = text.index("\n", int(len(text) * (1 - val_fraction)))
    counts = {}
    for split, part in (("train", text[:split_at]), ("val", text[split_at:])):
        writer = TokenWriter(out_dir, split, tokenizer.vocab_size)
        writer.add(tokenizer.encode(part, bos=True), len(part.encode("utf-8")))
        counts[split] = writer.close()
    return write_meta(out_dir, tokenizer, counts, source=name)


@pytest.fixture(scope="session")
def shakespeare_tokenizer():
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    return train_bpe(count_chunks([text[:300_000]]), 512)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, shakespeare_tokenizer):
    """A data_dir holding 'shakespeare': tiny shakespeare with a 512-token BPE tokenizer."""
    root = tmp_path_factory.mktemp("data")
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    prepare_text_source(root / "shakespeare", text, shakespeare_tokenizer, name="tinyshakespeare")
    return root


TINY_TRAIN = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--block_size=64", "--batch_size=8",
              "--eval_iters=4", "--log_interval=1", "--warmup_iters=5", "--num_threads=1", "--data=shakespeare"]


def run_stage(script, *args, check=True, timeout=300, env=None):
    """Run a stage script (train.py, sample.py, ...) from the repository root; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read_log(out_dir, kind="train"):
    with open(Path(out_dir) / "log.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def prepare_chat_source(out_dir, splits, tokenizer, name="chat"):
    """Render conversations ({split: [messages, ...]}) into chat token files: tokens, loss mask, meta.json."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, conversations in splits.items():
        writer = TokenWriter(out_dir, split, tokenizer.vocab_size, with_mask=True)
        for messages in conversations:
            ids, mask = tokenizer.render_conversation(messages)
            n_bytes = sum(len(str(m["content"]).encode("utf-8")) for m in messages)
            writer.add(ids, n_bytes, mask)
        counts[split] = writer.close()
    return write_meta(out_dir, tokenizer, counts, source=name, fmt="chat")


def alpaca_conversations(n, offset=0):
    """n real Alpaca instruction/response pairs from the sample as chat messages."""
    records = json.loads(sample_file("alpaca/alpaca_data_1k.json").read_text(encoding="utf-8"))[offset:offset + n]
    return [[{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
             {"role": "assistant", "content": r["output"]}] for r in records]
