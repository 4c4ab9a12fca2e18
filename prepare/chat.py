"""
Conversations -> chat token files: data/<name>/{train,val}.bin + {train,val}.mask.bin + meta.json ("format": "chat").

    python prepare/chat.py alpaca --source=sample         # the 1,000 Alpaca records of the repository's sample
    python prepare/chat.py alpaca                         # Stanford Alpaca, 52K instructions (download)
    python prepare/chat.py alpaca_cleaned                 # the cleaned Alpaca (yahma/gururise)
    python prepare/chat.py lima                           # LIMA, 1K curated conversations
    python prepare/chat.py dolly                          # Databricks Dolly-15k
    python prepare/chat.py smoltalk                       # SmolTalk (parquet: needs `pip install pyarrow`)
    python prepare/chat.py identity --model_name=nanollama --creator="Ada"   # who it is (prepare/identity.jsonl)
    python prepare/chat.py mc --source=sample             # ARC-Easy, ARC-Challenge, OpenBookQA: multiple choice
    python prepare/chat.py gsm8k --source=sample          # GSM8K with calculator tool calls
    python prepare/chat.py my_chats.jsonl --name=mine     # your own file (format detected, or --format)

Your own files may hold, one conversation a record:
  messages  JSONL {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]} (or a bare list;
            ShareGPT's {"conversations": [{"from": "human"|"gpt", "value": ...}]} works too)
  alpaca    JSON or JSONL {"instruction", "input", "output"} (Dolly's {"instruction", "context", "response"} too)
  chatml    text: <|im_start|>user\\n...<|im_end|> turns; a blank line between two turns starts a new conversation
  qa        text: 'Q: ...' and 'A: ...' lines; a blank line before a 'Q:' starts a new conversation

Sources without a validation split hold out --val_fraction (or --val_count) of their conversations, chosen
with --seed. A malformed record is an error naming file:line and what was expected; --skip_bad skips and
counts such records instead. Each source is its own folder; train.py mixes them: --data=alpaca,mc,gsm8k,identity:4
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import (download, load_tokenizer, local_source, output_dir, read_json_records,  # noqa: E402
                            read_text, split_train_val, write_chat_splits)
from prepare.tasks import load_task  # noqa: E402
from tokenizer import check_conversation  # noqa: E402

# -----------------------------------------------------------------------------------------------------
dataset = ""  # alpaca, alpaca_cleaned, lima, dolly, smoltalk, mc, gsm8k, identity, or a file of conversations
#               (the first argument: python prepare/chat.py alpaca)
source = ""  # 'sample' (prepare/sample), a local copy (a file, or a folder holding the files) or a mirror URL;
#              empty = download. identity: another identity file; mc and gsm8k: a folder laid out like the sample
name = ""  # output folder name under data_dir; empty = the dataset's name (a file's name without its suffix)
format = "auto"  # your own files: auto, json, chatml, qa or parquet
val_fraction = 0.05  # held out for val where the source has no val split
val_count = 0  # hold out exactly this many conversations instead; 0 = use val_fraction
seed = 1337  # which conversations are held out
skip_bad = False  # skip (and count) malformed records instead of stopping at the first
max_conversations = 0  # use at most this many train conversations (the first ones); 0 = all
tasks = "arc_easy,arc_challenge,openbookqa"  # mc: the multiple-choice tasks (also mmlu, hellaswag)
model_name = "nanollama"  # identity: the model's name
creator = "a person who trained it with nanollama"  # identity: who made it
tokenizer = "data/tokenizer.json"  # tokenizer file from prepare/tokenizer.py, or 'gpt2', 'bytes' or 'hf:DIR'
data_dir = "data"  # folder of the prepared sources
out = ""  # output folder; empty = <data_dir>/<name>
num_proc = max(1, min(8, os.cpu_count() or 1))  # processes that render conversations (the CPU count, at most 8)
# -----------------------------------------------------------------------------------------------------

REPO_PREPARE = os.path.dirname(os.path.abspath(__file__))

# name -> official URL(s) per split, sha256 where the file is pinned, and file names a --source folder may hold
SOURCES = {
    "alpaca": {"url": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json",
               "files": {"train": ["alpaca_data.json", "alpaca_data_1k.json", "alpaca/alpaca_data_1k.json"]}},
    "alpaca_cleaned": {"url": "https://raw.githubusercontent.com/gururise/AlpacaDataCleaned/main/alpaca_data_cleaned.json",
                       "files": {"train": ["alpaca_data_cleaned.json", "alpaca_train.json", "alpaca_cleaned/alpaca_train.json"],
                                 "val": ["alpaca_eval.json", "alpaca_cleaned/alpaca_eval.json"]}},
    "lima": {"url": "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/b9cdff41bbb6084380606cde6c875c994b6b1868/data/lima.json",
             "sha256": "1d447bd5d4750e651a6e28660e452c24d18d18e10e1d334b3c8277c2aa956322",
             "files": {"train": ["lima.json", "train.jsonl", "lima/lima.json"]}},
    "dolly": {"url": "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
              "files": {"train": ["databricks-dolly-15k.jsonl", "dolly/databricks-dolly-15k.jsonl"]}},
    "smoltalk": {"url": {"train": "https://huggingface.co/datasets/HuggingFaceTB/smoltalk/resolve/main/data/all/train-00000-of-00009.parquet",
                         "val": "https://huggingface.co/datasets/HuggingFaceTB/smoltalk/resolve/main/data/all/test-00000-of-00001.parquet"},
                 "files": {"train": ["train.jsonl", "smoltalk_train.jsonl", "train-00000-of-00009.parquet"],
                           "val": ["test.jsonl", "smoltalk_test.jsonl", "test-00000-of-00001.parquet"]}},
}
TASK_SOURCES = ("mc", "gsm8k")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
              "model": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------------
# records -> messages (each raises ValueError saying what was expected; the caller adds file:line)


def text_field(record, key, required=True):
    value = record.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"expected a non-empty string {key!r}")
    return value


def from_alpaca(record):
    """Alpaca {instruction, input, output} (LLaMA-Factory's history of earlier [user, assistant] turns too)."""
    messages = []
    for turn in record.get("history") or []:
        if not (isinstance(turn, list) and len(turn) == 2):
            raise ValueError("expected history as a list of [user, assistant] pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    instruction, extra = text_field(record, "instruction"), text_field(record, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": text_field(record, "output")}]


def from_dolly(record):
    """Dolly {instruction, context, response, category}: the context (a passage, if any) follows the instruction."""
    instruction, context = text_field(record, "instruction"), text_field(record, "context", required=False)
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": text_field(record, "response")}]


def from_messages(messages):
    """A list of {role, content} (or ShareGPT's {from, value}) messages, roles normalized."""
    if not isinstance(messages, list):
        raise ValueError("expected a list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLE_NAMES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected system, user or assistant")
        out.append({"role": ROLE_NAMES[role], "content": content})
    return out


def from_conversations(turns):
    """GAIR LIMA: {"conversations": ["user text", "assistant text", ...]} alternating, user first."""
    if all(isinstance(t, str) for t in turns):
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return from_messages(turns)


def to_messages(record):
    """Any supported JSON record -> messages."""
    if isinstance(record, list):
        return from_messages(record)
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object (or a list of messages)")
    if "messages" in record:
        return from_messages(record["messages"])
    if "conversations" in record:
        return from_conversations(record["conversations"])
    if "instruction" in record and "output" in record:
        return from_alpaca(record)
    if "instruction" in record and isinstance(record.get("instances"), list) and record["instances"]:
        return from_alpaca({**record["instances"][0], "instruction": record["instruction"]})  # Alpaca's seed tasks
    if "instruction" in record and "response" in record:
        return from_dolly(record)
    if isinstance(record.get("text"), str) and "<|im_start|>" in record["text"]:
        return chatml_turns(record["text"])
    raise ValueError("expected 'messages', 'conversations', Alpaca's 'instruction'/'input'/'output', Dolly's "
                     f"'instruction'/'context'/'response' or a ChatML 'text'; got keys {sorted(record)[:8]}")


CHATML_TURN = re.compile(r"<\|im_start\|>([a-z]+)[ \t]*\n(.*?)<\|im_end\|>", re.S)


def chatml_turns(text):
    return from_messages([{"role": role, "content": content.strip("\n")} for role, content in CHATML_TURN.findall(text)])


def chatml_conversations(text, path="text"):
    """(where, messages) of a ChatML text file: a blank line between two turns starts a new conversation."""
    conversations, current, line, previous_end = [], [], 1, None
    for match in CHATML_TURN.finditer(text):
        gap = text[previous_end:match.start()] if previous_end is not None else ""
        if current and gap.count("\n") >= 2:
            conversations.append((line, current))
            current = []
        if not current:
            line = text.count("\n", 0, match.start()) + 1
        current.append({"role": match.group(1), "content": match.group(2).strip("\n")})
        previous_end = match.end()
    if current:
        conversations.append((line, current))
    return [(f"{path}:{n}", m) for n, m in conversations]


def qa_conversations(text, path="text"):
    """(where, messages) of 'Q: ...' / 'A: ...' text: a blank line before a Q: starts a new conversation."""
    conversations, current, blank_before, start_line = [], [], False, 1
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and the like are not line ends
        line = line.removesuffix("\r")
        tag = line[:2]
        if tag in ("Q:", "A:"):
            role = "user" if tag == "Q:" else "assistant"
            if role == "user" and current and blank_before:
                conversations.append((start_line, current))
                current = []
            if not current:
                start_line = number
            current.append({"role": role, "content": line[2:].strip()})
        elif current:
            current[-1]["content"] += "\n" + line  # a turn goes on until the next Q: or A:
        elif line.strip():
            raise ValueError(f"{path}:{number}: expected a line starting with 'Q:' or 'A:'")
        blank_before = not line.strip()
    if current:
        conversations.append((start_line, current))
    return [(f"{path}:{n}", [{**m, "content": m["content"].strip()} for m in c]) for n, c in conversations]


# ----------------------------------------------------------------------------------------------------
# evaluation-style records as conversations: multiple choice and GSM8K with the calculator

LETTERS = "ABCDEFGHIJ"


def multiple_choice_messages(record):
    """A multiple-choice record (docs/formats.md's normalized form) as a question with lettered choices; the answer is the letter."""
    context = f"{record['context']}\n\n" if record.get("context") else ""
    choices = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(record["choices"]))
    user = f"{context}{record['question']}\n\n{choices}\n\nAnswer with the letter of the correct choice."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": LETTERS[record["answer"]]}]


GSM8K_CALL = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def gsm8k_messages(record):
    """
    A GSM8K problem: its solution's <<48/2=24>> annotations become calculator calls: the model writes the
    expression as a python part (trained), the tool's result is a python_output part (not trained).
    """
    parts, position = [], 0
    solution = record["solution"]
    for match in GSM8K_CALL.finditer(solution):
        if match.start() > position:
            parts.append({"type": "text", "text": solution[position:match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        position = match.end()
    if position < len(solution):
        parts.append({"type": "text", "text": solution[position:]})
    return [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": parts}]


def identity_conversations(path, model_name, creator):
    """The identity file's conversations with {name} and {creator} filled in."""
    out = []
    for where, record in read_json_records(path):
        text = json.dumps(record).replace("{name}", model_name).replace("{creator}", creator)
        out.append((where, to_messages(json.loads(text))))
    return out


# ----------------------------------------------------------------------------------------------------
# reading a file of conversations


def detect_format(path):
    if path.endswith(".parquet"):
        return "parquet"
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # a bad byte is reported by the reader, with its line
        head = f.read(1 << 16)
    if not head.strip():
        raise ValueError(f"{path}: no conversations in it (the file is empty)")
    if head.lstrip().startswith(("{", "[")):
        return "json"
    if "<|im_start|>" in head:
        return "chatml"
    if re.search(r"^Q:", head, re.M):
        return "qa"
    raise ValueError(f"{path}: cannot tell its format: expected JSON/JSONL records, ChatML (<|im_start|>) or 'Q:'/'A:' lines")


def parquet_records(path):
    try:
        import pyarrow.parquet as pq  # here, not at the top: optional, only SmolTalk's parquet files need it
    except ImportError:
        fail(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or pass --source with a JSONL copy")
    table = pq.read_table(path)
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}: record {i + 1}", record


def read_conversations(path, fmt="auto", skip_bad=False, counts=None):
    """[(line, messages)] of a file, each checked; a bad record is a ValueError naming path:line (or skipped)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt in ("chatml", "qa"):
        text = read_text(path)
        items = chatml_conversations(text, path) if fmt == "chatml" else qa_conversations(text, path)
        pairs = [(where, lambda m=m: from_messages(m)) for where, m in items]
    elif fmt in ("json", "messages", "alpaca", "parquet"):
        records = parquet_records(path) if fmt == "parquet" else read_json_records(path, skip_bad, counts)
        pairs = [(where, lambda r=r: to_messages(r)) for where, r in records]
    else:
        raise ValueError(f"--format {fmt}: expected auto, json, messages, alpaca, chatml, qa or parquet")
    conversations = []
    for where, make in pairs:
        try:
            messages = make()
            check_conversation(messages)
            if messages[-1]["role"] != "assistant":
                raise ValueError("expected the conversation to end with an assistant turn (there is nothing to learn)")
        except (ValueError, KeyError, TypeError) as e:
            if skip_bad:
                if counts is not None:
                    counts["bad"] = counts.get("bad", 0) + 1
                continue
            raise ValueError(f"{where}: {e} (--skip_bad skips such records)") from None
        conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path}: no conversations in it")
    return conversations


def source_file(name, split, source):
    """The file of a named source's split: the official download, or from --source (a file or a folder)."""
    spec = SOURCES[name]
    if not source:
        url = spec["url"][split] if isinstance(spec["url"], dict) else (spec["url"] if split == "train" else None)
        return download(url, spec.get("sha256")) if url else None
    if os.path.isdir(source):
        for relative in spec["files"].get(split, []):
            if os.path.exists(os.path.join(source, relative)):
                return os.path.join(source, relative)
        if split == "train":
            raise FileNotFoundError(f"--source {source}: none of {spec['files']['train']} in it")
        return None
    return download(source) if split == "train" else None


def task_conversations(name, source, tasks):
    """{split: conversations} of the multiple-choice tasks (mc) or GSM8K, from prepare/tasks.py's loaders."""
    splits = {"train": [], "val": []}
    if name == "gsm8k":
        splits["train"] = [gsm8k_messages(r) for r in load_task("gsm8k", "train", source)]
        splits.pop("val")  # GSM8K's only other split is test: never train or select on it
        return splits
    for task in tasks.split(","):
        # MMLU has no train split: its few-shot 'dev' examples train, its 'val' validates
        for split, task_split in (("train", "dev" if task == "mmlu" else "train"), ("val", "val")):
            records = load_task(task, task_split, source)
            if records is None:  # e.g. HellaSwag has no train split in the sample: it only validates
                print(f"note: {task} has no {task_split} split" + (f" in {source}" if source else "") + f"; no {split} data from it")
                continue
            splits[split] += [multiple_choice_messages(r) for r in records if r["answer"] >= 0]
    if not splits["train"]:
        raise ValueError(f"--tasks {tasks}: none of them has training data" + (f" in {source}" if source else ""))
    if not splits["val"]:
        splits.pop("val")
    return splits


def main():
    named = list(SOURCES) + list(TASK_SOURCES) + ["identity"]
    if not dataset:
        fail(f"which conversations? e.g. python prepare/chat.py alpaca (one of {', '.join(named)}, or a file)")
    if "," in dataset:
        fail(f"{dataset!r}: one dataset at a time (each is its own folder; train.py --data=a,b mixes them)")
    is_file = dataset not in named
    source_name = name or (os.path.splitext(os.path.basename(dataset))[0] if is_file else dataset)
    source_path = local_source(source)
    if dataset in TASK_SOURCES and not os.path.isdir(source_path or "."):
        fail(f"--source {source}: no such folder (mc and gsm8k read a folder laid out like prepare/sample)")
    tok = load_tokenizer(tokenizer)
    folder = output_dir(out, data_dir, source_name)

    counts = {}
    try:
        if dataset in TASK_SOURCES:
            splits = task_conversations(dataset, source_path, tasks)
        elif dataset == "identity":
            path = source_path or os.path.join(REPO_PREPARE, "identity.jsonl")
            splits = {"train": []}
            for where, messages in identity_conversations(path, model_name, creator):
                try:
                    check_conversation(messages)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                splits["train"].append(messages)
        elif dataset in SOURCES:
            splits = {}
            for split in ("train", "val"):
                path = source_file(dataset, split, source_path)
                if path:
                    splits[split] = read_conversations(path, "auto", skip_bad, counts)
        else:
            if not os.path.exists(dataset):
                fail(f"{dataset}: no such file, and not one of {', '.join(named)}")
            splits = {"train": read_conversations(dataset, format, skip_bad, counts)}
        if "val" not in splits:
            splits["train"], splits["val"] = split_train_val(splits["train"], val_fraction, val_count, seed)
    except (OSError, ValueError, KeyError) as e:
        fail(str(e).strip("'\""))
    if max_conversations:
        splits["train"] = splits["train"][:max_conversations]
    if counts.get("bad"):
        print(f"skipped {counts['bad']:,} malformed records (--skip_bad)")
    write_chat_splits(folder, tok, splits, source=source_name, num_proc=num_proc)


if __name__ == "__main__":
    configure(globals(), positional="dataset")
    main()
