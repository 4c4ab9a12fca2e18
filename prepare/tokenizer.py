"""
Train the byte-level BPE tokenizer -> data/tokenizer.json (the file every other prepare/ script reads).

    python prepare/tokenizer.py prepare/sample/tinystories/tiny_stories.txt --vocab_size=4096
    python prepare/tokenizer.py tinystories --vocab_size=32768 --max_chars=100_000_000    # fetches 100 MB of it
    python prepare/tokenizer.py my_notes/ books.txt chats.jsonl --vocab_size=8192 --out=data/my_tokenizer.json

The sources (arguments, or --source=a,b,c) are text files, folders (their .txt/.raw/.md files and the text
fields of .json/.jsonl files; 'sample' is the repository's sample folder), or the name of a source this
repository downloads: tinystories, tinyshakespeare, wikitext2, wikitext103 (their train split; of TinyStories'
2.2 GB only the first --max_chars bytes are fetched). Reading stops after --max_chars characters. The last part of what
was read (5%, at most 2M characters) is held out: training never sees it, and the compression (bytes per token)
is measured on it. Training is deterministic: the same text and vocab size give the same file, byte for byte.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Progress, fail  # noqa: E402
from configurator import configure  # noqa: E402
from prepare.common import download, local_source, read_json_records  # noqa: E402
from prepare.tinyshakespeare import SHA256 as TINYSHAKESPEARE_SHA256  # noqa: E402
from prepare.wikitext import find_split_files as wikitext_split_files  # noqa: E402
from tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, count_chunks, train_bpe  # noqa: E402

# -----------------------------------------------------------------------------------------------------
source = ""  # text files, folders, URLs or source names, comma-separated (or given as positional arguments)
vocab_size = 4096  # tokens in all: 256 bytes + merges + the special tokens
max_chars = 200_000_000  # read at most this many characters
out = "data/tokenizer.json"  # the tokenizer file to write
num_proc = os.cpu_count() or 1  # processes for the regex split
# -----------------------------------------------------------------------------------------------------

# sources known by name: the official train file of each
NAMED_SOURCES = {
    "tinystories": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
    "tinyshakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "wikitext2": "wikitext2",
    "wikitext103": "wikitext103",
}
TEXT_SUFFIXES = (".txt", ".raw", ".md", ".tokens")
JSON_SUFFIXES = (".json", ".jsonl")
BLOCK_CHARS = 1 << 20


def source_files(source, max_chars):
    """The files to read for one --source entry (of a large download, only the first max_chars bytes)."""
    if source in NAMED_SOURCES:
        if source.startswith("wikitext"):
            return [wikitext_split_files(None, source[len("wikitext"):])["train"]]
        if source == "tinyshakespeare":
            return [download(NAMED_SOURCES[source], TINYSHAKESPEARE_SHA256)]
        return [download(NAMED_SOURCES[source], max_bytes=max_chars)]  # characters need at least as many bytes
    source = local_source(source)
    if os.path.isdir(source):
        files = []
        for folder, _, names in sorted(os.walk(source)):
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES + JSON_SUFFIXES)]
        if not files:
            fail(f"--source {source}: no {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files in it")
        return files
    if os.path.exists(source) or "://" in source:
        return [download(source)]
    fail(f"--source {source}: not a file, a folder, a URL or one of {', '.join(NAMED_SOURCES)}")


def text_blocks(path):
    """~1 MB blocks of a text file, each cut after a line break followed by a non-space character, so that
    no regex chunk spans two blocks (the counts are those of the whole file)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        rest = ""
        for block in iter(lambda: f.read(BLOCK_CHARS), ""):
            text = rest + block
            cut = len(text)
            while cut > 0:
                cut = text.rfind("\n", 0, cut)
                if cut < 0 or not text[cut + 1:cut + 2].isspace() and cut + 1 < len(text):
                    break
            if cut <= 0:
                rest = text  # no safe cut yet: keep reading
                continue
            yield text[:cut + 1]
            rest = text[cut + 1:]
        if rest:
            yield rest


def json_texts(path):
    """The string values of every record of a .json (list) or .jsonl file, one text per record."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
    for _, record in read_json_records(path, skip_bad=True):
        yield "\n".join(strings(record))


def read_texts(sources, max_chars):
    """Texts from every source in order, at most max_chars characters in all."""
    n = 0
    for source in sources:
        for path in source_files(source, max_chars):
            texts = json_texts(path) if path.endswith(JSON_SUFFIXES) else text_blocks(path)
            for text in texts:
                if n + len(text) > max_chars:
                    text = text[:max_chars - n]
                n += len(text)
                if text:
                    yield text
                if n >= max_chars:
                    return


def main():
    sources = [entry for entry in source.split(",") if entry]
    if not sources:
        fail("no source: give text files, folders or source names as arguments or as --source=a,b")
    if not 256 + len(SPECIAL_TOKENS) <= vocab_size <= 65536:
        fail(f"--vocab_size={vocab_size}: expected {256 + len(SPECIAL_TOKENS)} to 65536")

    # read everything once to know the total, keeping the last part as held-out text
    t0 = time.time()
    try:
        texts = list(read_texts(sources, max_chars))
    except (OSError, ValueError) as e:
        fail(str(e))
    total = sum(len(t) for t in texts)
    if total == 0:
        fail(f"--source={source}: no text in it")
    heldout_chars = min(total // 20, 2_000_000)
    train_texts, heldout_texts, n = [], [], 0
    for text in texts:
        keep = max(0, min(len(text), total - heldout_chars - n))
        if keep:
            train_texts.append(text[:keep])
        if keep < len(text):
            heldout_texts.append(text[keep:])
        n += len(text)
    del texts
    print(f"read {total:,} characters in {time.time() - t0:.1f}s; training on {total - heldout_chars:,}, "
          f"holding out {heldout_chars:,}")

    t0 = time.time()
    chunk_counts = count_chunks(train_texts, GPT4_SPLIT_PATTERN, num_proc=num_proc)
    del train_texts
    print(f"counted {len(chunk_counts):,} unique chunks ({sum(chunk_counts.values()):,} in all) "
          f"in {time.time() - t0:.1f}s on {num_proc} processes")

    t0 = time.time()
    n_merges_asked = vocab_size - 256 - len(SPECIAL_TOKENS)
    merges = Progress("merges", lambda done, seconds: f"{done:,}/{n_merges_asked:,} ({seconds:.1f}s)")
    # train_bpe reports the merges done so far; Progress counts what is added
    tokenizer = train_bpe(chunk_counts, vocab_size, progress=lambda done, _: merges.update(done - merges.done))
    n_merges = len(tokenizer.mergeable_ranks) - 256
    merges.update(n_merges - merges.done)  # the merges made since train_bpe's last report
    merges.close()
    print(f"trained {n_merges:,} merges in {time.time() - t0:.1f}s: vocab_size {tokenizer.vocab_size:,}")
    if tokenizer.vocab_size < vocab_size:
        print(f"note: the text has too few distinct pairs for {vocab_size:,} tokens; the vocabulary stopped "
              f"at {tokenizer.vocab_size:,} (give it more text)")

    try:  # written aside, then renamed: an earlier tokenizer file is never left half-overwritten
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tokenizer.save(out + ".tmp")
        os.replace(out + ".tmp", out)
    except OSError as e:
        fail(f"{out}: cannot write the tokenizer file there ({e.strerror}); choose another --out")
    heldout = "".join(heldout_texts)
    n_tokens = len(tokenizer.encode(heldout))
    longest = sorted(tokenizer.mergeable_ranks, key=len)[-5:]
    print(f"compression on {len(heldout):,} held-out characters: "
          f"{len(heldout.encode('utf-8')) / max(n_tokens, 1):.2f} bytes/token")
    print(f"longest tokens: {', '.join(json.dumps(t.decode('utf-8', errors='replace')) for t in longest)}")
    print(f"wrote {out} (sha256 {tokenizer.sha256[:16]}...)")


if __name__ == "__main__":
    configure(globals(), positional="source")
    main()
