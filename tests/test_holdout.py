"""eval.py --tasks=chat:NAME: the held-out answers of a chat source scored (exact match, token F1, ROUGE-L
equal to the rouge-score package's, perplexity), two checkpoints compared on the same items, and bpb of the
answers."""

import importlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
from checkpoint import save_checkpoint
from conftest import prepare_chat_source, prepare_text_source, random_model, run_stage
from tokenizer import Tokenizer

ev = importlib.import_module("eval")  # eval.py (not the builtin): its functions, without running it

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = Tokenizer.byte_level()

# held-out conversations as prepare/chat.py renders them; each one's last answer is what gets scored
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a primary colour."},
     {"role": "assistant", "content": "Red"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "It is 42."}],
    [{"role": "user", "content": "What is 12*12?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                       {"type": "python", "text": "12*12"},
                                       {"type": "python_output", "text": "144"},
                                       {"type": "text", "text": " It is 144."}]}],
]
REFERENCES = ["Paris.", "Red", "It is 42.", "Let me compute. <<12*12=144>> It is 144."]


@pytest.fixture
def qa_dir(tmp_path):
    """data_dir with 'qa', a chat source whose val split holds CONVERSATIONS."""
    prepare_chat_source(tmp_path / "qa", {"train": CONVERSATIONS[:1], "val": CONVERSATIONS}, TOKENIZER)
    return tmp_path


class Oracle(nn.Module):
    """Answers each prompt with its reference answer (generate); gives every token the same probability."""

    def __init__(self, vocab_size, answers, max_seq_len=256):
        super().__init__()
        self.args = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.answers = answers  # prompt ids (tuple) -> answer ids

    def forward(self, tokens, targets=None, kv_cache=None, loss_reduction="mean"):
        logits = torch.zeros(*tokens.shape, self.args.vocab_size)
        loss = F.cross_entropy(logits.view(-1, self.args.vocab_size), targets.reshape(-1), ignore_index=-1,
                               reduction="none").view(tokens.shape)
        return logits, loss

    def generate(self, prompt, max_new_tokens, **kw):
        for token in self.answers[tuple(prompt)]:
            yield [token], [False]


def test_text_metrics_by_hand():
    assert ev.normalize_text("  The Cat, sat -- on A mat!") == "cat sat on mat"
    assert ev.exact_match("An apple.", "apple") == 1 and ev.exact_match("apples", "apple") == 0
    # "cat sat on mat" vs "cat on mat": 3 shared words, precision 3/4, recall 1
    assert ev.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert ev.token_f1("", "") == 1.0 and ev.token_f1("the", "cat") == 0.0
    assert ev.token_f1("dog", "cat") == 0.0
    assert ev.token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 / 1.5)  # repeats count once per match
    # ROUGE-L's textbook example: the LCS of these is "police the gunman", 3 of 4 words each way
    assert ev.rouge_l("police kill the gunman", "police killed the gunman") == 0.75
    assert ev.rouge_l("", "anything") == 0.0 and ev.rouge_l("A-B c", "a b C") == 1.0
    assert ev.longest_common_subsequence(list("ABCBDAB"), list("BDCABA")) == 4


def test_rouge_l_equals_the_rouge_score_package_on_200_real_pairs():
    fixture = json.loads((FIXTURES / "rouge_pairs.json").read_text(encoding="utf-8"))
    pairs = fixture["pairs"]
    assert len(pairs) == 200 and "CC BY-NC 4.0" in fixture["licence"]
    ours = [ev.rouge_l(p["prediction"], p["reference"]) for p in pairs]
    # the package's values recorded in the fixture; the package itself (test-only, .ci/run installs it) again
    assert ours == [p["rouge_score_f"] for p in pairs]
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert ours == [scorer.score(p["reference"], p["prediction"])["rougeL"].fmeasure for p in pairs]
    assert len({round(x, 3) for x in ours}) > 100  # the pairs are not all alike


@pytest.mark.parametrize("chat_format", ["nanollama", "chatml"])
def test_each_item_is_the_last_answer_prompted_as_chat_py_would(tmp_path, chat_format):
    tokenizer, conversations, references = TOKENIZER, CONVERSATIONS, REFERENCES
    if chat_format == "chatml":  # an imported model's format (SmolLM2's); no tool calls there
        specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
        tokenizer = Tokenizer(dict(TOKENIZER.mergeable_ranks), TOKENIZER.pattern, specials,
                              chat_format="chatml", bos_token="<|endoftext|>")
        conversations, references = CONVERSATIONS[:3], REFERENCES[:3]
    meta = prepare_chat_source(tmp_path / "qa", {"train": conversations, "val": conversations}, tokenizer)
    items, untrained = ev.read_holdout(str(tmp_path / "qa"), meta, tokenizer)
    assert untrained == 0 and [item["id"] for item in items] == list(range(len(conversations)))
    for item, messages, reference in zip(items, conversations, references):
        assert item["ids"][:item["answer_start"]].tolist() == tokenizer.render_for_completion(messages[:-1])
        answer = item["ids"][item["answer_start"]:].tolist()
        assert answer[-1] == tokenizer.assistant_end_id  # the end of the answer is part of it
        assert ev.render_reply(tokenizer, answer) == reference
    assert len(ev.read_holdout(str(tmp_path / "qa"), meta, tokenizer, limit=2)[0]) == 2


def test_an_answer_equal_to_the_reference_scores_100_and_a_uniform_model_has_perplexity_vocab_size(qa_dir):
    meta = json.loads((qa_dir / "qa" / "meta.json").read_text())
    items, _ = ev.read_holdout(str(qa_dir / "qa"), meta, TOKENIZER)
    answers = {tuple(item["ids"][:item["answer_start"]].tolist()): item["ids"][item["answer_start"]:].tolist()
               for item in items}
    oracle = Oracle(TOKENIZER.vocab_size, answers)
    scored = ev.score_holdout(oracle, TOKENIZER, items, "qa")
    assert [s["prediction"] for s in scored] == REFERENCES
    metrics = ev.holdout_metrics(scored, TOKENIZER.vocab_size)
    for metric in ("exact_match", "token_f1", "rouge_l"):
        assert metrics[metric]["value"] == 1.0 and metrics[metric]["above_baseline_99"]
    # every token has probability 1/vocab_size: the perplexity is the vocabulary's size, not above random
    assert metrics["perplexity"]["value"] == pytest.approx(TOKENIZER.vocab_size, rel=1e-5)
    assert not metrics["perplexity"]["above_baseline_99"]
    # the counted tokens: each last answer's trained ones, so the tool's output "144" and its markers are not
    plain = sum(len(r) + 1 for r in ["Paris.", "Red", "It is 42."])  # byte tokens + <|assistant_end|>
    with_tool = len("Let me compute. ") + 1 + len("12*12") + 1 + len(" It is 144.") + 1
    assert metrics["perplexity"]["tokens"] == plain + with_tool
    wrong = Oracle(TOKENIZER.vocab_size, {prompt: TOKENIZER.encode("Bananas")
                                          + [TOKENIZER.assistant_end_id] for prompt in answers})
    assert ev.holdout_metrics(ev.score_holdout(wrong, TOKENIZER, items, "qa"), 267)["rouge_l"]["value"] == 0.0


def test_greedy_answers_and_perplexity_match_the_engine_and_a_forward_pass_by_hand(qa_dir, monkeypatch):
    monkeypatch.setattr(ev, "max_new_tokens", 24)
    meta = json.loads((qa_dir / "qa" / "meta.json").read_text())
    items, _ = ev.read_holdout(str(qa_dir / "qa"), meta, TOKENIZER)
    model = random_model(vocab_size=TOKENIZER.vocab_size, max_seq_len=128)
    scored = ev.score_holdout(model, TOKENIZER, items, "qa")
    for item, s, messages in zip(items, scored, CONVERSATIONS):
        # the answer chat.py would give: engine.py's greedy reply, calculator on
        _, ids = engine.generate_reply(model, TOKENIZER, messages[:-1], max_new_tokens=24, temperature=0.0,
                                       tools=True)
        assert s["prediction"] == ev.render_reply(TOKENIZER, ids)
        # perplexity: one forward pass, the last answer's trained tokens (tool output left out)
        ids, mask = torch.tensor(item["ids"]), torch.tensor(item["mask"])
        with torch.no_grad():
            logits, _ = model(ids[None, :-1])
        nll = -torch.log_softmax(logits[0], dim=-1).gather(-1, ids[1:, None])[:, 0]
        counted = mask[1:].bool() & (torch.arange(1, len(ids)) >= item["answer_start"])
        assert s["answer_tokens"] == int(counted.sum())
        assert s["perplexity"] == pytest.approx(math.exp(float(nll[counted].mean())), rel=1e-4)


def test_paired_difference_of_a_checkpoint_with_itself_is_zero_and_otherwise_the_mean_of_item_differences():
    a = [{"exact_match": e, "token_f1": f, "rouge_l": r, "answer_nats": n, "answer_tokens": t}
         for e, f, r, n, t in [(1, 1.0, 1.0, 2.0, 4), (0, 0.5, 0.4, 9.0, 3), (0, 0.0, 0.2, 7.0, 5)]]
    b = [{**x, "exact_match": 0, "rouge_l": x["rouge_l"] / 2, "answer_nats": x["answer_nats"] + 1.2}
         for x in a]
    holdout = ("exact_match", "token_f1", "rouge_l", "perplexity")
    same = ev.paired_differences(a, a, holdout)
    assert all(d["value"] == 0 and d["stderr"] == 0 and d["better"] == d["worse"] == 0 for d in same.values())
    d = ev.paired_differences(a, b, holdout)
    assert d["exact_match"]["value"] == pytest.approx(1 / 3) and d["exact_match"]["better"] == 1
    diffs = [0.5, 0.2, 0.1]  # rouge_l: the mean of the per-item differences, stderr = sample std / sqrt(n)
    mean = sum(diffs) / 3
    assert d["rouge_l"]["value"] == pytest.approx(mean)
    assert d["rouge_l"]["stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2 / 3))
    # 1.2 nats less on each answer: log-perplexity lower by 3 * 1.2 / 12 tokens
    assert d["log_perplexity"]["value"] == pytest.approx(-0.3) and d["log_perplexity"]["better"] == 3
    assert d["log_perplexity"]["perplexity_ratio"] == pytest.approx(math.exp(-0.3))


def test_bpb_on_chat_data_counts_the_answers(qa_dir, monkeypatch):
    monkeypatch.setattr(ev, "data_dir", str(qa_dir))
    monkeypatch.setattr(ev, "bpb_data", "qa")
    checkpoint = {"config": {}}
    uniform = Oracle(TOKENIZER.vocab_size, {})
    result = ev.run_bpb(uniform, TOKENIZER, checkpoint)
    bpb = result["metrics"]["bpb"]
    # every trained token of every answer (earlier ones and end-of-turn tokens too), over the answers' bytes
    answer_texts = ["Paris.", "Red", "Hello! How can I help?", "It is 42.",
                    "Let me compute. 12*12 It is 144."]
    assert bpb["bytes"] == sum(len(t.encode()) for t in answer_texts)
    assert bpb["tokens"] == bpb["bytes"] + 5 + 2  # byte tokens + 5 <|assistant_end|> + <|python_start/end|>
    assert bpb["value"] == pytest.approx(math.log2(TOKENIZER.vocab_size) * bpb["tokens"] / bpb["bytes"])
    assert bpb["value"] == pytest.approx(bpb["random_baseline"])


def test_sources_without_holdout_are_skipped_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "data_dir", str(tmp_path))
    prepare_chat_source(tmp_path / "no_val", {"train": CONVERSATIONS, "val": []}, TOKENIZER)
    prepare_text_source(tmp_path / "text", "Some text.\n" * 50, TOKENIZER)
    model = random_model(vocab_size=TOKENIZER.vocab_size)
    skipped = ev.run_holdout("chat:no_val", model, TOKENIZER, {})["skipped"]
    assert "no held-out conversations: prepare it with --val_fraction" in skipped
    skipped = ev.run_holdout("chat:text", model, TOKENIZER, {})["skipped"]
    assert "is text data" in skipped and "--tasks=bpb --bpb_data=text" in skipped
    assert "not found" in ev.run_holdout("chat:missing", model, TOKENIZER, {})["skipped"]
    with pytest.raises(ev.EvalError, match="unknown task 'chat:'; .* or chat:NAME"):
        ev.task_entry("chat:")


def base_and_fine_tuned_checkpoints(tmp_path, max_seq_len, config=None):
    """Two random chat checkpoints, tmp_path/base/best.pt (step 10) and tmp_path/ft/best.pt (step 20)."""
    paths = {}
    for name, seed in (("base", 1), ("ft", 2)):
        model = random_model(seed=seed, vocab_size=TOKENIZER.vocab_size, max_seq_len=max_seq_len)
        paths[name] = tmp_path / name / "best.pt"
        save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(),
                         "tokenizer": TOKENIZER.to_json(), "data_format": "chat", "iter_num": seed * 10,
                         **({"config": config} if config else {})}, str(paths[name]))
    return paths


def test_eval_cli_compares_two_checkpoints_on_the_same_items(qa_dir, tmp_path):
    paths = base_and_fine_tuned_checkpoints(tmp_path, 128, config={"data_dir": str(qa_dir)})
    result = run_stage("eval.py", f"--ckpt={paths['ft']}", "--tasks=chat:qa", f"--compare={paths['base']}",
                       "--limit=3", "--max_new_tokens=12", "--num_threads=1")
    assert "chat:qa: " in result.stdout and "difference, this - other" in result.stdout
    saved = json.loads((tmp_path / "ft" / "eval_best_step20_chat_val.json").read_text())  # the holdout: val
    assert saved["split"] == "val"
    task = saved["tasks"]["chat:qa"]
    assert task["n"] == 3 and [item["reference"] for item in task["items"]] == REFERENCES[:3]
    assert task["compare"]["checkpoint"] == str(paths["base"]) and task["compare"]["step"] == 10
    for metric in ("exact_match", "token_f1", "rouge_l"):
        per_item = [a[metric] - b[metric] for a, b in zip(task["items"], task["compare"]["items"])]
        assert task["compare"]["differences"][metric]["value"] == pytest.approx(sum(per_item) / 3)
        assert task["metrics"][metric]["value"] == pytest.approx(sum(a[metric] for a in task["items"]) / 3)
    ratio = task["metrics"]["perplexity"]["value"] / task["compare"]["metrics"]["perplexity"]["value"]
    assert task["compare"]["differences"]["log_perplexity"]["perplexity_ratio"] == pytest.approx(ratio)
    report = (tmp_path / "ft" / "eval_report.md").read_text()
    assert "chat:qa rouge_l" in report and "chat:qa perplexity" in report
    assert f"best.pt (step 20) vs {paths['base']} (step 10), chat:qa, 3 items: exact_match" in report
    # --compare pairs items of chat:NAME and multiple-choice tasks, not generated maths or bpb
    bad = run_stage("eval.py", f"--ckpt={paths['ft']}", "--tasks=arc_easy,gsm8k,chat:qa,bpb",
                    f"--compare={paths['base']}", check=False)
    assert bad.returncode == 1 and "multiple-choice tasks, not gsm8k, bpb" in bad.stderr


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_eval_cli_compares_two_checkpoints_on_the_same_multiple_choice_questions(tmp_path, mode):
    paths = base_and_fine_tuned_checkpoints(tmp_path, 256)
    run_stage("eval.py", f"--ckpt={paths['ft']}", "--tasks=arc_easy", f"--compare={paths['base']}",
              "--source=prepare/sample", "--split=val", "--limit=12", f"--mode={mode}", "--num_threads=1")
    task = json.loads((tmp_path / "ft" / f"eval_best_step20_{mode}_val.json").read_text())["tasks"]["arc_easy"]
    other = task["compare"]
    assert other["step"] == 10 and len(other["items"]) == len(task["items"]) == 12
    assert [a["id"] for a in task["items"]] == [b["id"] for b in other["items"]]
    for metric in ("acc", "acc_norm") if mode == "base" else ("acc",):
        key = "pred" if metric == "acc" else "pred_norm"
        this_right = [int(item[key] == item["answer"]) for item in task["items"]]
        other_right = [int(item[key] == item["answer"]) for item in other["items"]]
        assert task["metrics"][metric]["correct"] == sum(this_right)
        assert other["metrics"][metric]["correct"] == sum(other_right)
        d = other["differences"][metric]
        assert d["value"] == pytest.approx((sum(this_right) - sum(other_right)) / 12)
        assert d["better"] == sum(a > b for a, b in zip(this_right, other_right))
        assert d["worse"] == sum(a < b for a, b in zip(this_right, other_right))
    # the same checkpoint on both sides: nothing differs
    run_stage("eval.py", f"--ckpt={paths['ft']}", "--tasks=arc_easy", f"--compare={paths['ft']}",
              "--source=prepare/sample", "--split=val", "--limit=12", f"--mode={mode}", "--num_threads=1",
              f"--results_file={tmp_path / 'self.json'}")
    same = json.loads((tmp_path / "self.json").read_text())["tasks"]["arc_easy"]["compare"]["differences"]
    assert all(d["value"] == 0 and d["better"] == d["worse"] == 0 for d in same.values())


def test_report_card_has_a_holdout_row_and_sfts_paired_change(tmp_path):
    import report
    (tmp_path / "eval").mkdir()
    rouge = {"base": [0.1, 0.2, 0.0, 0.3], "sft": [0.5, 0.2, 0.4, 0.2]}
    for name, values in rouge.items():
        items = [{"id": i, "exact_match": 0, "token_f1": r, "rouge_l": r, "answer_nats": 5.0,
                  "answer_tokens": 4} for i, r in enumerate(values)]
        task = {"n": 4, "metrics": ev.holdout_metrics(items, 267), "items": items}
        result = {"mode": "chat", "tasks": {"chat:qa": task}}
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(result))
    markdown, figures = report.build_report(str(tmp_path))
    assert "| chat:qa rouge_l (%) | 15.0 ± 6.5 | 32.5 ± 7.5 | 0.0 | 4 |" in markdown
    # the same 4 conversations: differences 0.4, 0, 0.4, -0.1
    change = figures["holdout_change"]["chat:qa"]
    assert change["difference"] == pytest.approx(0.175) and (change["better"], change["worse"]) == (2, 1)
    assert ("SFT's change in ROUGE-L on the conversations held out of qa, the same 4 answers: "
            "**+17.5 ± 13.1 points**") in markdown
