"""RL on verifiable rewards (rl.py) and the synthetic arithmetic task (prepare/arithmetic.py)."""

import json
import random

import pytest
import torch

from conftest import prepare_chat_source, random_model, read_log, run_stage
from engine import calculator
from prepare.arithmetic import conversation, generate_problems
from rl import compute_advantages, policy_gradient_terms, reply_text, rollout_tensors, score_reply
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer():
    return Tokenizer.byte_level()


def test_advantages_are_reward_minus_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    advantages = compute_advantages(rewards)
    assert torch.allclose(advantages, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]))
    normalized = compute_advantages(rewards, normalize=True)
    assert torch.allclose(normalized[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.equal(normalized[1], torch.zeros(4))  # all equal: no signal, and no NaN from a zero std
    assert torch.allclose(normalized[2], advantages[2] / advantages[2].pow(2).mean().sqrt(), atol=1e-4)
    assert torch.allclose(normalized.sum(dim=1), torch.zeros(3), atol=1e-5)


def reply_with_tool_call(tokenizer, expression, output, text):
    """A reply as the engine yields it: the tool call and text sampled, the tool's output forced."""
    sp = tokenizer.special
    sampled = [sp("<|python_start|>")] + tokenizer.encode(expression) + [sp("<|python_end|>")]
    forced = [sp("<|output_start|>")] + tokenizer.encode(output) + [sp("<|output_end|>")]
    ending = tokenizer.encode(text) + [sp("<|assistant_end|>")]
    return sampled + forced + ending, [False] * len(sampled) + [True] * len(forced) + [False] * len(ending)


def test_loss_touches_only_sampled_reply_tokens(byte_tokenizer):
    tok = byte_tokenizer
    prompt = tok.render_for_completion([{"role": "user", "content": "What is 12 + 30?"}])
    short_reply = tok.encode("#### 7") + [tok.special("<|assistant_end|>")]
    replies = [reply_with_tool_call(tok, "12+30", "42", "#### 42"), (short_reply, [False] * len(short_reply))]
    x, targets = rollout_tensors(prompt, replies, pad_id=tok.bos_id)
    for k, (tokens, forced) in enumerate(replies):
        expected = torch.full((x.shape[1],), -1)
        for j, (token, was_forced) in enumerate(zip(tokens, forced)):
            if not was_forced:
                expected[len(prompt) + j - 1] = token
        assert torch.equal(targets[k], expected)
        assert x[k, :len(prompt)].tolist() == prompt  # the inputs are the real sequence
    assert (targets[:, :len(prompt) - 1] == -1).all()  # nothing inside the prompt is learned
    assert (targets[1, len(prompt) + 6:] == -1).all()  # nor the padding after the short reply

    # the gradient reaches the logits only at the positions that predict sampled tokens
    model = random_model(vocab_size=tok.vocab_size, max_seq_len=128).train()
    captured = {}
    model.output.register_forward_hook(lambda module, inputs, out: captured.update(logits=out) or out.retain_grad())
    pg, _ = policy_gradient_terms(model, x, targets, torch.tensor([1.0, -1.0]))
    pg.backward()
    # (model.forward runs the output layer at those positions alone) and at every one of them
    assert captured["logits"].shape[0] == int((targets != -1).sum())
    assert (captured["logits"].grad.abs().sum(dim=-1) > 0).all()
    assert (targets != -1).sum() == sum(not f for _, forced in replies for f in forced)


def test_kl_to_the_reference_is_zero_for_the_same_model_and_positive_otherwise(byte_tokenizer):
    tok = byte_tokenizer
    prompt = tok.render_for_completion([{"role": "user", "content": "Hi"}])
    x, targets = rollout_tensors(prompt, [reply_with_tool_call(tok, "1+1", "2", "#### 2")])
    model, same, other = (random_model(seed=s, vocab_size=tok.vocab_size, max_seq_len=128) for s in (0, 0, 1))
    _, kl_same = policy_gradient_terms(model, x, targets, torch.zeros(1), ref_model=same)
    _, kl_other = policy_gradient_terms(model, x, targets, torch.zeros(1), ref_model=other)
    assert kl_same.item() == pytest.approx(0.0, abs=1e-5)
    assert kl_other.item() > 0.1


def test_reward_reads_the_models_text_not_the_tool_output(byte_tokenizer):
    tok = byte_tokenizer
    right, _ = reply_with_tool_call(tok, "12+30", "42", "#### 42")
    wrong, _ = reply_with_tool_call(tok, "12+30", "42", "#### 41")
    unanswered, _ = reply_with_tool_call(tok, "12+30", "42", "done")  # 42 appears only in the tool output
    assert reply_text(tok, right) == "#### 42"
    assert score_reply(tok, right, "42") == (1.0, True)
    assert score_reply(tok, right, "42", format_bonus=0.5) == (1.5, True)
    assert score_reply(tok, wrong, "42", format_bonus=0.5) == (0.5, False)
    assert score_reply(tok, unanswered, "42", format_bonus=0.5) == (0.0, False)
    assert score_reply(tok, tok.encode("The answer is 1,800."), "1800") == (1.0, True)  # no '####': the last number


def test_arithmetic_problems_are_right_and_their_replies_earn_the_reward(byte_tokenizer):
    problems = generate_problems(300, random.Random(0), set())
    assert len({p["question"] for p in problems}) == 300
    for p in problems:
        value = None
        for expression, step_value in p["steps"]:
            assert calculator(expression) == str(step_value)  # every step is what the engine's calculator says
            value = step_value
        assert p["answer"] == str(value) and value >= 0
    assert {len(p["steps"]) for p in problems} == {1, 2}
    for p in problems[:20]:
        ids, mask = byte_tokenizer.render_conversation(conversation(p))
        start = ids.index(byte_tokenizer.special("<|assistant_start|>")) + 1
        assert score_reply(byte_tokenizer, ids[start:], p["answer"]) == (1.0, True)
        # the tool's output is given, not learned: its tokens carry mask 0
        output_start = ids.index(byte_tokenizer.special("<|output_start|>"))
        output_end = ids.index(byte_tokenizer.special("<|output_end|>"))
        assert mask[output_start:output_end + 1] == [0] * (output_end - output_start + 1)


def test_prepare_arithmetic_writes_problems_and_chat_data(tmp_path):
    out = tmp_path / "arith"
    run_stage("prepare/arithmetic.py", "--out", out, "--n_train", 300, "--n_val", 30, "--n_test", 50, "--vocab_size", 300)
    splits = {s: [json.loads(line) for line in open(out / f"{s}.jsonl")] for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 30, 50]
    assert not {p["question"] for p in splits["test"]} & {p["question"] for p in splits["train"] + splits["val"]}
    assert set(splits["test"][0]) == {"id", "question", "answer", "solution"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "chat" and meta["splits"]["train"]["documents"] == 300
    assert (out / "train.mask.bin").stat().st_size == meta["splits"]["train"]["tokens"]


# ----------------------------------------------------------------------------------------------------
# the whole loop: a toy task whose reward a tiny model can learn in a few dozen steps

DIGITS_SFT = ["--dim=64", "--n_layers=2", "--n_heads=4", "--block_size=32", "--batch_size=16", "--max_iters=60",
              "--eval_interval=60", "--eval_iters=2", "--log_interval=10", "--warmup_iters=5", "--learning_rate=3e-3",
              "--num_threads=1", "--data=digits"]
TOY_RL = ["--num_prompts=4", "--num_samples=8", "--max_new_tokens=8", "--eval_problems=16", "--eval_samples=4",
          "--learning_rate=3e-3", "--warmup_iters=0", "--decay_lr=False", "--num_threads=1", "--log_interval=1"]


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory, byte_tokenizer):
    """A tiny chat model SFT'd to answer '#### <random digit>' to 'Pick a digit.', and a task whose answer
    is always 7: it starts near 10% right and RL alone must find out which digit pays."""
    root = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    questions = ["Pick a digit.", "Pick a digit, please.", "Give me a digit.", "Say a digit."]
    chats = {split: [[{"role": "user", "content": rng.choice(questions)},
                      {"role": "assistant", "content": f"#### {rng.randrange(10)}"}] for _ in range(n)]
             for split, n in (("train", 400), ("val", 20))}
    prepare_chat_source(root / "data" / "digits", chats, byte_tokenizer, name="digits")
    run_stage("train.py", *DIGITS_SFT, f"--data_dir={root / 'data'}", f"--out_dir={root / 'sft'}")
    (root / "task").mkdir()
    for split in ("train", "test"):
        with open(root / "task" / f"{split}.jsonl", "w") as f:
            for i, q in enumerate(questions * 4):
                f.write(json.dumps({"id": f"{split}/{i}", "question": q, "answer": "7"}) + "\n")
    return root


def test_mean_reward_rises_on_a_toy_task(toy_task, tmp_path):
    out = tmp_path / "rl"
    result = run_stage("rl.py", *TOY_RL, f"--init_from={toy_task / 'sft' / 'ckpt.pt'}", f"--task_dir={toy_task / 'task'}",
                       f"--out_dir={out}", "--max_iters=40", "--eval_interval=40")
    steps, evals = read_log(out), read_log(out, "eval")
    first, last = [s["mean_reward"] for s in steps[:10]], [s["mean_reward"] for s in steps[-10:]]
    assert sum(first) / 10 < 0.35  # it starts near chance (1 in 10)
    assert sum(last) / 10 > sum(first) / 10 + 0.3, result.stdout[-2000:]
    assert evals[-1]["pass_at_1"] > evals[0]["pass_at_1"] + 0.3
    assert evals[0]["n_problems"] == 16 and evals[-1]["iter"] == 40
    # not on a terminal, evaluation progress is whole lines (common.Progress), no carriage returns in logs
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert any(line.startswith("  evaluating: 16/16 problems, greedy accuracy so far")
               for line in result.stderr.splitlines())
    assert (out / "reward.png").stat().st_size > 0
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["data_format"] == "chat" and checkpoint["iter_num"] == 40
    assert {"model_args", "model", "tokenizer", "tokenizer_sha256", "config", "optimizer"} <= set(checkpoint)


def test_resume_continues_exactly(toy_task, tmp_path):
    common = [*TOY_RL, f"--task_dir={toy_task / 'task'}", "--max_iters=6", "--eval_interval=3", "--eval_samples=0",
              "--eval_problems=4", "--kl_coef=0.1"]
    sft = f"--init_from={toy_task / 'sft' / 'ckpt.pt'}"
    run_stage("rl.py", *common, sft, f"--out_dir={tmp_path / 'straight'}")
    run_stage("rl.py", *common, sft, f"--out_dir={tmp_path / 'split'}", "--max_iters=3")
    result = run_stage("rl.py", *common, "--init_from=resume", f"--out_dir={tmp_path / 'split'}")
    assert "resuming from" in result.stdout
    straight, split = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert [s["iter"] for s in split] == list(range(1, 7))
    for a, b in zip(straight, split):
        assert a["mean_reward"] == b["mean_reward"]
        assert a["pg_loss"] == pytest.approx(b["pg_loss"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)


def test_clear_errors(toy_task, tmp_path):
    missing = run_stage("rl.py", f"--task_dir={tmp_path}", f"--init_from={toy_task / 'sft' / 'ckpt.pt'}",
                        f"--out_dir={tmp_path / 'o'}", check=False)
    assert missing.returncode == 1 and "test.jsonl not found" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "test.jsonl").write_text('{"question": "Pick a digit."}\n')
    bad = run_stage("rl.py", f"--task_dir={tmp_path}", f"--init_from={toy_task / 'sft' / 'ckpt.pt'}",
                    f"--out_dir={tmp_path / 'o'}", check=False)
    assert bad.returncode == 1 and "test.jsonl:1" in bad.stderr and "answer" in bad.stderr
    no_model = run_stage("rl.py", f"--init_from={tmp_path / 'nothing.pt'}", f"--out_dir={tmp_path / 'o'}", check=False)
    assert no_model.returncode == 1 and "not found" in no_model.stderr and "Traceback" not in no_model.stderr
