"""eval.py: lm-evaluation-harness-style scoring on forced models, GSM8K answers, the real task files, end to end."""

import importlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import SAMPLE_DATA, TINY_TRAIN, random_model, run_stage
from tokenizer import Tokenizer

ev = importlib.import_module("eval")  # eval.py (not the builtin): its functions, without running it


class ForcedModel(nn.Module):
    """Logits that prefer a fixed set of token ids at every position: 0 for them, -8 for every other token."""

    def __init__(self, vocab_size, preferred_ids, max_seq_len=512):
        super().__init__()
        self.args = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.bias = torch.full((vocab_size,), -8.0)
        self.bias[list(preferred_ids)] = 0.0

    def forward(self, tokens, targets=None, kv_cache=None, loss_reduction="mean"):
        return self.bias.expand(*tokens.shape, -1).clone(), None


def byte_ids(tokenizer, chars):
    return {tokenizer.encode(c)[0] for c in chars}


# a hand-made set: every right choice is written with the letters a, b, c; every wrong one with x, y, z
HAND_MADE = [
    {"id": "1", "question": "First?", "choices": ["abc", "xyz", "zzyx"], "answer": 0},
    {"id": "2", "question": "Second?", "choices": ["xx", "yz", "cab", "z"], "answer": 2},
    {"id": "3", "question": "Third?", "choices": ["zyxzyx", "bb"], "answer": 1},
    {"id": "4", "question": "Fourth?", "choices": ["y", "x", "z", "aaaa"], "answer": 3},
]


def evaluate_hand_made(model, tokenizer, task="arc_easy", records=HAND_MADE):
    contexts = ev.fewshot_contexts(task, records, [], 0, 1234, False)
    metrics, items = ev.evaluate_multiple_choice(task, model, tokenizer, records, contexts, batch_size=3)
    return metrics, items


def test_forced_model_scores_100_and_0():
    tokenizer = Tokenizer.byte_level()
    right = ForcedModel(tokenizer.vocab_size, byte_ids(tokenizer, " abc"))
    metrics, items = evaluate_hand_made(right, tokenizer)
    assert metrics["acc"]["value"] == 1.0 and metrics["acc_norm"]["value"] == 1.0
    assert [i["pred"] for i in items] == [r["answer"] for r in HAND_MADE]
    wrong = ForcedModel(tokenizer.vocab_size, byte_ids(tokenizer, " xyz"))
    metrics, _ = evaluate_hand_made(wrong, tokenizer)
    assert metrics["acc"]["value"] == 0.0 and metrics["acc_norm"]["value"] == 0.0
    # each choice's log-likelihood is the sum over its tokens: " abc" is 4 preferred tokens (log-prob ~0 each)
    log_z = math.log(4 + (tokenizer.vocab_size - 4) * math.exp(-8.0))
    assert items[0]["loglikelihoods"][0] == pytest.approx(-4 * log_z, abs=1e-3)


def test_acc_norm_differs_from_acc_where_lengths_differ():
    # a model that knows nothing: every token costs log(vocab), so acc picks the shortest choice and acc_norm
    # (log-likelihood per character) the longest
    tokenizer = Tokenizer.byte_level()
    uniform = ForcedModel(tokenizer.vocab_size, range(tokenizer.vocab_size))
    records = [{"id": "1", "question": "Q?", "choices": ["a", "a long answer"], "answer": 1},
               {"id": "2", "question": "Q?", "choices": ["another long one", "no"], "answer": 0}]
    metrics, items = evaluate_hand_made(uniform, tokenizer, records=records)
    assert metrics["acc"]["value"] == 0.0 and metrics["acc_norm"]["value"] == 1.0
    assert ev.pick_answers([-2.0, -3.0], ["a", "abcdef"]) == (0, 1)


def test_batched_scores_equal_one_at_a_time_and_long_inputs_are_cut_on_the_left():
    tokenizer = Tokenizer.byte_level()
    model = random_model(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    records = ev.load_records("arc_easy", "val", "", str(SAMPLE_DATA))[:6]  # prompts longer than 64 bytes
    contexts = ev.fewshot_contexts("arc_easy", records, [], 0, 1234, False)
    requests = [ev.encode_pair(tokenizer, c, " " + choice) for r, c in zip(records, contexts) for choice in r["choices"]]
    assert any(len(a) + len(b) > 65 for a, b in requests)
    one_by_one = ev.continuation_logprobs(model, requests, batch_size=1)
    batched = ev.continuation_logprobs(model, requests, batch_size=7)
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    # by hand for one request: the last 65 tokens, logits of all but the last, log-probs of the continuation
    context, continuation = requests[0]
    whole = (context + continuation)[-65:]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = torch.log_softmax(logits[0], dim=-1)
    n = len(continuation)
    expected = sum(float(logprobs[len(whole) - 1 - n + j, t]) for j, t in enumerate(whole[-n:]))
    assert one_by_one[0] == pytest.approx(expected, abs=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tokenizer = Tokenizer.byte_level()
    context, continuation = ev.encode_pair(tokenizer, "Question: hi\nAnswer: ", "yes")
    assert context[0] == tokenizer.bos_id
    assert tokenizer.decode(context[1:]) == "Question: hi\nAnswer:" and tokenizer.decode(continuation) == " yes"


def test_chat_letters_forced_to_the_right_and_wrong_letter():
    tokenizer = Tokenizer.byte_level()
    records = [{"id": str(i), "question": f"Question {i}?", "choices": ["one", "two", "three"], "answer": 0}
               for i in range(5)]
    prefers_a = ForcedModel(tokenizer.vocab_size, byte_ids(tokenizer, "A"))
    metrics, items = ev.evaluate_multiple_choice_chat("arc_easy", prefers_a, tokenizer, records, batch_size=2)
    assert metrics["acc"]["value"] == 1.0 and {i["pred"] for i in items} == {0}
    prefers_c = ForcedModel(tokenizer.vocab_size, byte_ids(tokenizer, "C"))
    metrics, _ = ev.evaluate_multiple_choice_chat("arc_easy", prefers_c, tokenizer, records, batch_size=2)
    assert metrics["acc"]["value"] == 0.0
    # a letter past the last choice is never picked: with two choices, a model preferring C answers A or B
    two = [{**r, "choices": ["one", "two"]} for r in records]
    assert set(ev.letter_predictions(prefers_c, tokenizer, two, batch_size=2)) <= {0, 1}


def test_gsm8k_extractor_returns_the_gold_number_of_every_real_solution():
    records = ev.load_records("gsm8k", "train", "", str(SAMPLE_DATA))
    assert len(records) == 300  # the sample's MANIFEST.md
    for r in records:
        gold = ev.normalize_answer(r["answer"])
        assert ev.extract_answer_strict(r["solution"]) == gold, r["id"]
        assert ev.extract_answer_flexible(r["solution"]) == gold, r["id"]
    assert ev.extract_answer_flexible("She pays $1,234.") == "1234"
    assert ev.extract_answer_strict("so #### -5\nQuestion") == "-5"
    assert ev.extract_answer_strict("the answer is 5") is None and ev.extract_answer_flexible("no number") is None


@pytest.mark.parametrize("task,split,count", [("openbookqa", "val", 300), ("openbookqa", "train", 300),
                                              ("arc_easy", "val", 300), ("arc_challenge", "val", 299),
                                              ("mmlu", "test", 3 * 57), ("mmlu", "dev", 285),
                                              ("hellaswag", "val", 100), ("gsm8k", "train", 300)])
def test_each_task_loader_reads_its_real_file(task, split, count):
    records = ev.load_records(task, split, "", str(SAMPLE_DATA))
    assert len(records) == count
    ev.check_records(task, records, task)
    prompt = ev.fewshot_contexts(task, records[:1], [], 0, 1234, False)[0]
    if task in ("arc_easy", "arc_challenge", "gsm8k"):
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
    if task == "mmlu":
        assert prompt.startswith("The following are multiple choice questions (with answers) about ")
        assert "\nA. " in prompt and "\nD. " in prompt and prompt.endswith("\nAnswer:")
        assert len(ev.first_items(task, records, 2)) == 2 * 57  # --limit is per subject, as in lm-eval


def test_fewshot_examples_are_seeded_and_never_the_question_itself():
    records = ev.load_records("gsm8k", "train", "", str(SAMPLE_DATA))[:50]
    first = ev.fewshot_contexts("gsm8k", records, records, 5, 1234, True)
    assert first == ev.fewshot_contexts("gsm8k", records, records, 5, 1234, True)
    assert first != ev.fewshot_contexts("gsm8k", records, records, 5, 99, True)
    for record, context in zip(records, first):
        assert context.count("Question: ") == 6 and context.count(record["question"]) == 1
    dev = ev.load_records("mmlu", "dev", "", str(SAMPLE_DATA))
    test = ev.load_records("mmlu", "test", "", str(SAMPLE_DATA))[:1]
    context = ev.fewshot_contexts("mmlu", test, dev, 2, 1234, False)[0]
    same_subject = [r for r in dev if r["subject"] == test[0]["subject"]]
    assert context.index(same_subject[0]["question"].strip()) < context.index(same_subject[1]["question"].strip())


def test_a_missing_task_file_or_folder_is_named_with_what_to_do(tmp_path):
    with pytest.raises(ev.SplitMissing) as missing:  # eval.py skips the task with this message
        ev.load_records("arc_easy", "val", str(tmp_path), "")
    path = tmp_path / "arc_easy" / "val.jsonl"
    assert f"{path} not found (python prepare/tasks.py --tasks=arc_easy" in str(missing.value)
    with pytest.raises(ev.EvalError, match="nothing: no such folder; --source expects a folder laid out like"):
        ev.load_records("arc_easy", "val", "", str(tmp_path / "nothing"))
    (tmp_path / "arc_easy").mkdir()  # a copy without that split
    with pytest.raises(ev.SplitMissing) as missing:
        ev.load_records("arc_easy", "val", "", str(tmp_path))
    assert f"no val split of arc_easy in {tmp_path}" in str(missing.value)


def test_statistics():
    score = ev.proportion_score([1, 1, 0, 0], [0.25] * 4)
    assert score["value"] == 0.5 and score["stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    assert score["ci95"][0] < 0.5 < score["ci95"][1] and not score["above_baseline_99"]
    assert ev.proportion_score([1] * 10, [0.25] * 10)["above_baseline_99"]  # p = 0.25^10
    assert not ev.proportion_score([1] * 3 + [0] * 7, [0.25] * 10)["above_baseline_99"]
    assert ev.chance_tail(2, [0.5, 0.5]) == pytest.approx(0.25)
    assert ev.chance_tail(1, [0.5, 0.25]) == pytest.approx(1 - 0.5 * 0.75)


def test_end_to_end_on_a_tiny_checkpoint(data_dir, tmp_path):
    out = tmp_path / "out"
    run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=10",
              "--eval_interval=10")
    common = [f"--source={SAMPLE_DATA}", "--num_threads=1", "--max_new_tokens=8"]
    # the README's spaced form, multiple choice and bpb
    result = run_stage("eval.py", "--ckpt", out / "best.pt", "--tasks", "arc_easy,mmlu,hellaswag,gsm8k,bpb",
                       "--split", "val", "--limit", "3", *common)
    assert "gsm8k: skipped" in result.stderr  # no GSM8K val split in the sample
    assert "\r" not in result.stderr  # progress written to a file (not a terminal) is whole lines
    saved = json.loads((out / "eval_best_step10_base_val.json").read_text())
    assert saved["tasks"]["mmlu"]["n"] == 3 * 57 and saved["tasks"]["hellaswag"]["n"] == 3
    for metric in ("acc", "acc_norm"):
        score = saved["tasks"]["arc_easy"]["metrics"][metric]
        assert 0 <= score["value"] <= 1 and score["random_baseline"] == 0.25 and "ci95" in score
    bpb = saved["tasks"]["bpb"]["metrics"]["bpb"]
    assert 0 < bpb["value"] < bpb["random_baseline"]  # below log2(512) bits per token
    # GSM8K 5-shot (few-shot examples from train), and a chat-mode run, each adding a row
    run_stage("eval.py", f"--ckpt={out / 'best.pt'}", "--tasks=gsm8k,openbookqa", "--split=train", "--limit=2", *common)
    saved = json.loads((out / "eval_best_step10_base_train.json").read_text())
    assert saved["tasks"]["gsm8k"]["num_fewshot"] == 5 and len(saved["tasks"]["gsm8k"]["items"]) == 2
    run_stage("eval.py", f"--ckpt={out / 'best.pt'}", "--tasks=arc_easy,gsm8k", "--split=train", "--limit=2",
              "--mode=chat", *common)
    report = (out / "eval_report.md").read_text()
    assert report.count("| best.pt | 10 |") == 3 and "arc_easy acc_norm" in report and "gsm8k strict" in report
    assert (out / "eval_scores.png").stat().st_size > 1000
    assert len((out / "eval_history.jsonl").read_text().splitlines()) == 3
    # a bad task name is a clear error, not a traceback
    bad = run_stage("eval.py", f"--ckpt={out / 'best.pt'}", "--tasks=arc_eazy", check=False)
    assert bad.returncode == 1 and "arc_eazy" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("line, expected", [
    ('["First?", ["abc", "xyz"], 0]', "an array; expected a JSON object"),
    ('"First?"', "a string; expected a JSON object"),
    ('{"id": "7", "question": "First?", "choices": ["abc", 3], "answer": 0}', "record (id 7): expected"),
    ('{"id": "8", "question": "First?", "choices": ["abc", "xyz"]}', "record (id 8): expected"),
    ('{"id": "9", "choices": ["abc", "xyz"], "answer": 1}', "record (id 9): expected"),
])
def test_a_bad_task_record_is_one_line_naming_file_and_line(tmp_path, line, expected):
    folder = tmp_path / "arc_easy"
    folder.mkdir()
    good = json.dumps(HAND_MADE[0])
    (folder / "val.jsonl").write_text(f"{good}\n\n{line}\n{good}\n")  # the bad record is on line 3
    with pytest.raises(ev.EvalError) as error:
        ev.load_records("arc_easy", "val", str(tmp_path), "")
    message = str(error.value)
    assert message.startswith(f"{folder / 'val.jsonl'}:3: {expected}") and "\n" not in message
    assert '"choices": [str, ...]' in message


def test_a_bad_gsm8k_record_names_its_line(tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": 4}\n')
    with pytest.raises(ev.EvalError, match=r"gsm8k/test.jsonl:2: record \(id \?\): expected \{\"question\": str"):
        ev.load_records("gsm8k", "test", str(tmp_path), "")
