"""
Reinforcement learning on verifiable rewards: a chat model answers problems whose answers can be checked
(GSM8K, the synthetic arithmetic task of prepare/arithmetic.py) and learns from its own right answers.

    python rl.py config/rl_arith.py                          # from out/arith_sft/ckpt.pt, minutes on a CPU
    python rl.py config/rl.py --init_from=out/sft/ckpt.pt    # GSM8K on a GPU
    python rl.py config/rl_arith.py --init_from=resume       # continue out_dir/ckpt.pt
    python rl.py config/rl_arith.py --eval_only=True --init_from=out/arith_sft/ckpt.pt  # measure a checkpoint

Each step:
  1. take num_prompts problems from the task's train split; the engine samples num_samples (K) replies to
     each, with the calculator on (engine.generate: the one generation engine, the same as chat.py's);
  2. reward each reply: 1 if the number after its last '####' (else its last number) equals the answer,
     plus format_reward if it ends with '#### <number>'; tool outputs do not count as the model's text;
  3. advantage = reward - mean of the K rewards of the same problem (divided by their std with
     normalize_advantages): replies better than their siblings are pushed up, worse ones down, and a
     problem whose K replies all score the same teaches nothing;
  4. policy-gradient loss -advantage * log p(token) over the tokens the model sampled (not the prompt, not
     the tool's forced output), divided by the number of those tokens in the step; plus kl_coef x an
     estimate of the KL divergence to the starting model; one AdamW step.
Every eval_interval steps it measures the held-out problems (eval_split): greedy accuracy, pass@1 and
pass@K over eval_samples samples, mean reward, each with its standard error. Writes out_dir/ckpt.pt (a
checkpoint like train.py's, so sample.py, chat.py, eval.py and export.py read it), log.jsonl and reward.png.
Ctrl-C finishes the step, saves ckpt.pt and exits; --init_from=resume continues as if uninterrupted.
"""

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

import engine
from checkpoint import load_checkpoint, save_checkpoint
from common import Progress, StopSignals, append_jsonl, fail, plot_rewards, setup_device
from configurator import configure
from model import configure_optimizer, count_params

# -----------------------------------------------------------------------------------------------------
# I/O
init_from = "out/arith_sft/ckpt.pt"  # the chat model (SFT) to improve, or 'resume' (out_dir/ckpt.pt)
out_dir = "out/arith_rl"
overwrite = False  # allow a new run to replace an existing out_dir/ckpt.pt
eval_interval = 25  # measure the held-out problems and save ckpt.pt every this many steps
log_interval = 1  # print and log every this many steps
keep_all_checkpoints = False  # also write ckpt_<iter>.pt at every evaluation
eval_only = False  # measure init_from on the held-out problems and exit
# task: a folder of GSM8K-style problem files {split}.jsonl with "question" and "answer" (the final number)
task_dir = "data/arith"  # prepare/arithmetic.py, or data/tasks/gsm8k from prepare/tasks.py
train_split = "train"  # the problems to practise on
eval_split = "test"  # the held-out problems to measure on
eval_problems = 400  # held-out problems per evaluation (the first ones of the file, the same every time)
eval_samples = 8  # samples per held-out problem for pass@1 and pass@K (0 = greedy accuracy only)
# sampling
num_prompts = 8  # problems per step
num_samples = 8  # K: replies sampled per problem
max_new_tokens = 64  # reply length limit (tool outputs included)
temperature = 1.0  # 1.0 samples from the model's own distribution, which the policy gradient assumes
top_k = 0  # 0 = off
tools = True  # the calculator: <|python_start|>expr<|python_end|> is answered by the engine
# reward and loss
format_reward = 0.0  # added to the reward of a reply that ends with '#### <number>', right or wrong
normalize_advantages = False  # divide advantages by the std of the K rewards (GRPO); False: reward - mean
kl_coef = 0.0  # weight of the KL penalty to the starting model (0 = off; > 0 keeps a frozen copy in memory)
# optimizer (AdamW): warmup then constant or linear decay to 0 at max_iters
learning_rate = 1e-4
max_iters = 100
warmup_iters = 5
decay_lr = True
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = no clipping
# system
device = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' | 'float32' | 'bfloat16' | 'float16' (float16 uses a gradient scaler), as in train.py
seed = 1337
num_threads = 0  # CPU threads for torch; 0 = torch's default (all cores)
# -----------------------------------------------------------------------------------------------------

# The pieces of one step and of an evaluation, as plain functions above the script: tests/test_rl.py imports
# them without running it. The script itself is the `if __name__ == "__main__":` block at the end, read top to
# bottom like train.py, its state at module level.

NUMBER_PATTERN = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def reply_text(tokenizer, tokens):
    """The text the model wrote in a reply: everything but special tokens, tool calls and tool outputs."""
    python_start, python_end = tokenizer.special("<|python_start|>"), tokenizer.special("<|python_end|>")
    output_start, output_end = tokenizer.special("<|output_start|>"), tokenizer.special("<|output_end|>")
    segments, current, inside = [], [], None
    for t in tokens:
        if t in (python_start, output_start):
            inside = t
        elif t in (python_end, output_end):
            inside = None
        elif inside is None and not tokenizer.is_special(t):
            current.append(t)
            continue
        if current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return "\n".join(segments)


def extract_answer(text):
    """The number after the last '####' (GSM8K's marker), else the last number of the text; None if none."""
    if "####" in text:
        match = NUMBER_PATTERN.search(text.rsplit("####", 1)[1])
        return match.group().replace(",", "") if match else None
    numbers = NUMBER_PATTERN.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def is_correct(predicted, answer):
    """Numeric equality of two number strings ('18', '18.0', '1,800' vs '1800')."""
    if predicted is None:
        return False
    try:
        a, b = float(predicted.replace(",", "")), float(str(answer).replace(",", ""))
    except ValueError:
        return False
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def has_answer_format(text):
    return re.search(r"####\s*" + NUMBER_PATTERN.pattern + r"\s*$", text) is not None


def score_reply(tokenizer, tokens, answer, format_bonus=0.0):
    """(reward, correct) of one reply: 1 for the right answer, + format_bonus for a '#### <number>' ending."""
    text = reply_text(tokenizer, tokens)
    correct = is_correct(extract_answer(text), answer)
    return float(correct) + (format_bonus if has_answer_format(text) else 0.0), correct


def compute_advantages(rewards, normalize=False, eps=1e-6):
    """rewards (P, K): K replies to each of P problems -> advantages (P, K): reward minus its group's mean,
    divided by the group's std when normalize. A group whose K rewards are equal gets zeros."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize:
        advantages = advantages / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return advantages


def rollout_tensors(prompt, replies, pad_id=0):
    """
    Inputs and targets for the replies to one prompt: x (K, T) is prompt + reply without its last token,
    targets (K, T) holds the reply's sampled tokens at the positions that predict them and -1 everywhere
    else: the prompt, the tool's forced output, and padding after a short reply. replies: [(tokens, forced)].
    """
    width = len(prompt) + max(len(tokens) for tokens, _ in replies) - 1
    x = torch.full((len(replies), width), pad_id, dtype=torch.long)
    targets = torch.full((len(replies), width), -1, dtype=torch.long)
    for k, (tokens, forced) in enumerate(replies):
        sequence = list(prompt) + list(tokens)
        x[k, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        for j, (token, was_forced) in enumerate(zip(tokens, forced)):
            if not was_forced:
                targets[k, len(prompt) + j - 1] = token  # position len(prompt)+j-1 predicts reply token j
    return x, targets


def policy_gradient_terms(model, x, targets, advantages, ref_model=None):
    """
    Sums over the sampled tokens of one prompt's replies (divide by the step's token count for the loss):
    pg = sum of advantage x -log p(token), and kl = sum of the k3 estimate exp(r) - r - 1 with
    r = log p_ref - log p (>= 0, unbiased for KL(policy || reference)) when ref_model is given.
    """
    _, nll = model(x, targets, loss_reduction="none")  # (K, T), -log p of each target, 0 where target is -1
    pg = (advantages.view(-1, 1) * nll).sum()
    kl = torch.zeros((), device=x.device)
    if ref_model is not None:
        with torch.no_grad():
            _, ref_nll = ref_model(x, targets, loss_reduction="none")
        log_ratio = (nll - ref_nll.to(nll.dtype))[targets != -1]  # log p_ref - log p
        kl = (torch.exp(log_ratio) - log_ratio - 1).sum()
    return pg, kl


def sample_replies(model, tokenizer, prompt, n, max_tokens, temperature, top_k, seed, with_tools):
    """n replies to prompt from the engine, each (tokens, forced): forced marks the tool's output tokens."""
    replies = [([], []) for _ in range(n)]
    for tokens, forced in engine.generate(model, tokenizer, prompt, max_tokens, temperature=temperature,
                                          top_k=top_k, seed=seed, num_samples=n, tools=with_tools):
        for i, (token, was_forced) in enumerate(zip(tokens, forced)):
            if token is not None:
                replies[i][0].append(token)
                replies[i][1].append(was_forced)
    return replies


def read_problems(path):
    """GSM8K-style records of a task file; a bad line is an error naming file:line."""
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or "question" not in record or "answer" not in record:
                    raise ValueError(f"{path}:{number}: expected "
                                     "{\"question\": ..., \"answer\": \"<number>\"}")
                problems.append(record)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run prepare/arithmetic.py (or prepare/tasks.py for "
                                "GSM8K)") from None
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def read_task(tokenizer, path, max_seq_len):
    """The problems of a task file whose question fits the model with room to answer, and their prompts."""
    problems = read_problems(path)
    prompts = [tokenizer.render_for_completion([{"role": "user", "content": problem["question"]}])
               for problem in problems]
    keep = [i for i, prompt in enumerate(prompts) if len(prompt) + 2 <= max_seq_len]
    if not keep:
        raise ValueError(f"{path}: every question is longer than the model's max_seq_len={max_seq_len}")
    if len(keep) < len(prompts):
        print(f"{path}: skipping {len(prompts) - len(keep)} problems longer than max_seq_len",
              file=sys.stderr)
    return [problems[i] for i in keep], [prompts[i] for i in keep]


def standard_error(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def get_lr(it):
    """Linear warmup, then constant, or (decay_lr) a linear decay to 0 at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    return learning_rate * max(0.0, (max_iters - it) / max(1, max_iters - warmup_iters))


@torch.no_grad()
def evaluate(model, tokenizer, problems, prompts, autocast):
    """
    Greedy accuracy, pass@1 and pass@K (eval_samples samples each) and mean reward on the held-out
    problems, with standard errors over problems. Fixed seeds: every evaluation sees the same draws.
    """
    model.eval()
    greedy, pass1, passk, rewards = [], [], [], []
    t0 = time.time()
    progress = Progress("  evaluating", lambda done, seconds: f"{done}/{len(problems)} problems, "
                                                             f"greedy accuracy so far {np.mean(greedy):.3f}")
    for i, (problem, prompt) in enumerate(zip(problems, prompts)):
        with autocast:
            (tokens, _), = sample_replies(model, tokenizer, prompt, 1, max_new_tokens, 0.0, 0, None, tools)
            greedy.append(float(score_reply(tokenizer, tokens, problem["answer"])[1]))
            if eval_samples:
                replies = sample_replies(model, tokenizer, prompt, eval_samples, max_new_tokens, temperature,
                                         top_k, seed + 1_000_003 + i, tools)
                scores = [score_reply(tokenizer, t, problem["answer"], format_reward) for t, _ in replies]
                pass1.append(np.mean([c for _, c in scores]))
                passk.append(float(any(c for _, c in scores)))
                rewards.append(np.mean([r for r, _ in scores]))
        progress.update()
    progress.close()
    model.train()
    result = {"n_problems": len(problems), "accuracy": float(np.mean(greedy)),
              "accuracy_stderr": standard_error(greedy), "eval_time_s": round(time.time() - t0, 2)}
    if eval_samples:
        result.update({"k": eval_samples,
                       "pass_at_1": float(np.mean(pass1)), "pass_at_1_stderr": standard_error(pass1),
                       "pass_at_k": float(np.mean(passk)), "pass_at_k_stderr": standard_error(passk),
                       "mean_reward": float(np.mean(rewards)), "mean_reward_stderr": standard_error(rewards)})
    return result


def describe_evaluation(result):
    text = f"greedy accuracy {result['accuracy']:.3f} ± {result['accuracy_stderr']:.3f}"
    if "k" in result:
        text += (f", pass@1 {result['pass_at_1']:.3f} ± {result['pass_at_1_stderr']:.3f}, "
                 f"pass@{result['k']} {result['pass_at_k']:.3f} ± {result['pass_at_k_stderr']:.3f}, "
                 f"mean reward {result['mean_reward']:.3f}")
    return text + f" on {result['n_problems']} held-out problems [{result['eval_time_s']:.0f}s]"


def make_checkpoint():
    """ckpt.pt of this run, like train.py's (sample.py, chat.py, eval.py, export.py read it), from the
    script's state below: the model and optimizer, the step, and what an exact resume needs."""
    return {"model_args": asdict(model.args), "model": model.state_dict(), "tokenizer": tokenizer.to_json(),
            "tokenizer_sha256": tokenizer.sha256, "config": config, "data_format": "chat",
            "iter_num": iter_num, "train_time_s": train_time, "init_checkpoint": init_checkpoint,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng_state": {"torch": torch.get_rng_state()}}


# -----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    config = configure(globals())
    # the one device and dtype rule of every stage (common.py), as in train.py
    device, device_type, dtype, autocast = setup_device(device, dtype, seed, num_threads)
    if min(num_prompts, num_samples, max_new_tokens, max_iters + 1) < 1:
        fail("num_prompts, num_samples and max_new_tokens must be at least 1, max_iters at least 0")

    # --- the model: a chat checkpoint to improve, or this run's own ckpt.pt to resume
    ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
    if init_from == "scratch":
        fail("RL improves a trained chat model: set --init_from to an SFT checkpoint (or 'resume')")
    load_path = ckpt_path if init_from == "resume" else init_from
    if init_from != "resume" and not eval_only and os.path.exists(ckpt_path) and not overwrite:
        fail(f"{ckpt_path} exists: continue it with --init_from=resume, or start over with --overwrite=True "
             "(or another --out_dir)")
    try:
        # load_checkpoint is the one loader; a LoRA checkpoint comes back merged, and RL trains every weight
        model, tokenizer, checkpoint = load_checkpoint(load_path, device)
    except (FileNotFoundError, ValueError) as e:
        fail(f"init_from={init_from!r}: {e}")
    if checkpoint.get("data_format") != "chat":
        print(f"warning: {load_path} was not trained on chat data; RL expects a chat model that already "
              "answers in the task's format (SFT it first, e.g. on prepare/arithmetic.py's conversations)",
              file=sys.stderr)
    # the starting model of the whole run: the KL anchor, recorded in ckpt.pt for a resume
    init_checkpoint = checkpoint["init_checkpoint"] if init_from == "resume" else os.path.abspath(load_path)
    model.requires_grad_(True)

    # --- the task: problems to practise on (train_split) and held-out problems to measure on (eval_split)
    max_seq_len = model.args.max_seq_len  # a prompt and at least a token of its reply must fit
    try:
        eval_set, eval_prompts = read_task(tokenizer, os.path.join(task_dir, f"{eval_split}.jsonl"),
                                           max_seq_len)
        train_set, train_prompts = [], []
        if not eval_only:
            train_set, train_prompts = read_task(tokenizer, os.path.join(task_dir, f"{train_split}.jsonl"),
                                                 max_seq_len)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    eval_set, eval_prompts = eval_set[:eval_problems], eval_prompts[:eval_problems]
    if not eval_only and len(train_set) < num_prompts:
        fail(f"{task_dir}/{train_split}.jsonl has {len(train_set)} problems, fewer than "
             f"num_prompts={num_prompts}")

    ref_model = None  # the frozen starting model, for the KL penalty
    if kl_coef > 0 and not eval_only:
        try:
            ref_model, _, _ = load_checkpoint(init_checkpoint, device)
        except (FileNotFoundError, ValueError) as e:
            fail(f"kl_coef > 0 needs the starting model {init_checkpoint}: {e}")
        ref_model.requires_grad_(False)

    optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # float16 gradients need scaling
    iter_num, train_time = 0, 0.0  # train_time: seconds of training steps over the run, resumes included
    if init_from == "resume":
        if "optimizer" not in checkpoint:
            fail(f"{ckpt_path} has no optimizer state; start a new run from it with --init_from={ckpt_path}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint.get("scaler", scaler.state_dict()))
        iter_num, train_time = checkpoint["iter_num"], checkpoint.get("train_time_s", 0.0)
        torch.set_rng_state(checkpoint["rng_state"]["torch"])
        print(f"resuming from {ckpt_path} at step {iter_num}")
    checkpoint = None  # free the memory
    if not eval_only:
        os.makedirs(out_dir, exist_ok=True)
        if init_from != "resume" and os.path.exists(log_path):
            os.remove(log_path)  # a new run starts a new log; a resumed one appends
    print(f"model: {count_params(model) / 1e6:.2f}M parameters from {load_path}; device {device}, "
          f"dtype {dtype}")
    print(f"task: {task_dir}, {len(train_set):,} {train_split} problems, {len(eval_set):,} {eval_split} "
          f"problems per evaluation; {num_prompts} problems x {num_samples} samples per step, "
          f"tools {'on' if tools else 'off'}")
    if eval_only:
        result = evaluate(model, tokenizer, eval_set, eval_prompts, autocast)
        print(f"{load_path}: {describe_evaluation(result)}")
        sys.exit(0)
    stop = StopSignals(f"finishing this step, then saving {ckpt_path}")  # Ctrl-C and SIGTERM: save, exit 0

    # -------------------------------------------------------------------------------------------------
    # the loop
    start_iter, start_time = iter_num, train_time
    model.train()
    print(f"training from step {iter_num} to {max_iters}")
    while True:
        last_step = iter_num >= max_iters
        if iter_num % eval_interval == 0 or last_step:
            if iter_num > start_iter:
                # first: a failing evaluation must not lose the steps since the last save
                save_checkpoint(make_checkpoint(), ckpt_path)
            result = evaluate(model, tokenizer, eval_set, eval_prompts, autocast)
            print(f"step {iter_num}: {describe_evaluation(result)}", flush=True)
            append_jsonl(log_path, {"type": "eval", "iter": iter_num, **result,
                                    "time_s": round(train_time, 3)})
            if keep_all_checkpoints and iter_num > start_iter:
                save_checkpoint(make_checkpoint(), os.path.join(out_dir, f"ckpt_{iter_num:06d}.pt"))
            plot_rewards(log_path, os.path.join(out_dir, "reward.png"), f"{out_dir}: RL on {task_dir}",
                         max_reward=1.0 + format_reward)
        if last_step:
            break

        t0 = time.time()
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 1. sample: the problems and the sampling seeds are a function of (seed, step), so a resumed run
        # draws exactly what an uninterrupted one would
        rng = np.random.default_rng([seed, iter_num])
        chosen = rng.choice(len(train_set), size=num_prompts, replace=False)
        sample_seeds = rng.integers(0, 2 ** 31, size=num_prompts)
        model.eval()
        groups = []  # (prompt, replies, answer) per problem
        with autocast:
            for index, sample_seed in zip(chosen, sample_seeds):
                replies = sample_replies(model, tokenizer, train_prompts[index], num_samples, max_new_tokens,
                                         temperature, top_k, int(sample_seed), tools)
                groups.append((train_prompts[index], replies, train_set[index]["answer"]))
        model.train()
        t_sampled = time.time()
        # 2. reward, 3. advantages
        scores = [[score_reply(tokenizer, tokens, answer, format_reward) for tokens, _ in replies]
                  for _, replies, answer in groups]
        rewards = torch.tensor([[r for r, _ in group] for group in scores], dtype=torch.float32)
        correct = np.array([[c for _, c in group] for group in scores], dtype=np.float64)
        advantages = compute_advantages(rewards, normalize_advantages).to(device)
        # 4. the loss over the step's sampled tokens, one prompt's replies per backward pass
        sampled_tokens = sum(sum(not f for f in forced) for _, replies, _ in groups for _, forced in replies)
        n_tokens = max(1, sampled_tokens)
        pg_total, kl_total, learned = 0.0, 0.0, False
        for p, (prompt, replies, _) in enumerate(groups):
            if not advantages[p].any() and ref_model is None:
                continue  # every reply scored the same: no gradient from this problem
            x, targets = rollout_tensors(prompt, replies, pad_id=tokenizer.bos_id)
            x, targets = x.to(device), targets.to(device)
            with autocast:
                pg, kl = policy_gradient_terms(model, x, targets, advantages[p], ref_model)
            scaler.scale((pg + kl_coef * kl) / n_tokens).backward()
            pg_total, kl_total, learned = pg_total + pg.item(), kl_total + kl.item(), True
        grad_norm = 0.0  # a step with nothing to learn leaves the weights as they are
        if learned:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       grad_clip if grad_clip > 0 else float("inf")).item()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        iter_num += 1
        train_time += dt

        if iter_num % log_interval == 0 or iter_num == start_iter + 1:
            reply_tokens = sum(len(tokens) for _, replies, _ in groups for tokens, _ in replies)
            informative = float((rewards.std(dim=1) > 0).float().mean())
            record = {"type": "train", "iter": iter_num, "mean_reward": float(rewards.mean()),
                      "accuracy": float(correct.mean()), "informative_groups": informative,
                      "pg_loss": pg_total / n_tokens, "kl": kl_total / n_tokens, "lr": lr,
                      "grad_norm": grad_norm, "mean_reply_tokens": reply_tokens / (num_prompts * num_samples),
                      "ms_per_iter": dt * 1000, "sample_s": round(t_sampled - t0, 3),
                      "sampled_tokens_per_sec": reply_tokens / (t_sampled - t0),
                      "time_s": round(train_time, 3)}
            append_jsonl(log_path, record)
            eta_min = (max_iters - iter_num) * (train_time - start_time) / (iter_num - start_iter) / 60
            print(f"step {iter_num}/{max_iters}: mean reward {record['mean_reward']:.3f}, "
                  f"accuracy {record['accuracy']:.3f}, informative groups {informative:.2f}, "
                  f"kl {record['kl']:.4f}, reply {record['mean_reply_tokens']:.1f} tokens, lr {lr:.2e}, "
                  f"{dt * 1000:.0f} ms ({record['sample_s'] * 1000:.0f} sampling), ETA {eta_min:.1f} min",
                  flush=True)
        if stop.requested:
            save_checkpoint(make_checkpoint(), ckpt_path)
            print(f"saved {ckpt_path} at step {iter_num}; continue with --init_from=resume")
            break

    if iter_num > start_iter and not stop.requested:
        print(f"done: {iter_num} steps in {train_time / 60:.1f} min of training; {ckpt_path}, {log_path}, "
              f"{os.path.join(out_dir, 'reward.png')}")
