"""
Plain LoRA versus QLoRA (the frozen base stored NF4 or int8, model.py) side by side: the bytes the weights
take, the process's peak and training-time resident memory, seconds per training step, and for a real model
the loss on the same real text after the same steps.

    python bench/qlora.py --num_threads=2
    python bench/qlora.py --hf_dir=~/.cache/smollm2-135m-instruct --big_layers=4 --steps=6

Two models: (a) SmolLM2-135M-Instruct from its Hugging Face folder (hf_dir), trained on TinyStories'
validation text from the repository's sample, and (b) a randomly initialized 1B-shaped model (dim 2048, 32
heads, 8 kv heads, hidden 5632, vocab 32000) with big_layers of its 16 blocks; per-block figures scale to 16.
Each variant runs in its own process, so its peak resident memory (ru_maxrss) is its own; that peak includes
the float model built or loaded before quantizing, so the resident memory while training is printed too.
Prints figures and the machine; asserts nothing.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from checkpoint import load_checkpoint  # noqa: E402
from configurator import configure  # noqa: E402
from model import ModelArgs, Transformer, apply_lora, configure_optimizer  # noqa: E402

# -----------------------------------------------------------------------------------------------------
hf_dir = "~/.cache/smollm2-135m-instruct"  # SmolLM2-135M-Instruct's Hugging Face folder ('' = skip it)
text_file = "prepare/sample/tinystories/tinystories_val.txt"  # real text the real model trains on
big_layers = 2  # blocks of the random 1B-shaped model (all 16 are too slow on 2 CPU cores)
batch_size = 4  # sequences per step
block_size = 128  # tokens per sequence
steps = 8  # training steps per variant; the loss is reported after all of them
warmup = 2  # the first steps are left out of the step time
lora_rank = 8  # adapter rank (alpha = 2 x rank)
lora_targets = "q,v"  # projections that get adapters; QLoRA quantizes every projection of the blocks
learning_rate = 1e-3  # AdamW, constant
num_threads = 2  # torch threads
# what one worker process measures (the main process runs one worker per model and variant)
worker = ""  # '' = run every variant; 'smollm2' or 'big': measure that model in this process, print JSON
quantize = ""  # the worker's variant: '' (plain LoRA), 'nf4' or 'int8'
# -----------------------------------------------------------------------------------------------------


def rss_mb():
    """The resident memory of this process now (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def weight_bytes(model):
    """Bytes of the model's parameters and buffers (a tied head counted once)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def real_batches(tokenizer, n):
    """n batches of consecutive windows of the text, and one held-out batch after them."""
    with open(os.path.join(REPO, text_file), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), bos=True)
    window = block_size + 1
    needed = (n + 1) * batch_size * window
    if len(ids) < needed:
        raise SystemExit(f"error: text_file={text_file} has {len(ids)} tokens, {needed} needed")
    data = torch.tensor(ids[:needed]).view(n + 1, batch_size, window)
    return [(b[:, :-1], b[:, 1:]) for b in data]


def measure():
    torch.set_num_threads(num_threads)
    torch.manual_seed(0)
    if worker == "smollm2":
        model, tokenizer, _ = load_checkpoint("hf:" + os.path.expanduser(hf_dir))
        batches = real_batches(tokenizer, steps)
    else:
        args = ModelArgs(dim=2048, n_layers=big_layers, n_heads=32, n_kv_heads=8, hidden_dim=5632,
                         vocab_size=32000, max_seq_len=block_size)
        model = Transformer(args)
        batches = [(x, x) for x in torch.randint(0, args.vocab_size, (steps + 1, batch_size, block_size))]
    float_bytes = weight_bytes(model)
    apply_lora(model, lora_rank, 2.0 * lora_rank, 0.0, lora_targets, quantize)
    model.train()
    optimizer = configure_optimizer(model, 0.0, learning_rate, (0.9, 0.95), "cpu")
    val_x, val_y = batches[-1]
    with torch.no_grad():
        val_before = model(val_x, val_y)[1].item()
    times, losses = [], []
    for step, (x, y) in enumerate(batches[:-1]):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    with torch.no_grad():
        val_after = model(val_x, val_y)[1].item()
    print(json.dumps({"float_bytes": float_bytes, "weight_bytes": weight_bytes(model),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                      "train_rss_mb": rss_mb(), "s_per_step": statistics.median(times),
                      "train_loss_last": losses[-1], "val_before": val_before, "val_after": val_after}))


def main():
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {num_threads} threads; fp32; batch "
          f"{batch_size} x {block_size}; LoRA r={lora_rank} on {lora_targets}; {steps} steps (step time: "
          f"median after {warmup}); lr {learning_rate:g}")
    models = (["smollm2"] if hf_dir else []) + ["big"]
    for name in models:
        title = f"SmolLM2-135M-Instruct ({hf_dir}), trained on {text_file}" if name == "smollm2" else \
            f"random 1B-shaped model, {big_layers} of its 16 blocks (dim 2048, hidden 5632, vocab 32000)"
        print(f"\n{title}")
        print(f"{'variant':<12} {'weights MB':>11} {'(float MB)':>11} {'peak RSS MB':>12} "
              f"{'train RSS MB':>13} {'s/step':>8} {'val loss before -> after':>26}")
        for variant in ("", "nf4", "int8"):
            command = [sys.executable, __file__, f"--worker={name}", f"--quantize={variant}"] + \
                [f"--{key}={value}" for key, value in (("hf_dir", hf_dir), ("text_file", text_file),
                                                       ("big_layers", big_layers), ("batch_size", batch_size),
                                                       ("block_size", block_size), ("steps", steps),
                                                       ("warmup", warmup), ("lora_rank", lora_rank),
                                                       ("lora_targets", lora_targets),
                                                       ("learning_rate", learning_rate),
                                                       ("num_threads", num_threads))]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{variant or 'LoRA'}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            loss = f"{r['val_before']:.4f} -> {r['val_after']:.4f}" if name == "smollm2" else "(random model)"
            print(f"{'QLoRA ' + variant if variant else 'LoRA':<12} {r['weight_bytes'] / 1e6:>11.1f} "
                  f"{r['float_bytes'] / 1e6:>11.1f} {r['peak_rss_mb']:>12.0f} {r['train_rss_mb']:>13.0f} "
                  f"{r['s_per_step']:>8.2f} {loss:>26}")


if __name__ == "__main__":
    configure(globals())
    if worker:
        measure()
    else:
        main()
