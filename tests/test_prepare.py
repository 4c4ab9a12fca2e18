"""prepare/: every parser on its real file in ../shared/data (record counts from MANIFEST.md), hand-written records
for the sources with no copy there, chat conversion and masks, mixing by weight, and bad input."""

import json

import numpy as np
import pytest

import prepare.common as common
from conftest import prepare_text_source, run_stage, shared_file
from prepare.chat import (chatml_conversations, gsm8k_messages, identity_conversations, multiple_choice_messages,
                          qa_conversations, read_conversations, to_messages)
from data import TokenWriter, open_tokens, read_meta
from prepare.common import read_documents, split_train_val
from prepare.tasks import load_task
from prepare.tinystories import stories
from prepare.wikitext import articles
from tokenizer import Tokenizer, check_conversation


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, shakespeare_tokenizer):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    shakespeare_tokenizer.save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# every real file in ../shared/data, with the record counts of its MANIFEST.md


@pytest.mark.parametrize("task, split, count", [
    ("openbookqa", "train", 4957), ("openbookqa", "val", 500),
    ("arc_easy", "train", 2251), ("arc_easy", "val", 570),
    ("arc_challenge", "train", 1119), ("arc_challenge", "val", 299),
    ("mmlu", "dev", 285), ("mmlu", "val", 1531), ("mmlu", "test", 14042),
    ("hellaswag", "val", 1000), ("gsm8k", "train", 7473),
])
def test_evaluation_sets_have_the_manifest_counts(task, split, count):
    records = load_task(task, split, str(shared_file(".")))
    assert len(records) == count
    for r in records[:50]:
        if task == "gsm8k":
            assert r["answer"].lstrip("-").replace(".", "").isdigit() and "####" in r["solution"]
        else:
            assert r["question"] and len(r["choices"]) >= 3 and 0 <= r["answer"] < len(r["choices"])


@pytest.mark.parametrize("relative, count", [
    ("alpaca/alpaca_data_1k.json", 1000), ("alpaca/seed_tasks.jsonl", 175),
    ("alpaca_cleaned/alpaca_train.json", 4900), ("alpaca_cleaned/alpaca_eval.json", 100),
    ("lima/lima.json", 1029),
])
def test_conversation_files_have_the_manifest_counts(relative, count):
    conversations = read_conversations(str(shared_file(relative)))
    assert len(conversations) == count
    for messages in conversations:
        check_conversation(messages)


def test_lima_multi_turn_records_keep_their_history():
    conversations = read_conversations(str(shared_file("lima/lima.json")))
    assert sum(len(m) > 2 for m in conversations) == 29  # MANIFEST: 29 records are multi-turn


def test_tinystories_files():
    assert len(list(stories(str(shared_file("tinystories/tinystories_val.txt"))))) == 1000  # '<|endoftext|>'-separated
    path = shared_file("tinystories/tiny_stories.txt")
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 10426  # MANIFEST: records = lines
    found = list(stories(str(path)))
    assert found[0].startswith("One day, a little girl named Lily found a needle") and found[0].endswith("worked together.")
    # every non-blank line lands in exactly one story (a story is its paragraphs, split by blank lines)
    assert sum(len([p for p in s.split("\n") if p.strip()]) for s in found) == sum(1 for x in text.splitlines() if x.strip())


def test_wikitext_files_split_into_articles():
    assert len(list(articles(str(shared_file("wikitext-2/valid.txt"))))) == 60  # MANIFEST: 60 articles
    assert len(list(articles(str(shared_file("wikitext-2/test.txt"))))) == 60
    raw = list(articles(str(shared_file("wikitext-2/wiki.test.raw"))))
    assert raw[0].startswith("= Robert Boulter =")
    assert len(shared_file("wikitext-2/wiki.test.raw").read_text(encoding="utf-8").splitlines()) == 2891
    # this copy dropped the blank lines that tell a title from an equation line: 2 equations count as titles
    assert len(raw) == 62


def test_tinyshakespeare_prepares_with_the_manifest_size(tokenizer_file, tmp_path):
    out = tmp_path / "tinyshakespeare"
    run_stage("prepare/tinyshakespeare.py", "--source", shared_file("tinyshakespeare"), "--tokenizer", tokenizer_file,
              "--out", out, "--num_proc", "1")
    meta = read_meta(str(out))
    assert meta["format"] == "text" and meta["dtype"] == "uint16"
    splits = meta["splits"]
    text = shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
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
    run_stage("prepare/tinystories.py", f"--source={shared_file('tinystories')}", f"--tokenizer={tokenizer_file}",
              f"--out={out}", "--max_train_bytes=50_000", "--max_val_bytes=20_000", "--num_proc=1")
    meta = read_meta(str(out))
    assert 45_000 < meta["splits"]["train"]["bytes"] <= 50_000
    assert 15_000 < meta["splits"]["val"]["bytes"] <= 20_000
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    first_story = next(stories(str(shared_file("tinystories/tiny_stories.txt"))))
    assert tok.decode(open_tokens(str(out), "train", meta)[:400].tolist()).startswith(f"<|bos|>{first_story}")


def test_byte_cap_counts_bytes_and_cuts_after_a_line_break(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("h\u00e9llo\nworld\nabc\n", encoding="utf-8")  # lines of 7 (an accent is 2 bytes), 6, 4 bytes
    caps = (6, 7, 12, 13, 16, 17)
    assert [common.end_of_first_bytes(str(path), 0, cap) for cap in caps] == [0, 6, 6, 12, 12, None]
    assert common.end_of_first_bytes(str(path), 6, 9) == 12  # from the second line on


# ----------------------------------------------------------------------------------------------------
# sources with no copy in ../shared/data: a few records written by hand in the official format


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
    record = load_task("gsm8k", "train", str(shared_file(".")))[0]
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
    record = load_task("arc_easy", "val", str(shared_file(".")))[0]
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
    result = run_stage("prepare/chat.py", "alpaca", "--source", shared_file("alpaca/alpaca_data_1k.json"),
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
    ids, expected_mask = tok.render_conversation(read_conversations(str(shared_file("alpaca/alpaca_data_1k.json")))[0])
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
    result = run_stage("prepare/tinyshakespeare.py", "--source", shared_file("tinyshakespeare"),
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
    path = str(shared_file("tinystories/tinystories_val.txt"))
    assert list(read_documents(path, "<|endoftext|>", block_chars=4096)) == list(read_documents(path, "<|endoftext|>"))
    # one 1 MB document read in 50 KB pieces: the pieces' tokens are the whole document's tokens
    monkeypatch.setattr(common, "MAX_PIECE_CHARS", 50_000)
    shakespeare = str(shared_file("tinyshakespeare/input.txt"))
    pieces = list(read_documents(shakespeare, "file", block_chars=20_000))
    assert len(pieces) > 10 and [starts for _, starts in pieces] == [True] + [False] * (len(pieces) - 1)
    whole = shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8").strip()
    assert "".join(p for p, _ in pieces) == whole
    tok = shakespeare_tokenizer
    assert [i for p, _ in pieces for i in tok.encode(p)] == tok.encode(whole)


def test_tokenizer_script_and_text_script(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:150_000])
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
