"""
The report card of a speedrun: collects what every stage wrote in a run folder into <run>/report.md, with a
table per stage and the pictures the stages drew, plus <run>/report.json (the same figures, for scripts and
tests) and <run>/scores.png (the evaluation scores of each checkpoint).

    python report.py runs/20260101-120000      # or --run=runs/20260101-120000; --help lists the settings

It reads, in the run folder (see speedrun.sh):
    run.txt, stages.tsv                     the preset and each stage's wall-clock seconds
    data/                                   tokenizer.json, and meta.json of each prepared source (token counts)
    logs/*.log                              each command's output (tokenizer compression, ./run's tok/s and replies)
    base/, sft/                             train.py's log.jsonl, loss.png and checkpoints
    rl/                                     rl.py's log.jsonl and reward.png
    eval/{base,sft,rl}.json                 eval.py's results: bpb, OpenBookQA, ARC-Easy, ARC-Challenge (val),
                                            and chat:NAME (held-out conversations of a chat source) if asked
    eval/{base,sft,rl}_arith.json           eval.py's results on the arithmetic test problems, asked as a chat
    export/                                 the fp32 and int8 model files and the tokenizer file for run.c
A stage that did not run is reported as missing, never as an error: the report shows how far a run got.
"""

import json
import os
import platform
import re
import subprocess

import torch

from checkpoint import load_checkpoint
from common import fail, plot_checkpoint_scores
from configurator import configure
from eval import headline_metrics
from model import count_params
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------------
run = ""  # the run folder speedrun.sh wrote (the first argument: python report.py runs/<date-time>)
# -----------------------------------------------------------------------------------------------------

CHECKPOINTS = ["base", "sft", "rl"]  # the three models of a run, in pipeline order
BENCHMARKS = ["bpb", "openbookqa", "arc_easy", "arc_challenge"]


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_text(path):
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def fmt(x, digits=3):
    """A number for a table: '-' when missing, thousands separators for counts."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def duration(seconds):
    if seconds is None:
        return "-"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


# ----------------------------------------------------------------------------------------------------
# what each stage wrote


def stage_seconds(run):
    """{stage name: (seconds computing, wall-clock seconds)} from stages.tsv (speedrun.sh writes a line when a
    stage ends; the two differ when the run waited for a lock shared with other jobs)."""
    seconds = {}
    for line in read_text(os.path.join(run, "stages.tsv")).splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            seconds[fields[0]] = (int(fields[1]), int(fields[2]))
    return seconds


def model_size(run_folder):
    """Parameters and shape of a run's model, from its checkpoint (load_checkpoint: the one loader)."""
    for name in ("best.pt", "ckpt.pt"):
        path = os.path.join(run_folder, name)
        if os.path.exists(path):
            model, tokenizer, checkpoint = load_checkpoint(path)
            args = checkpoint["model_args"]
            return {"parameters": count_params(model), "dim": args["dim"], "n_layers": args["n_layers"],
                    "n_heads": args["n_heads"], "n_kv_heads": args["n_kv_heads"], "vocab_size": args["vocab_size"],
                    "max_seq_len": args["max_seq_len"], "checkpoint_bytes": os.path.getsize(path)}
    return None


def training_summary(run_folder):
    """Losses, speed and time of a train.py run from its log.jsonl."""
    records = read_jsonl(os.path.join(run_folder, "log.jsonl"))
    steps = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    if not steps:
        return None
    # the first logged step includes warm-up costs; the median of the others is the steady speed
    speeds = sorted(r["tokens_per_sec"] for r in steps[1:] or steps)
    summary = {"steps": steps[-1]["iter"], "tokens": steps[-1]["tokens"], "train_time_s": steps[-1]["time_s"],
               "first_train_loss": steps[0]["loss"], "last_train_loss": steps[-1]["loss"],
               "tokens_per_sec": speeds[len(speeds) // 2], "mfu": steps[-1].get("mfu")}
    if evals:
        summary.update({"first_val_loss": evals[0]["val_loss"], "last_val_loss": evals[-1]["val_loss"],
                        "best_val_loss": min(r["val_loss"] for r in evals),
                        "first_eval_train_loss": evals[0]["train_loss"], "last_eval_train_loss": evals[-1]["train_loss"]})
        if "val_bpb" in evals[-1]:
            summary["last_val_bpb"] = evals[-1]["val_bpb"]
    return summary


def rl_summary(run_folder, window=5):
    """Reward and held-out accuracy of an rl.py run: the first and last evaluation, and the mean training reward
    of the first and last `window` steps (each step samples num_prompts x num_samples replies)."""
    records = read_jsonl(os.path.join(run_folder, "log.jsonl"))
    steps = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    if not steps:
        return None
    window = max(1, min(window, len(steps) // 2))
    summary = {"steps": steps[-1]["iter"], "train_time_s": steps[-1]["time_s"],
               "first_steps_reward": mean(r["mean_reward"] for r in steps[:window]),
               "last_steps_reward": mean(r["mean_reward"] for r in steps[-window:]), "reward_window": window,
               "sampled_tokens_per_sec": mean(r["sampled_tokens_per_sec"] for r in steps),
               "mean_reply_tokens": mean(r["mean_reply_tokens"] for r in steps)}
    for which, record in (("first", evals[0] if evals else None), ("last", evals[-1] if len(evals) > 1 else None)):
        if record:
            summary[f"{which}_eval"] = {k: record.get(k) for k in ("iter", "n_problems", "accuracy", "accuracy_stderr",
                                                                   "pass_at_1", "pass_at_k", "k", "mean_reward")}
    return summary


def eval_scores(run):
    """{checkpoint: {row name: score}} from eval.py's JSON results; a score is {value, stderr, random_baseline}."""
    scores = {}
    for name in CHECKPOINTS:
        result = read_json(os.path.join(run, "eval", f"{name}.json"))
        rows = {}
        if result:
            for task, task_result in result["tasks"].items():
                if "metrics" not in task_result:
                    continue
                # one row per task: acc_norm for a base model, acc (the letter it answers) for a chat model,
                # ROUGE-L for the held-out answers of a chat source (chat:NAME)
                metric = headline_metrics(task, result["mode"])[0]
                m = task_result["metrics"][metric]
                row = f"{task} {metric}" if task.startswith("chat:") else task
                rows[row] = {"value": m["value"], "stderr": m["stderr"], "n": m.get("n"), "metric": metric,
                             "random_baseline": m["random_baseline"]}
            rows["_mode"] = result["mode"]
        arith = read_json(os.path.join(run, "eval", f"{name}_arith.json"))
        if arith and "metrics" in arith["tasks"].get("gsm8k", {}):
            task_result = arith["tasks"]["gsm8k"]
            m = task_result["metrics"]["strict"]
            rows["arithmetic accuracy"] = {"value": m["value"], "stderr": m["stderr"], "random_baseline": 0.0,
                                           "n": task_result["n"]}
            items = task_result.get("items") or []
            if items:
                # the format SFT teaches: a final '#### <number>' (eval.py's strict answer is None without one)
                formatted = [item["strict"] is not None for item in items]
                p = mean(formatted)
                rows["arithmetic format"] = {"value": p, "stderr": (p * (1 - p) / len(items)) ** 0.5,
                                             "random_baseline": 0.0, "n": len(items)}
        if rows:
            scores[name] = rows
    return scores


def paired_difference(run, before="sft", after="rl"):
    """
    The change in arithmetic accuracy from one checkpoint to the next, measured on the same problems: the
    mean of the per-problem differences (+1, 0 or -1) and its standard error. Pairing removes the variation
    between problems that the two models share, so this error is smaller than either accuracy's own; a
    change of more than about two of them is beyond evaluation noise. None without both results.
    """
    def correct(name):
        result = read_json(os.path.join(run, "eval", f"{name}_arith.json"))
        items = ((result or {}).get("tasks", {}).get("gsm8k", {}).get("items")) or []
        return {item["id"]: item["strict"] is not None and item["strict"] == item["answer"] for item in items}

    a, b = correct(before), correct(after)
    ids = [i for i in a if i in b]
    if len(ids) < 2:
        return None
    diffs = [int(b[i]) - int(a[i]) for i in ids]
    d, stderr = mean_and_stderr(diffs)
    return {"before": before, "after": after, "n": len(ids), "difference": d,
            "stderr": stderr, "gained": diffs.count(1), "lost": diffs.count(-1)}


def holdout_change(run, before="base", after="sft"):
    """
    The change in ROUGE-L on the conversations held out of a chat source (eval.py's chat:NAME tasks in
    eval/{name}.json), paired per conversation as paired_difference pairs problems: {task: {n, difference,
    stderr, better, worse}} for each task both results have.
    """
    def rouge(name):
        result = read_json(os.path.join(run, "eval", f"{name}.json")) or {}
        return {task: {item["id"]: item["rouge_l"] for item in r.get("items") or []}
                for task, r in result.get("tasks", {}).items() if task.startswith("chat:")}

    a, b = rouge(before), rouge(after)
    changes = {}
    for task in [t for t in a if t in b]:
        ids = [i for i in a[task] if i in b[task]]
        if len(ids) >= 2:
            diffs = [b[task][i] - a[task][i] for i in ids]
            d, stderr = mean_and_stderr(diffs)
            changes[task] = {"before": before, "after": after, "n": len(ids), "difference": d,
                             "stderr": stderr, "better": sum(x > 0 for x in diffs),
                             "worse": sum(x < 0 for x in diffs)}
    return changes


def mean_and_stderr(values):
    """Mean and its standard error (sample standard deviation / sqrt(n)) of at least two values."""
    m = mean(values)
    variance = sum((x - m) ** 2 for x in values) / (len(values) - 1)
    return m, (variance / len(values)) ** 0.5


def run_c_outputs(run):
    """[(model file, prompt, reply, tok/s)] from logs/run_c.log (speedrun.sh writes '## <model>: <prompt>' first)."""
    outputs = []
    for block in re.split(r"^## ", read_text(os.path.join(run, "logs", "run_c.log")), flags=re.M)[1:]:
        header, _, body = block.partition("\n")
        model_file, _, prompt = header.partition(": ")
        speed = re.search(r"achieved tok/s: ([\d.]+)", body)
        # the reply runs from 'Assistant: ' to the next 'User: ' prompt (stdin is empty, so run.c stops there)
        reply = re.search(r"Assistant: (.*?)(?:\nUser: |\nachieved tok/s|$)", body, flags=re.S)
        reply_text = (reply.group(1) if reply else body).strip()
        outputs.append((model_file, prompt, reply_text, float(speed.group(1)) if speed else None))
    return outputs


def data_sources(run):
    """{source name: meta.json} of every prepared source in the run's data folder."""
    sources = {}
    folder = os.path.join(run, "data")
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            meta = read_json(os.path.join(folder, name, "meta.json"))
            if meta:
                sources[name] = meta
    return sources


def machine():
    """A line naming the machine, so that times can be compared."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------
# the report


def build_report(run):
    info = dict(line.split("=", 1) for line in read_text(os.path.join(run, "run.txt")).splitlines() if "=" in line)
    seconds = stage_seconds(run)
    sources = data_sources(run)
    busy = {name: b for name, (b, _) in seconds.items()}
    figures = {"preset": info.get("preset"), "data_dir": info.get("data_dir"), "stage_seconds": busy,
               "total_seconds": sum(busy.values()) if busy else None,
               "total_wall_seconds": sum(w for _, w in seconds.values()) if seconds else None}
    md = [f"# nanollama speedrun report: {os.path.basename(os.path.abspath(run))}", "",
          f"Preset `{info.get('preset', '?')}`, data from `{info.get('data_dir', '?')}`, started {info.get('started', '?')}, "
          f"commit {git_commit() or '?'}.  ",
          f"Machine: {machine()}.", ""]

    md += ["## Time per stage", ""]
    md += table(["stage", "time", "wall-clock (with waits for a shared CPU)"],
                [[name, duration(b), duration(w)] for name, (b, w) in seconds.items()] +
                [["**total**", f"**{duration(figures['total_seconds'])}**", duration(figures["total_wall_seconds"])]])

    # --- tokenizer
    md += ["## 1. Tokenizer", ""]
    tok_log = read_text(os.path.join(run, "logs", "tokenizer.log"))
    tok = read_json(os.path.join(run, "data", "tokenizer.json"))
    if tok is None:
        md += ["(did not run)", ""]
    else:
        read = re.search(r"read ([\d,]+) characters", tok_log)
        compression = re.search(r"([\d.]+) bytes/token", tok_log)
        vocab_size = Tokenizer.from_file(os.path.join(run, "data", "tokenizer.json")).vocab_size
        figures["tokenizer"] = {"vocab_size": vocab_size,
                                "characters_read": int(read.group(1).replace(",", "")) if read else None,
                                "bytes_per_token": float(compression.group(1)) if compression else None}
        md += table(["vocab size", "text read (characters)", "held-out compression (bytes/token)", "time"],
                    [[fmt(vocab_size), fmt(figures["tokenizer"]["characters_read"]),
                      fmt(figures["tokenizer"]["bytes_per_token"], 2), duration(busy.get("1 tokenizer"))]])

    # --- data
    if sources:
        md += ["## Data", ""]
        rows = []
        for name, meta in sources.items():
            splits = meta.get("splits", {})
            rows.append([name, meta.get("format", "?"), fmt(splits.get("train", {}).get("tokens")),
                         fmt(splits.get("val", {}).get("tokens")), fmt(splits.get("train", {}).get("bytes"))])
        md += table(["source", "format", "train tokens", "val tokens", "train bytes"], rows)
        figures["data"] = {name: meta.get("splits") for name, meta in sources.items()}

    # --- pretraining and SFT: the same train.py
    for number, name, title in ((2, "base", "Pretraining"), (3, "sft", "SFT (Alpaca + identity + arithmetic)")):
        md += [f"## {number}. {title}", ""]
        summary = training_summary(os.path.join(run, name))
        if summary is None:
            md += ["(did not run)", ""]
            continue
        size = model_size(os.path.join(run, name))
        figures[name] = {**summary, "model": size}
        if size:
            md += table(["parameters", "layers", "dim", "heads (kv)", "vocab", "context", "checkpoint"],
                        [[f"{size['parameters'] / 1e6:.2f}M", size["n_layers"], size["dim"],
                          f"{size['n_heads']} ({size['n_kv_heads']})", fmt(size["vocab_size"]), size["max_seq_len"],
                          f"{size['checkpoint_bytes'] / 1e6:.1f} MB"]])
        md += table(["steps", "tokens", "train loss first -> last", "val loss first -> best", "val bpb", "tokens/s",
                     "MFU", "training time", "stage time"],
                    [[fmt(summary["steps"]), fmt(summary["tokens"]),
                      f"{fmt(summary['first_train_loss'])} -> {fmt(summary['last_train_loss'])}",
                      f"{fmt(summary.get('first_val_loss'))} -> {fmt(summary.get('best_val_loss'))}",
                      fmt(summary.get("last_val_bpb")), fmt(int(summary["tokens_per_sec"])),
                      f"{100 * summary['mfu']:.0f}%" if summary.get("mfu") is not None else "-",
                      duration(summary["train_time_s"]), duration(busy.get(f"{number} {'pretraining' if name == 'base' else 'sft'}"))]])
        if os.path.exists(os.path.join(run, name, "loss.png")):
            md += [f"![{name} loss]({name}/loss.png)", ""]

    # --- RL
    md += ["## 4. RL on arithmetic", ""]
    summary = rl_summary(os.path.join(run, "rl"))
    if summary is None:
        md += ["(did not run)", ""]
    else:
        figures["rl"] = summary
        md += table(["steps", f"mean reward, first {summary['reward_window']} steps", f"last {summary['reward_window']} steps",
                     "sampled tokens/s", "reply length (tokens)", "training time", "stage time"],
                    [[fmt(summary["steps"]), fmt(summary["first_steps_reward"]), fmt(summary["last_steps_reward"]),
                      fmt(int(summary["sampled_tokens_per_sec"])), fmt(summary["mean_reply_tokens"], 1),
                      duration(summary["train_time_s"]), duration(busy.get("4 rl"))]])
        evals = [e for e in (summary.get("first_eval"), summary.get("last_eval")) if e]
        # pass@1, pass@K and the mean reward need samples (rl.py's eval_samples > 0); greedy accuracy is always there
        sampled = any(e.get("pass_at_1") is not None for e in evals)
        rows = [[fmt(e["iter"]), fmt(e["n_problems"]), f"{fmt(e['accuracy'])} ± {fmt(e['accuracy_stderr'])}"]
                + ([fmt(e.get("pass_at_1")), fmt(e.get("pass_at_k")), fmt(e.get("mean_reward"))] if sampled else [])
                for e in evals]
        if rows:
            k = evals[0].get("k") or "K"
            md += ["Held-out problems (rl.py's evaluation):", ""]
            md += table(["step", "problems", "greedy accuracy"] + (["pass@1", f"pass@{k}", "mean reward"] if sampled else []),
                        rows)
        if os.path.exists(os.path.join(run, "rl", "reward.png")):
            md += ["![rl reward](rl/reward.png)", ""]

    # --- evaluation
    md += ["## 5. Evaluation", ""]
    scores = eval_scores(run)
    if not scores:
        md += ["(did not run)", ""]
    else:
        figures["eval"] = scores
        names = [n for n in CHECKPOINTS if n in scores]
        row_names = [r for r in dict.fromkeys(k for n in names for k in scores[n]) if not r.startswith("_")]
        rows = []
        for r in row_names:
            cells, baseline, n_items = [], None, None
            for n in names:
                s = scores[n].get(r)
                if s is None:
                    cells.append("-")
                    continue
                scale = 1 if r == "bpb" else 100
                cells.append(f"{scale * s['value']:.{3 if r == 'bpb' else 1}f}"
                             + (f" ± {scale * s['stderr']:.{3 if r == 'bpb' else 1}f}" if s.get("stderr") else ""))
                baseline, n_items = s["random_baseline"], s.get("n")
            unit = "bits/byte" if r == "bpb" else "%"
            base_text = "-" if baseline is None else (f"{baseline:.3f}" if r == "bpb" else f"{100 * baseline:.1f}")
            rows.append([f"{r} ({unit})", *cells, base_text, fmt(n_items)])
        modes = [f"{n} ({scores[n].get('_mode', '?')} model)" for n in names]
        md += table(["task", *modes, "random", "n"], rows)
        change = paired_difference(run)
        if change:
            figures["rl_arithmetic_change"] = change
            md += [f"RL's change in arithmetic accuracy, on the same {change['n']} problems: "
                   f"**{100 * change['difference']:+.1f} ± {100 * change['stderr']:.1f} points** (paired standard "
                   f"error; {change['gained']} problems newly right, {change['lost']} newly wrong).", ""]
        for task, change in holdout_change(run).items():
            figures.setdefault("holdout_change", {})[task] = change
            md += [f"SFT's change in ROUGE-L on the conversations held out of {task[len('chat:'):]}, the "
                   f"same {change['n']} answers: **{100 * change['difference']:+.1f} ± "
                   f"{100 * change['stderr']:.1f} points** (paired standard error; {change['better']} "
                   f"answers closer to the reference, {change['worse']} further).", ""]
        md += ["Validation splits (OpenBookQA dev, ARC dev); bpb on the TinyStories val subset; arithmetic on the "
               "held-out test problems of prepare/arithmetic.py, asked as a chat with the calculator (accuracy: the "
               "number after '####' is right; format: there is one). Multiple choice: a base model is scored by "
               "log-likelihood (acc_norm), a chat model by the letter it answers (acc).", ""]
        if any(row.startswith("chat:") for n in names for row in scores[n]):
            md += ["chat:NAME: the last answer of each conversation held out of that chat source (its "
                   "val split), generated greedily and compared with the reference by ROUGE-L; exact match, "
                   "token F1 and the perplexity of the references are in eval/*.json.", ""]
        if plot_checkpoint_scores(scores, os.path.join(run, "scores.png")):
            md += ["![scores per checkpoint](scores.png)", ""]

    # --- export
    md += ["## 6. Export", ""]
    export = os.path.join(run, "export")
    files = [f for f in ("model.bin", "model_int8.bin", "tokenizer.bin") if os.path.exists(os.path.join(export, f))]
    if not files:
        md += ["(did not run)", ""]
    else:
        sizes = {f: os.path.getsize(os.path.join(export, f)) for f in files}
        figures["export"] = sizes
        md += table(["file", "size"], [[f"export/{f}", f"{sizes[f] / 1e6:.2f} MB"] for f in files])

    # --- ./run
    md += ["## 7. C inference (`./run`)", ""]
    outputs = run_c_outputs(run)
    if not outputs:
        md += ["(did not run)", ""]
    else:
        figures["run_c"] = [{"model": m, "prompt": p, "reply": r, "tokens_per_sec": s} for m, p, r, s in outputs]
        md += table(["model file", "prompt", "reply (greedy)", "tok/s"],
                    [[m, p, r.replace("\n", " ").replace("|", "\\|")[:300], fmt(s, 1)] for m, p, r, s in outputs])
    return "\n".join(md), figures


def main():
    if not run or "," in run:
        fail("which run? python report.py RUN_FOLDER (one folder speedrun.sh wrote)")
    if not os.path.isdir(run):
        fail(f"{run}: no such folder (expected a run folder written by speedrun.sh)")
    markdown, figures = build_report(run)
    with open(os.path.join(run, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    with open(os.path.join(run, "report.json"), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=1)
    print(markdown)
    print(f"\nreport: {os.path.join(run, 'report.md')} (figures in report.json)")


if __name__ == "__main__":
    configure(globals(), positional="run")
    main()
