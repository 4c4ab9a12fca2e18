"""prepare/: every parser on its real file in the repository's sample (record counts from its MANIFEST.md),
hand-written records for the sources with no copy there, chat conversion and masks, mixing by weight, downloads
(against a local HTTP server), output folders replaced whole, and bad input."""

import errno
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

import prepare.common as common
from conftest import REPO, SAMPLE_DATA, prepare_text_source, run_stage, sample_file
from prepare.chat import (chatml_conversations, gsm8k_messages, identity_conversations, multiple_choice_messages,
                          qa_conversations, read_conversations, to_messages)
from data import TokenWriter, open_tokens, read_meta
from prepare.common import read_documents, split_train_val
from prepare.tasks import load_task, read_task_file
from prepare.tinystories import stories
from prepare.wikitext import articles
from tokenizer import Tokenizer, check_conversation


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, shakespeare_tokenizer):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    shakespeare_tokenizer.save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# every real file in the sample, with the record counts of its MANIFEST.md


@pytest.mark.parametrize("task, split, count", [
    ("openbookqa", "train", 300), ("openbookqa", "val", 300),
    ("arc_easy", "train", 200), ("arc_easy", "val", 300),
    ("arc_challenge", "train", 100), ("arc_challenge", "val", 299),
    ("mmlu", "dev", 285), ("mmlu", "val", 5 * 57), ("mmlu", "test", 3 * 57),
    ("hellaswag", "val", 100), ("gsm8k", "train", 300),
])
def test_evaluation_sets_have_the_manifest_counts(task, split, count):
    records = load_task(task, split, str(sample_file(".")))
    assert len(records) == count
    for r in records[:50]:
        if task == "gsm8k":
            assert r["answer"].lstrip("-").replace(".", "").isdigit() and "####" in r["solution"]
        else:
            assert r["question"] and len(r["choices"]) >= 3 and 0 <= r["answer"] < len(r["choices"])


@pytest.mark.parametrize("relative, count", [
    ("alpaca/alpaca_data_1k.json", 1000), ("alpaca/seed_tasks.jsonl", 20),
    ("alpaca_cleaned/alpaca_train.json", 100), ("alpaca_cleaned/alpaca_eval.json", 20),
    ("lima/lima.json", 45),
])
def test_conversation_files_have_the_manifest_counts(relative, count):
    conversations = read_conversations(str(sample_file(relative)))
    assert len(conversations) == count
    for messages in conversations:
        check_conversation(messages)


def test_lima_multi_turn_records_keep_their_history():
    conversations = read_conversations(str(sample_file("lima/lima.json")))
    assert sum(len(m) > 2 for m in conversations) == 5  # MANIFEST: 5 records are multi-turn


def test_tinystories_files():
    assert len(list(stories(str(sample_file("tinystories/tinystories_val.txt"))))) == 1000  # '<|endoftext|>'-separated
    path = sample_file("tinystories/tiny_stories.txt")
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 10426  # MANIFEST: records = lines
    found = list(stories(str(path)))
    assert found[0].startswith("One day, a little girl named Lily found a needle") and found[0].endswith("worked together.")
    # every non-blank line lands in exactly one story (a story is its paragraphs, split by blank lines)
    assert sum(len([p for p in s.split("\n") if p.strip()]) for s in found) == sum(1 for x in text.splitlines() if x.strip())


def test_wikitext_files_split_into_articles():
    assert len(list(articles(str(sample_file("wikitext-2/valid.txt"))))) == 8  # MANIFEST: 8 articles
    assert len(list(articles(str(sample_file("wikitext-2/test.txt"))))) == 2
    raw = list(articles(str(sample_file("wikitext-2/wiki.test.raw"))))
    assert raw[0].startswith("= Robert Boulter =")
    assert len(sample_file("wikitext-2/wiki.test.raw").read_text(encoding="utf-8").splitlines()) == 120
    # this copy dropped the blank lines that tell a title from an equation line: of its 3 articles, the third
    # has 2 equations that count as titles
    assert len(raw) == 5 and raw[3].startswith("= 1 rad / s")


def test_tinyshakespeare_prepares_with_the_manifest_size(tokenizer_file, tmp_path):
    out = tmp_path / "tinyshakespeare"
    run_stage("prepare/tinyshakespeare.py", "--source", sample_file("tinyshakespeare"), "--tokenizer", tokenizer_file,
              "--out", out, "--num_proc", "1")
    meta = read_meta(str(out))
    assert meta["format"] == "text" and meta["dtype"] == "uint16"
    splits = meta["splits"]
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 40000
    assert abs(splits["train"]["bytes"] + splits["val"]["bytes"] - 1_115_394) < 10  # only edge whitespace dropped
    assert 0.09 < splits["val"]["bytes"] / 1_115_394 < 0.11
    tokens = open_tokens(str(out), "train", meta)
    assert tokens[0] == meta["bos_id"] and len(tokens) == splits["train"]["tokens"]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.decode(tokens[1:200].tolist()) == text[:len(tok.decode(tokens[1:200].tolist()))]


def test_tinystories_byte_caps_keep_the_first_whole_lines(tokenizer_file, tmp_path):
    # speedrun.sh's presets tokenize only the start of TinyStories (the CPU preset: 20 MB of the 2.2 GB file)
    out = tmp_path / "ts"
    run_stage("prepare/tinystories.py", "--source=sample", f"--tokenizer={tokenizer_file}",  # prepare/sample
              f"--out={out}", "--max_train_bytes=50_000", "--max_val_bytes=20_000", "--num_proc=1")
    meta = read_meta(str(out))
    assert 45_000 < meta["splits"]["train"]["bytes"] <= 50_000
    assert 15_000 < meta["splits"]["val"]["bytes"] <= 20_000
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    first_story = next(stories(str(sample_file("tinystories/tiny_stories.txt"))))
    assert tok.decode(open_tokens(str(out), "train", meta)[:400].tolist()).startswith(f"<|bos|>{first_story}")


def test_byte_cap_counts_bytes_and_cuts_after_a_line_break(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("h\u00e9llo\nworld\nabc\n", encoding="utf-8")  # lines of 7 (an accent is 2 bytes), 6, 4 bytes
    caps = (6, 7, 12, 13, 16, 17)
    assert [common.end_of_first_bytes(str(path), 0, cap) for cap in caps] == [0, 6, 6, 12, 12, None]
    assert common.end_of_first_bytes(str(path), 6, 9) == 12  # from the second line on


# ----------------------------------------------------------------------------------------------------
# sources with no copy in the sample: a few records written by hand in the official format


def test_dolly_records(tmp_path):
    path = tmp_path / "databricks-dolly-15k.jsonl"
    records = [{"instruction": "When did Virgin Australia start operating?", "category": "closed_qa",
                "context": "Virgin Australia commenced services on 31 August 2000.",
                "response": "Virgin Australia commenced services on 31 August 2000."},
               {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "category": "classification",
                "response": "Tope"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    conversations = read_conversations(str(path))
    assert len(conversations) == 2
    assert conversations[0][0]["content"].endswith("\n\nVirgin Australia commenced services on 31 August 2000.")
    assert conversations[1] == [{"role": "user", "content": "Which is a species of fish? Tope or Rope"},
                                {"role": "assistant", "content": "Tope"}]


def test_smoltalk_records(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                "source": "smol-magpie-ultra"},
               {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sky colour?"},
                             {"role": "assistant", "content": "Blue."}], "source": "systemchats-30k"}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    conversations = read_conversations(str(path))
    assert [len(c) for c in conversations] == [4, 3] and conversations[1][0]["role"] == "system"


def test_tinystories_v2_train_and_wikitext103_layouts(tmp_path):
    (tmp_path / "TinyStoriesV2-GPT4-train.txt").write_text(
        "Once upon a time, there was a cat.\n\nThe cat was happy.\n<|endoftext|>\nTom had a red ball.\n<|endoftext|>\n"
        "Sue liked to run.\n")
    assert list(stories(str(tmp_path / "TinyStoriesV2-GPT4-train.txt"))) == [
        "Once upon a time, there was a cat.\n\nThe cat was happy.", "Tom had a red ball.", "Sue liked to run."]
    (tmp_path / "wiki.train.raw").write_text(
        " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a game .\n \n = = Gameplay = = \n \n It is fun . \n"
        " \n = Tower Building of the Little Rock Arsenal = \n \n The building is old , with \n = 1 m and a k = \n \n")
    found = list(articles(str(tmp_path / "wiki.train.raw")))
    assert len(found) == 2 and found[0].startswith("= Valkyria") and "= = Gameplay = =" in found[0]
    assert found[1].startswith("= Tower Building") and found[1].endswith("= 1 m and a k =")


# ----------------------------------------------------------------------------------------------------
# conversation formats, GSM8K tool calls, multiple choice, identity


def test_chatml_and_qa_text(tmp_path):
    text = ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello!\n\nHow are you?<|im_end|>\n\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye!<|im_end|>\n")
    conversations = chatml_conversations(text, "chats.txt")
    assert [where for where, _ in conversations] == ["chats.txt:1", "chats.txt:10"]
    assert conversations[0][1][2] == {"role": "assistant", "content": "Hello!\n\nHow are you?"}
    qa = qa_conversations("Q: What is 2+2?\nA: 4\nQ: And 3+3?\nA: 6,\nsix.\n\nQ: Colour of grass?\nA: Green.\n", "qa.txt")
    assert [len(m) for _, m in qa] == [4, 2] and qa[0][1][3]["content"] == "6,\nsix." and qa[1][0] == "qa.txt:7"
    path = tmp_path / "qa.txt"
    path.write_text("Q: hi\nA: hello\n")
    assert read_conversations(str(path)) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]


def test_gsm8k_annotations_become_calculator_calls(shakespeare_tokenizer):
    record = load_task("gsm8k", "train", str(sample_file(".")))[0]
    messages = gsm8k_messages(record)
    parts = messages[1]["content"]
    assert parts[:3] == [{"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
                         {"type": "python_output", "text": "24"}]
    assert parts[-1]["text"].endswith("#### 72") and "<<" not in "".join(p["text"] for p in parts)
    tok = shakespeare_tokenizer
    ids, mask = tok.render_conversation(messages)
    start, end = ids.index(tok.special("<|output_start|>")), ids.index(tok.special("<|output_end|>"))
    assert tok.decode(ids[start + 1:end]) == "24" and not any(mask[start:end + 1])
    python_start = ids.index(tok.special("<|python_start|>"))
    assert mask[python_start] == 1 and tok.decode(ids[python_start + 1:start - 1]) == "48/2"


def test_multiple_choice_as_chat():
    record = load_task("arc_easy", "val", str(sample_file(".")))[0]
    user, assistant = multiple_choice_messages(record)
    assert "A. cellular telephone" in user["content"] and assistant["content"] == "ABCDE"[record["answer"]]
    record = {"question": "Q?", "choices": ["x", "y"], "answer": 1, "context": "A fact."}
    assert multiple_choice_messages(record)[0]["content"].startswith("A fact.\n\nQ?\n\nA. x\nB. y")


def test_identity_conversations_fill_in_name_and_creator():
    conversations = identity_conversations("prepare/identity.jsonl", "Pico", "Ada Lovelace")
    text = json.dumps([m for _, m in conversations])
    assert len(conversations) >= 10 and "Pico" in text and "Ada Lovelace" in text and "{name}" not in text
    for _, messages in conversations:
        check_conversation(messages)


def test_record_formats_are_detected():
    alpaca = to_messages({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert alpaca == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    sharegpt = to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    assert [m["role"] for m in sharegpt] == ["user", "assistant"]
    assert to_messages({"conversations": ["q", "a"]}) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="expected 'messages'"):
        to_messages({"prompt": "x"})


# ----------------------------------------------------------------------------------------------------
# the chat prepare script end to end, and bad input


def test_prepare_chat_alpaca_end_to_end(tokenizer_file, tmp_path):
    result = run_stage("prepare/chat.py", "alpaca", "--source", sample_file("alpaca/alpaca_data_1k.json"),
                       "--tokenizer", tokenizer_file, "--data_dir", tmp_path, "--val_count", "40", "--num_proc", "2")
    assert "960 conversations" in result.stdout and "40 conversations" in result.stdout
    out = tmp_path / "alpaca"
    meta = read_meta(str(out))
    assert meta["format"] == "chat" and meta["splits"]["train"]["documents"] == 960
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens, mask = open_tokens(str(out), "train", meta), open_tokens(str(out), "train", meta, mask=True)
    assert len(tokens) == len(mask) == meta["splits"]["train"]["tokens"]
    # the trained tokens are exactly the assistant's: each conversation's mask, rendered again, matches
    starts = np.append(np.flatnonzero(tokens == tok.bos_id), len(tokens))
    assert len(starts) - 1 == 960
    ids, expected_mask = tok.render_conversation(read_conversations(str(sample_file("alpaca/alpaca_data_1k.json")))[0])
    assert tokens[:starts[1]].tolist() == ids and mask[:starts[1]].tolist() == expected_mask


def test_malformed_json_line_names_file_and_line(tokenizer_file, tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path.write_text("\n".join([good, good, "{broken", good, json.dumps({"messages": [{"role": "user", "content": "x"}]})]
                              + [good] * 20) + "\n")
    result = run_stage("prepare/chat.py", path, "--tokenizer", tokenizer_file, "--data_dir", tmp_path, check=False)
    assert result.returncode == 1 and f"{path}:3: invalid JSON" in result.stderr and "Traceback" not in result.stderr
    result = run_stage("prepare/chat.py", path, "--tokenizer", tokenizer_file, "--data_dir", tmp_path, "--skip_bad",
                       "--val_count", "2", "--num_proc", "1")
    assert "skipped 2 malformed records" in result.stdout  # the broken line and the conversation with no answer
    assert read_meta(str(tmp_path / "chats"))["splits"]["train"]["documents"] == 21  # 23 good, 2 for val


def test_empty_source_and_missing_tokenizer_are_errors(tokenizer_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_stage("prepare/text.py", empty, "--tokenizer", tokenizer_file, "--data_dir", tmp_path, check=False)
    assert result.returncode == 1 and "empty" in result.stderr
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    result = run_stage("prepare/chat.py", blank, "--tokenizer", tokenizer_file, "--data_dir", tmp_path, check=False)
    assert result.returncode == 1 and "no conversations" in result.stderr
    result = run_stage("prepare/tinyshakespeare.py", "--source", sample_file("tinyshakespeare"),
                       "--tokenizer", tmp_path / "nope.json", "--data_dir", tmp_path, check=False)
    assert result.returncode == 1 and "prepare/tokenizer.py" in result.stderr


def test_token_ids_outside_the_vocabulary_are_errors(tmp_path):
    writer = TokenWriter(str(tmp_path), "train", vocab_size=1000)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.add([1, 2, 1000], 3)
    writer = TokenWriter(str(tmp_path), "train", vocab_size=70000)  # uint32 beyond 65,536
    writer.add([69999], 1)
    writer.close()
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint32).tolist() == [69999]


def test_val_split_is_seeded():
    items = list(range(100))
    train, val = split_train_val(items, val_fraction=0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and split_train_val(items, 0.1, seed=3) == (train, val)
    assert split_train_val(items, val_count=7, seed=4)[1] != val
    with pytest.raises(ValueError):
        split_train_val([1], val_fraction=0.5)


# ----------------------------------------------------------------------------------------------------
# streaming: small reads and long documents give the same tokens


def test_streaming_reads_give_the_same_documents_and_tokens(shakespeare_tokenizer, monkeypatch):
    path = str(sample_file("tinystories/tinystories_val.txt"))
    assert list(read_documents(path, "<|endoftext|>", block_chars=4096)) == list(read_documents(path, "<|endoftext|>"))
    # one 1 MB document read in 50 KB pieces: the pieces' tokens are the whole document's tokens
    monkeypatch.setattr(common, "MAX_PIECE_CHARS", 50_000)
    shakespeare = str(sample_file("tinyshakespeare/input.txt"))
    pieces = list(read_documents(shakespeare, "file", block_chars=20_000))
    assert len(pieces) > 10 and [starts for _, starts in pieces] == [True] + [False] * (len(pieces) - 1)
    whole = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8").strip()
    assert "".join(p for p, _ in pieces) == whole
    tok = shakespeare_tokenizer
    assert [i for p, _ in pieces for i in tok.encode(p)] == tok.encode(whole)


def test_tokenizer_script_and_text_script(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:150_000])
    out = tmp_path / "tok.json"
    result = run_stage("prepare/tokenizer.py", "--source", source, "--vocab_size", "400", "--out", out, "--num_proc", "1")
    assert "bytes/token" in result.stdout and Tokenizer.from_file(str(out)).vocab_size == 400
    run_stage("prepare/text.py", source, "--doc_sep", "blank", "--tokenizer", out, "--data_dir", tmp_path)
    meta = read_meta(str(tmp_path / "corpus"))
    assert meta["splits"]["train"]["documents"] > 100 and meta["tokenizer_sha256"] == Tokenizer.from_file(str(out)).sha256


# ----------------------------------------------------------------------------------------------------
# mixing


def make_text_source(root, name, tokenizer, n_docs, word, seed):
    """A text source of n_docs documents of varying length."""
    rng = np.random.default_rng(seed)
    docs = [" ".join([word] * int(rng.integers(5, 40))) for _ in range(n_docs)]
    out = root / name
    out.mkdir()
    counts = {}
    for split, part in (("train", docs[: n_docs * 9 // 10]), ("val", docs[n_docs * 9 // 10:])):
        writer = TokenWriter(str(out), split, tokenizer.vocab_size)
        for d in part:
            writer.add(tokenizer.encode(d, bos=True), len(d))
        counts[split] = writer.close()
    common.write_meta(str(out), tokenizer, counts, source=name)


def test_mix_ratios_and_reproducibility(shakespeare_tokenizer, tmp_path):
    make_text_source(tmp_path, "a", shakespeare_tokenizer, 3000, "alpha", 0)
    make_text_source(tmp_path, "b", shakespeare_tokenizer, 1500, "beta", 1)
    args = ["--data_dir", tmp_path, "a:0.3", "b:0.7"]
    result = run_stage("prepare/mix.py", "--out", tmp_path / "mix", *args)
    meta = json.loads((tmp_path / "mix" / "meta.json").read_text())
    for split in ("train", "val"):
        assert abs(meta["mix"]["realized"][split]["a"] - 0.3) < 0.01
        assert abs(meta["mix"]["realized"][split]["b"] - 0.7) < 0.01
    assert "asked  30.0%" in result.stdout
    tokens = np.fromfile(tmp_path / "mix" / "train.bin", dtype=np.uint16)
    assert tokens[0] == shakespeare_tokenizer.bos_id and len(tokens) == meta["splits"]["train"]["tokens"]
    # whole documents: every document in the mix is one of the sources'
    text = shakespeare_tokenizer.decode(tokens.tolist())
    docs = text.split("<|bos|>")[1:]
    assert all(set(d.split()) in ({"alpha"}, {"beta"}) for d in docs)
    run_stage("prepare/mix.py", "--out", tmp_path / "mix2", *args)
    assert (tmp_path / "mix2" / "train.bin").read_bytes() == (tmp_path / "mix" / "train.bin").read_bytes()
    run_stage("prepare/mix.py", "--out", tmp_path / "mix3", "--seed", "7", *args)
    assert (tmp_path / "mix3" / "train.bin").read_bytes() != (tmp_path / "mix" / "train.bin").read_bytes()


def test_mix_refuses_different_tokenizers(shakespeare_tokenizer, tmp_path):
    make_text_source(tmp_path, "a", shakespeare_tokenizer, 100, "alpha", 0)
    prepare_text_source(tmp_path / "bytes", "some text\n" * 200, Tokenizer.byte_level(), name="bytes")
    result = run_stage("prepare/mix.py", "--out", tmp_path / "mix", "--data_dir", tmp_path, "a:1", "bytes:1", check=False)
    assert result.returncode == 1 and "different tokenizers" in result.stderr


# ----------------------------------------------------------------------------------------------------
# the sample itself, and no test (or default) reading data from outside the repository


def manifest_rows():
    """(relative path, bytes, sha256) of every file the sample's MANIFEST.md lists."""
    rows = []
    for line in (SAMPLE_DATA / "MANIFEST.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5:
            rows.append((cells[0], int(cells[3].replace(",", "")), cells[4]))
    return rows


def test_the_sample_is_what_its_manifest_says():
    rows = manifest_rows()
    on_disk = {p.relative_to(SAMPLE_DATA).as_posix() for p in SAMPLE_DATA.rglob("*") if p.is_file()}
    assert on_disk - {"MANIFEST.md"} == {relative for relative, _, _ in rows}
    for relative, size, digest in rows:
        data = (SAMPLE_DATA / relative).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest, f"{relative} differs from MANIFEST.md"
    assert sum(size for _, size, _ in rows) < 5_000_000  # small enough to live in the repository


def test_nothing_reads_data_from_beside_the_repository():
    # a fresh clone has no larger copy of the data beside it: a test or a default that reads it works here and fails for users
    outside = ["../" + "shared", "shared" + "/data", "SHARED" + "_DATA", "NANOLLAMA_" + "SHARED"]
    files = sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "prepare").glob("*.py")) + \
        sorted((REPO / "config" / "speedrun").glob("*/*.py")) + [REPO / "speedrun.sh"]
    for path in files:
        found = [word for word in outside if word in path.read_text(encoding="utf-8")]
        assert not found, f"{path.relative_to(REPO)} names {found}; read real data from prepare/sample (sample_file)"


# ----------------------------------------------------------------------------------------------------
# downloads, against a local HTTP server: only the start a preset reads, resumed, checked, one line offline


@pytest.fixture
def file_server(tmp_path):
    """
    (base URL, folder it serves, log) of an HTTP server on 127.0.0.1 that honours Range requests, as the dataset
    hosts do (Python's own handler does not). log holds each request's Range header and the bytes its responses carried; with
    log["honour_range"] = False it ignores Range, as some mirrors do.
    """
    root = tmp_path / "served"
    root.mkdir()
    log = {"ranges": [], "sent": 0, "honour_range": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            wanted = self.headers.get("Range")
            log["ranges"].append(wanted)
            start, end = 0, len(data)
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
            if match and log["honour_range"]:
                start = int(match.group(1))
                end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            # counted before the write: the client may read the last byte and go on before this thread runs again
            log["sent"] += end - start
            try:
                self.wfile.write(data[start:end])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading: a byte cap on a stream

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, log
    server.shutdown()
    server.server_close()


def test_a_start_of_a_file_is_all_that_is_fetched_and_it_resumes(file_server, tmp_path):
    url, root, log = file_server
    text = "".join(f"story {i}: caf\u00e9 \u00fcber na\u00efve {'x' * (i % 50)}\n" for i in range(3000))
    whole = text.encode("utf-8")
    (root / "stories.txt").write_bytes(whole)
    cache = str(tmp_path / "cache")
    path = common.download(f"{url}/stories.txt", max_bytes=10_000, cache_dir=cache)
    start = Path(path).read_bytes()
    assert log["ranges"] == ["bytes=0-9999"] and log["sent"] == 10_000  # 10 KB of the file's 190 KB
    assert 9_900 < len(start) <= 10_000 and start.endswith(b"\n") and whole.startswith(start)  # whole lines
    # the same start or a shorter one: from the cache; a longer one: only the bytes after what is cached
    assert common.download(f"{url}/stories.txt", max_bytes=5_000, cache_dir=cache) == path
    assert len(log["ranges"]) == 1
    longer = Path(common.download(f"{url}/stories.txt", max_bytes=30_000, cache_dir=cache)).read_bytes()
    assert log["ranges"][-1] == f"bytes={len(start)}-29999" and whole.startswith(longer) and len(longer) > 29_900
    # an interrupted fetch (its .part file) goes on from where it stopped
    Path(cache, "stories.txt.first-60000.part").write_bytes(whole[:41_000])
    resumed = Path(common.download(f"{url}/stories.txt", max_bytes=60_000, cache_dir=cache)).read_bytes()
    assert log["ranges"][-1] == "bytes=41000-59999" and whole.startswith(resumed) and len(resumed) > 59_900
    # a server that ignores Range: the stream is cut at the cap
    log["honour_range"] = False
    plain = Path(common.download(f"{url}/stories.txt", max_bytes=10_000, cache_dir=str(tmp_path / "c2"))).read_bytes()
    assert plain == start


def test_a_whole_file_download_resumes_and_is_checked(file_server, tmp_path):
    url, root, log = file_server
    data = bytes(range(256)) * 1000
    (root / "archive.zip").write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "archive.zip.part").write_bytes(data[:123_456])  # an interrupted download
    path = common.download(f"{url}/archive.zip", sha256=hashlib.sha256(data).hexdigest(), cache_dir=str(cache))
    assert Path(path).read_bytes() == data and os.listdir(cache) == ["archive.zip"]
    assert log["ranges"] == ["bytes=123456-"] and log["sent"] == len(data) - 123_456
    assert common.download(f"{url}/archive.zip", cache_dir=str(cache)) == path and len(log["ranges"]) == 1
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="sha256 does not match"):
        common.download(f"{url}/archive.zip", sha256="0" * 64, cache_dir=str(other))
    assert os.listdir(other) == []  # nothing left that a later run could take for the file


def test_preparing_from_a_url_fetches_only_the_bytes_it_tokenizes(file_server, tokenizer_file, tmp_path):
    url, root, log = file_server
    (root / "TinyStoriesV2-GPT4-train.txt").write_bytes(sample_file("tinystories/tiny_stories.txt").read_bytes())
    out = tmp_path / "ts"
    run_stage("prepare/tinystories.py", f"--source={url}/TinyStoriesV2-GPT4-train.txt", f"--tokenizer={tokenizer_file}",
              f"--out={out}", "--max_train_bytes=50_000", "--val_fraction=0.1", "--num_proc=1",
              env={"NANOLLAMA_CACHE": str(tmp_path / "c")})
    assert log["ranges"] == ["bytes=0-49999"] and log["sent"] == 50_000  # of 944 KB
    meta = read_meta(str(out))
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] <= 50_000


def test_offline_is_one_line_that_names_source(tokenizer_file, tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_stage("prepare/tinystories.py", f"--source=http://127.0.0.1:{port}/TinyStoriesV2-GPT4-train.txt",
                       f"--tokenizer={tokenizer_file}", f"--data_dir={tmp_path}", "--max_train_bytes=20_000_000",
                       check=False, env={"NANOLLAMA_CACHE": str(tmp_path / "cache")})
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last.startswith("error: download of http://127.0.0.1") and "--source" in last


@pytest.mark.parametrize("command", [
    ["prepare/tinystories.py", "--tokenizer={tok}", "--data_dir={tmp}"],
    ["prepare/tinyshakespeare.py", "--tokenizer={tok}", "--data_dir={tmp}"],
    ["prepare/wikitext.py", "--tokenizer={tok}", "--data_dir={tmp}"],
    ["prepare/chat.py", "alpaca", "--tokenizer={tok}", "--data_dir={tmp}"],
    ["prepare/chat.py", "mc", "--tokenizer={tok}", "--data_dir={tmp}"],
    ["prepare/tasks.py", "--out={tmp}/tasks"],
    ["prepare/tokenizer.py", "--out={tmp}/tokenizer.json"],
], ids=lambda command: " ".join(command[:2]))
def test_a_missing_source_is_one_line(command, tokenizer_file, tmp_path):
    args = [arg.format(tok=tokenizer_file, tmp=tmp_path) for arg in command[1:]]
    result = run_stage(command[0], *args, "--source=/no/such/folder", check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr and "unknown url type" not in result.stderr
    assert last.startswith("error: ") and "/no/such/folder" in last


# ----------------------------------------------------------------------------------------------------
# output folders are written aside and swapped in whole (issue 20): a failure never mixes new and old files


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_a_failure_while_writing_leaves_the_old_folder_as_it_was(shakespeare_tokenizer, tmp_path, capsys):
    out = tmp_path / "data" / "notes"
    common.write_text_splits(str(out), shakespeare_tokenizer, {"train": ["To be.", "Or not."], "val": ["That."]},
                             source="notes")
    before = folder_bytes(out)

    def disk_full_after_one_document():
        yield "A new document."
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit):
        common.write_text_splits(str(out), shakespeare_tokenizer, {"train": ["New train text."] * 3,
                                                                   "val": disk_full_after_one_document()},
                                 source="notes")
    assert folder_bytes(out) == before  # the old train.bin, val.bin and meta.json, nothing else
    assert os.listdir(out.parent) == ["notes"]  # no half-written folder left beside it
    assert "No space left on device while writing" in capsys.readouterr().err


def test_input_too_small_for_a_val_split_leaves_the_old_folder(tokenizer_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Paragraph {i} of a good notes file." for i in range(200)))
    args = [notes, "--doc_sep=blank", f"--tokenizer={tokenizer_file}", f"--data_dir={tmp_path / 'data'}"]
    run_stage("prepare/text.py", *args)
    before = folder_bytes(tmp_path / "data" / "notes")
    notes.write_text("One short paragraph.\n\nAnd a second, longer one that holds the last tenth of the text.")
    result = run_stage("prepare/text.py", *args, check=False)
    assert result.returncode == 1 and "the val split is empty" in result.stderr and "Traceback" not in result.stderr
    assert folder_bytes(tmp_path / "data" / "notes") == before and os.listdir(tmp_path / "data") == ["notes"]


def test_left_overs_of_runs_that_died_are_cleaned_up(tmp_path):
    dead = 999_999_999  # above any process id Linux or macOS hands out
    half = tmp_path / f"notes.tmp-{dead}"  # a run that died while writing
    half.mkdir()
    (half / "train.bin").write_bytes(b"half")
    old = tmp_path / f"other.old-{dead}"  # a run that died between its two renames: the only good copy
    old.mkdir()
    (old / "meta.json").write_text("{}")
    (tmp_path / "notes.tmp-1").mkdir()  # process 1 runs: its folder is left alone
    common.clean_stale_folders(str(tmp_path / "notes"))
    common.clean_stale_folders(str(tmp_path / "other"))
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp-1", "other"] and (tmp_path / "other" / "meta.json").exists()


def test_an_output_folder_that_cannot_be_written_is_one_line(tokenizer_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: a file in the way fails the same way
        locked.chmod(0o700)
        locked.rmdir()
        locked.write_text("a file where a folder should be")
    for script, args in [("prepare/tinyshakespeare.py", ["--source=sample", f"--tokenizer={tokenizer_file}",
                                                         f"--data_dir={locked}"]),
                         ("prepare/tasks.py", ["--source=sample", "--tasks=arc_challenge", f"--out={locked}/tasks"]),
                         ("prepare/tokenizer.py", [notes_file(tmp_path), "--vocab_size=300", f"--out={locked}/t.json"])]:
        result = run_stage(script, *args, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, f"{script}: {result.stderr[-2000:]}"
        assert "cannot write" in result.stderr.strip().splitlines()[-1], script


def notes_file(folder):
    path = Path(folder) / "notes.txt"
    path.write_text("Some notes to train a tokenizer on.\n" * 50)
    return path


def test_a_folder_holding_other_files_is_not_replaced(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit):
        common.output_dir(str(tmp_path / "mine"), "", "")
    assert "thesis.tex" in capsys.readouterr().err and (tmp_path / "mine" / "thesis.tex").exists()


# ----------------------------------------------------------------------------------------------------
# characters that break lines elsewhere, invalid UTF-8, byte-order marks (issue 20)

LINE_BREAKERS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # str.splitlines() ends a line at each of these


def test_task_files_round_trip_characters_that_break_lines(tmp_path):
    source = tmp_path / "copy"
    (source / "gsm8k").mkdir(parents=True)
    (source / "mmlu" / "val").mkdir(parents=True)
    problems = [{"question": f"Tom has 2{c}apples and 3 pears. How many?", "answer": f"2+3=<<2+3=5>>5{c}\n#### 5"}
                for c in LINE_BREAKERS]
    with open(source / "gsm8k" / "train.jsonl", "w", encoding="utf-8") as f:  # raw, as json.dumps leaves them
        f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems))
    (source / "mmlu" / "val" / "demo_val.csv").write_text(
        "".join(f'"Which{c}one?",a,b,c,d,B\n' for c in LINE_BREAKERS), encoding="utf-8")
    out = tmp_path / "tasks"
    run_stage("prepare/tasks.py", f"--source={source}", "--tasks=gsm8k,mmlu", f"--out={out}")
    import eval as ev  # eval.py reads the task files through prepare/tasks.py
    for task, split, n in (("gsm8k", "train", len(LINE_BREAKERS)), ("mmlu", "val", len(LINE_BREAKERS))):
        text = (out / task / f"{split}.jsonl").read_text(encoding="utf-8")
        assert len(text.splitlines()) == n  # no line of the file breaks anywhere else
        records = read_task_file(str(out / task / f"{split}.jsonl"))
        assert records == ev.load_records(task, split, str(out), "") and len(records) == n
        questions = [r["question"] for r in records]
        assert all(c in q for c, q in zip(LINE_BREAKERS, questions))


def test_invalid_utf8_in_conversations_names_file_and_line(tokenizer_file, tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path.write_bytes(("\n".join([good, good]) + "\n").encode() + b'{"messages": "caf\xe9"}\n' +
                     ("\n".join([good] * 20) + "\n").encode())
    result = run_stage("prepare/chat.py", path, f"--tokenizer={tokenizer_file}", f"--data_dir={tmp_path}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{path}:3: not UTF-8" in result.stderr
    result = run_stage("prepare/chat.py", path, f"--tokenizer={tokenizer_file}", f"--data_dir={tmp_path}",
                       "--skip_bad", "--val_count=2", "--num_proc=1")
    assert "skipped 1 malformed records" in result.stdout
    assert read_meta(str(tmp_path / "chats"))["splits"]["train"]["documents"] == 20


def test_a_byte_order_mark_is_not_text(tokenizer_file, tmp_path):
    bom = "\ufeff"
    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(30)]
    (tmp_path / "list.json").write_text(bom + json.dumps(records), encoding="utf-8")
    (tmp_path / "lines.jsonl").write_text(bom + "\n".join(json.dumps(r) for r in records), encoding="utf-8")
    for name in ("list.json", "lines.jsonl"):
        conversations = read_conversations(str(tmp_path / name))
        assert len(conversations) == 30 and conversations[0][0]["content"] == "Say 0.", name  # the first one kept
    notes = tmp_path / "notes.txt"
    notes.write_text(bom + "\n\n".join(f"Paragraph {i}." for i in range(100)), encoding="utf-8")
    run_stage("prepare/text.py", f"--source={notes}", "--doc_sep=blank", f"--tokenizer={tokenizer_file}",
              f"--data_dir={tmp_path}")
    meta = read_meta(str(tmp_path / "notes"))
    tok = Tokenizer.from_file(str(tmp_path / "notes" / "tokenizer.json"))
    assert tok.decode(open_tokens(str(tmp_path / "notes"), "train", meta)[:30].tolist()).startswith("<|bos|>Paragraph 0.")


def test_text_script_without_input_names_a_flag_it_has(tmp_path):
    result = run_stage("prepare/text.py", check=False)
    assert result.returncode == 1 and "--source=" in result.stderr
    assert "--source=" in run_stage("prepare/text.py", "--help").stdout


def test_as_text_writes_each_question_as_the_prompt_eval_scores_and_its_right_answer(tmp_path):
    import eval as ev
    run_stage("prepare/tasks.py", "--source=sample", "--tasks=openbookqa,arc_easy", f"--out={tmp_path}/tasks",
              "--as_text=mc_text", "--tokenizer=bytes", f"--data_dir={tmp_path}", "--num_proc=1")
    folder = str(tmp_path / "mc_text")
    meta = read_meta(folder)
    assert meta["format"] == "text"
    tok = Tokenizer.byte_level()
    for split in ("train", "val"):
        expected = [ev.TASKS[task]["prompt"](r) + " " + ev.TASKS[task]["target"](r)
                    for task in ("openbookqa", "arc_easy") for r in load_task(task, split, SAMPLE_DATA)]
        assert meta["splits"][split]["documents"] == len(expected) > 0
        tokens = np.asarray(open_tokens(folder, split, meta)).tolist()
        documents = [tok.decode(tokens[start:end]) for start, end in
                     zip([i + 1 for i, t in enumerate(tokens) if t == tok.bos_id],
                         [i for i, t in enumerate(tokens) if t == tok.bos_id][1:] + [len(tokens)])]
        assert documents == expected  # e.g. "Question: ...\nAnswer: <the right choice>"
    bad = run_stage("prepare/tasks.py", "--source=sample", "--tasks=openbookqa,gsm8k", f"--out={tmp_path}/t2",
                    "--as_text=x", "--tokenizer=bytes", f"--data_dir={tmp_path}", check=False)
    assert bad.returncode == 1 and "leave gsm8k out of --tasks" in bad.stderr.strip().splitlines()[-1]


def test_as_choices_writes_every_choice_as_the_row_eval_scores_with_the_right_ones_index(tmp_path):
    import eval as ev
    run_stage("prepare/tasks.py", "--source=sample", "--tasks=openbookqa,arc_easy", f"--out={tmp_path}/tasks",
              "--as_choices=mc_choice", "--tokenizer=bytes", f"--data_dir={tmp_path}")
    folder = str(tmp_path / "mc_choice")
    meta = read_meta(folder)
    assert meta["format"] == "choice"
    tok = Tokenizer.byte_level()
    for split in ("train", "val"):
        records = [(task, r) for task in ("openbookqa", "arc_easy") for r in load_task(task, split, SAMPLE_DATA)]
        tokens = np.asarray(open_tokens(folder, split, meta)).tolist()
        mask = np.asarray(open_tokens(folder, split, meta, mask=True)).tolist()
        pairs = np.fromfile(f"{folder}/{split}.choices.bin", dtype=np.uint8).reshape(-1, 2).tolist()
        assert meta["splits"][split]["questions"] == len(pairs) == len(records) > 0
        assert pairs == [[len(r["choices"]), r["answer"]] for _, r in records]
        starts = [i for i, t in enumerate(tokens) if t == tok.bos_id] + [len(tokens)]
        assert meta["splits"][split]["documents"] == len(starts) - 1 == sum(len(r["choices"]) for _, r in records)
        rows = iter(zip(starts, starts[1:]))
        for task, r in records:
            for choice in r["choices"]:
                start, end = next(rows)
                context, continuation = ev.encode_pair(tok, ev.TASKS[task]["prompt"](r), " " + choice)
                assert tokens[start:end] == context + continuation  # byte-level: <|bos|> is eval's first token
                assert mask[start:end] == [0] * len(context) + [1] * len(continuation)
    shown = run_stage("prepare/show_mask.py", f"--source={folder}", "--index=1", "--plain=True").stdout
    assert "[[" in shown  # the second row's choice: what its score sums
    shutil.copytree(folder, tmp_path / "other")
    mixed = run_stage("prepare/mix.py", f"--data_dir={tmp_path}", "--sources=mc_choice:0.5,other:0.5",
                      f"--out={tmp_path}/mixed", check=False)
    assert mixed.returncode == 1 and "mixed by train.py itself" in mixed.stderr
