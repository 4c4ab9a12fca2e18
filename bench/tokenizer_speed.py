"""
Tokenizer benchmark: training time, encoding speed, compression, and the memory of preparing a large file.

    python bench/tokenizer_speed.py              # 10 MB and 100 MB corpora (about 2-3 minutes on 2 cores)
    python bench/tokenizer_speed.py --quick      # 10 MB only

The full TinyStories train split (2.2 GB) is not in a local copy of the datasets, so the corpora are built from the real
stories there (tiny_stories.txt, ~1,100 stories, 0.9 MB), repeated with a different seeded shuffle of the
stories each time. Repeating text adds no new words: such a corpus has only ~5-7K distinct chunks, too few
pairs for a 32K vocabulary, so the 32K figures are also measured on a diverse corpus: every text file in
the local copy (WikiText, Shakespeare, Alpaca, LIMA, GSM8K, MMLU, ...; ~29 MB), repeated to 100 MB.
Compression is measured on tinystories_val.txt, which no corpus here contains.
"""

import glob
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's modules first: bench/ holds none of the same name
from configurator import configure  # noqa: E402
from tokenizer import count_chunks, train_bpe  # noqa: E402

# -----------------------------------------------------------------------------------------------------
quick = False  # the 10 MB corpora only
num_proc = os.cpu_count() or 1  # processes for counting chunks (and for prepare/text.py)
# -----------------------------------------------------------------------------------------------------

SHARED = os.environ.get("NANOLLAMA_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


def read(relative):
    with open(os.path.join(SHARED, relative), encoding="utf-8") as f:
        return f.read()


def tinystories_corpus(n_bytes):
    """Real stories repeated, each repetition in a new seeded order, until n_bytes."""
    stories = [s for s in read("tinystories/tiny_stories.txt").split("\n") if s.strip()]
    out, size, seed = [], 0, 0
    while size < n_bytes:
        order = stories[:]
        random.Random(seed).shuffle(order)
        for s in order:
            out.append(s)
            size += len(s) + 1
            if size >= n_bytes:
                break
        seed += 1
    return out


def diverse_corpus(n_bytes):
    files = sorted(f for f in glob.glob(os.path.join(SHARED, "**", "*"), recursive=True)
                   if f.endswith((".txt", ".json", ".jsonl", ".csv", ".raw")) and "tinystories_val" not in f)
    paragraphs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            paragraphs += [p for p in f.read().split("\n\n") if p.strip()]
    out, size, seed = [], 0, 0
    while size < n_bytes:
        order = paragraphs[:]
        random.Random(seed).shuffle(order)
        for p in order:
            out.append(p)
            size += len(p) + 2
            if size >= n_bytes:
                break
        seed += 1
    return out


def train(texts, vocab_size, num_proc):
    t0 = time.time()
    counts = count_chunks(texts, num_proc=num_proc)
    t1 = time.time()
    tokenizer = train_bpe(counts, vocab_size)
    t2 = time.time()
    return tokenizer, len(counts), t1 - t0, t2 - t1


def main():
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}; "
          f"python {platform.python_version()}")
    heldout = read("tinystories/tinystories_val.txt").replace("<|endoftext|>", "")
    sizes = [10_000_000] if quick else [10_000_000, 100_000_000]

    print("\n## training (count chunks on %d processes, then merge)" % num_proc)
    print(f"{'corpus':24s} {'vocab':>6s} {'reached':>7s} {'chunks':>8s} {'count s':>8s} {'merge s':>8s} {'total s':>8s} {'bytes/tok':>9s}")
    trained = {}
    for size in sizes:
        for kind, make in (("tinystories", tinystories_corpus), ("diverse", diverse_corpus)):
            texts = make(size)
            for vocab_size in (4096, 32768):
                if kind == "diverse" and vocab_size == 4096:
                    continue
                tokenizer, n_chunks, count_s, merge_s = train(texts, vocab_size, num_proc)
                ids = tokenizer.encode(heldout)
                bpt = len(heldout.encode("utf-8")) / len(ids)
                print(f"{kind + f' {size // 1_000_000} MB':24s} {vocab_size:6d} {tokenizer.vocab_size:7d} {n_chunks:8,d} "
                      f"{count_s:8.1f} {merge_s:8.1f} {count_s + merge_s:8.1f} {bpt:9.2f}", flush=True)
                trained[(kind, size, vocab_size)] = tokenizer
            if kind == "tinystories" and size == sizes[0]:
                encode_texts = texts
            del texts

    print("\n## encoding (tiktoken, encode_batch over ~1,000-byte stories)")
    total_bytes = sum(len(t.encode("utf-8")) for t in encode_texts)
    for key in ((("tinystories", sizes[0], 4096)), ("diverse", sizes[0], 32768)):
        tokenizer = trained[key]
        for threads in (1, 2):
            t0 = time.time()
            tokenizer.encode_batch(encode_texts, num_threads=threads)
            seconds = time.time() - t0
            print(f"vocab {tokenizer.vocab_size:6d}, {threads} thread{'s' if threads > 1 else ' '}: "
                  f"{total_bytes / seconds / 1e6:6.1f} MB/s ({total_bytes / seconds / 1e6 / threads:5.1f} MB/s per thread)")

    print("\n## preparing token files: prepare/text.py on the largest TinyStories corpus (peak memory of the processes)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(tinystories_corpus(sizes[-1])))
        tokenizer_path = os.path.join(tmp, "tokenizer.json")
        trained[("tinystories", sizes[0], 4096)].save(tokenizer_path)
        command = [sys.executable, os.path.join(REPO, "prepare", "text.py"), path, "--doc_sep=line",
                   f"--tokenizer={tokenizer_path}", f"--data_dir={tmp}", f"--num_proc={num_proc}"]
        # a fresh wrapper process, so that the peak counts only prepare/text.py and its workers (this process's
        # earlier children were forked with the corpora in memory)
        wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        t0 = time.time()
        result = subprocess.run([sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True)
        seconds = time.time() - t0
        peak_mb = int(result.stdout.split()[-1]) / 1024  # the largest of those processes, in MB
        size_mb = os.path.getsize(path) / 1e6
        print(f"{size_mb:.0f} MB in {seconds:.1f}s ({size_mb / seconds:.1f} MB/s) on {num_proc} processes; "
              f"largest process peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    configure(globals())
    main()
