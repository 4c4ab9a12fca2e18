"""
Validation loss reached in the same wall-clock time: our recipe (model.py: RMSNorm, RoPE, SwiGLU, its init, AdamW
betas 0.9/0.95, peak lr 3e-3) against a nanoGPT-style GPT-2 recipe (bench/gpt2_reference.py), on the
same TinyStories tokens, the same tokenizer, the same batch and the same time budget per run. Two more rows
say why: GPT-2 at our learning rate, and our model with its residual projections initialized at zero.

    python bench/loss_per_second.py                      # 90 s per recipe, ~8 minutes in all on 2 CPU cores
    python bench/loss_per_second.py --budget_s=30 --recipes=gpt2,nanollama

Each recipe trains for budget_s seconds of training time (evaluations are not counted) with linear warmup over the
first 5% of the budget and cosine decay to lr/10 at the end, so every run gets a complete schedule whatever its
speed. Val loss (nats per token, the same tokens for everyone) is measured at 10 points; the curves go to
loss_per_second.png. Train data: prepare/sample/tinystories/tiny_stories.txt + the first 80% of
tinystories_val.txt; val: its last 20%. Tokenizer: byte-level BPE, vocab 2048, trained on the train text.
"""

import math
import os
import platform
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's modules first (python put bench/ on the path for gpt2_reference)
from common import Progress, fail, progress_bar, pyplot, save_figure  # noqa: E402
from configurator import configure  # noqa: E402
from gpt2_reference import GPT2, gpt2_optimizer  # noqa: E402
from model import ModelArgs, Transformer, configure_optimizer  # noqa: E402
from tokenizer import count_chunks, train_bpe  # noqa: E402

# -----------------------------------------------------------------------------------------------------
budget_s = 90.0  # training seconds per recipe
recipes = "gpt2,gpt2-lr3e-3,nanollama-zeroinit,nanollama"  # comma-separated (the default lists all of them)
dim = 128  # model width (both models)
n_layers = 4  # transformer blocks
n_heads = 4  # attention heads
block_size = 128  # tokens per sequence
batch_size = 16  # sequences per step
vocab_size = 2048  # of the BPE tokenizer trained on the train text
seed = 0  # initialization and the order of the batches (the same for every recipe)
plot = "loss_per_second.png"  # the curves; empty = no picture
# -----------------------------------------------------------------------------------------------------

SHARED = os.path.join(REPO, "prepare", "sample")  # its two TinyStories files are whole


def make_nanollama(vocab_size, zero_init=False):
    model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size,
                                  max_seq_len=block_size))
    if zero_init:  # the alternative we measured: residual projections start at zero (each block the identity)
        for name, p in model.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                torch.nn.init.zeros_(p)
    return model


# name -> (build model, build optimizer, peak learning rate)
RECIPES = {
    "gpt2": (lambda v: GPT2(v, block_size, dim, n_layers, n_heads),
             lambda m, lr: gpt2_optimizer(m, lr, betas=(0.9, 0.99)), 1e-3),
    "gpt2-lr3e-3": (lambda v: GPT2(v, block_size, dim, n_layers, n_heads),
                    lambda m, lr: gpt2_optimizer(m, lr, betas=(0.9, 0.99)), 3e-3),
    "nanollama-zeroinit": (lambda v: make_nanollama(v, zero_init=True),
                           lambda m, lr: configure_optimizer(m, 0.1, lr, (0.9, 0.95), "cpu"), 3e-3),
    "nanollama": (lambda v: make_nanollama(v),
                  lambda m, lr: configure_optimizer(m, 0.1, lr, (0.9, 0.95), "cpu"), 3e-3),
}


def load_tokens(vocab_size):
    train_text = open(os.path.join(SHARED, "tinystories", "tiny_stories.txt"), encoding="utf-8").read()
    extra = open(os.path.join(SHARED, "tinystories", "tinystories_val.txt"), encoding="utf-8").read()
    cut = extra.index("<|endoftext|>", int(len(extra) * 0.8))
    train_text += "\n" + extra[:cut].replace("<|endoftext|>", "")
    val_text = extra[cut:].replace("<|endoftext|>", "")
    tokenizer = train_bpe(count_chunks([train_text]), vocab_size)
    return (np.array(tokenizer.encode(train_text), dtype=np.int64), np.array(tokenizer.encode(val_text), dtype=np.int64),
            tokenizer.vocab_size)


def batch(tokens, rng, batch_size, block_size):
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s in starts]))
    y = torch.from_numpy(np.stack([tokens[s + 1:s + 1 + block_size] for s in starts]))
    return x, y


@torch.no_grad()
def val_loss(model, val_batches):
    model.eval()
    losses = [model(x, y)[1].item() for x, y in val_batches]
    model.train()
    return float(np.mean(losses))


def run(name, train_tokens, val_batches, vocab_size):
    build_model, build_optimizer, peak_lr = RECIPES[name]
    torch.manual_seed(seed)
    model = build_model(vocab_size)
    optimizer = build_optimizer(model, peak_lr)
    rng = np.random.default_rng(seed)  # the same batches, in the same order, for every recipe
    curve, elapsed, steps = [(0.0, val_loss(model, val_batches))], 0.0, 0
    next_eval = budget_s / 10
    # the share of the time budget used, the steps taken and the latest val loss
    progress = Progress(name, lambda done, _: f"{progress_bar(min(elapsed, budget_s), budget_s)} "
                                              f"{done:,} steps, val loss {curve[-1][1]:.3f}")
    while elapsed < budget_s:
        share_done = elapsed / budget_s
        lr = peak_lr * (share_done / 0.05 if share_done < 0.05 else
                        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (share_done - 0.05) / 0.95)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch(train_tokens, rng, batch_size, block_size)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        steps += 1
        if elapsed >= next_eval or elapsed >= budget_s:
            curve.append((elapsed, val_loss(model, val_batches)))
            next_eval += budget_s / 10
        progress.update()
    progress.close()
    return curve, steps


def main():
    unknown = [name for name in recipes.split(",") if name not in RECIPES]
    if unknown:
        fail(f"--recipes: unknown {', '.join(unknown)}; expected some of {', '.join(RECIPES)}")
    train_tokens, val_tokens, tokenizer_vocab_size = load_tokens(vocab_size)
    val_rng = np.random.default_rng(1234)
    val_batches = [batch(val_tokens, val_rng, batch_size, block_size) for _ in range(20)]
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens; {n_layers} layers, dim {dim}, "
          f"{n_heads} heads, batch {batch_size} x {block_size}; {budget_s:.0f} s per recipe")
    results = {}
    for name in recipes.split(","):
        curve, steps = run(name, train_tokens, val_batches, tokenizer_vocab_size)
        results[name] = curve
        print(f"{name:<20} peak lr {RECIPES[name][2]:.0e}: {steps:5d} steps "
              f"({steps * batch_size * block_size / curve[-1][0]:,.0f} tok/s), "
              f"val loss {curve[-1][1]:.4f} after {curve[-1][0]:.0f} s "
              f"(at half time {min(curve, key=lambda p: abs(p[0] - budget_s / 2))[1]:.4f})")
    plt = pyplot()
    if plt is None or not plot:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in results.items():
        ax.plot([t for t, _ in curve[1:]], [v for _, v in curve[1:]], "o-", label=name)
    ax.set_xlabel(f"training seconds ({torch.get_num_threads()} CPU threads)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("TinyStories: validation loss per second of training")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, plot)
    print(f"wrote {plot}")


if __name__ == "__main__":
    configure(globals())
    main()
