"""
What every stage script shares, so that each stage's file holds only its own logic: the error exit, the
device and dtype rule, Ctrl-C handling, log files, progress lines and the pictures drawn from the logs.

torch is imported inside the functions that need it, so that prepare/ scripts (which never touch a model)
start without torch's two-second import.
"""

import hashlib
import json
import os
import signal
import sys
import time


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fail(message):
    """A user error: one 'error: ...' line on stderr and exit status 1, no traceback (the message says what to do)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    distributed = sys.modules.get("torch.distributed")  # only a process that imported it can be in a group
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
    sys.exit(1)


def check_writable_dir(path):
    """
    Create folder path if needed and check that files can be written in it (a read-only folder or disk, a
    path through a file): raises OSError with the cause, before hours of work rather than at their end.
    """
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
    finally:
        if os.path.exists(probe):
            os.remove(probe)


# -----------------------------------------------------------------------------------------------------
# device and dtype: one rule for every stage


def pick_device(requested="auto"):
    """'auto' -> cuda if present, else mps if it really runs (not just exists), else cpu; anything else as given."""
    import torch
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        try:
            (torch.ones(2, device="mps") * 2).cpu()
            return "mps"
        except Exception:
            pass
    return "cpu"


def setup_device(device="auto", dtype="auto", seed=None, num_threads=0, local_rank=None):
    """
    The rule every stage follows: device 'auto' is cuda > mps > cpu; dtype 'auto' is bfloat16 on a GPU that
    has it, float16 on an older GPU (train.py and rl.py then scale the loss), float32 elsewhere. Matmuls
    run in the chosen dtype under autocast, the weights stay float32. Returns (device, device_type, dtype,
    autocast context). Seeds torch when seed is given; num_threads > 0 sets torch's CPU threads. Under
    torchrun (local_rank given), each process of a machine takes its own GPU: cuda:<local_rank>.
    """
    import torch
    from contextlib import nullcontext
    device = pick_device(device)
    device_type = device.split(":")[0]
    if local_rank is not None and device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"dtype={dtype!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'")
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if seed is not None:
        torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    return device, device_type, dtype, autocast


# peak dense bf16 tensor FLOP/s of common GPUs, for MFU
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12,
                  "3090": 71e12, "V100": 125e12, "T4": 65e12}


def model_matmul_shapes(model, n_tokens, largest=1024):
    """
    The matmuls a training step of model runs, as (m, k, n) for an (m, k) @ (k, n) product: for each linear
    layer over n_tokens rows, the forward pass and the two of the backward pass (input and weight gradients).
    Each size is capped at `largest`, so that measuring a big model's shapes stays short.
    """
    import torch
    shapes = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            d_in, d_out = module.in_features, module.out_features
            for m, k, n in ((n_tokens, d_in, d_out), (n_tokens, d_out, d_in), (d_out, n_tokens, d_in)):
                shapes.add((min(m, largest), min(k, largest), min(n, largest)))
    return sorted(shapes)


SQUARE_MATMULS = ((256, 256, 256), (512, 512, 512), (1024, 1024, 1024))


def measure_matmul_flops(device="cpu", dtype=None, shapes=SQUARE_MATMULS, seconds=1.0):
    """
    The fastest matmul of this device in FLOP/s, with torch's current threads: the best single call among
    `shapes` ((m, k, n): an (m, k) @ (k, n) product), each called again and again for its share of `seconds`.
    Returns (peak, {shape: best FLOP/s}). The best single call, because a peak is a maximum: a CPU shared
    with other processes is taken away now and then, and a short call often runs whole.
    """
    import torch
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout, resume) alone
    synchronize = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.split(":")[0])
    rates = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, generator=generator).to(dtype)
        b = torch.randn(k, n, device=device, generator=generator).to(dtype)
        a @ b  # warm up
        if synchronize:
            synchronize()
        best, start = 0.0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            a @ b
            if synchronize:  # a GPU runs asynchronously: wait for the product
                synchronize()
            t1 = time.perf_counter()
            best = max(best, 2 * m * k * n / (t1 - t0))
            if t1 - start > seconds / len(shapes):
                break
        rates[m, k, n] = best
    return max(rates.values()), rates


def peak_flops(device, dtype=None, matmul_shapes=()):
    """
    The FLOP/s that MFU is measured against. A GPU: its bf16 peak from the table (measured when it is not
    there). A CPU: torch's threads x the best matmul rate of one thread, in the training dtype, over a few
    squares and the model's own matmuls (model_matmul_shapes) -- the rate every thread could reach at best.
    Not a measurement with all threads at once: on a CPU shared with other processes, threads that wait for
    each other made a 1024^3 probe run at 15 GFLOP/s on a 2-core AVX2 EPYC that does 88 per core, and the
    training matmuls, smaller and in cache, then showed MFU over 100%.
    """
    import torch
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return measure_matmul_flops(device, torch.bfloat16, shapes=((4096, 4096, 4096),))[0]
    if device.startswith("mps"):
        return measure_matmul_flops(device, dtype, shapes=SQUARE_MATMULS + tuple(matmul_shapes))[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_thread = measure_matmul_flops(device, dtype, shapes=SQUARE_MATMULS + tuple(matmul_shapes))[0]
    finally:
        torch.set_num_threads(threads)
    return threads * per_thread


# -----------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: the training loops finish the step, save a checkpoint and exit


class StopSignals:
    """
    After Ctrl-C or SIGTERM, `requested` is True: the loop finishes its step, saves and exits. A second
    Ctrl-C raises KeyboardInterrupt at once (the user really wants out).
    """

    def __init__(self, message):
        self.requested = False
        self.message = message
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: {self.message}", flush=True)


# -----------------------------------------------------------------------------------------------------
# logs: out_dir/log.jsonl, one JSON record a line, read back by the plots and report.py


def append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """
    A progress line on stderr: redrawn in place (carriage return) a few times a second on a terminal, and
    written as whole lines every `log_seconds` when stderr is a file, so that logs hold one line per report.
    describe(done, elapsed_seconds) returns the text after the label.
    """

    def __init__(self, label, describe, log_seconds=10.0):
        self.label, self.describe = label, describe
        self.tty = sys.stderr.isatty()
        self.interval = 0.25 if self.tty else log_seconds
        self.start = self.last = time.time()
        self.done, self.drawn = 0, False

    def update(self, n=1, force=False):
        self.done += n
        now = time.time()
        if force or now - self.last >= self.interval:
            self.last = now
            self.draw(now)

    def draw(self, now):
        line = f"{self.label}: {self.describe(self.done, now - self.start)}"
        if self.tty:
            sys.stderr.write(f"\r{line}\033[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.drawn = True

    def close(self):
        """The final figures, and the line ended."""
        self.draw(time.time())
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_bar(done, total, width=30):
    """[=========               ] 32%"""
    filled = int(width * done / max(1, total))
    return f"[{'=' * filled}{' ' * (width - filled)}] {done / max(1, total):4.0%}"


# -----------------------------------------------------------------------------------------------------
# pictures: every PNG a stage writes is drawn here, from its log or results


def pyplot():
    """matplotlib's pyplot drawing to files (no screen needed), or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path):
    plt = pyplot()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_and_eval_records(log_path):
    """(the per-step records, the per-evaluation records) of a stage's log.jsonl."""
    records = read_jsonl(log_path)
    return [r for r in records if r["type"] == "train"], [r for r in records if r["type"] == "eval"]


def plot_losses(log_path, png_path, title):
    """train.py's loss.png from its log.jsonl: the loss per logged step, train and val loss per evaluation."""
    plt = pyplot()
    if plt is None:
        return
    steps, evals = train_and_eval_records(log_path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if steps:
        ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6,
                label="train (step)")
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png_path)


def plot_rewards(log_path, png_path, title, max_reward=1.0):
    """rl.py's reward.png from its log.jsonl: mean reward per step, held-out accuracy per evaluation."""
    plt = pyplot()
    if plt is None:
        return
    steps, evals = train_and_eval_records(log_path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if steps:
        iters, rewards = [r["iter"] for r in steps], [r["mean_reward"] for r in steps]
        ax.plot(iters, rewards, lw=0.8, alpha=0.4, label="mean reward (training samples)")
        # the reward of one step is noisy: a moving average shows the trend
        window = min(10, len(rewards))
        smoothed = [sum(rewards[i - window:i]) / window for i in range(window, len(rewards) + 1)]
        ax.plot(iters[window - 1:], smoothed, lw=1.5, color="C0", label=f"mean reward, {window}-step average")
    if evals:
        iters, last = [r["iter"] for r in evals], evals[-1]
        ax.errorbar(iters, [r["accuracy"] for r in evals], yerr=[r["accuracy_stderr"] for r in evals],
                    fmt="o-", capsize=3, label=f"held-out greedy accuracy ({last['n_problems']} problems)")
        if "k" in last:
            ax.errorbar(iters, [r["pass_at_1"] for r in evals], yerr=[r["pass_at_1_stderr"] for r in evals],
                        fmt="s-", capsize=3, label="held-out pass@1")
            ax.plot(iters, [r["pass_at_k"] for r in evals], "^--", label=f"held-out pass@{last['k']}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, max_reward + 0.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, png_path)


def plot_eval_scores(history, path):
    """
    eval.py's eval_scores.png: each headline score of eval_history.jsonl over checkpoint steps, a line per
    score (and per mode and split when they vary), its random baseline dotted; bpb on an axis of its own.
    """
    plt = pyplot()
    if plt is None:
        return
    kinds = sorted({(row["mode"], row["split"]) for row in history})
    series = {}  # label -> [(step, score)]
    for i, row in enumerate(history):
        step = row["step"] if row["step"] is not None else i
        for key, score in row["scores"].items():
            if score["value"] is not None:
                label = key + (f" ({row['mode']}, {row['split']})" if len(kinds) > 1 else "")
                series.setdefault(label, []).append((step, score))
    groups = [[k for k in series if not k.startswith("bpb")], [k for k in series if k.startswith("bpb")]]
    groups = [g for g in groups if g]
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        scale = 1.0 if group[0].startswith("bpb") else 100.0  # bits per byte, or %
        for n, label in enumerate(group):
            points = sorted(series[label], key=lambda p: p[0])
            color = f"C{n % 10}"
            steps, values = [s for s, _ in points], [p["value"] * scale for _, p in points]
            ax.plot(steps, values, "o-", color=color, label=label)
            baseline = points[-1][1].get("random_baseline")
            if baseline is not None:
                ax.axhline(baseline * scale, color=color, ls=":", lw=1)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("bits per byte" if scale == 1.0 else "score (%)")
        ax.set_title("dotted: random baseline")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_checkpoint_scores(scores, path):
    """
    report.py's scores.png: grouped bars of each benchmark (in %) per checkpoint, bpb on its own axis, the
    random baselines dashed. scores: {checkpoint: {row: {value, stderr, random_baseline}}} in the bars' order
    (rows starting with '_' are not scores). Returns whether a picture was drawn.
    """
    plt = pyplot()
    names = list(scores)
    rows = [r for r in dict.fromkeys(k for n in names for k in scores[n]) if not r.startswith("_")]
    percent_rows = [r for r in rows if r != "bpb"]
    if plt is None or not names or not rows:
        return False
    width_ratios = [max(1, len(percent_rows)), 1]  # the % axis has a group of bars per row, bpb one
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": width_ratios})
    width = 0.8 / len(names)
    for axis, group, scale, unit in ((axes[0], percent_rows, 100, "%"), (axes[1], ["bpb"], 1, "bits per byte")):
        for i, name in enumerate(names):
            values = [scores[name].get(r, {}).get("value") for r in group]
            errors = [scores[name].get(r, {}).get("stderr") or 0 for r in group]
            xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(group))]
            axis.bar(xs, [scale * (v or 0) for v in values], width, yerr=[scale * e for e in errors],
                     label=name, capsize=2)
        for x, r in enumerate(group):  # the random baseline of each row
            baseline = next((scores[n][r]["random_baseline"] for n in names if r in scores[n]), None)
            if baseline:
                axis.hlines(scale * baseline, x - 0.45, x + 0.45, colors="gray", linestyles="dashed")
        axis.set_xticks(range(len(group)))
        axis.set_xticklabels([r.replace(" ", "\n", 1) for r in group], fontsize=8)
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend(title="checkpoint")
    axes[0].set_title("scores per checkpoint (dashed: random guessing)")
    axes[1].set_title("lower is better")
    save_figure(fig, path)
    return True
