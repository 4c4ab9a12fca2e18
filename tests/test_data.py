"""data.py's batches: a pure function of (seed, split, step, micro-step, rank), chat masks, DDP shares, errors."""

import random
import re
import shutil

import pytest
import torch

from conftest import prepare_chat_source, prepare_text_source
from data import Batches
from tokenizer import Tokenizer, count_chunks, train_bpe

WORDS = "the cat sat on a mat while two dogs ran past the old red barn and one bird sang".split()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.byte_level()


def conversations(n, seed):
    """n chats of varied length: a user question, an assistant answer (some with a system message too)."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 20)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 12)))
        messages = [{"role": "user", "content": f"{i}: {question}?"}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        chats.append(messages)
    return chats


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer):
    """'text' (random words), 'chat' (40 train, 8 val conversations), 'more' (12 + 4 others)."""
    root = tmp_path_factory.mktemp("batches")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(600))
    prepare_text_source(root / "text", text, tokenizer)
    prepare_chat_source(root / "chat", {"train": conversations(40, 1), "val": conversations(8, 2)}, tokenizer)
    prepare_chat_source(root / "more", {"train": conversations(12, 3), "val": conversations(4, 4)}, tokenizer)
    return root


def batches(data_dir, spec, **settings):
    settings = {"batch_size": 4, "block_size": 64, "seed": 7, **settings}
    return Batches(str(data_dir), spec, **settings)


@pytest.mark.parametrize("spec", ["text", "chat,more:2"])
def test_a_batch_depends_only_on_split_step_and_micro_step(data_dir, spec):
    """A resumed run draws exactly the batches an uninterrupted one would: no hidden sampler state."""
    straight = batches(data_dir, spec, gradient_accumulation_steps=2)
    wanted = [(step, micro) for step in range(12) for micro in range(2)]
    expected = {key: straight.get_batch("train", *key) for key in wanted}
    resumed = batches(data_dir, spec, gradient_accumulation_steps=2)
    for key in reversed(wanted):  # another object, the other order
        x, y = resumed.get_batch("train", *key)
        assert torch.equal(x, expected[key][0]) and torch.equal(y, expected[key][1])
    assert not torch.equal(expected[0, 0][0], expected[0, 1][0])  # and micro-batches do differ
    assert not torch.equal(expected[0, 0][0], expected[1, 0][0])


@pytest.mark.parametrize("spec", ["text", "chat,more:2"])
def test_ddp_ranks_draw_the_micro_batches_of_one_process_with_more_accumulation(data_dir, spec):
    single = batches(data_dir, spec, gradient_accumulation_steps=4)
    ranks = [batches(data_dir, spec, gradient_accumulation_steps=2, rank=r, world_size=2) for r in range(2)]
    for step in range(8):
        for micro in range(4):
            x, y = single.get_batch("train", step, micro)
            rank_x, rank_y = ranks[micro // 2].get_batch("train", step, micro % 2)
            assert torch.equal(x, rank_x) and torch.equal(y, rank_y)


def rendered(tokenizer, chats, block_size):
    """{the inputs of a conversation: (its next tokens, its loss mask for them)}, cut as a batch row is."""
    rows = {}
    for messages in chats:
        ids, mask = tokenizer.render_conversation(messages)
        ids, mask = ids[:block_size + 1], mask[:block_size + 1]
        rows[tuple(ids[:-1])] = (ids[1:], mask[1:])
    return rows


@pytest.mark.parametrize("loss_mask", [True, False])
def test_chat_rows_are_whole_conversations_learned_where_the_mask_is_1(data_dir, tokenizer, loss_mask):
    block_size = 48  # some conversations are longer: they are cut, not split across rows
    data = batches(data_dir, "chat", block_size=block_size, loss_mask=loss_mask)
    expected = rendered(tokenizer, conversations(40, 1), block_size)
    seen = []
    for step in range(data.steps_for_epochs(1)):  # one epoch: batch_size conversations per step
        x, y = data.get_batch("train", step, 0)
        assert x.shape == y.shape and x.shape[1] <= block_size and x.shape[1] % 8 == 0
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            key = next(k for k in expected if row_x[:len(k)] == list(k))  # the conversation of this row
            targets, mask = expected[key]
            n = len(key)
            assert row_x[n:] == [0] * (len(row_x) - n) and row_y[n:] == [-1] * (len(row_y) - n)  # padding
            assert row_y[:n] == [t if (m or not loss_mask) else -1 for t, m in zip(targets, mask)]
            seen.append(key)
    assert sorted(seen) == sorted(expected)  # each conversation exactly once per epoch


def test_a_weight_repeats_a_sources_conversations_per_epoch(data_dir, tokenizer):
    data = batches(data_dir, "chat,more:2.5", block_size=256)
    chat, more = rendered(tokenizer, conversations(40, 1), 256), rendered(tokenizer, conversations(12, 3), 256)
    assert data.batches_per_epoch["train"] == -(-(40 + 30) // 4)  # 12 x 2.5 = 30 of 'more'
    counts = {}
    for step in range(data.batches_per_epoch["train"]):
        x, _ = data.get_batch("train", step, 0)
        for row in x.tolist():
            key = next(k for k in list(chat) + list(more) if row[:len(k)] == list(k))
            counts[key] = counts.get(key, 0) + 1
    assert all(counts[key] == 1 for key in chat)
    assert sorted(counts[key] for key in more) == [2] * 6 + [3] * 6  # twice, plus a random half once more
    assert "data: chat x1, more x2.5" in data.summary()[0]


def test_evaluation_batches_are_the_same_every_time(data_dir):
    for spec in ("text", "chat"):
        data = batches(data_dir, spec)
        first = [[b for b in group] for _, group in data.eval_batches("train", 3)]
        again = [[b for b in group] for _, group in data.eval_batches("train", 3)]
        assert len(first[0]) == 3
        for a, b in zip(sum(first, []), sum(again, [])):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_clear_errors(data_dir, tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"mixes formats \(text: text, chat: chat\)"):
        batches(data_dir, "text,chat")
    with pytest.raises(ValueError, match="weight 'x' of source 'chat' is not a number"):
        batches(data_dir, "chat:x")
    with pytest.raises(FileNotFoundError, match="nope/meta.json not found"):
        batches(data_dir, "nope")
    with pytest.raises(ValueError, match=r"\.bin has \d+ tokens, too few for block_size=100000"):
        batches(data_dir, "text", block_size=100_000)
    # a system message longer than block_size: no conversation has anything to learn
    long_system = [[{"role": "system", "content": "Be kind. " * 20}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]] * 3
    prepare_chat_source(tmp_path / "long", {"train": long_system, "val": long_system}, tokenizer)
    with pytest.raises(ValueError, match="no conversation has an assistant token within block_size=64"):
        batches(tmp_path, "long")
    text = "a few words\n" * 500
    prepare_text_source(tmp_path / "other", text, train_bpe(count_chunks([text]), 300))
    prepare_text_source(tmp_path / "text", text, tokenizer)
    with pytest.raises(ValueError, match="prepared with different tokenizers"):
        batches(tmp_path, "text,other")


def test_token_files_are_checked_against_meta_json_and_the_vocabulary(data_dir, tmp_path):
    """A file cut short, one from another preparation, an id past the vocabulary: each refused at start with
    the file's name, instead of numpy's 'not a multiple of the data-type size' or an IndexError mid-run."""
    def damaged(source, name, change):
        shutil.copytree(data_dir / source, tmp_path / name)
        path = tmp_path / name / change[0]
        data = bytearray(path.read_bytes())
        change[1](data)
        path.write_bytes(bytes(data))
        return str(path)

    path = damaged("text", "odd", ("train.bin", lambda d: d.extend(b"\x01")))
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: [\d,]+ bytes is not a whole number"):
        batches(tmp_path, "odd")
    path = damaged("text", "longer", ("val.bin", lambda d: d.extend(b"\x01\x00")))
    with pytest.raises(ValueError, match=rf"^{re.escape(path)} holds [\d,]+ tokens but .*meta.json counts"):
        batches(tmp_path, "longer")
    path = damaged("chat", "mask", ("train.mask.bin", lambda d: d.pop()))
    with pytest.raises(ValueError, match=rf"^{re.escape(path)} holds [\d,]+ mask entries but"):
        batches(tmp_path, "mask")
    token_300_at_50 = ("train.bin", lambda d: d.__setitem__(slice(100, 102), (300).to_bytes(2, "little")))
    path = damaged("text", "foreign", token_300_at_50)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: token id 300 at position 50 is outside"):
        batches(tmp_path, "foreign")
