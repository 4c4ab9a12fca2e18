"""
Memory and step time of full fine-tuning versus LoRA on the same model.

    python bench/lora.py                        # dim 512, 8 layers (~25M parameters), batch 8 x 256
    python bench/lora.py --dim=768 --n_layers=12 --steps=5

Each configuration runs in its own process, so that its peak resident memory (ru_maxrss) is its own:
weights, gradients, AdamW state and activations. Step time is the median of the timed steps.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules first
from configurator import configure  # noqa: E402
from model import ModelArgs, Transformer, apply_lora, configure_optimizer  # noqa: E402

# -----------------------------------------------------------------------------------------------------
dim = 512  # model width
n_layers = 8  # transformer blocks
n_heads = 8  # attention heads
vocab_size = 4096  # token ids (random tokens: the speed does not depend on them)
batch_size = 8  # sequences per step
block_size = 256  # tokens per sequence
steps = 5  # timed steps (the median is reported)
warmup = 2  # untimed steps first
# what one worker process measures (the main process runs one worker per configuration)
worker = False  # run one configuration and print its figures as JSON
lora_rank = 0  # 0 = full fine-tuning
lora_targets = "q,v"  # the projections that get adapters, of q,k,v,o,gate,up,down
# -----------------------------------------------------------------------------------------------------


def measure():
    """One configuration in this process: its figures as a line of JSON."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size,
                                  max_seq_len=block_size))
    if lora_rank:
        apply_lora(model, lora_rank, 2.0 * lora_rank, 0.0, lora_targets)
    optimizer = configure_optimizer(model, 0.1, 1e-4, (0.9, 0.95), "cpu")
    x = torch.randint(0, vocab_size, (batch_size, block_size))
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"trainable": trainable, "total": total, "ms_per_step": 1000 * statistics.median(times),
                      "peak_rss_mb": peak_mb}))


def main():
    print(f"model dim {dim}, {n_layers} layers, vocab {vocab_size}; batch {batch_size} x "
          f"{block_size}; {torch.get_num_threads()} threads; fp32 on CPU")
    print(f"{'configuration':<34} {'trainable':>12} {'ms/step':>9} {'peak RSS MB':>12}")
    runs = [(0, "q,v", "full fine-tuning"), (8, "q,v", "LoRA r=8 on q,v"),
            (8, "q,k,v,o,gate,up,down", "LoRA r=8 on all projections")]
    shape = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "vocab_size": vocab_size,
             "batch_size": batch_size, "block_size": block_size, "steps": steps, "warmup": warmup}
    for rank, targets, name in runs:
        # each configuration in its own process, so that its peak resident memory is its own
        command = [sys.executable, __file__, "--worker", f"--lora_rank={rank}", f"--lora_targets={targets}"] + \
            [f"--{key}={value}" for key, value in shape.items()]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        print(f"{name:<34} {result['trainable']:>12,} {result['ms_per_step']:>9.0f} {result['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    configure(globals())
    if worker:
        measure()
    else:
        main()
