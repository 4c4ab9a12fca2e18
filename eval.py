"""
Evaluate a checkpoint on the benchmarks people quote, scored the way lm-evaluation-harness scores them.

    python eval.py --ckpt=out/best.pt --tasks=arc_easy,hellaswag,bpb --split=val --limit=100
    python eval.py --ckpt out/best.pt --tasks openbookqa,arc_easy,arc_challenge,mmlu,hellaswag,gsm8k,bpb --split test
    python eval.py --ckpt=out/sft/best.pt --tasks=mmlu,arc_easy,gsm8k    # a chat model (from the checkpoint)

Task records are the normalized files of prepare/tasks.py (data/tasks/<task>/<split>.jsonl), or are read straight
from a folder laid out like prepare/sample with --source=prepare/sample.

Base models (checkpoint data_format "text"): multiple choice by log-likelihood, exactly as lm-evaluation-harness
(its "multiple_choice" output type). Each choice is scored as the continuation " " + choice after the prompt:
    acc       the choice with the highest summed log-probability of its tokens
    acc_norm  the choice with the highest summed log-probability divided by the choice's length in characters
Prompts (lm-evaluation-harness's templates; few-shot examples are "prompt choice" joined by blank lines):
    openbookqa     <question stem>                                      -> " <choice>"
    arc_easy/_challenge  "Question: <question>\nAnswer:"                -> " <choice>"
    hellaswag      "<activity label>: <ctx_a> <Ctx_b>" with its [title]/[step] clean-up (prepare/tasks.py)
                                                                        -> " <ending>"
    mmlu           "The following are multiple choice questions (with answers) about <subject>.\n\n"
                   "<question>\nA. <a>\nB. <b>\nC. <c>\nD. <d>\nAnswer:"    -> " A" / " B" / " C" / " D"
    gsm8k          5-shot "Question: <question>\nAnswer: <solution>" blocks, then
                   "Question: <question>\nAnswer:"; greedy generation stopped at "Question:"
The prompt starts with <|bos|> (our models see it at the start of every document). As in lm-evaluation-harness,
trailing spaces of the prompt move to the continuation, the continuation's tokens are those of prompt+choice
after the prompt's tokens, too-long inputs are cut on the left, and few-shot examples are drawn with
random.Random(1234) per task in item order (MMLU: the first k dev questions of the subject).

Chat models (data_format "chat"): the question and lettered choices are a user turn (rendered by prepare/chat.py,
as in the midtraining/SFT data); the model's answer is the letter token (A, B, C, ...) with the highest
probability right after <|assistant_start|>. GSM8K: the question is the user turn, the assistant answers
greedily with the calculator tool on (zero-shot).

GSM8K answers: "strict" is the number after '####', "flexible" the last number in the answer; both ignore
commas, '$' and a trailing '.' (lm-evaluation-harness's strict-match and flexible-extract filters).
bpb: bits per byte on a prepared token source's val split, in non-overlapping windows of max_seq_len tokens;
on a chat source, bits per byte of the assistant's answers (the tokens the loss mask trains, over the bytes of
their text: train.py's masked val loss, per byte instead of per token).

Your own chat data (prepare/chat.py holds out --val_fraction of the conversations as the val split):
    python eval.py --ckpt=out/ft/best.pt --tasks=chat:my_qa --limit=200            # data/my_qa/val.bin
    python eval.py --ckpt=out/ft/best.pt --tasks=chat:my_qa --compare=out/base/best.pt
chat:NAME scores the last assistant answer of each val conversation: the model answers greedily (engine.py,
calculator on, at most max_new_tokens) given every token before that answer, and
    exact_match   the answer equals the reference after SQuAD's normalization (lowercase, no punctuation, no
                  articles a/an/the, single spaces)
    token_f1      SQuAD's F1 of the normalized words the two share
    rouge_l       ROUGE-L F-measure: the longest common subsequence of the words as the rouge-score package
                  splits them by default (lowercase runs of a-z and 0-9, no stemming); equal to its
                  RougeScorer(['rougeL'])
    perplexity    exp(mean negative log-likelihood per token of the reference answers), over the tokens the
                  loss mask trains (each answer's <|assistant_end|> included), all items' tokens pooled; one
                  forward pass per conversation; lower is better
The reference is the answer's text; tool calls in it, and in the model's answers, read <<expression=result>>.
--compare=CKPT scores a second checkpoint (e.g. the base model) on the same items and adds, per metric, the
mean paired difference (this checkpoint minus the other) and its standard error over items; for perplexity the
difference of log-perplexities (its exp is the ratio of the two perplexities). Multiple-choice tasks pair the
same way (acc, acc_norm: right or wrong per question), e.g. a fine-tune against its base on OpenBookQA:
    python eval.py --ckpt=out/smollm2_obqa/ckpt.pt --tasks=openbookqa --split=val --compare=hf:DIR

Every score comes with its standard error (lm-evaluation-harness's: sample std / sqrt(n)), a 95% interval
(Wilson), the random baseline (1 / number of choices, averaged over items) and whether the score is above that
baseline at 99% (one-sided exact test). Results go beside the checkpoint:
    eval_<checkpoint>_step<N>_<mode>_<split>.json   everything, with each item's prediction
    eval_history.jsonl              one line per evaluation
    eval_report.md                  the report card: a row per evaluated checkpoint
    eval_scores.png                 the scores over checkpoints

A task is its entry in TASKS below (prompt, choices, target, few-shot split, metrics); a new multiple-choice
task in the normalized format is one entry there plus its <task_dir>/<task>/<split>.jsonl files. chat:NAME has
one entry for every NAME, built by task_entry.
"""

import json
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import engine
from checkpoint import absolute_checkpoint_path, checkpoint_in, checkpoint_prefix, load_checkpoint
from common import Progress, fail, plot_eval_scores, progress_bar, read_jsonl, setup_device
from configurator import configure
from data import open_tokens, read_meta
from prepare.chat import multiple_choice_messages
from prepare.tasks import load_task, read_task_file

# -----------------------------------------------------------------------------------------------------
ckpt = ""  # checkpoint to evaluate (or hf:DIR, a Hugging Face model);
#            empty = out_dir/best.pt, else out_dir/ckpt.pt
out_dir = "out"
tasks = "openbookqa,arc_easy,arc_challenge,mmlu,hellaswag,gsm8k,bpb"  # comma-separated
split = "test"  # test | val | train | dev; HellaSwag has no labelled test split and uses val (as lm-eval does)
limit = 0  # only the first N items of each task (of each MMLU subject, like lm-eval's --limit);
#            bpb: N windows; 0 = all
num_fewshot = -1  # -1 = each task's default (0 for multiple choice, 5 for GSM8K);
#                   chat models are always zero-shot
fewshot_seed = 1234  # lm-evaluation-harness's seed for drawing few-shot examples
mode = "auto"  # 'auto' = from the checkpoint's data_format;
#                'base' (log-likelihood) or 'chat' (letters, conversation)
task_dir = "data/tasks"  # normalized task files from prepare/tasks.py: <task_dir>/<task>/<split>.jsonl
source = ""  # read tasks straight from a folder laid out like prepare/sample instead of task_dir
data_dir = ""  # prepared token sources for bpb and chat:NAME;
#                empty = the data_dir the checkpoint was trained with
bpb_data = ""  # the token source whose val split bpb is measured on;
#                empty = the (first) source of the checkpoint
batch_size = 16  # sequences per forward pass (multiple choice and bpb)
max_new_tokens = 256  # GSM8K and chat:NAME: most tokens generated per answer (lm-eval's max_gen_toks)
compare = ""  # chat:NAME and multiple choice: a second checkpoint scored on the same items, with the paired
#               difference per metric
device = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' = bfloat16 on a GPU that has it (float16 on older ones), float32 elsewhere
num_threads = 0  # CPU threads for torch; 0 = torch's default
results_file = ""  # the JSON result;
#                    empty = <checkpoint folder>/eval_<checkpoint name>_step<N>_<mode>_<split>.json
report = True  # add this evaluation to <checkpoint folder>/eval_report.md, eval_history.jsonl
#                and eval_scores.png
save_items = True  # keep each item's prediction in the JSON result
# -----------------------------------------------------------------------------------------------------


class EvalError(Exception):
    """A user error: printed as 'error: ...' with exit code 1."""


class SplitMissing(EvalError):
    """A task split that is not there: main skips the task with this message, which says where it looked."""


# -----------------------------------------------------------------------------------------------------
# answers and records, as the task entries below check them


STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_ANSWER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_answer(text):
    """lm-eval's regexes_to_ignore for GSM8K: commas, '$', everything up to '#### ', one trailing '.'."""
    text = text.replace(",", "").replace("$", "")
    text = re.sub(r"(?s).*#### ", "", text)
    text = re.sub(r"\.$", "", text)
    return text.strip().lower()


def extract_answer_strict(text):
    """The number after the first '####', normalized; None when there is none (lm-eval's strict-match)."""
    match = STRICT_ANSWER.findall(text)
    return normalize_answer(match[0].strip()) if match else None


def extract_answer_flexible(text):
    """The last number in the text, normalized; None when there is none (lm-eval's flexible-extract)."""
    matches = FLEXIBLE_ANSWER.findall(text)
    if not matches:
        return None
    last = [m for m in matches[-1] if m]
    return normalize_answer(last[0].strip()) if last else None


# the overlap of a generated answer with the reference (chat:NAME)

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize_text(text):
    """SQuAD's answer normalization: lowercase, punctuation removed, then the articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction, reference):
    return int(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction, reference):
    """SQuAD's F1: precision and recall of the normalized words both share (counted with repeats)."""
    predicted, expected = normalize_text(prediction).split(), normalize_text(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_words(text):
    """Words as the rouge-score package splits text by default: lowercase runs of a-z and 0-9, no stemming."""
    return re.findall(r"[a-z0-9]+", text.lower())


def longest_common_subsequence(a, b):
    """Length of the longest common subsequence of two lists, by dynamic programming one row at a time."""
    previous = [0] * (len(b) + 1)  # previous[j]: LCS of the items of a so far (but the last) and b[:j]
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F-measure: LCS / predicted words (precision), LCS / reference words (recall), harmonic mean."""
    predicted, expected = rouge_words(prediction), rouge_words(reference)
    lcs = longest_common_subsequence(predicted, expected) if predicted and expected else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def is_choice_record(r):
    return (isinstance(r.get("question"), str) and isinstance(r.get("choices"), list) and len(r["choices"]) >= 2
            and all(isinstance(c, str) for c in r["choices"])
            and isinstance(r.get("answer"), int) and not isinstance(r["answer"], bool)
            and 0 <= r["answer"] < len(r["choices"]))


def is_answer_record(r):
    return isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)


# -----------------------------------------------------------------------------------------------------
# the tasks: all that eval.py knows about a benchmark is its entry here; the code below is the same for all.
# The fields follow lm-evaluation-harness's task configs (doc_to_text, doc_to_choice, doc_to_target,
# description, fewshot_split, metrics), over the normalized records r of docs/formats.md:
#   kind             "choice": multiple choice, scored by log-likelihood (base models) or by the letter the
#                    model answers (chat models); "answer": a generated answer checked against the reference;
#                    "bpb": bits per byte of a prepared token source (no records)
#   prompt(r)        the question as a base model sees it
#   choices(r)       the continuations scored after the prompt, each after a space
#   target(r)        the answer of a solved example in a few-shot prompt
#   description(r)   text before the few-shot examples
#   fewshot_split    the split few-shot examples come from
#   fewshot_sampler  "random": drawn with random.Random(fewshot_seed); "first_n": the first ones of the split
#   subtask          the field that splits a task into subtasks (MMLU's subject): --limit counts per subtask
#                    and few-shot examples come from the record's own subtask
#   test_split       the split that --split=test reads
#   num_fewshot      few-shot examples for a base model when --num_fewshot is -1 (chat models: always 0)
#   valid(r)         the record check; expected: the record shape it wants, for the error message
#   headline         per mode, the metrics the report card shows (report.py shows the first)
# and for "answer" tasks:
#   chat_messages(r) the conversation a chat model answers
#   stop             where a base model's answer ends (it would go on with the next question)
#   gold(r)          the reference answer
#   extract          {metric: text -> the answer found in it (or None)}; right when it equals gold(r)

MULTIPLE_CHOICE = {  # what the multiple-choice tasks share; each entry below says what differs
    "kind": "choice",
    "choices": lambda r: r["choices"],
    "target": lambda r: r["choices"][r["answer"]],
    "description": lambda r: "",
    "fewshot_split": "train", "fewshot_sampler": "random", "subtask": None,
    "test_split": "test", "num_fewshot": 0,
    "valid": is_choice_record,
    "expected": '{"question": str, "choices": [str, ...], "answer": <index of the right choice>}',
    "headline": {"base": ["acc_norm"], "chat": ["acc"]},
}

TASKS = {
    "openbookqa": {**MULTIPLE_CHOICE, "prompt": lambda r: r["question"]},  # the question stem alone
    "arc_easy": {**MULTIPLE_CHOICE, "prompt": lambda r: f"Question: {r['question']}\nAnswer:"},
    "arc_challenge": {**MULTIPLE_CHOICE, "prompt": lambda r: f"Question: {r['question']}\nAnswer:"},
    # the choices are lettered in the prompt and the letters are scored; with one-character choices acc_norm
    # is acc, so acc is the headline
    "mmlu": {
        **MULTIPLE_CHOICE,
        "prompt": lambda r: r["question"].strip() + "".join(f"\n{letter}. {choice}" for letter, choice
                                                            in zip("ABCD", r["choices"])) + "\nAnswer:",
        "choices": lambda r: list("ABCD"),
        "target": lambda r: "ABCD"[r["answer"]],
        "description": lambda r: ("The following are multiple choice questions (with answers) about "
                                  f"{r['subject'].replace('_', ' ')}.\n\n"),
        "fewshot_split": "dev", "fewshot_sampler": "first_n", "subtask": "subject",
        "valid": lambda r: is_choice_record(r) and len(r["choices"]) == 4 and isinstance(r.get("subject"), str),
        "expected": '{"question": str, "choices": [4 strs], "answer": <index of the right one>, "subject": str}',
        "headline": {"base": ["acc"], "chat": ["acc"]},
    },
    # prepare/tasks.py already built the query "<activity label>: <ctx_a> <Ctx_b>" and cleaned it; the public
    # test split has no labels, so --split=test reads val (as lm-eval does)
    "hellaswag": {**MULTIPLE_CHOICE, "prompt": lambda r: r["question"], "test_split": "val"},
    "gsm8k": {
        "kind": "answer",
        "prompt": lambda r: f"Question: {r['question']}\nAnswer:",
        "target": lambda r: r["solution"],
        "description": lambda r: "",
        "fewshot_split": "train", "fewshot_sampler": "random", "subtask": None,
        "test_split": "test", "num_fewshot": 5,
        "valid": is_answer_record,
        "expected": '{"question": str, "answer": "<number>", "solution": str}',
        "headline": {"base": ["strict", "flexible"], "chat": ["strict", "flexible"]},
        "chat_messages": lambda r: [{"role": "user", "content": r["question"]}],
        "stop": "Question:",
        "gold": lambda r: normalize_answer(r["answer"]),
        "extract": {"strict": extract_answer_strict, "flexible": extract_answer_flexible},
    },
    "bpb": {"kind": "bpb", "headline": {"base": ["bpb"], "chat": ["bpb"]}},
}

# chat:NAME, the answers held out of a prepared chat source (data_dir/NAME/val.bin); task_entry builds it:
#   kind    "holdout": generated answers scored against the references, and the references' perplexity
#   source  NAME
HOLDOUT_HEADLINE = ["rouge_l", "exact_match", "perplexity"]


def task_entry(name):
    """A task's entry in TASKS (or chat:NAME's); an unknown name is a user error that lists the tasks."""
    if name.startswith("chat:") and name[len("chat:"):]:
        return {"kind": "holdout", "source": name[len("chat:"):],
                "headline": {"base": HOLDOUT_HEADLINE, "chat": HOLDOUT_HEADLINE}}
    if name not in TASKS:
        raise EvalError(f"unknown task {name!r}; expected a comma-separated list of {', '.join(TASKS)} "
                        "or chat:NAME (the held-out conversations of the chat source data_dir/NAME)")
    return TASKS[name]


# -----------------------------------------------------------------------------------------------------
# records and prompts


def load_records(task, task_split, task_dir, source):
    """
    Normalized records of a task split: <task_dir>/<task>/<split>.jsonl, or the original files in a source
    folder. A split that is not there raises SplitMissing, whose message names where it looked and what to do.
    """
    if source:
        if not os.path.isdir(source):
            raise EvalError(f"{source}: no such folder; --source expects a folder laid out like prepare/sample "
                            "(see its MANIFEST.md)")
        try:
            records = load_task(task, task_split, source)
        except (OSError, ValueError, KeyError) as e:
            raise EvalError(f"{task} {task_split} in {source}: {e}") from None
        if not records:
            raise SplitMissing(f"no {task_split} split of {task} in {source} (this copy does not have it)")
        return records
    path = os.path.join(task_dir, task, f"{task_split}.jsonl")
    if not os.path.exists(path):
        raise SplitMissing(f"no {task_split} split of {task}: {path} not found (python prepare/tasks.py "
                           f"--tasks={task} --out={task_dir} writes the splits the task has; or read the "
                           "original files with --source=FOLDER)")
    line_numbers = []
    try:
        records = read_task_file(path, line_numbers)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if not records:
        raise SplitMissing(f"{path} holds no records")
    entry = task_entry(task)
    for number, r in zip(line_numbers, records):  # a record the task cannot read: its file:line, not a traceback
        if not isinstance(r, dict):
            kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
            kind = kind.get(type(r), "a number")
            raise EvalError(f"{path}:{number}: {kind}; expected a JSON object {entry['expected']}")
        unlabelled = entry["kind"] == "choice" and r.get("answer") == -1  # HellaSwag's test rows, left out later
        if not (unlabelled or entry["valid"](r)):
            raise EvalError(f"{path}:{number}: record (id {r.get('id', '?')}): expected {entry['expected']}")
    return records


def check_records(task, records, where):
    entry = task_entry(task)
    for number, r in enumerate(records, 1):
        if not (isinstance(r, dict) and entry["valid"](r)):
            record_id = r.get("id", "?") if isinstance(r, dict) else "?"
            raise EvalError(f"{where}: record {number} (id {record_id}): expected {entry['expected']}")


def first_items(task, records, limit):
    """The first limit records, of each subtask where the task has them (lm-eval's --limit is per subtask)."""
    key = task_entry(task)["subtask"]
    if not limit:
        return records
    if not key:
        return records[:limit]
    kept, seen = [], {}
    for r in records:
        seen[r[key]] = seen.get(r[key], 0) + 1
        if seen[r[key]] <= limit:
            kept.append(r)
    return kept


def fewshot_contexts(task, records, pool, k, seed, same_split):
    """
    The prompt of every record with k solved examples from pool before it, drawn as lm-evaluation-harness
    draws them: "random" samples with one random.Random(seed) per task, in record order, dropping the record
    itself when the pool is its own split; "first_n" takes the first k. A task with subtasks draws from the
    record's own subtask.
    """
    entry = task_entry(task)
    rng = random.Random(seed)
    contexts = []
    for record in records:
        examples = []
        if k > 0:
            candidates = pool
            if entry["subtask"]:
                candidates = [r for r in pool if r.get(entry["subtask"]) == record.get(entry["subtask"])]
            if entry["fewshot_sampler"] == "first_n":
                examples = candidates[:k]
            else:
                drawn = rng.sample(candidates, k + 1 if same_split else k)
                examples = [r for r in drawn if r != record][:k]
        shots = "".join(f"{entry['prompt'](r)} {entry['target'](r)}\n\n" for r in examples)
        contexts.append(entry["description"](record) + shots + entry["prompt"](record))
    return contexts


def prompt_ids(tokenizer, text):
    """
    A base model's prompt as token ids, with the token lm-evaluation-harness's tokenizer puts first: <|bos|> for
    ours (our models see it at the start of every document); for an imported model what its tokenizer files say
    (tokenizer.scoring_bos_id: SmolLM2's and Qwen2.5's put nothing, Llama 3's <|begin_of_text|>).
    """
    start = [] if tokenizer.scoring_bos_id is None else [tokenizer.scoring_bos_id]
    return start + tokenizer.encode(text)


def encode_pair(tokenizer, context, continuation):
    """
    (context ids, continuation ids) as lm-evaluation-harness makes them: trailing whitespace of the context
    moves to the continuation; the continuation is whatever the whole string's tokens add after the context's.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = prompt_ids(tokenizer, context)
    whole_ids = prompt_ids(tokenizer, context + continuation)
    return context_ids, whole_ids[len(context_ids):]


# -----------------------------------------------------------------------------------------------------
# scoring


def progress(label, total):
    """A progress line for total steps on stderr (redrawn in place on a terminal, whole lines in a log file)."""
    return Progress(label, lambda done, seconds:
                    f"{progress_bar(done, total)} {done}/{total} {done / max(seconds, 1e-9):.1f}/s")


def model_device(model):
    return model.tok_embeddings.weight.device if hasattr(model, "tok_embeddings") else "cpu"


@torch.no_grad()
def continuation_logprobs(model, requests, batch_size, label="score"):
    """
    Summed log-probability of each continuation given its context: requests are (context ids, continuation ids).
    Inputs are (context + continuation)[-(max_seq_len + 1):][:-1] as in lm-eval (cut on the left). Identical
    inputs are run once (MMLU's four one-token letters share one forward pass); the rest go longest first,
    batch_size to a forward pass, padded on the right (causal attention: padding never changes earlier logits).
    """
    max_len = model.args.max_seq_len
    rows = {}  # input ids -> [(request index, targets)]
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {i}: empty continuation")
        whole = (list(context) + list(continuation))[-(max_len + 1):]
        n_targets = min(len(continuation), len(whole) - 1)
        rows.setdefault(tuple(whole[:-1]), []).append((i, whole[-n_targets:]))
    inputs = sorted(rows, key=len, reverse=True)
    scores = [0.0] * len(requests)
    bar = progress(label, len(inputs))
    for b in range(0, len(inputs), batch_size):
        batch = inputs[b:b + batch_size]
        x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        for r, ids in enumerate(batch):
            x[r, :len(ids)] = torch.tensor(ids)
        logits, _ = model(x.to(model_device(model)))  # (B, T, vocab)
        for r, ids in enumerate(batch):
            for i, targets in rows[ids]:
                n = len(targets)
                logprobs = F.log_softmax(logits[r, len(ids) - n:len(ids)].float(), dim=-1)  # (n, vocab)
                target_ids = torch.tensor(targets, device=logprobs.device)
                scores[i] = float(logprobs.gather(-1, target_ids[:, None]).sum())
        bar.update(len(batch))
    bar.close()
    return scores


def pick_answers(logprobs_per_choice, choices):
    """lm-eval's acc and acc_norm predictions: argmax of the log-likelihoods, raw and per character of choice."""
    lls = np.array(logprobs_per_choice)
    lengths = np.array([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


@torch.no_grad()
def letter_predictions(model, tokenizer, records, batch_size, label="letters"):
    """
    Chat models: the letter (A, B, ...) with the highest logit right after <|assistant_start|>, per record.
    The question is the user turn prepare/chat.py renders (the question, its lettered choices and "Answer with
    the letter of the correct choice."), as in the midtraining/SFT data.
    """
    max_len = model.args.max_seq_len
    letter_ids = []
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise EvalError(f"the tokenizer encodes the letter {letter!r} as {len(ids)} tokens; expected one")
        letter_ids.append(ids[0])
    prompts = []
    for record in records:
        ids = tokenizer.render_for_completion(multiple_choice_messages(record)[:1])  # the user turn only
        prompts.append(ids[-max_len:])  # too long: keep the end (the choices and <|assistant_start|>)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    predictions = [None] * len(records)
    bar = progress(label, len(records))
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        x = torch.zeros(len(batch), len(prompts[batch[0]]), dtype=torch.long)
        for r, i in enumerate(batch):
            x[r, :len(prompts[i])] = torch.tensor(prompts[i])
        logits, _ = model(x.to(model_device(model)))
        for r, i in enumerate(batch):
            n_choices = len(records[i]["choices"])
            last = logits[r, len(prompts[i]) - 1, letter_ids[:n_choices]]
            predictions[i] = int(torch.argmax(last))
        bar.update(len(batch))
    bar.close()
    return predictions


def evaluate_multiple_choice(task, model, tokenizer, records, contexts, batch_size):
    """Base model: acc and acc_norm by log-likelihood of each choice after its context."""
    choices = task_entry(task)["choices"]
    requests, owners = [], []
    for i, (record, context) in enumerate(zip(records, contexts)):
        for choice in choices(record):
            requests.append(encode_pair(tokenizer, context, " " + choice))
            owners.append(i)
    scores = continuation_logprobs(model, requests, batch_size, label=task)
    per_record = [[] for _ in records]
    for i, score in zip(owners, scores):
        per_record[i].append(score)
    items, correct, correct_norm = [], [], []
    for record, lls in zip(records, per_record):
        pred, pred_norm = pick_answers(lls, choices(record))
        correct.append(int(pred == record["answer"]))
        correct_norm.append(int(pred_norm == record["answer"]))
        items.append({"id": record.get("id"), "answer": record["answer"], "pred": pred, "pred_norm": pred_norm,
                      "acc": correct[-1], "acc_norm": correct_norm[-1],
                      "loglikelihoods": [round(x, 4) for x in lls]})
    chances = [1.0 / len(r["choices"]) for r in records]
    metrics = {"acc": proportion_score(correct, chances), "acc_norm": proportion_score(correct_norm, chances)}
    return metrics, items


def evaluate_multiple_choice_chat(task, model, tokenizer, records, batch_size):
    """Chat model: acc, the letter it answers."""
    predictions = letter_predictions(model, tokenizer, records, batch_size, label=task)
    correct = [int(p == r["answer"]) for p, r in zip(predictions, records)]
    items = [{"id": r.get("id"), "answer": r["answer"], "pred": p, "acc": c}
             for r, p, c in zip(records, predictions, correct)]
    return {"acc": proportion_score(correct, [1.0 / len(r["choices"]) for r in records])}, items


def render_reply(tokenizer, ids):
    """A chat reply as text, with calculator calls written the way GSM8K writes them: <<expr=result>>."""
    shown = {"<|python_start|>": "<<", "<|python_end|>": "=", "<|output_start|>": "", "<|output_end|>": ">>"}
    pieces, run = [], []
    for token in ids:
        if tokenizer.is_special(token):
            pieces.append(tokenizer.decode(run))
            run = []
            pieces.append(shown.get(tokenizer.decode([token]), ""))
        else:
            run.append(token)
    pieces.append(tokenizer.decode(run))
    return "".join(pieces)


def generate_base_answer(model, tokenizer, context, max_new_tokens, stop):
    """Greedy continuation of a few-shot prompt, cut at the stop string (or <|bos|>, a new document)."""
    budget = min(max_new_tokens, model.args.max_seq_len // 2)
    prompt = prompt_ids(tokenizer, context)[-(model.args.max_seq_len - budget):]  # cut on the left, as lm-eval
    ids = []
    for tokens, _ in engine.generate(model, tokenizer, prompt, budget, temperature=0.0, tools=False,
                                     stop_tokens=[tokenizer.bos_id]):
        if tokens[0] == tokenizer.bos_id:
            break
        ids.append(tokens[0])
        if stop in tokenizer.decode(ids):
            break
    return tokenizer.decode(ids).split(stop)[0]


def generate_chat_answer(model, tokenizer, messages, max_new_tokens):
    """The chat model's greedy reply to the conversation, calculator on."""
    _, ids = engine.generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=0.0,
                                   tools=True)
    return render_reply(tokenizer, ids)


def evaluate_answers(task, model, tokenizer, records, contexts, chat, max_new_tokens):
    """Generated answers (greedy), each of the task's extractions compared with the reference answer."""
    entry = task_entry(task)
    items, correct = [], {metric: [] for metric in entry["extract"]}
    bar = progress(task, len(records))
    for record, context in zip(records, contexts or [None] * len(records)):
        if chat:
            completion = generate_chat_answer(model, tokenizer, entry["chat_messages"](record), max_new_tokens)
        else:
            completion = generate_base_answer(model, tokenizer, context, max_new_tokens, entry["stop"])
        gold = entry["gold"](record)
        item = {"id": record.get("id"), "answer": gold}
        for metric, extract in entry["extract"].items():
            item[metric] = extract(completion)
            correct[metric].append(int(item[metric] == gold))
        items.append({**item, "completion": completion})
        bar.update()
    bar.close()
    no_chance = [0.0] * len(records)  # guessing never finds the answer
    return {metric: proportion_score(right, no_chance) for metric, right in correct.items()}, items


@torch.no_grad()
def bits_per_byte(model, tokens, n_tokens_split, n_bytes_split, vocab_size, batch_size, limit=0):
    """
    Bits per byte of a token array: non-overlapping windows of max_seq_len predicted tokens, nats per token
    -> bits per token -> x tokens per byte of the split (meta.json's counts, as train.py's estimate_loss).
    """
    block = model.args.max_seq_len
    starts = list(range(0, len(tokens) - 1, block))
    if limit:
        starts = starts[:limit]
    if not starts:
        raise EvalError(f"bpb: the val split has {len(tokens)} tokens; it needs at least 2")
    window_nats, window_counts = [], []
    bar = progress("bpb", len(starts))
    # the last window may be shorter: windows of equal length go together
    groups = {}
    for s in starts:
        groups.setdefault(min(block, len(tokens) - 1 - s), []).append(s)
    for length, group in groups.items():
        for b in range(0, len(group), batch_size):
            batch = group[b:b + batch_size]
            windows = [np.asarray(tokens[s:s + length + 1], dtype=np.int64) for s in batch]
            x = torch.from_numpy(np.stack(windows)).to(model_device(model))  # (B, length + 1)
            _, loss = model(x[:, :-1], x[:, 1:], loss_reduction="none")  # (B, length)
            window_nats += loss.float().sum(dim=1).tolist()
            window_counts += [length] * len(batch)
            bar.update(len(batch))
    bar.close()
    tokens_per_byte = n_tokens_split / max(1, n_bytes_split)
    to_bpb = tokens_per_byte / math.log(2)
    nats_per_token = sum(window_nats) / sum(window_counts)
    value = nats_per_token * to_bpb
    per_window = np.array(window_nats) / np.array(window_counts) * to_bpb
    stderr = float(per_window.std(ddof=1) / math.sqrt(len(per_window))) if len(per_window) > 1 else None
    baseline = math.log2(vocab_size) * tokens_per_byte  # a model that gives every token the same probability
    z_99_one_sided = 2.3263  # the normal quantile: above the baseline by more than this many stderrs
    above = None if not stderr else bool((baseline - value) / stderr > z_99_one_sided)
    return {"bpb": {"value": value, "stderr": stderr,
                    "ci95": [value - 1.96 * stderr, value + 1.96 * stderr] if stderr else [None, None],
                    "n": len(per_window), "tokens": int(sum(window_counts)), "random_baseline": baseline,
                    "above_baseline_99": above, "lower_is_better": True}}


# -----------------------------------------------------------------------------------------------------
# chat data: the held-out answers (chat:NAME) and bits per byte of the answers (bpb)


def conversation_bounds(tokens, tokenizer, where):
    """(start, end) of every conversation of a chat token file: each one starts with <|bos|>."""
    starts = np.flatnonzero(np.asarray(tokens) == tokenizer.bos_id)
    if len(starts) == 0 or starts[0] != 0:
        raise EvalError(f"{where}: chat data starts every conversation with {tokenizer.bos_token}; this file "
                        "does not (prepare it with prepare/chat.py and the checkpoint's tokenizer)")
    return list(zip(starts.tolist(), np.append(starts[1:], len(tokens)).tolist()))


def read_chat_split(folder, meta, tokenizer):
    """The val split's tokens and loss mask, checked to belong together."""
    tokens, mask = open_tokens(folder, "val", meta), open_tokens(folder, "val", meta, mask=True)
    if len(mask) != len(tokens):
        raise EvalError(f"{folder}/val.mask.bin has {len(mask):,} entries for the {len(tokens):,} tokens of "
                        "val.bin; prepare the source again (prepare/chat.py writes both)")
    return tokens, mask


def last_answer_start(ids, mask, tokenizer):
    """
    Where a conversation's last assistant answer starts: its last run of trained tokens (mask 1), extended
    back over the tool outputs inside the answer (<|output_start|>...<|output_end|>: given, so mask 0) to the
    tool call before each. None when the conversation trains no token.
    """
    trained = np.flatnonzero(mask)
    if len(trained) == 0:
        return None
    output_start = tokenizer.special("<|output_start|>") if tokenizer.has_tools else None
    output_end = tokenizer.special("<|output_end|>") if tokenizer.has_tools else None
    start = int(trained[-1])
    while True:
        while start > 0 and mask[start - 1]:
            start -= 1
        if output_end is None or start == 0 or ids[start - 1] != output_end:
            return start
        opening = start - 1
        while opening > 0 and ids[opening] != output_start:
            opening -= 1
        if opening == 0 or not mask[opening - 1]:
            return start
        start = opening - 1  # the <|python_end|> of the call whose output this was


def read_holdout(folder, meta, tokenizer, limit=0):
    """
    The items of a chat source's val split, its held-out conversations: one per conversation that trains
    something, {id: its index in the split, ids, mask, answer_start}, ids ending with the last answer's last
    trained token (its end-of-turn token). The first `limit` (0: all). Returns (items, number of
    conversations without an answer).
    """
    tokens, mask = read_chat_split(folder, meta, tokenizer)
    items, untrained = [], 0
    for index, (begin, end) in enumerate(conversation_bounds(tokens, tokenizer, f"{folder}/val.bin")):
        ids, trained = tokens[begin:end].astype(np.int64), mask[begin:end].astype(np.int64)
        answer_start = last_answer_start(ids, trained, tokenizer)
        if answer_start is None:
            untrained += 1
            continue
        answer_end = int(np.flatnonzero(trained)[-1]) + 1
        items.append({"id": index, "ids": ids[:answer_end], "mask": trained[:answer_end],
                      "answer_start": answer_start})
        if limit and len(items) == limit:
            break
    return items, untrained


@torch.no_grad()
def masked_nats(model, rows, batch_size, label="nll"):
    """
    Negative log-likelihood (nats, summed) and number of the tokens each row's mask selects, each predicted
    from the tokens before it. rows: (ids, mask) of equal length, at most max_seq_len + 1 tokens. They go
    longest first, batch_size to a forward pass, padded on the right (causal attention: padding never changes
    earlier logits).
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    nats, counts = [0.0] * len(rows), [0] * len(rows)
    bar = progress(label, len(rows))
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        width = len(rows[batch[0]][0]) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)  # -1: not counted
        for r, i in enumerate(batch):
            ids, mask = np.asarray(rows[i][0], dtype=np.int64), np.asarray(rows[i][1])
            targets = np.where(mask[1:] == 1, ids[1:], -1)
            x[r, :len(ids) - 1] = torch.from_numpy(ids[:-1])
            y[r, :len(ids) - 1] = torch.from_numpy(targets)
        device = model_device(model)
        _, loss = model(x.to(device), y.to(device), loss_reduction="none")  # (B, width), 0 where not counted
        for r, i in enumerate(batch):
            nats[i], counts[i] = float(loss[r].sum()), int((y[r] != -1).sum())
        bar.update(len(batch))
    bar.close()
    return nats, counts


def score_holdout(model, tokenizer, items, label):
    """
    Each item's greedy answer (engine.py, calculator on), its exact match, token F1 and ROUGE-L against the
    reference, and the reference answer's negative log-likelihood under the model (its trained tokens).
    """
    max_len = model.args.max_seq_len
    room = min(max_new_tokens, max_len // 2)  # a prompt longer than max_len - room is cut on the left
    scored = []
    bar = progress(f"{label} answers", len(items))
    for item in items:
        prompt = item["ids"][:item["answer_start"]].tolist()
        reply = []
        for tokens, _ in engine.generate(model, tokenizer, prompt[-(max_len - room):], max_new_tokens,
                                         temperature=0.0, tools=True):
            reply.append(tokens[0])
        # ids past the tokenizer (a vocabulary padded for speed) have no text
        prediction = render_reply(tokenizer, [t for t in reply if t < tokenizer.vocab_size])
        reference = render_reply(tokenizer, item["ids"][item["answer_start"]:].tolist())
        scored.append({"id": item["id"], "prompt": tokenizer.decode(prompt), "prompt_tokens": len(prompt),
                       "prompt_cut": len(prompt) > max_len - room, "reference": reference,
                       "prediction": prediction, "exact_match": exact_match(prediction, reference),
                       "token_f1": token_f1(prediction, reference),
                       "rouge_l": rouge_l(prediction, reference)})
        bar.update()
    bar.close()
    rows = []
    for item in items:
        answer_mask = item["mask"].copy()
        answer_mask[:item["answer_start"]] = 0  # earlier answers are part of the prompt
        rows.append((item["ids"][-(max_len + 1):], answer_mask[-(max_len + 1):]))  # too long: keep the end
    nats, counts = masked_nats(model, rows, batch_size, label=f"{label} perplexity")
    for s, n, count in zip(scored, nats, counts):
        s.update(answer_tokens=count, answer_nats=n, perplexity=math.exp(n / count))
    return scored


def holdout_metrics(scored, vocab_size):
    """exact_match, token_f1, rouge_l (means over items) and perplexity (over all reference tokens)."""
    tokens = [s["answer_tokens"] for s in scored]
    log_perplexity, stderr = ratio_estimate([s["answer_nats"] for s in scored], tokens)
    z_99_one_sided = 2.3263
    # the error of the log, carried to the perplexity (delta method) and its interval
    perplexity = {"value": math.exp(log_perplexity), "stderr": stderr and math.exp(log_perplexity) * stderr,
                  "ci95": [None if x is None else math.exp(x) for x in interval95(log_perplexity, stderr)],
                  "n": len(scored), "tokens": sum(tokens),
                  "random_baseline": float(vocab_size),  # a model that gives every token the same probability
                  "above_baseline_99": bool(stderr)
                  and (math.log(vocab_size) - log_perplexity) / stderr > z_99_one_sided,
                  "lower_is_better": True}
    return {"exact_match": proportion_score([s["exact_match"] for s in scored], [0.0] * len(scored)),
            "token_f1": mean_score([s["token_f1"] for s in scored]),
            "rouge_l": mean_score([s["rouge_l"] for s in scored]), "perplexity": perplexity}


def paired_differences(scored, other, metrics):
    """
    This checkpoint's scores minus the other's on the same items: the mean per-item difference and its
    standard error over items. The items' own difficulty, shared by both models, cancels, so the error is
    smaller than either score's. Perplexity: the difference of log-perplexities (the two models score the same
    tokens), whose exp is the ratio of the perplexities.
    """
    differences = {}
    for metric in metrics:
        if metric == "perplexity":
            continue
        d = [a[metric] - b[metric] for a, b in zip(scored, other)]
        value, stderr = ratio_estimate(d, [1] * len(d))
        differences[metric] = {"value": value, "stderr": stderr, "n": len(d),
                               "ci95": interval95(value, stderr),
                               "better": sum(x > 0 for x in d), "worse": sum(x < 0 for x in d)}
    if "perplexity" not in metrics:
        return differences
    d = [a["answer_nats"] - b["answer_nats"] for a, b in zip(scored, other)]
    value, stderr = ratio_estimate(d, [s["answer_tokens"] for s in scored])
    differences["log_perplexity"] = {"value": value, "stderr": stderr, "n": len(d),
                                     "ci95": interval95(value, stderr), "perplexity_ratio": math.exp(value),
                                     "better": sum(x < 0 for x in d), "worse": sum(x > 0 for x in d)}
    return differences


def answer_bits_per_byte(model, tokenizer, folder, meta, vocab_size):
    """
    bpb of a chat source's val split, on the assistant's answers only: the negative log-likelihood of the
    tokens the loss mask trains (end-of-turn tokens included: ending the answer is part of it), in bits, over
    the bytes of their text. A conversation longer than max_seq_len + 1 tokens keeps its end. --limit counts
    conversations.
    """
    max_len = model.args.max_seq_len
    tokens, mask = read_chat_split(folder, meta, tokenizer)
    rows, answer_bytes = [], []
    for begin, end in conversation_bounds(tokens, tokenizer, f"{folder}/val.bin"):
        begin = max(begin, end - (max_len + 1))
        ids, trained = tokens[begin:end].astype(np.int64), mask[begin:end].astype(np.int64)
        counted = ids[1:][trained[1:] == 1]  # the first token of a row is never predicted
        if len(counted) == 0:
            continue
        rows.append((ids, trained))
        text_ids = [t for t in counted.tolist() if not tokenizer.is_special(t)]
        answer_bytes.append(len(tokenizer.decode_bytes(text_ids)))
        if limit and len(rows) == limit:
            break
    if not rows:
        raise EvalError(f"bpb: {folder}/val.bin has no assistant answer (no token with mask 1)")
    nats, counts = masked_nats(model, rows, batch_size, label="bpb")
    value, stderr = ratio_estimate(np.array(nats) / math.log(2), answer_bytes)
    baseline = math.log2(vocab_size) * sum(counts) / sum(answer_bytes)
    z_99_one_sided = 2.3263
    above = None if not stderr else bool((baseline - value) / stderr > z_99_one_sided)
    return {"bpb": {"value": value, "stderr": stderr, "ci95": interval95(value, stderr), "n": len(rows),
                    "tokens": sum(counts), "bytes": sum(answer_bytes), "random_baseline": baseline,
                    "above_baseline_99": above, "lower_is_better": True}}


# -----------------------------------------------------------------------------------------------------
# statistics


def wilson_interval(k, n, z=1.959964):
    if n == 0:
        return [None, None]
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def chance_tail(k, chances):
    """P(at least k right) for a guesser right on item i with probability chances[i] (Poisson binomial)."""
    distribution = np.ones(1)
    for p in chances:
        wrong = np.concatenate([distribution * (1 - p), [0.0]])  # j right so far, this one wrong: still j
        right = np.concatenate([[0.0], distribution * p])  # this one right: j + 1
        distribution = wrong + right
    return float(min(1.0, distribution[k:].sum()))


def ratio_estimate(numerators, denominators):
    """
    sum(numerators) / sum(denominators) over items and its standard error with the item as the unit sampled
    (the ratio estimator's: sqrt(sum (x_i - r w_i)^2 / (n (n - 1))) / mean(w)). With every denominator 1 it is
    the mean and the sample standard deviation / sqrt(n), lm-eval's stderr. The error is None for one item.
    """
    x, w = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    ratio = float(x.sum() / w.sum())
    if len(x) < 2:
        return ratio, None
    return ratio, float(np.sqrt(((x - ratio * w) ** 2).sum() / (len(x) * (len(x) - 1))) / w.mean())


def interval95(value, stderr):
    """The normal 95% interval around a mean; [None, None] without a standard error."""
    return [value - 1.96 * stderr, value + 1.96 * stderr] if stderr else [None, None]


def mean_score(values):
    """
    A score between 0 and 1 per item (F1, ROUGE-L): mean, standard error, normal 95% interval, and whether it
    is above 0 (what an empty answer scores) at 99%, one-sided.
    """
    value, stderr = ratio_estimate(values, [1] * len(values))
    z_99_one_sided = 2.3263
    above = value > 0 if not stderr else value / stderr > z_99_one_sided
    return {"value": value, "stderr": stderr, "ci95": interval95(value, stderr), "n": len(values),
            "random_baseline": 0.0, "above_baseline_99": bool(above)}


def proportion_score(correct, chances):
    """A 0/1 score: mean, lm-eval's stderr, Wilson 95% interval, random baseline and a one-sided 99% test."""
    n, k = len(correct), int(sum(correct))
    value = k / n if n else None
    stderr = math.sqrt(value * (1 - value) / (n - 1)) if n > 1 else None
    baseline = float(np.mean(chances)) if n else None
    p_value = chance_tail(k, chances) if n else None
    return {"value": value, "stderr": stderr, "ci95": wilson_interval(k, n), "n": n, "correct": k,
            "random_baseline": baseline, "p_value": p_value,
            "above_baseline_99": bool(p_value is not None and p_value < 0.01)}


# -----------------------------------------------------------------------------------------------------
# the report card beside the checkpoint


def headline_metrics(task, task_mode):
    """The numbers the report card's table shows per task (the ones usually quoted)."""
    return task_entry(task)["headline"][task_mode]


def summary(result):
    """One line of eval_history.jsonl: the evaluation without its per-item details."""
    scores = {}
    for task, task_result in result["tasks"].items():
        if "metrics" not in task_result:
            continue
        for metric in headline_metrics(task, result["mode"]):
            m = task_result["metrics"][metric]
            scores[task if metric == task else f"{task} {metric}"] = {
                k: m[k] for k in ("value", "stderr", "random_baseline", "above_baseline_99")}
    # --compare: the paired differences of each chat:NAME task
    comparisons = {task: {"checkpoint": r["compare"]["checkpoint"], "step": r["compare"]["step"],
                          "differences": {metric: {k: d[k] for k in ("value", "stderr", "n")}
                                          for metric, d in r["compare"]["differences"].items()}}
                   for task, r in result["tasks"].items() if "compare" in r}
    return {k: result[k] for k in ("checkpoint", "step", "tokens_seen", "mode", "split", "limit", "num_fewshot",
                                   "time", "results_file")} | {"scores": scores, "comparisons": comparisons}


def format_value(metric, x):
    """bpb in bits per byte, perplexity as it is, everything else in %."""
    if x is None:
        return "-"
    if metric.endswith("bpb"):
        return f"{x:.3f}"
    return f"{x:.2f}" if metric.endswith("perplexity") else f"{100 * x:.1f}"


def format_difference(metric, d):
    """A paired difference as the report card and the terminal show it: points of %, or a perplexity ratio."""
    if d["value"] is None:
        return "-"
    if metric == "log_perplexity":
        text = f"x{math.exp(d['value']):.3f}"
        return text + (f" (log {d['value']:+.3f} ± {d['stderr']:.3f})" if d["stderr"] is not None else "")
    text = f"{100 * d['value']:+.1f}"
    return text + (f" ± {100 * d['stderr']:.1f}" if d["stderr"] is not None else "") + " points"


def format_score(metric, score):
    text = format_value(metric, score["value"])
    if score.get("stderr") is not None:
        text += f" ± {format_value(metric, score['stderr'])}"
    if score.get("above_baseline_99") is False:
        text += " ~"  # not distinguishable from guessing at 99%
    return text


def write_report(folder, history):
    """eval_report.md (a row per evaluation) and eval_scores.png, rebuilt from eval_history.jsonl."""
    order = list(TASKS)
    columns = sorted({key for row in history for key in row["scores"]},
                     key=lambda key: (order.index(key.split()[0]) if key.split()[0] in order else 99, key))
    lines = [f"# Evaluation report: {folder}", "",
             "Scores in % (bpb in bits per byte) ± standard error; ~ marks a score not above the random "
             "baseline at 99%. Written by eval.py; one row per evaluated checkpoint.", "",
             "| checkpoint | step | mode | split | limit | " + " | ".join(columns) + " |",
             "| --- | ---: | --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in history:
        cells = [os.path.basename(row["checkpoint"]), str(row["step"]), row["mode"], row["split"],
                 str(row["limit"] or "all")]
        cells += [format_score(c, row["scores"][c]) if c in row["scores"] else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    baselines = {c: row["scores"][c]["random_baseline"] for row in history for c in row["scores"]}
    baseline_texts = [f"{c} {format_value(c, b)}" + ("%" if format_value(c, 1.0) == "100.0" else "")
                      for c, b in baselines.items() if b is not None]
    lines += ["", "Random baselines: " + ", ".join(baseline_texts), ""]
    compared = [(row, task, c) for row in history for task, c in row.get("comparisons", {}).items()]
    if compared:
        lines += ["Paired comparisons (--compare): this checkpoint minus the other on the same items, ± the "
                  "standard error of the mean per-item difference.", ""]
        for row, task, c in compared:
            differences = ", ".join(f"{metric.replace('log_perplexity', 'perplexity')} "
                                    f"{format_difference(metric, d)}"
                                    for metric, d in c["differences"].items())
            n = next(iter(c["differences"].values()))["n"]
            lines.append(f"- {os.path.basename(row['checkpoint'])} (step {row['step']}) vs "
                         f"{c['checkpoint']} (step {c['step']}), {task}, {n} items: {differences}")
        lines.append("")
    lines += ["![scores over checkpoints](eval_scores.png)", "",
              "Each evaluation's full result (every metric, 95% intervals, each item's prediction) is in the "
              "JSON file named in eval_history.jsonl.", ""]
    with open(os.path.join(folder, "eval_report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    # the picture draws scores in % and bpb; a perplexity is neither, so it stays in the table
    plotted = [{**row, "scores": {k: v for k, v in row["scores"].items() if not k.endswith("perplexity")}}
               for row in history]
    plot_eval_scores(plotted, os.path.join(folder, "eval_scores.png"))


# -----------------------------------------------------------------------------------------------------


def source_folder(name, checkpoint):
    """data_dir/NAME, data_dir defaulting to the one the checkpoint was trained with."""
    return os.path.join(data_dir or checkpoint.get("config", {}).get("data_dir", "data"), name)


def check_source_tokenizer(folder, meta, tokenizer):
    if meta["tokenizer_sha256"] != tokenizer.sha256:
        raise EvalError(f"{folder}/meta.json: prepared with another tokenizer than the checkpoint's "
                        "(tokenizer_sha256 differs); prepare it with the checkpoint's tokenizer")


def run_bpb(model, tokenizer, checkpoint):
    """
    bpb on the val split of bpb_data (default: the source the checkpoint was trained on); on a chat source,
    bits per byte of the answers (answer_bits_per_byte).
    """
    name = bpb_data or str(checkpoint.get("config", {}).get("data", "")).split(",")[0].split(":")[0]
    folder = source_folder(name, checkpoint)
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError) as e:
        return {"skipped": f"{e} (set --bpb_data and --data_dir)"}
    check_source_tokenizer(folder, meta, tokenizer)
    counts = meta["splits"].get("val", {})
    if not counts.get("tokens"):
        return {"skipped": f"{folder} has no val split (prepare it with a --val_fraction above 0)"}
    if meta["format"] == "choice":
        return {"skipped": f"{folder} is choice data (questions and their choices): score them with their task, "
                           "e.g. --tasks=openbookqa --split=val"}
    if meta["format"] == "chat":
        metrics = answer_bits_per_byte(model, tokenizer, folder, meta, tokenizer.vocab_size)
        return {"data": folder, "split": "val", "counted": "the assistant's answers (loss mask 1)",
                "metrics": metrics}
    metrics = bits_per_byte(model, open_tokens(folder, "val", meta), counts["tokens"], counts["bytes"],
                            tokenizer.vocab_size, batch_size, limit)
    return {"data": folder, "split": "val", "metrics": metrics}


def run_holdout(task, model, tokenizer, checkpoint, other=None):
    """
    chat:NAME: the conversations held out of a prepared chat source (its val split), the last answer of each
    generated and scored. other: {"checkpoint", "step", "model"} of --compare, scored on the same items.
    """
    folder = source_folder(task_entry(task)["source"], checkpoint)
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError) as e:
        return {"skipped": f"{e} (chat:NAME reads data_dir/NAME; set --data_dir)"}
    if meta["format"] != "chat":
        return {"skipped": f"{folder} is {meta['format']} data; {task} scores the conversations held out of a "
                           "chat source (prepare/chat.py); for text use "
                           f"--tasks=bpb --bpb_data={os.path.basename(folder)}"}
    check_source_tokenizer(folder, meta, tokenizer)
    if not meta["splits"].get("val", {}).get("tokens"):
        return {"skipped": f"{folder} has no held-out conversations: prepare it with --val_fraction "
                           "(e.g. 0.1) or --val_count"}
    items, untrained = read_holdout(folder, meta, tokenizer, limit)
    if not items:
        return {"skipped": f"{folder}/val.bin: no conversation has an assistant answer to score"}
    scored = score_holdout(model, tokenizer, items, task)
    result = {"data": folder, "split": "val", "n": len(items), "conversations_without_answer": untrained,
              "metrics": holdout_metrics(scored, tokenizer.vocab_size)}
    if other:
        other_scored = score_holdout(other["model"], tokenizer, items, f"{task} (compare)")
        result["compare"] = {"checkpoint": other["checkpoint"], "step": other["step"],
                             "metrics": holdout_metrics(other_scored, tokenizer.vocab_size),
                             "differences": paired_differences(scored, other_scored, result["metrics"])}
        if save_items:
            result["compare"]["items"] = [{k: s[k] for k in ("id", "prediction", "exact_match", "token_f1",
                                                             "rouge_l", "answer_nats", "perplexity")}
                                          for s in other_scored]
    if save_items:
        result["items"] = scored
    return result


def run_task(task, model, tokenizer, eval_mode, other=None):
    """
    One benchmark: its records, few-shot prompts (base models), scores and each item's prediction.
    other: {"checkpoint", "step", "model"} of --compare (multiple choice), scored on the same prompts.
    """
    entry = task_entry(task)
    task_split = entry["test_split"] if split == "test" else split
    try:
        records = load_records(task, task_split, task_dir, source)
    except SplitMissing as e:
        return {"skipped": str(e)}
    if entry["kind"] == "choice":
        records = [r for r in records if r.get("answer") != -1]  # HellaSwag's unlabelled rows
    check_records(task, records, os.path.join(source or task_dir, task, task_split))
    records = first_items(task, records, limit)
    k = 0 if eval_mode == "chat" else (num_fewshot if num_fewshot >= 0 else entry["num_fewshot"])
    contexts = None
    if eval_mode == "base":
        pool = []
        if k > 0:
            try:  # the whole split, whatever the limit
                pool = load_records(task, entry["fewshot_split"], task_dir, source)
            except SplitMissing as e:
                raise EvalError(f"{task}: {k}-shot takes its examples from the {entry['fewshot_split']} split: "
                                f"{e}; or use --num_fewshot=0") from None
        contexts = fewshot_contexts(task, records, pool, k, fewshot_seed, entry["fewshot_split"] == task_split)

    def evaluate(model):
        if entry["kind"] == "answer":
            return evaluate_answers(task, model, tokenizer, records, contexts, eval_mode == "chat", max_new_tokens)
        if eval_mode == "chat":
            return evaluate_multiple_choice_chat(task, model, tokenizer, records, batch_size)
        return evaluate_multiple_choice(task, model, tokenizer, records, contexts, batch_size)

    metrics, items = evaluate(model)
    result = {"split": task_split, "num_fewshot": k, "n": len(records), "metrics": metrics}
    if other:
        other_metrics, other_items = evaluate(other["model"])
        result["compare"] = {"checkpoint": other["checkpoint"], "step": other["step"], "metrics": other_metrics,
                             "differences": paired_differences(items, other_items, metrics)}
        if save_items:
            result["compare"]["items"] = other_items
    if save_items:
        result["items"] = items
    return result


def main():
    t_start = time.time()
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise EvalError(f"tasks={tasks!r}: expected a comma-separated list of {', '.join(TASKS)}")
    entries = {task: task_entry(task) for task in task_list}
    if split not in ("test", "val", "train", "dev"):
        raise EvalError(f"split={split!r}: expected test, val, train or dev")
    if mode not in ("auto", "base", "chat"):
        raise EvalError(f"mode={mode!r}: expected auto, base or chat")
    if limit < 0 or batch_size < 1:
        raise EvalError("limit must be >= 0 and batch_size >= 1")
    if source and not os.path.isdir(source):
        raise EvalError(f"source={source!r} is not a folder; expected one laid out like prepare/sample")
    if compare and any(entry["kind"] not in ("holdout", "choice") for entry in entries.values()):
        others = [t for t, e in entries.items() if e["kind"] not in ("holdout", "choice")]
        raise EvalError(f"--compare scores a second checkpoint on the items of chat:NAME and multiple-choice "
                        f"tasks, not {', '.join(others)}; for those, evaluate each checkpoint and compare their "
                        "rows in eval_report.md")

    ckpt_path = ckpt or checkpoint_in(out_dir)
    run_device, _, run_dtype, autocast = setup_device(device, dtype, num_threads=num_threads)
    try:
        model, tokenizer, checkpoint = load_checkpoint(ckpt_path, run_device)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    other = None
    if compare:
        try:
            other_model, other_tokenizer, other_checkpoint = load_checkpoint(compare, run_device)
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(f"--compare: {e}") from None
        if other_tokenizer.sha256 != tokenizer.sha256:
            raise EvalError(f"--compare={compare}: its tokenizer is not {ckpt_path}'s; a paired comparison "
                            "scores both checkpoints on the same tokens")
        other = {"checkpoint": absolute_checkpoint_path(compare), "step": other_checkpoint.get("iter_num"),
                 "model": other_model}
    eval_mode = mode if mode != "auto" else ("chat" if checkpoint.get("data_format") == "chat" else "base")
    step = checkpoint.get("iter_num")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ckpt_path}: step {step}, {eval_mode} model, {n_params:,} parameters, max_seq_len "
          f"{model.args.max_seq_len}, device {run_device} ({run_dtype})", file=sys.stderr)

    results = {}
    for task, entry in entries.items():
        t0 = time.time()
        with autocast:
            if entry["kind"] == "bpb":
                results[task] = run_bpb(model, tokenizer, checkpoint)
            elif entry["kind"] == "holdout":
                results[task] = run_holdout(task, model, tokenizer, checkpoint, other)
            else:
                results[task] = run_task(task, model, tokenizer, eval_mode, other)
        if "skipped" in results[task]:
            print(f"{task}: skipped: {results[task]['skipped']}", file=sys.stderr)
        results[task]["seconds"] = round(time.time() - t0, 2)

    ran = [t for t in task_list if "metrics" in results[t]]
    if not ran:
        raise EvalError("no task could run: " + "; ".join(f"{t}: {results[t]['skipped']}" for t in task_list))
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    name = os.path.splitext(os.path.basename(ckpt_path))[0]
    prefix = checkpoint_prefix(ckpt_path)
    if prefix:  # an imported model (hf: or gguf:): its results go to out_dir, not into its folder
        folder = out_dir
        name = os.path.splitext(os.path.basename(os.path.normpath(ckpt_path[len(prefix):])))[0]
        name = prefix[:-1] + "_" + name
    # chat:NAME tasks score their source's holdout (val) whatever --split says
    split_label = "val" if all(t.startswith("chat:") for t in task_list) else split
    result_path = results_file or \
        os.path.join(folder, f"eval_{name}_step{step}_{eval_mode}_{split_label}.json")
    result = {"checkpoint": absolute_checkpoint_path(ckpt_path), "step": step,
              "tokens_seen": checkpoint.get("tokens_seen"), "mode": eval_mode, "split": split_label,
              "limit": limit,
              "num_fewshot": num_fewshot, "compare": other and other["checkpoint"],
              "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(time.time() - t_start, 2),
              "device": run_device, "results_file": os.path.abspath(result_path), "tasks": results}
    os.makedirs(os.path.dirname(os.path.abspath(result_path)), exist_ok=True)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)

    # the scores, as a table on stdout
    print(f"\n{'task':14s} {'metric':11s} {'score':>8s} {'stderr':>7s} {'95% interval':>17s} "
          f"{'random':>7s}  n")
    for task in task_list:
        if "metrics" not in results[task]:
            print(f"{task:14s} skipped: {results[task]['skipped']}")
            continue
        for metric, m in results[task]["metrics"].items():
            interval = f"[{format_value(metric, m['ci95'][0])}, {format_value(metric, m['ci95'][1])}]"
            mark = "" if m["above_baseline_99"] else "  (not above random at 99%)"
            print(f"{task:14s} {metric:11s} {format_value(metric, m['value']):>8s} "
                  f"{format_value(metric, m['stderr']):>7s} {interval:>17s} "
                  f"{format_value(metric, m['random_baseline']):>7s}  {m['n']}{mark}")
    # --compare: both checkpoints on the same items, and the mean of the per-item differences
    for task in task_list:
        c = results[task].get("compare")
        if not c:
            continue
        print(f"\n{task}: {ckpt_path} (this) vs {compare} (other) on the same {results[task]['n']} items")
        print(f"{'metric':11s} {'this':>8s} {'other':>8s}  difference, this - other (± standard error)")
        for metric, m in results[task]["metrics"].items():
            key = "log_perplexity" if metric == "perplexity" else metric
            d = c["differences"][key]
            print(f"{metric:11s} {format_value(metric, m['value']):>8s} "
                  f"{format_value(metric, c['metrics'][metric]['value']):>8s}  {format_difference(key, d)} "
                  f"(better on {d['better']}, worse on {d['worse']})")
    print(f"\nresults: {result_path} ({time.time() - t_start:.1f}s)")

    if report:
        os.makedirs(folder, exist_ok=True)  # out_dir, for an imported model, may not exist yet (a fresh clone)
        history_path = os.path.join(folder, "eval_history.jsonl")
        history = read_jsonl(history_path) if os.path.exists(history_path) else []
        row = summary(result)
        same = ("checkpoint", "step", "mode", "split", "limit", "num_fewshot")
        # evaluating the same checkpoint the same way again replaces its row
        history = [h for h in history if any(h.get(k) != row[k] for k in same)] + [row]
        with open(history_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        write_report(folder, history)
        print(f"report card: {os.path.join(folder, 'eval_report.md')} ({len(history)} rows), "
              f"{os.path.join(folder, 'eval_scores.png')}")


if __name__ == "__main__":
    configure(globals())
    try:
        main()
    except EvalError as e:
        fail(str(e))
