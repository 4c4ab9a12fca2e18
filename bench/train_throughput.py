"""
Training throughput: tokens/s, ms/iter and MFU of one optimizer step (forward, backward, AdamW) of model.py,
next to the nanoGPT-style GPT-2 of bench/gpt2_reference.py at the same shape.

    python bench/train_throughput.py                                  # the two nanoGPT CPU shapes
    python bench/train_throughput.py --shape_from=config/pretrain_tinystories.py   # the shape of a train config
    python bench/train_throughput.py --dim=512 --n_layers=8 --n_heads=8 --block_size=512 --batch_size=16 --compile

MFU is taken against the peak of this machine: the measured fp32 matmul FLOP/s on CPU (common.peak_flops), the
GPU's bf16 peak on CUDA. Random tokens: data loading is not part of the figure (train.py's costs well under 1%).
"""

import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules first
from common import fail, peak_flops, setup_device  # noqa: E402
from configurator import ConfigError, configure, read_config_file  # noqa: E402
from gpt2_reference import GPT2, gpt2_flops_per_token, gpt2_optimizer  # noqa: E402
from model import ModelArgs, Transformer, configure_optimizer, count_params, flops_per_token  # noqa: E402

# -----------------------------------------------------------------------------------------------------
shape_from = ""  # a train.py config file whose model and batch shape to measure; empty = nanoGPT's CPU shapes
# shape (0 = from shape_from, or the first nanoGPT shape when only some are given)
dim = 0  # model width
n_layers = 0  # transformer blocks
n_heads = 0  # attention heads
n_kv_heads = 0  # key/value heads (grouped-query attention); the model's 0 means n_heads
block_size = 0  # tokens per sequence
batch_size = 0  # sequences per micro-step
gradient_accumulation_steps = 0  # micro-steps per optimizer step
vocab_size = 0  # token ids (random tokens)
# how
device = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | ...
dtype = "auto"  # float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU)
compile = False  # torch.compile both models
steps = 10  # timed optimizer steps (the median is reported)
warmup = 3  # untimed steps first
no_reference = False  # skip the GPT-2 baseline
# -----------------------------------------------------------------------------------------------------

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "block_size", "batch_size", "gradient_accumulation_steps")
# nanoGPT's CPU shapes from the issue: char-level Shakespeare (vocab 65)
DEFAULT_SHAPES = [dict(dim=384, n_layers=6, n_heads=6, block_size=256, batch_size=8, vocab_size=65),
                  dict(dim=128, n_layers=4, n_heads=4, block_size=64, batch_size=12, vocab_size=65)]


def shape_from_config(path, overrides):
    """The model and batch settings of a train.py config file (other keys are ignored here)."""
    try:
        values = read_config_file(path, {})
    except ConfigError as e:
        fail(str(e))
    shape = {k: values[k] for k in SHAPE_KEYS if k in values}
    shape.setdefault("vocab_size", 4096)
    return {**shape, **overrides}


def time_steps(model, optimizer, shape, device, autocast, steps, warmup):
    """Median seconds per optimizer step over `steps` timed steps."""
    batch_size, block_size = shape["batch_size"], shape["block_size"]
    accumulation = shape.get("gradient_accumulation_steps", 1)
    x = torch.randint(0, shape["vocab_size"], (batch_size, block_size), device=device)
    y = torch.randint(0, shape["vocab_size"], (batch_size, block_size), device=device)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        for _ in range(accumulation):
            with autocast:
                _, loss = model(x, y)
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    given = {key: globals()[key] for key in SHAPE_KEYS + ("vocab_size",) if globals()[key] > 0}
    if shape_from:
        shapes = [shape_from_config(shape_from, given)]
    elif given:
        shapes = [{**DEFAULT_SHAPES[0], **given}]
    else:
        shapes = DEFAULT_SHAPES
    device_name, device_type, dtype_name, autocast = setup_device(device, dtype)
    peak = peak_flops(device_name)
    machine = torch.cuda.get_device_name() if device_type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{machine}; torch {torch.__version__}; {dtype_name}; compile={compile}; "
          f"peak {peak / 1e12:.3f} TFLOP/s ({'measured matmul' if device_type == 'cpu' else 'bf16 spec'})")
    print(f"{'model':<10} {'shape':<46} {'params':>8} {'ms/iter':>8} {'tokens/s':>10} {'MFU':>6}")
    for shape in shapes:
        shape = {"n_kv_heads": 0, "gradient_accumulation_steps": 1, **shape}
        tokens_per_step = shape["batch_size"] * shape["block_size"] * shape["gradient_accumulation_steps"]
        description = (f"{shape['n_layers']}L dim {shape['dim']} {shape['n_heads']}h, {shape['batch_size']}x"
                       f"{shape['block_size']}x{shape['gradient_accumulation_steps']}, vocab {shape['vocab_size']}")
        torch.manual_seed(0)
        model_args = ModelArgs(dim=shape["dim"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                               n_kv_heads=shape["n_kv_heads"], vocab_size=shape["vocab_size"],
                               max_seq_len=shape["block_size"])
        ours = Transformer(model_args).to(device_name)
        candidates = [("nanollama", ours, configure_optimizer(ours, 0.1, 1e-3, (0.9, 0.95), device_type),
                       flops_per_token(model_args, shape["block_size"]))]
        if not no_reference:
            reference = GPT2(shape["vocab_size"], shape["block_size"], shape["dim"], shape["n_layers"],
                             shape["n_heads"]).to(device_name)
            candidates.append(("gpt2-ref", reference, gpt2_optimizer(reference, 1e-3),
                               gpt2_flops_per_token(shape["vocab_size"], shape["dim"], shape["n_layers"],
                                                    shape["block_size"])))
        for name, model, optimizer, flops in candidates:
            step_model = torch.compile(model) if compile else model
            seconds = time_steps(step_model, optimizer, shape, device_name, autocast, steps, warmup)
            tokens_per_sec = tokens_per_step / seconds
            params = count_params(model) if name == "nanollama" else sum(p.numel() for p in model.parameters())
            print(f"{name:<10} {description:<46} {params / 1e6:>7.2f}M {seconds * 1000:>8.0f} "
                  f"{tokens_per_sec:>10,.0f} {flops * tokens_per_sec / peak:>6.1%}")


if __name__ == "__main__":
    configure(globals())
    main()
