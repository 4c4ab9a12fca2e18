"""
Memory and step time of full fine-tuning versus LoRA on the same model.

    python bench/lora.py                        # dim 512, 8 layers (~25M parameters), batch 8 x 256
    python bench/lora.py --dim 768 --n_layers 12 --steps 5

Each configuration runs in its own process, so that its peak resident memory (ru_maxrss) is its own:
weights, gradients, AdamW state and activations. Step time is the median of the timed steps.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer, apply_lora, configure_optimizer  # noqa: E402


def worker(args):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                                  max_seq_len=args.block_size))
    if args.lora_rank:
        apply_lora(model, args.lora_rank, 2.0 * args.lora_rank, 0.0, args.lora_targets)
    optimizer = configure_optimizer(model, 0.1, 1e-4, (0.9, 0.95), "cpu")
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"trainable": trainable, "total": total, "ms_per_step": 1000 * statistics.median(times),
                      "peak_rss_mb": peak_mb}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora_rank", type=int, default=0)
    parser.add_argument("--lora_targets", default="q,v")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"model dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}; batch {args.batch_size} x "
          f"{args.block_size}; {torch.get_num_threads()} threads; fp32 on CPU")
    print(f"{'configuration':<34} {'trainable':>12} {'ms/step':>9} {'peak RSS MB':>12}")
    runs = [(0, "q,v", "full fine-tuning"), (8, "q,v", "LoRA r=8 on q,v"),
            (8, "q,k,v,o,gate,up,down", "LoRA r=8 on all projections")]
    for rank, targets, name in runs:
        command = [sys.executable, __file__, "--worker", f"--lora_rank={rank}", f"--lora_targets={targets}"] + \
            [f"--{k}={getattr(args, k)}" for k in ("dim", "n_layers", "n_heads", "vocab_size", "batch_size",
                                                   "block_size", "steps", "warmup")]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        print(f"{name:<34} {result['trainable']:>12,} {result['ms_per_step']:>9.0f} {result['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
