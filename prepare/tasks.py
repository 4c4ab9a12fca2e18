"""
Evaluation sets, normalized to the records of docs/formats.md, one JSONL file per task and split:

    multiple choice: {"id", "question", "choices": [...], "answer": <index>}  (+ "context", "subject" where known)
    GSM8K:           {"id", "question", "answer": "<final number>", "solution": "..."}

    python prepare/tasks.py --source=sample                   # the slices in the repository's sample
    python prepare/tasks.py                                   # all tasks, from the official sources
    python prepare/tasks.py --source=path/to/copy             # a local copy laid out like prepare/sample
    python prepare/tasks.py --tasks=arc_easy,gsm8k --out=data/tasks
    python prepare/tasks.py --tasks=openbookqa,arc_easy,arc_challenge --source=sample --as_text=mc_text \
        --tokenizer=hf:DIR                                    # also a text source of the right answers (below)
    python prepare/tasks.py --tasks=openbookqa,arc_easy,arc_challenge --as_choices=mc_choice --tokenizer=hf:DIR
                                                              # also a choice source: every choice, ranked (below)

Writes data/tasks/<task>/<split>.jsonl (splits: train, val, test and MMLU's dev; whichever the source has).
eval.py reads these files; prepare/chat.py renders them as conversations for midtraining and SFT. --as_text=NAME
also writes the multiple-choice questions as a text source <data_dir>/NAME for train.py: each question one
document, the prompt eval.py scores in base mode followed by the right answer (train: the train splits, val:
the val splits), so that a fine-tune learns exactly what base-mode evaluation measures. --as_choices=NAME writes
them as a choice source instead: every choice of a question a row, the prompt and that choice tokenized as eval.py
scores them, with the index of the right one (docs/formats.md); train.py's loss on it ranks each question's choices
by their summed log-likelihood, which is what base-mode acc picks the answer by. A line ends
at '\\n' only: U+2028, U+2029 and U+0085 inside the text are written as JSON escapes, so that no reader that
splits lines the way str.splitlines does can cut a record in two.
"""

import csv
import io
import json
import os
import re
import sys
import tarfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import (download, load_tokenizer, local_source, output_dir, read_text,  # noqa: E402
                            write_choice_splits, write_text_splits, written_aside)

# -----------------------------------------------------------------------------------------------------
tasks = "openbookqa,arc_easy,arc_challenge,mmlu,hellaswag,gsm8k"  # comma-separated
source = ""  # 'sample' (prepare/sample), a folder laid out like it (or holding the official archives); empty = download
out = "data/tasks"  # output folder: <out>/<task>/<split>.jsonl
as_text = ""  # also write the multiple-choice questions as this text source: <data_dir>/<as_text>/{train,val}.bin
as_choices = ""  # also write them as this choice source (every choice a row, ranked in training)
tokenizer = "data/tokenizer.json"  # as_text, as_choices: the tokenizer file, or 'gpt2', 'bytes' or 'hf:DIR'
data_dir = "data"  # as_text, as_choices: the folder of prepared sources
num_proc = max(1, min(8, os.cpu_count() or 1))  # as_text: processes that tokenize
# -----------------------------------------------------------------------------------------------------

OPENBOOKQA_URL = "https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/OpenBookQA-V1-Sep2018.zip"
ARC_URL = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"

TASKS = ["openbookqa", "arc_easy", "arc_challenge", "mmlu", "hellaswag", "gsm8k"]


# ----------------------------------------------------------------------------------------------------
# parsers: raw file text -> normalized records


def read_jsonl_lines(text, source, line_numbers=None):
    """
    Parsed JSON objects of a JSONL text; a malformed line is an error that names source:line. A list given as
    line_numbers gets each record's line number, for errors about the record that name its line.
    """
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 and the like are not line ends
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{number}: invalid JSON ({e.msg}); expected one JSON object per line") from None
        if line_numbers is not None:
            line_numbers.append(number)
    return records


def parse_ai2_multiple_choice(text, source):
    """OpenBookQA and ARC: {id, question: {stem, choices: [{text, label}]}, answerKey} (+ fact1 in OpenBookQA)."""
    records = []
    for raw in read_jsonl_lines(text, source):
        try:
            labels = [c["label"] for c in raw["question"]["choices"]]
            record = {"id": raw["id"], "question": raw["question"]["stem"],
                      "choices": [c["text"] for c in raw["question"]["choices"]],
                      "answer": labels.index(raw["answerKey"])}
        except (KeyError, ValueError) as e:
            raise ValueError(f"{source}: record {raw.get('id', '?')}: expected question.stem, question.choices and "
                             f"an answerKey among the labels ({e})") from None
        if raw.get("fact1"):
            record["context"] = raw["fact1"]
        records.append(record)
    return records


def parse_mmlu_csv(text, source, subject):
    """MMLU: headerless CSV rows question, A, B, C, D, answer-letter."""
    records = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if len(row) != 6 or row[5] not in "ABCD" or not row[5]:
            raise ValueError(f"{source}:{number}: expected question,A,B,C,D,answer-letter; got {len(row)} fields")
        records.append({"id": f"{subject}/{number}", "question": row[0], "choices": row[1:5],
                        "answer": "ABCD".index(row[5]), "subject": subject})
    return records


def hellaswag_preprocess(text):
    """lm-evaluation-harness's clean-up of HellaSwag text (WikiHow's [title]/[step] markers, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_hellaswag(text, source):
    """HellaSwag: the question is lm-evaluation-harness's query: activity label + ': ' + context."""
    records = []
    for raw in read_jsonl_lines(text, source):
        context = raw["ctx_a"] + " " + raw["ctx_b"].capitalize()
        records.append({"id": str(raw["ind"]), "question": hellaswag_preprocess(raw["activity_label"] + ": " + context),
                        "choices": [hellaswag_preprocess(e) for e in raw["endings"]],
                        "answer": int(raw["label"]) if raw.get("label", "") != "" else -1})
    return records


def gsm8k_final_answer(solution):
    """The number after '####' in a GSM8K solution, without thousands separators."""
    if "####" not in solution:
        return None
    return solution.split("####")[-1].strip().replace(",", "")


def parse_gsm8k(text, source):
    records = []
    for number, raw in enumerate(read_jsonl_lines(text, source)):
        answer = gsm8k_final_answer(raw.get("answer", ""))
        if answer is None:
            raise ValueError(f"{source}: record {number}: the solution has no '#### <answer>' line")
        records.append({"id": f"gsm8k/{number}", "question": raw["question"], "answer": answer,
                        "solution": raw["answer"]})
    return records


# ----------------------------------------------------------------------------------------------------
# where each task's files are: in a --source folder (its layout or the official archives') or downloaded


def archive_member(archive_path, suffix):
    """Text of the member of a .zip or .tar archive whose name ends with suffix."""
    if zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as z:
            for name in z.namelist():
                if name.endswith(suffix):
                    return z.read(name).decode("utf-8")
    else:
        with tarfile.open(archive_path) as t:
            for member in t.getmembers():
                if member.name.endswith(suffix):
                    return t.extractfile(member).read().decode("utf-8")
    raise FileNotFoundError(f"{archive_path}: no member ending with {suffix}")


def find_file(source, candidates):
    for relative in candidates:
        path = os.path.join(source, relative)
        if os.path.exists(path):
            return path
    return None


def load_task(task, split, source=None):
    """
    Normalized records of one task split. source: a folder laid out like prepare/sample or holding the
    official files; None downloads the official files. Returns None when the source lacks that split.
    """
    if split not in ("train", "val", "test", "dev"):
        raise ValueError(f"unknown split {split!r}; expected train, val, test or dev (MMLU's few-shot examples)")
    if task == "openbookqa":
        name = {"train": "train", "val": "dev", "test": "test"}.get(split)
        if name is None:
            return None
        if source:
            path = find_file(source, [f"openbookqa/{name}.jsonl", f"{name}.jsonl", f"Data/Main/{name}.jsonl",
                                      f"OpenBookQA-V1-Sep2018/Data/Main/{name}.jsonl"])
            return parse_ai2_multiple_choice(read_text(path), path) if path else None
        return parse_ai2_multiple_choice(archive_member(download(OPENBOOKQA_URL), f"Data/Main/{name}.jsonl"), name)
    if task in ("arc_easy", "arc_challenge"):
        level = "Easy" if task == "arc_easy" else "Challenge"
        if split == "dev":
            return None
        name = f"ARC-{level}-" + {"train": "Train", "val": "Dev", "test": "Test"}[split] + ".jsonl"
        if source:
            path = find_file(source, [f"{task}/{name}", name, f"ARC-{level}/{name}", f"ARC-V1-Feb2018-2/ARC-{level}/{name}"])
            return parse_ai2_multiple_choice(read_text(path), path) if path else None
        return parse_ai2_multiple_choice(archive_member(download(ARC_URL), f"ARC-{level}/{name}"), name)
    if task == "mmlu":
        name = {"dev": "dev", "val": "val", "test": "test"}.get(split)
        if name is None:
            return None
        if source:
            folder = next((os.path.join(source, c) for c in (f"mmlu/{name}", name, f"data/{name}")
                           if os.path.isdir(os.path.join(source, c))), None)
            if folder is None:
                return None
            files = sorted(f for f in os.listdir(folder) if f.endswith(f"_{name}.csv"))
            return [r for f in files for r in parse_mmlu_csv(read_text(os.path.join(folder, f)),
                                                             os.path.join(folder, f), f[:-len(f"_{name}.csv")])]
        records = []
        with tarfile.open(download(MMLU_URL)) as t:
            for member in sorted(t.getmembers(), key=lambda m: m.name):
                if member.name.startswith(f"data/{name}/") and member.name.endswith(f"_{name}.csv"):
                    subject = os.path.basename(member.name)[:-len(f"_{name}.csv")]
                    records += parse_mmlu_csv(t.extractfile(member).read().decode("utf-8"), member.name, subject)
        return records
    if task == "hellaswag":
        if split not in ("train", "val"):
            return None  # the public test split has no labels
        if source:
            path = find_file(source, [f"hellaswag/hellaswag_{split}.jsonl", f"hellaswag_{split}.jsonl"] +
                             (["hellaswag/hellaswag.jsonl"] if split == "val" else []))
            return parse_hellaswag(read_text(path), path) if path else None
        path = download(HELLASWAG_URL.format(split=split))
        return parse_hellaswag(read_text(path), path)
    if task == "gsm8k":
        if split not in ("train", "test"):
            return None
        if source:
            path = find_file(source, [f"gsm8k/{split}.jsonl", f"{split}.jsonl", f"grade_school_math/data/{split}.jsonl"])
            return parse_gsm8k(read_text(path), path) if path else None
        path = download(GSM8K_URL.format(split=split))
        return parse_gsm8k(read_text(path), path)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def read_task_file(path, line_numbers=None):
    """Records of a normalized task file written by this script (line_numbers: as read_jsonl_lines)."""
    return read_jsonl_lines(read_text(path), path, line_numbers)


# the characters other than '\\n' at which str.splitlines() ends a line and that json.dumps(ensure_ascii=False)
# writes as they are (the control characters below U+0020 it escapes already)
LINE_BREAKS_TO_ESCAPE = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(record):
    """One JSONL line: readable UTF-8, with the line-breaking characters of other readers escaped."""
    text = json.dumps(record, ensure_ascii=False)
    for character, escape in LINE_BREAKS_TO_ESCAPE.items():
        text = text.replace(character, escape)
    return text + "\n"


def answer_documents(task, records):
    """Multiple-choice records as the text eval.py scores in base mode: the task's prompt, a space, the right answer."""
    import eval  # its TASKS table: the prompts are the evaluation's own, so training and scoring cannot drift
    entry = eval.TASKS[task]
    return [entry["prompt"](r) + " " + entry["target"](r) for r in records if r["answer"] >= 0]


def choice_questions(task, records, tokenizer):
    """
    Multiple-choice records as a choice source's questions: (rows, answer, bytes), a row per choice holding
    exactly the tokens eval.py scores in base mode (its prompt and encode_pair) after a <|bos|>, masked to the
    choice's tokens.
    """
    import eval  # the evaluation's own prompts and tokenization: training ranks what evaluation compares
    entry = eval.TASKS[task]
    questions = []
    for r in records:
        if r["answer"] < 0:
            continue
        prompt, choices = entry["prompt"](r), entry["choices"](r)  # MMLU's choices are the letters it lists
        rows = []
        for choice in choices:
            context, continuation = eval.encode_pair(tokenizer, prompt, " " + choice)
            start = [] if context[:1] == [tokenizer.bos_id] else [tokenizer.bos_id]
            rows.append((start + context + continuation, [0] * (len(start) + len(context)) + [1] * len(continuation)))
        n_bytes = len((prompt + "".join(" " + c for c in choices)).encode("utf-8"))
        questions.append((rows, r["answer"], n_bytes))
    return questions


def main():
    folder = local_source(source)
    if folder and not os.path.isdir(folder):
        fail(f"--source {source}: no such folder (expected 'sample' or a folder laid out like prepare/sample, see "
             "its MANIFEST.md; empty downloads the official files)")
    option = "--as_text" if as_text else "--as_choices"
    if (as_text or as_choices) and "gsm8k" in tasks.split(","):
        fail(f"{option} writes multiple-choice questions with their right answer; leave gsm8k out of --tasks "
             "(prepare/chat.py gsm8k renders it as conversations with calculator calls)")
    if as_text and as_choices:
        fail("--as_text and --as_choices: one at a time (each writes its own source)")
    token_source = load_tokenizer(tokenizer) if (as_text or as_choices) else None  # before any file is written
    documents = {"train": [], "val": []}  # as_text: strings; as_choices: questions (choice_questions)
    written = 0
    for task in tasks.split(","):
        if task not in TASKS:
            fail(f"--tasks: unknown task {task!r}; expected some of {', '.join(TASKS)}")
        found = {}
        for split in ("train", "val", "test", "dev"):
            try:
                records = load_task(task, split, folder)
            except (OSError, ValueError, KeyError) as e:
                fail(f"{task} {split}: {e}")
            if records:
                found[split] = records
        if not found:
            print(f"{task:14s} no split of it in {folder}")
            continue
        task_dir = output_dir(os.path.join(out, task), "", "")
        with written_aside(task_dir) as work:  # the task's folder is replaced whole, never half-written
            for split, records in found.items():
                with open(os.path.join(work, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                    for record in records:
                        f.write(json_line(record))
        for split, records in found.items():
            print(f"{task:14s} {split:5s} {len(records):6d} records -> {os.path.join(task_dir, split + '.jsonl')}")
        written += 1
        # MMLU has no train split: its few-shot 'dev' examples are the ones to learn from
        for split, task_split in (("train", "dev" if task == "mmlu" else "train"), ("val", "val")):
            if as_text:
                documents[split] += answer_documents(task, found.get(task_split, []))
            elif as_choices:
                documents[split] += choice_questions(task, found.get(task_split, []), token_source)
    if not written:
        fail(f"--source {source}: none of the tasks {tasks} has a file in it (see prepare/sample/MANIFEST.md for "
             "the layout)")
    if (as_text or as_choices) and (not documents["train"] or not documents["val"]):
        fail(f"{option}: the tasks {tasks} have no " + ("train" if not documents["train"] else "val") +
             f" questions in {folder or 'the download'}")
    if as_choices:
        write_choice_splits(output_dir("", data_dir, as_choices), token_source, documents, source=as_choices)
    if as_text:
        write_text_splits(output_dir("", data_dir, as_text), token_source, documents, source=as_text,
                          num_proc=num_proc)


if __name__ == "__main__":
    configure(globals())
    main()
