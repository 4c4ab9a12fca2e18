"""
Tokens per second of run.c at llama2.c's model shapes and SmolLM2-135M's, float32 and int8, on 1 and 2 threads:
generation, and the time to first token for prompts of 32, 200 and 1000 tokens (beside the Python engine's).

    python bench/run_c.py                          # stories15M, 42M and 110M shapes, and SmolLM2-135M's
    python bench/run_c.py --shapes 15M --threads 2 --steps 128
    python bench/run_c.py --shapes SmolLM2 --threads 2 --prompts 200 --python False

Random weights (the speed does not depend on their values). Every run samples with -p 1.0, because top-p over
the near-flat logits of a random model would measure the sampler rather than the model; one extra run per
shape measures what top-p 0.9 costs. run.c is built like `make runomp` (-O3 -march=native -fopenmp).
Each model file is dropped from the page cache after it is written, so run.c reads it from disk as it would a model
exported earlier; on Linux with large page-cache folios (ext4/xfs, recent kernels) it is then mapped with 2 MB
pages. A file still cached from its own writing is mapped with 4 KB pages: 10-30% slower at 42M-110M float32 here.
Run it alone (e.g. under the shared CPU lock): other work on the cores changes the figures, and so does the memory
bandwidth left by other machines on the same host (it moved between ~40 and ~80 GB/s within an hour here). So each
figure also comes as a share of the ceiling measured in the same minutes: bench/read_bandwidth.c streams a
buffer of the model file's size with as many threads, alternating with the runs, and its best GB/s divided by the
file size (the bytes a token reads) is the tok/s no matmul code can beat.

Time to first token: ./run -n 1 on a prompt of exactly N tokens (the byte-level tokenizer: <|bos|> and N - 1 bytes of
text), as run.c reports it (from the prompt's first token into the model to the first token sampled), best of the
repeats; prompt tok/s is N divided by it, and GFLOP/s counts 2 flops per weight of the layers per prompt token (the
attention over the cache comes on top). The prompt goes through the model in blocks of 64 tokens (-b); a prompt is
not bound by memory bandwidth but by arithmetic. The Python engine's time to first token (engine.generate, float32,
PyTorch on as many threads) is measured on the same model and prompt. Every model here has max_seq_len 2048 so that
the 1000-token prompt fits (the context length changes nothing else).
"""

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from export import choose_group_size, write_model, write_tokenizer  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # llama2.c's TinyStories models
    "15M": dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256),
    "42M": dict(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024),
    "110M": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=1024),
    # SmolLM2-135M-Instruct's shape (random weights; the speed does not depend on their values)
    "SmolLM2": dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                    max_seq_len=8192, rope_theta=100000.0),
}
PROMPT_TEXT = ("Once upon a time, in a small town by the sea, there lived a girl who loved to count the boats in the "
               "harbour every morning before school. ")
# llama2.c's run.c / runq.c on this kind of machine, 2 threads, -p 1.0 (the reference figures)
LLAMA2C = {"fp32": {"15M": 712, "42M": 176, "110M": 64}, "int8": {"15M": 619, "42M": 226, "110M": 104}}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build(binary, source="run.c"):
    cmd = ["cc", "-O3", "-march=native", "-fopenmp", "-o", binary, os.path.join(REPO, source), "-lm"]
    subprocess.run(cmd, check=True)


def read_bandwidth(binary, size_bytes, threads):
    """GB/s of a plain streaming read of size_bytes, best of its 20 passes."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    megabytes = max(1, round(size_bytes / 2**20))
    result = subprocess.run([binary, str(megabytes)], capture_output=True, text=True, env=env, check=True)
    return float(result.stdout.split()[0])


def random_model(shape):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**shape, "max_seq_len": 2048}, tie_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model


def drop_from_page_cache(path):
    """Write the file to disk and evict it, so the next reader maps it as it would a model file on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_c(binary, model_path, tokenizer_path, threads, steps, topp):
    """(tokens per second, percent of the time spent sampling) of one ./run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [binary, model_path, "-z", tokenizer_path, "-t", "1.0", "-p", str(topp), "-n", str(steps), "-s", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return (float(re.search(r"achieved tok/s: ([0-9.]+)", result.stderr).group(1)),
            float(re.search(r"sampling: ([0-9.]+)%", result.stderr).group(1)))


def tokens_per_second(binary, model_path, tokenizer_path, threads, steps, topp):
    return run_c(binary, model_path, tokenizer_path, threads, steps, topp)[0]


def prompt_file(folder, n_tokens):
    """A text of n_tokens - 1 bytes: with <|bos|>, a prompt of n_tokens byte-level tokens."""
    path = os.path.join(folder, f"prompt_{n_tokens}.txt")
    with open(path, "w") as f:
        f.write((PROMPT_TEXT * (n_tokens // len(PROMPT_TEXT) + 1))[:n_tokens - 1])
    return path


def time_to_first_token(binary, model_path, tokenizer_path, threads, prompt_path):
    """Seconds from the prompt's first token into ./run to the first token out, as run.c reports them."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [binary, model_path, "-z", tokenizer_path, "-t", "0", "-n", "1", "-f", prompt_path]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return float(re.search(r"time to first token: ([0-9.]+) s", result.stderr).group(1))


def python_time_to_first_token(model, tokenizer, n_tokens, threads, repeats):
    """The Python engine's time to first token on the same prompt: engine.generate, float32, best of the repeats."""
    import engine
    torch.set_num_threads(threads)
    prompt = [tokenizer.bos_id] + tokenizer.encode((PROMPT_TEXT * (n_tokens // len(PROMPT_TEXT) + 1))[:n_tokens - 1])
    assert len(prompt) == n_tokens
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        next(engine.generate(model, tokenizer, prompt, max_new_tokens=1, temperature=0, tools=False))
        best = min(best, time.perf_counter() - t0)
    return best


def layer_weights(shape):
    """Weights of the layers (what every prompt token multiplies): attention and feed-forward."""
    dim, hidden, layers = shape["dim"], shape["hidden_dim"], shape["n_layers"]
    kv_dim = dim // shape["n_heads"] * shape.get("n_kv_heads", shape["n_heads"])
    return layers * (2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="15M,42M,110M,SmolLM2", help="comma-separated: 15M, 42M, 110M, SmolLM2")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--steps", type=int, default=256, help="new tokens per run (-n)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
    parser.add_argument("--dtypes", default="fp32,int8")
    parser.add_argument("--prompts", default="32,200,1000", help="prompt lengths for the time to first token ('' = none)")
    parser.add_argument("--python", default="True", help="also time the Python engine's first token (True/False)")
    args = parser.parse_args()
    prompt_lengths = [int(n) for n in args.prompts.split(",") if n.strip()]
    shapes = [s.strip() for s in args.shapes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; -t 1.0 -p 1.0 -n {args.steps}, best of {args.repeats}")
    tokenizer = Tokenizer.byte_level()
    rows, first_token_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        binary, probe = os.path.join(tmp, "run"), os.path.join(tmp, "read_bandwidth")
        build(binary)
        build(probe, os.path.join("bench", "read_bandwidth.c"))
        tokenizer_path = os.path.join(tmp, "tokenizer.bin")
        write_tokenizer(tokenizer, tokenizer_path)
        prompts = {n: prompt_file(tmp, n) for n in prompt_lengths}
        for shape in shapes:
            model = random_model(SHAPES[shape])
            for dtype in dtypes:
                path = os.path.join(tmp, f"{shape}_{dtype}.bin")
                t0 = time.time()
                group = choose_group_size(model.args, 64) if dtype == "int8" else 0
                size, _ = write_model(model, tokenizer, path, 1 if dtype == "int8" else 0, group)
                print(f"{shape} {dtype}: {size / 1e6:.0f} MB file, written in {time.time() - t0:.1f}s", flush=True)
                drop_from_page_cache(path)
                tokens_per_second(binary, path, tokenizer_path, 1, 4, 1.0)  # read it from disk once
                for n_threads in threads:
                    tps, bandwidth = 0.0, 0.0
                    for _ in range(args.repeats):  # alternating, so both see the same minutes of the host
                        bandwidth = max(bandwidth, read_bandwidth(probe, size, n_threads))
                        tps = max(tps, tokens_per_second(binary, path, tokenizer_path, n_threads, args.steps, 1.0))
                    ceiling = bandwidth * 1e9 / size  # tok/s if every weight byte came at the streaming speed
                    reference = LLAMA2C[dtype].get(shape) if n_threads == 2 else None
                    rows.append((shape, dtype, n_threads, tps, reference, tps / ceiling))
                    ref_text = f"   llama2.c {reference} tok/s: {tps / reference:.2f}x" if reference else ""
                    print(f"  {n_threads} thread{'s' if n_threads > 1 else ' '}: {tps:8.1f} tok/s   "
                          f"{100 * tps / ceiling:3.0f}% of the {bandwidth:.0f} GB/s ceiling ({ceiling:.0f} tok/s)"
                          f"{ref_text}", flush=True)
                # the sampler's share of the time, timed inside run.c: tok/s with and without top-p differ by
                # less than the run-to-run noise of the memory bandwidth, so their ratio is no measure
                n_threads = max(threads)
                full = [run_c(binary, path, tokenizer_path, n_threads, args.steps, 1.0) for _ in range(args.repeats)]
                nucleus = [run_c(binary, path, tokenizer_path, n_threads, args.steps, 0.9)
                           for _ in range(args.repeats)]
                print(f"  sampling ({n_threads} threads, median of {args.repeats}): "
                      f"{sorted(r[1] for r in full)[len(full) // 2]:.1f}% of the time at -p 1.0, "
                      f"{sorted(r[1] for r in nucleus)[len(nucleus) // 2]:.1f}% at -p 0.9 "
                      f"({max(r[0] for r in nucleus):.1f} tok/s)", flush=True)
                for n_threads in threads:
                    for n_tokens, prompt_path in prompts.items():
                        ttft = min(time_to_first_token(binary, path, tokenizer_path, n_threads, prompt_path)
                                   for _ in range(args.repeats))
                        gflops = 2 * layer_weights(SHAPES[shape]) * n_tokens / ttft / 1e9
                        first_token_rows.append((shape, dtype, n_threads, n_tokens, ttft))
                        print(f"  {n_threads} thread{'s' if n_threads > 1 else ' '}, {n_tokens:4d}-token prompt: first "
                              f"token after {ttft:7.3f} s ({n_tokens / ttft:7.1f} prompt tok/s, {gflops:5.1f} GFLOP/s)",
                              flush=True)
                os.remove(path)
            if args.python == "True":
                n_threads = max(threads)
                for n_tokens in prompt_lengths:
                    ttft = python_time_to_first_token(model, tokenizer, n_tokens, n_threads, args.repeats)
                    first_token_rows.append((shape, "python fp32", n_threads, n_tokens, ttft))
                    print(f"  Python engine, fp32, {n_threads} threads, {n_tokens:4d}-token prompt: first token after "
                          f"{ttft:7.3f} s ({n_tokens / ttft:7.1f} prompt tok/s)", flush=True)
            del model
    print("\ngeneration\n  shape  dtype  threads     tok/s   of ceiling   vs llama2.c")
    for shape, dtype, n_threads, tps, reference, share in rows:
        ratio = f"{tps / reference:.2f}x of {reference}" if reference else ""
        print(f"{shape:>7}  {dtype:>5}  {n_threads:>7}  {tps:8.1f}   {100 * share:9.0f}%   {ratio}")
    if first_token_rows:
        print("\ntime to first token, seconds (prompt tok/s)")
        print("  shape        dtype  threads  " + "  ".join(f"{n:>17}" for n in prompt_lengths))
        keys = sorted({r[:3] for r in first_token_rows}, key=lambda k: [r[:3] for r in first_token_rows].index(k))
        for key in keys:
            cells = {r[3]: r[4] for r in first_token_rows if r[:3] == key}
            print(f"{key[0]:>7}  {key[1]:>11}  {key[2]:>7}  " +
                  "  ".join(f"{cells[n]:7.3f} ({n / cells[n]:6.1f})" for n in prompt_lengths))


if __name__ == "__main__":
    main()
