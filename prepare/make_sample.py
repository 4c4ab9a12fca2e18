"""
Cut the repository's sample of real data (prepare/sample/) from a larger local copy laid out the same way, and
write its MANIFEST.md (source, licence, bytes, sha256 and record counts of every file).

    python prepare/make_sample.py --source=path/to/data      # the copy the sample was cut from: see MANIFEST.md

The sample is what the tests, the quick start and speedrun.sh's ci and cpu presets read when no other data is
given, so that a fresh clone works offline. It keeps the paths of the copy it was cut from, so every prepare/
script's --source reads it unchanged (or --source=sample). Every cut is a start (the first N records, lines or
articles) except the two noted in CUTS, and files are written as the source wrote them (same JSON indent and
escaping, the same bytes for text), so the same copy gives the same sample byte for byte. Test splits of
OpenBookQA, ARC and GSM8K are not in it: the copy keeps them back for final checks (GSM8K is cut from train).
"""

import csv
import fnmatch
import glob
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import written_aside  # noqa: E402
from prepare.tinystories import stories  # noqa: E402
from prepare.wikitext import articles  # noqa: E402

# -----------------------------------------------------------------------------------------------------
source = ""  # the larger copy to cut from (laid out as MANIFEST.md lists; its own MANIFEST.md gives licences)
out = "prepare/sample"  # the sample folder (replaced whole)
# -----------------------------------------------------------------------------------------------------

# (path or glob in the copy, how it is cut, N). TinyStories, Tiny Shakespeare and the 1,000 Alpaca records are
# kept whole: the cpu preset of speedrun.sh was measured on exactly these files.
CUTS = [
    ("tinystories/tiny_stories.txt", "whole", None),
    ("tinystories/tinystories_val.txt", "whole", None),
    ("tinyshakespeare/input.txt", "whole", None),
    ("alpaca/alpaca_data_1k.json", "whole", None),
    ("alpaca/seed_tasks.jsonl", "first_lines", 20),
    ("alpaca_cleaned/alpaca_train.json", "first_records", 100),
    ("alpaca_cleaned/alpaca_eval.json", "first_records", 20),
    ("lima/lima.json", "lima", 40),  # the first 40, and the first 5 of the multi-turn records (at the end of the file)
    ("wikitext-2/valid.txt", "first_articles", 8),
    ("wikitext-2/test.txt", "first_articles", 2),
    # the first 2 articles, and the one whose equation lines look like titles in this blank-line-less copy
    ("wikitext-2/wiki.test.raw", "raw_articles", None),
    ("openbookqa/train.jsonl", "first_lines", 300),
    ("openbookqa/dev.jsonl", "first_lines", 300),
    ("arc_easy/ARC-Easy-Train.jsonl", "first_lines", 200),
    ("arc_easy/ARC-Easy-Dev.jsonl", "first_lines", 300),
    ("arc_challenge/ARC-Challenge-Train.jsonl", "first_lines", 100),
    ("arc_challenge/ARC-Challenge-Dev.jsonl", "whole", None),
    ("mmlu/README.txt", "whole", None),
    ("mmlu/dev/*.csv", "whole", None),
    ("mmlu/val/*.csv", "first_rows", 5),
    ("mmlu/test/*.csv", "first_rows", 3),
    ("hellaswag/hellaswag.jsonl", "first_lines", 100),
    ("gsm8k/train.jsonl", "first_lines", 300),
]

# where each dataset comes from (the repository and commit the copy was read from) and its licence, as the
# copy's MANIFEST.md gives them: the upstream dataset's own statement
SOURCES = {
    "tinystories": ("TinyStories (roneneldan/TinyStories). tiny_stories.txt: the start of the train split, stories "
                    "ending at a single newline (s-ajaykumar/smallGPT data/tiny_stories.txt @ b8b89926); "
                    "tinystories_val.txt: the first 1,000 V1 validation stories, '<|endoftext|>' between them "
                    "(BhargavKumarNath/NanoGPT data_corpus/tinystories_val.txt @ 25e02c8a)",
                    "CDLA-Sharing-1.0 (Hugging Face dataset card)"),
    "tinyshakespeare": ("Tiny Shakespeare (karpathy/char-rnn data/tinyshakespeare/input.txt @ 6f9487a6)",
                        "public domain text (the repository has no licence file)"),
    "alpaca": ("Stanford Alpaca: 1,000 of its 52,002 records (wujindou/BLOOM-LORA data/alpaca_data_1k.json "
               "@ 11c488c8) and the seed tasks (tatsu-lab/stanford_alpaca seed_tasks.jsonl @ 761dc5bf)",
               "CC BY-NC 4.0 (tatsu-lab DATA_LICENSE)"),
    "alpaca_cleaned": ("Alpaca cleaned (yahma/alpaca-cleaned): records 100-4,999 as train and 0-99 as eval "
                       "(DinishaSuryawanshi/sfa631_NLP-Assignment3 data/ @ 55b3061f)",
                       "CC BY-NC 4.0 (gururise/AlpacaDataCleaned DATA_LICENSE)"),
    "lima": ("LIMA (GAIR/lima) in the Alpaca-with-history layout (hiyouga/LLaMA-Factory data/lima.json @ b9cdff41)",
             "CC BY-NC-SA, or stricter where the source data is stricter (GAIR/lima dataset card)"),
    "wikitext-2": ("WikiText-2 (Salesforce). valid.txt and test.txt: the tokenized form (pytorch/examples "
                   "word_language_model/data/wikitext-2 @ 77f55b91); wiki.test.raw: the raw form with the blank "
                   "lines dropped (Tylogi/TyloQuant data/wikitext-2-raw @ 7989d038)", "CC BY-SA 3.0"),
    "openbookqa": ("OpenBookQA (AllenAI), byte-identical to the official Data/Main files (train: "
                   "raybears/cot-transparency data/openbook_qa @ f6874394; dev: rebuilt from "
                   "genggui001/opencompass data/openbookqa/Main/dev.tsv @ 5649a0f7)",
                   "'unknown' on the Hugging Face dataset card"),
    "arc_easy": ("ARC-Easy (AllenAI, ARC-V1-Feb2018; raybears/cot-transparency data/arc_easy @ f6874394)",
                 "CC BY-SA 4.0 (Hugging Face ai2_arc card)"),
    "arc_challenge": ("ARC-Challenge (AllenAI, ARC-V1-Feb2018; raybears/cot-transparency data/arc_challenge "
                      "@ f6874394)", "CC BY-SA 4.0 (Hugging Face ai2_arc card)"),
    "mmlu": ("MMLU (hendrycks/test; raybears/cot-transparency data/mmlu @ f6874394): all 285 dev (few-shot) "
             "questions, the first 5 val and the first 3 test questions of each of the 57 subjects",
             "MIT (hendrycks/test)"),
    "hellaswag": ("HellaSwag (rowanz/hellaswag): the first 100 of a 1,000-record selection of the validation split "
                  "(RubriksCube/rubriks_cube data/hellaswag.jsonl @ 45e617d6)", "MIT (rowanz/hellaswag LICENSE)"),
    "gsm8k": ("GSM8K (openai/grade-school-math grade_school_math/data/train.jsonl @ 3101c7d5): the first 300 train "
              "problems", "MIT (repository LICENSE and README)"),
}


# ----------------------------------------------------------------------------------------------------
# cuts: the bytes of a source file -> the bytes of its sample file


def first_lines(data, n):
    """The first n non-empty lines (JSONL records), exactly as they are."""
    kept, count = [], 0
    for line in data.split(b"\n"):
        if count == n:
            break
        kept.append(line)
        count += bool(line.strip())
    return b"\n".join(kept) + b"\n"


def json_style(data):
    """(indent, ensure_ascii) with which json.dumps wrote this JSON file, so that a slice is written the same way."""
    records, text = json.loads(data), data.decode("utf-8")
    for indent in (None, 2, 4):
        for ensure_ascii in (True, False):
            dumped = json.dumps(records, indent=indent, ensure_ascii=ensure_ascii)
            if dumped == text.rstrip("\n"):
                return indent, ensure_ascii
    fail("cannot tell how the JSON file was written (not json.dumps with indent None, 2 or 4)")


def dump_like(data, records):
    indent, ensure_ascii = json_style(data)
    return json.dumps(records, indent=indent, ensure_ascii=ensure_ascii).encode("utf-8") + \
        (b"\n" if data.endswith(b"\n") else b"")


def first_rows(data, n):
    """The first n CSV rows, exactly as they are (a quoted field may span lines)."""
    lines = data.decode("utf-8").split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    consumed = []

    def feed():  # csv.reader takes lines one at a time and asks for no more than a row needs
        for line in lines:
            consumed.append(line)
            yield line
    for _ in zip(range(n), csv.reader(feed())):
        pass
    return "".join(consumed).encode("utf-8")


def title_lines(lines, blank_lines):
    """Indices of the ' = Title = ' lines that start WikiText articles (with blank lines around them, if the
    copy has blank lines; else every such line, as prepare/wikitext.py reads such a copy)."""
    def is_title(line):
        line = line.rstrip("\r")
        return line.startswith(" = ") and not line.startswith(" = = ") and line.rstrip().endswith(" =")
    found = []
    for i, line in enumerate(lines):
        around = 0 < i < len(lines) - 1 and not lines[i - 1].strip() and not lines[i + 1].strip()
        if is_title(line) and (around or not blank_lines):
            found.append(i)
    return found


def first_articles(data, n):
    """The first n articles of a WikiText file with blank lines, up to the blank line before article n + 1."""
    lines = data.decode("utf-8").split("\n")
    titles = title_lines(lines, blank_lines=True)
    return "\n".join(lines[:titles[n] - 1]).encode("utf-8") + b"\n"


def raw_articles(data):
    """Articles 1-2, and the article (28) whose equation lines prepare/wikitext.py reads as two more titles."""
    lines = data.decode("utf-8").split("\n")
    titles = title_lines(lines, blank_lines=False)
    return "\n".join(lines[:titles[2]] + lines[titles[27]:titles[30]]).encode("utf-8") + b"\n"


def lima(data, n):
    records = json.loads(data)
    multi_turn = [r for r in records if r.get("history")]
    return dump_like(data, records[:n] + multi_turn[:5])


def cut(data, how, n):
    if how == "whole":
        return data
    if how == "first_lines":
        return first_lines(data, n)
    if how == "first_records":
        return dump_like(data, json.loads(data)[:n])
    if how == "first_rows":
        return first_rows(data, n)
    if how == "first_articles":
        return first_articles(data, n)
    if how == "raw_articles":
        return raw_articles(data)
    if how == "lima":
        return lima(data, n)
    raise ValueError(f"unknown cut {how!r}")


# ----------------------------------------------------------------------------------------------------
# the manifest


def count_records(path):
    """What a reader counts in a sample file: records, rows or lines, and the documents of the text files."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".jsonl"):
        n_records = sum(1 for line in data.split(b"\n") if line.strip())
        return f"{n_records:,} records"
    if path.endswith(".json"):
        records = json.loads(data)
        multi = sum(1 for r in records if r.get("history"))
        return f"{len(records):,} records" + (f" ({multi} multi-turn)" if multi else "")
    if path.endswith(".csv"):
        n_rows = sum(1 for _ in csv.reader(line + "\n" for line in data.decode("utf-8").split("\n") if line))
        return f"{n_rows:,} rows"
    lines = f"{len(data.decode('utf-8').splitlines()):,} lines"
    if "tinystories" in path:
        return f"{lines}, {sum(1 for _ in stories(path)):,} stories"
    if "wikitext" in path:
        return f"{lines}, {sum(1 for _ in articles(path)):,} articles as prepare/wikitext.py reads them"
    return lines


def describe_cut(how, n):
    return {"whole": "whole file", "first_lines": f"first {n} records", "first_records": f"first {n} records",
            "first_rows": f"first {n} rows", "first_articles": f"first {n} articles",
            "raw_articles": "articles 1-2 and 28", "lima": f"first {n} records + first 5 multi-turn"}[how]


def manifest(folder, rows):
    total = sum(size for _, _, size, _ in rows)
    lines = [
        "# The sample: small slices of real datasets, in the repository",
        "",
        "The tests, the quick start and `speedrun.sh` (its ci and cpu presets) read these files when no other data",
        "is given, so that a fresh clone works offline. Paths are those of the larger copy they were cut from (a",
        "folder laid out the same way works with every `--source`); `--source=sample` means this folder.",
        f"Cut by `python prepare/make_sample.py --source=<copy>`: {len(rows)} files, {total:,} bytes.",
        "",
        "Not here: the test splits of OpenBookQA, ARC-Easy, ARC-Challenge and GSM8K (kept back for final checks;",
        "GSM8K is cut from its train file), WikiText's train split, and anything large: the full datasets are",
        "downloaded by the prepare/ scripts (see each script's --help).",
        "",
        "| file | records | cut | bytes | sha256 |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for relative, records, size, digest in rows:
        how = next(describe_cut(h, n) for pattern, h, n in CUTS if fnmatch.fnmatch(relative, pattern))
        lines.append(f"| `{relative}` | {records} | {how} | {size:,} | `{digest}` |")
    lines += ["", "## Sources and licences (as each source states it)", ""]
    for name, (what, licence) in SOURCES.items():
        lines.append(f"- `{name}/`: {what}. Licence: {licence}.")
    lines += ["", "Several are non-commercial (Alpaca, Alpaca cleaned: CC BY-NC 4.0; LIMA: CC BY-NC-SA) or "
              "share-alike (ARC, WikiText, TinyStories): check before using a model trained on them.", ""]
    with open(os.path.join(folder, "MANIFEST.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main():
    if not source or not os.path.isdir(source):
        fail(f"--source={source!r}: expected the folder to cut the sample from (laid out as MANIFEST.md lists)")
    folder = os.path.normpath(out)  # not output_dir(): this folder holds text, not prepared token files
    if os.path.isdir(folder) and os.path.samefile(folder, source):
        fail("--out is --source: the sample would replace the copy it is cut from")
    rows = []
    with written_aside(folder) as work:
        for pattern, how, n in CUTS:
            paths = sorted(glob.glob(os.path.join(source, pattern)))
            if not paths:
                fail(f"{source}: no {pattern} in it")
            for path in paths:
                relative = os.path.relpath(path, source)
                with open(path, "rb") as f:
                    data = cut(f.read(), how, n)
                target = os.path.join(work, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(data)
                rows.append((relative, count_records(target), len(data), hashlib.sha256(data).hexdigest()))
        manifest(work, rows)
    print(f"wrote {folder}: {len(rows)} files, {sum(size for _, _, size, _ in rows):,} bytes (MANIFEST.md lists them)")


if __name__ == "__main__":
    configure(globals())
    main()
