"""The BPE tokenizer: round trips, deterministic training, tiktoken == the merges, the tokenizer file, chat rendering."""

import hashlib
import json
import os
import random
import tempfile

import pytest

from conftest import sample_file
from tokenizer import (GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer, check_conversation, count_chunks,
                       special_tokens_after, train_bpe)

HARD_STRINGS = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", "\t\t x", "a  b   c    d", "   leading", "trailing   ", " \n \n ",
    "Hello, world!", "don't you'll I'M", "1234567890 3.14159 -42 1e10",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 family", "CJK: 你好，世界。日本語のテキスト 한국어", "Ünïcödé àçcénts, ﬁ ligature, e\u0301",
    "mixed\ttabs\nand\r\nline endings\r", "<|bos|> <|user_start|> special names as plain text",
    "\x00 null and \x7f del", "math: ∀x∈ℝ, x² ≥ 0 → √x", "a" * 500, "🙂" * 100, " " * 300 + "x",
    "code:\n    def f(x):\n        return x  # comment\n",
]


def random_strings(n, seed):
    """Seeded random strings over a wide mix of characters: ASCII, whitespace, accents, CJK, emoji, symbols."""
    rng = random.Random(seed)
    pools = [" \t\n\r", "abcxyzABCXYZ", "0123456789", ".,;:!?'\"()[]{}<>|-_=+*/\\@#$%^&~`",
             "éüñçßøåœ", "你好世界日本語한국어", "😀🎉👍🏽🚀🙂", "∀∈ℝ²√→∞≠", "\u0301\u200d\ufe0f"]
    out = []
    for _ in range(n):
        length = rng.randint(0, 60)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return out


@pytest.fixture(scope="module")
def unicode_tokenizer():
    """A tokenizer trained on English plus some emoji and CJK, so that merges exist inside multi-byte characters."""
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:100_000]
    text += " ".join(HARD_STRINGS) * 20
    return train_bpe(count_chunks([text]), 700)


def test_round_trip_hard_strings(shakespeare_tokenizer, unicode_tokenizer):
    for tokenizer in (shakespeare_tokenizer, unicode_tokenizer, Tokenizer.byte_level()):
        for s in HARD_STRINGS + random_strings(300, seed=0):
            ids = tokenizer.encode(s)
            assert tokenizer.decode(ids) == s, (tokenizer.name, s)
            assert tokenizer.decode_bytes(ids) == s.encode("utf-8")
            assert all(0 <= i < tokenizer.vocab_size and not tokenizer.is_special(i) for i in ids)


def test_special_token_text_is_never_a_special_token(shakespeare_tokenizer):
    ids = shakespeare_tokenizer.encode("<|assistant_end|><|bos|>")
    assert shakespeare_tokenizer.special("<|assistant_end|>") not in ids and shakespeare_tokenizer.bos_id not in ids


def test_encode_batch_equals_encode(shakespeare_tokenizer):
    texts = random_strings(50, seed=1) + HARD_STRINGS
    for threads in (1, 2):
        assert shakespeare_tokenizer.encode_batch(texts, bos=True, num_threads=threads) == \
            [[shakespeare_tokenizer.bos_id] + shakespeare_tokenizer.encode(t) for t in texts]


def test_training_is_deterministic_and_parallel_counting_matches():
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:200_000]
    pieces = text.split("\n\n")
    serial = count_chunks(pieces)
    assert count_chunks(pieces, num_proc=2) == serial
    a, b = train_bpe(serial, 600), train_bpe(count_chunks(pieces), 600)
    assert a.to_json() == b.to_json() and a.sha256 == b.sha256
    assert a.vocab_size == 600
    assert a.special_tokens == special_tokens_after(600 - len(SPECIAL_TOKENS))


def apply_merges_in_order(tokenizer, text):
    """Reference BPE: split with the regex, then apply every merge in the order training made it."""
    import regex
    ids = []
    for chunk in regex.findall(tokenizer.pattern, text):
        word = list(chunk.encode("utf-8"))
        for left, right, new in tokenizer.merges:
            if len(word) < 2:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += word
    return ids


def test_tiktoken_encoding_equals_merges_in_rank_order(unicode_tokenizer):
    heldout = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[500_000:508_000]
    for text in [heldout] + HARD_STRINGS + random_strings(40, seed=2):
        assert unicode_tokenizer.encode(text) == apply_merges_in_order(unicode_tokenizer, text)


def test_vocab_size_limits():
    counts = count_chunks(["hello world " * 10])
    for bad in (256, 256 + len(SPECIAL_TOKENS) - 1, 65537):
        with pytest.raises(ValueError, match="vocab_size"):
            train_bpe(counts, bad)
    smallest = train_bpe(counts, 256 + len(SPECIAL_TOKENS))
    assert smallest.vocab_size == 256 + len(SPECIAL_TOKENS) and len(smallest.mergeable_ranks) == 256


def test_tokenizer_file_round_trip_and_identity(shakespeare_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    shakespeare_tokenizer.save(path)
    loaded = Tokenizer.from_file(str(path))
    assert loaded.sha256 == shakespeare_tokenizer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.special_tokens == shakespeare_tokenizer.special_tokens
    d = json.loads(path.read_text())
    assert d["version"] == 1 and d["pattern"] == GPT4_SPLIT_PATTERN and len(d["ranks"]) == len(loaded.mergeable_ranks)
    text = "To be, or not to be: that is the question. 😀"
    assert loaded.encode(text) == shakespeare_tokenizer.encode(text)


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare/tokenizer.py"):
        Tokenizer.from_file(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.from_file(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.from_file(str(tmp_path / "other.json"))


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("ranks"), 'without a valid "ranks" (expected a JSON array)'),
    (lambda d: d["ranks"].__setitem__(5, "!!not base64"), '"ranks"[5] is "!!not base64"; expected'),
    (lambda d: d["ranks"].__setitem__(7, ""), '"ranks"[7] is ""; expected'),  # once loaded as an empty token
    (lambda d: d["ranks"].__setitem__(9, "QUJD="), '"ranks"[9] is "QUJD="; expected'),  # extra padding
    (lambda d: d["ranks"].__setitem__(3, 65), '"ranks"[3] is 65; expected'),
    (lambda d: d.pop("pattern"), 'without a valid "pattern"'),
])
def test_a_tokenizer_file_with_bad_ranks_names_the_file_and_key(tmp_path, change, expected):
    d = json.loads(Tokenizer.byte_level().to_json())
    change(d)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError) as error:
        Tokenizer.from_file(str(path))
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value)
    assert "\n" not in str(error.value)


def tiktoken_gpt2_cached():
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    urls = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


@pytest.mark.skipif(not tiktoken_gpt2_cached(), reason="tiktoken's GPT-2 files are not cached (needs internet once)")
def test_gpt2_tokenizer():
    tokenizer = Tokenizer.gpt2()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.bos_id == 50257 and tokenizer.vocab_size == 50257 + len(SPECIAL_TOKENS)
    assert tokenizer.decode(tokenizer.encode("héllo 😀")) == "héllo 😀"


# ----------------------------------------------------------------------------------------------------
# chat rendering


def test_chat_mask_covers_exactly_the_assistant_tokens(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 6 times 7?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                                  {"type": "python", "text": "6*7"},
                                                  {"type": "python_output", "text": "42"},
                                                  {"type": "text", "text": "It is 42."}]},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."}]
    ids, mask = tok.render_conversation(messages)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and mask[0] == 0
    trained = [i for i, m in zip(ids, mask) if m]
    expected = (tok.encode("Let me compute: ") + [tok.special("<|python_start|>")] + tok.encode("6*7") +
                [tok.special("<|python_end|>")] + tok.encode("It is 42.") + [tok.special("<|assistant_end|>")] +
                tok.encode("You are welcome.") + [tok.special("<|assistant_end|>")])
    assert trained == expected
    # the tool output, the user's and system's text and the start tokens are never trained
    output_start = ids.index(tok.special("<|output_start|>"))
    output_end = ids.index(tok.special("<|output_end|>"))
    assert not any(mask[output_start:output_end + 1])
    for name in ("<|user_start|>", "<|user_end|>", "<|system_start|>", "<|assistant_start|>"):
        assert all(m == 0 for i, m in zip(ids, mask) if i == tok.special(name))
    assert tok.decode(ids).startswith("<|bos|><|system_start|>Be brief.<|system_end|><|user_start|>What is 6")


def test_render_for_completion_is_the_prompt_of_the_conversation(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    prompt = [{"role": "user", "content": "Hello"}]
    ids = tok.render_for_completion(prompt)
    full, _ = tok.render_conversation(prompt + [{"role": "assistant", "content": "Hi there"}])
    assert ids[-1] == tok.special("<|assistant_start|>") and full[:len(ids)] == ids
    with pytest.raises(ValueError, match="last message"):
        tok.render_for_completion(prompt + [{"role": "assistant", "content": "Hi"}])


@pytest.mark.parametrize("messages, error", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "  "}], "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected an assistant turn"),
    ([{"role": "assistant", "content": "a"}], "expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
    ([{"role": "system", "content": "s"}], "at least one user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "parts"),
    ([{"content": "no role"}], "expected"),
])
def test_bad_conversations_are_clear_errors(messages, error, shakespeare_tokenizer):
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        check_conversation(messages)
    with pytest.raises(ValueError):
        shakespeare_tokenizer.render_conversation(messages)
