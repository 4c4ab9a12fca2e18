"""
A synthetic arithmetic task sized for a CPU: seeded word problems with small numbers and checkable answers.

    python prepare/arithmetic.py                                  # 20,000 train / 500 val / 1,000 test problems
    python prepare/arithmetic.py --tokenizer=data/tokenizer.json  # the tokenizer of a model you will fine-tune
    python prepare/arithmetic.py --n_train=5000 --seed=7 --out=data/arith

Writes data/arith/:
    train.jsonl, val.jsonl, test.jsonl    the problems, GSM8K-style {"id", "question", "answer", "solution"}
                                          (rl.py samples train problems and measures accuracy on test)
    train.bin, train.mask.bin, val.*      SFT conversations (chat token files per docs/formats.md): the user asks the
                                          question, the assistant calls the calculator, then writes '#### <answer>'
    meta.json, tokenizer.json             as every prepared source has

A problem is one or two steps of + - * / over numbers up to 20 (products up to a few hundred), about a
named person and their things, sometimes with a sentence of distracting numbers. The assistant's reply does
each step with the calculator, the second step on the first one's result, so a model must pick the right
numbers and operation and copy the tool's output forward:

    user:      Mia has 4 bags with 6 shells in each bag. She gives 5 to Leo. How many shells does Mia keep?
    assistant: <|python_start|>4*6<|python_end|><|output_start|>24<|output_end|><|python_start|>24-5<|python_end|>
               <|output_start|>19<|output_end|>#### 19

Without --tokenizer, a small BPE tokenizer (--vocab_size) is trained on the generated problems themselves,
which is what a from-scratch demo needs. The test problems never repeat a train or val question.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from data import TokenWriter, write_meta  # noqa: E402
from prepare.common import load_tokenizer, output_dir, written_aside  # noqa: E402
from tokenizer import count_chunks, train_bpe  # noqa: E402

# -----------------------------------------------------------------------------------------------------
out = "data/arith"  # output folder
n_train = 20000  # train problems (SFT conversations, and rl.py's prompts)
n_val = 500  # val problems (SFT's validation loss)
n_test = 1000  # test problems, never in train or val (rl.py's and eval.py's accuracy)
seed = 1337  # the problems drawn
tokenizer = ""  # a tokenizer file (or 'bytes'); empty = train a small one on the train problems
vocab_size = 512  # vocabulary of the tokenizer trained here
# -----------------------------------------------------------------------------------------------------

NAMES = [("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Max", "He"),
         ("Lily", "She"), ("Ben", "He"), ("Emma", "She"), ("Noah", "He"), ("Ruby", "She"), ("Omar", "He"),
         ("Nina", "She"), ("Theo", "He"), ("Ivy", "She"), ("Jack", "He")]
THINGS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "eggs", "flowers", "balloons",
          "shells", "coins", "stamps", "buttons", "candies", "toy cars"]
SINGULAR = {"apples": "apple", "pencils": "pencil", "stickers": "sticker", "marbles": "marble", "cookies": "cookie",
            "books": "book", "cards": "card", "eggs": "egg", "flowers": "flower", "balloons": "balloon",
            "shells": "shell", "coins": "coin", "stamps": "stamp", "buttons": "button", "candies": "candy",
            "toy cars": "toy car"}


def problem(rng):
    """One random problem: (question, steps) where steps are [(calculator expression, its value)]."""
    (name, he), (friend, _) = rng.sample(NAMES, 2)
    things, other = rng.sample(THINGS, 2)
    n = lambda lo=2, hi=20: rng.randint(lo, hi)  # noqa: E731
    kind = rng.randrange(13)
    if kind == 0:
        a, b = n(), n()
        q, steps = f"{name} has {a} {things}. {he} finds {b} more. How many {things} does {name} have now?", [(f"{a}+{b}", a + b)]
    elif kind == 1:
        a, b = n(), n()
        q = f"{name} picked {a} {things} in the morning and {b} in the afternoon. How many {things} did {name} pick in all?"
        steps = [(f"{a}+{b}", a + b)]
    elif kind == 2:
        b = n(1, 15)
        a = b + n(1, 15)
        q = f"{name} had {a} {things} and gave {b} of them to {friend}. How many {things} does {name} have left?"
        steps = [(f"{a}-{b}", a - b)]
    elif kind == 3:
        b = n(1, 15)
        a = b + n(1, 15)
        q = f"There are {a} {things} in a box. {name} takes {b}. How many {things} are still in the box?"
        steps = [(f"{a}-{b}", a - b)]
    elif kind == 4:
        b = n(1, 15)
        a = b + n(1, 15)
        q = f"{name} has {a} {things} and {friend} has {b}. How many more {things} does {name} have than {friend}?"
        steps = [(f"{a}-{b}", a - b)]
    elif kind == 5:
        a, b = n(2, 12), n(2, 12)
        q = f"{name} has {a} bags with {b} {things} in each bag. How many {things} does {name} have?"
        steps = [(f"{a}*{b}", a * b)]
    elif kind == 6:
        a, b = n(2, 12), n(2, 9)
        q = f"{name} gets {a} {things} every day for {b} days. How many {things} does {name} get?"
        steps = [(f"{a}*{b}", a * b)]
    elif kind == 7:
        each, b = n(2, 12), n(2, 9)
        q = f"{name} shares {each * b} {things} equally among {b} friends. How many {things} does each friend get?"
        steps = [(f"{each * b}/{b}", each)]
    elif kind == 8:
        boxes, size = n(2, 12), n(2, 9)
        q = f"{name} puts {boxes * size} {things} into boxes of {size}. How many boxes does {name} fill?"
        steps = [(f"{boxes * size}/{size}", boxes)]
    elif kind == 9:
        a, b = n(), n()
        c = n(1, a + b - 1)
        q = f"{name} has {a} {things}. {he} buys {b} more, then gives {c} to {friend}. How many {things} does {name} have now?"
        steps = [(f"{a}+{b}", a + b), (f"{a + b}-{c}", a + b - c)]
    elif kind == 10:
        a, b = n(2, 9), n(2, 9)
        c = n(1, a * b - 1)
        q = f"{name} has {a} bags with {b} {things} in each bag. {he} gives {c} to {friend}. How many {things} does {name} keep?"
        steps = [(f"{a}*{b}", a * b), (f"{a * b}-{c}", a * b - c)]
    elif kind == 11:
        a, b, c = n(2, 9), n(2, 9), n()
        q = f"{name} has {c} {things}. {he} buys {a} packs with {b} {things} in each pack. How many {things} does {name} have now?"
        steps = [(f"{a}*{b}", a * b), (f"{a * b}+{c}", a * b + c)]
    else:
        price, count = n(2, 9), n(2, 9)
        paid = next(bill for bill in (10, 20, 50, 100) if bill > price * count)
        q = (f"One {SINGULAR[things]} costs {price} dollars. {name} buys {count} of them and pays with {paid} dollars. "
             f"How much change does {name} get?")
        steps = [(f"{price}*{count}", price * count), (f"{paid}-{price * count}", paid - price * count)]
    if rng.random() < 0.3:
        # a sentence with numbers that do not matter: the model must read which numbers the question is about
        q = f"{friend} has {n()} {other}. " + q
    return q, steps


def assistant_parts(steps):
    """The assistant's reply: one calculator call per step, then the answer after '####' (GSM8K's marker)."""
    parts = []
    for expression, value in steps:
        parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": str(value)}]
    return parts + [{"type": "text", "text": f"#### {steps[-1][1]}"}]


def generate_problems(n, rng, exclude):
    """n problems with questions not in exclude (which grows with them), as GSM8K-style records."""
    records = []
    while len(records) < n:
        question, steps = problem(rng)
        if question in exclude:
            continue
        exclude.add(question)
        solution = "\n".join(f"<<{e}={v}>>" for e, v in steps) + f"\n#### {steps[-1][1]}"
        records.append({"question": question, "answer": str(steps[-1][1]), "solution": solution, "steps": steps})
    return records


def conversation(record):
    return [{"role": "user", "content": record["question"]},
            {"role": "assistant", "content": assistant_parts(record["steps"])}]


def main():
    if min(n_train, n_val, n_test) < 1:
        fail(f"--n_train={n_train}, --n_val={n_val}, --n_test={n_test}: each must be at least 1")
    folder = output_dir(out, "", "")

    rng = random.Random(seed)
    seen = set()
    splits = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        splits[split] = generate_problems(count, rng, seen)
        for i, record in enumerate(splits[split]):
            record["id"] = f"arith/{split}/{i}"

    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        texts = [r["question"] + "\n" + r["solution"] for r in splits["train"]]
        tok = train_bpe(count_chunks(texts), vocab_size, name="arith")
        print(f"trained a {tok.vocab_size}-token BPE tokenizer on the train problems")

    with written_aside(folder) as work:  # the folder is replaced whole at the end, never half-written
        for split, records in splits.items():
            with open(os.path.join(work, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps({k: r[k] for k in ("id", "question", "answer", "solution")}) + "\n")
            print(f"{split:5s} {len(records):6d} problems -> {os.path.join(folder, split + '.jsonl')}")
        counts = {}
        for split in ("train", "val"):  # the SFT conversations; test stays held out for rl.py's accuracy
            writer = TokenWriter(work, split, tok.vocab_size, with_mask=True)
            for record in splits[split]:
                messages = conversation(record)
                ids, mask = tok.render_conversation(messages)
                n_bytes = len(record["question"].encode("utf-8")) + sum(len(p["text"]) for p in messages[1]["content"])
                writer.add(ids, n_bytes, mask)
            counts[split] = writer.close()
            print(f"{split:5s} {counts[split]['tokens']:,} tokens of SFT conversations -> "
                  f"{os.path.join(folder, split + '.bin')}")
        write_meta(work, tok, counts, source=f"prepare/arithmetic.py --seed {seed}", fmt="chat")
    example = conversation(splits["train"][0])
    print("example:", example[0]["content"], "->",
          " ".join(p["text"] if p["type"] != "python_output" else f"[{p['text']}]" for p in example[1]["content"]))


if __name__ == "__main__":
    configure(globals())
    main()
