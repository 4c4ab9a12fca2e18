"""
Byte-level BPE tokenizer: training, the tokenizer file, encoding through tiktoken, and chat rendering.

- Training splits text with a GPT-4-style regex (the `regex` package), counts the unique chunks once, then
  merges the most frequent adjacent pair again and again, updating pair counts only in the chunks that
  contain the merged pair (never a full recount).
- The tokenizer file is one JSON document: format version, split pattern, every token's bytes in rank order
  (base64), and the special tokens. Its sha256 is the tokenizer's identity in meta.json and checkpoints.
- Encoding and decoding go through a tiktoken.Encoding built from the ranks (Rust, multi-threaded batches).
- render_conversation() turns chat messages into token ids and a loss mask in one pass, so the mask can
  never drift from the tokens.
"""

import base64
import hashlib
import heapq
import json
from collections import Counter

import regex
import tiktoken

# GPT-4's (cl100k) pre-split: contractions, words with one leading non-letter, numbers of up to 3 digits,
# punctuation runs, newlines, other whitespace. BPE merges never cross these chunk boundaries.
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|system_start|>", "<|system_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the calculator tool
    "<|output_start|>", "<|output_end|>",  # the tool's answer, written into the sequence by the engine
]

FILE_FORMAT = "tokenizer"
FILE_VERSION = 1


class Tokenizer:
    """Ranks (token bytes -> id), a split pattern and special tokens, encoded and decoded by tiktoken."""

    def __init__(self, mergeable_ranks, pattern, special_tokens, name="bpe"):
        missing = [t for t in SPECIAL_TOKENS if t not in special_tokens]
        if missing:
            raise ValueError(f"tokenizer {name}: missing special tokens {missing}")
        self.mergeable_ranks = mergeable_ranks  # dict bytes -> id
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)  # dict name -> id
        self.name = name
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.vocab_size = self.encoding.n_vocab
        self.bos_id = self.special_tokens["<|bos|>"]
        self._json = None

    # --- construction ---

    @classmethod
    def byte_level(cls):
        """256 byte tokens + the special tokens, no merges: a tokenizer that needs no training."""
        ranks = {bytes([i]): i for i in range(256)}
        return cls(ranks, GPT4_SPLIT_PATTERN, special_tokens_after(256), name="bytes")

    @classmethod
    def gpt2(cls):
        """tiktoken's GPT-2 ranks plus our special tokens (GPT-2's <|endoftext|> keeps its id 50256)."""
        gpt2 = tiktoken.get_encoding("gpt2")  # downloads once, then tiktoken's cache
        ranks = gpt2._mergeable_ranks
        special = {"<|endoftext|>": 50256, **special_tokens_after(50257)}
        return cls(ranks, gpt2._pat_str, special, name="gpt2")

    @classmethod
    def from_json(cls, text, source="tokenizer"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not a tokenizer file (invalid JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != FILE_FORMAT:
            raise ValueError(f"{source}: not a tokenizer file (expected \"format\": \"{FILE_FORMAT}\")")
        if d.get("version") != FILE_VERSION:
            raise ValueError(f"{source}: tokenizer file version {d.get('version')}, this code reads {FILE_VERSION}")
        ranks = {base64.b64decode(token): rank for rank, token in enumerate(d["ranks"])}
        if len(ranks) != len(d["ranks"]):
            raise ValueError(f"{source}: tokenizer has duplicate tokens")
        tokenizer = cls(ranks, d["pattern"], d["special_tokens"], name=d.get("name", "bpe"))
        tokenizer._json = text
        return tokenizer

    @classmethod
    def from_file(cls, path):
        if path == "gpt2":
            return cls.gpt2()
        if path == "bytes":
            return cls.byte_level()
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read(), source=path)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {path} not found (train one with prepare/tokenizer.py)") from None

    def to_json(self):
        if self._json is None:
            ranks = [base64.b64encode(token).decode("ascii")
                     for token, _ in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
            self._json = json.dumps({"format": FILE_FORMAT, "version": FILE_VERSION, "name": self.name,
                                     "pattern": self.pattern, "special_tokens": self.special_tokens,
                                     "ranks": ranks})
        return self._json

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @property
    def sha256(self):
        """The tokenizer's identity: sha256 of its file's bytes."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    # --- encoding ---

    def encode(self, text, bos=False):
        """Plain text -> ids. Special-token strings inside text are encoded as ordinary text, never as specials."""
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts, bos=False, num_threads=8):
        """Many texts at once, on num_threads threads (tiktoken's Rust encoder runs without the GIL)."""
        texts = list(texts)
        encode = self.encoding.encode_ordinary
        if num_threads <= 1 or len(texts) < 2:
            batches = [encode(t) for t in texts]
        else:
            # one contiguous slice of texts per thread: far cheaper than one thread-pool task per text, which
            # costs more than encoding a short document
            from concurrent.futures import ThreadPoolExecutor
            n = min(num_threads, len(texts))
            bounds = [len(texts) * i // n for i in range(n + 1)]
            with ThreadPoolExecutor(n) as pool:
                parts = pool.map(lambda i: [encode(t) for t in texts[bounds[i]:bounds[i + 1]]], range(n))
            batches = [ids for part in parts for ids in part]
        return [[self.bos_id] + ids for ids in batches] if bos else batches

    def decode(self, ids):
        return self.encoding.decode(ids, errors="replace")

    def decode_bytes(self, ids):
        """The raw bytes of ids; streaming callers join bytes and decode once a character is complete."""
        return self.encoding.decode_bytes(ids)

    def special(self, name):
        return self.special_tokens[name]

    def is_special(self, token_id):
        return token_id in self._special_ids()

    def _special_ids(self):
        return set(self.special_tokens.values())

    # --- chat ---

    def render_conversation(self, messages, max_tokens=None):
        """
        A conversation -> (ids, mask), per DESIGN.md: <|bos|>, then each turn wrapped in its role's start and
        end tokens. mask[i] is 1 where ids[i] is a token the model must learn to produce: the assistant's text,
        its tool calls and its <|assistant_end|>; 0 for everything it is given (system and user turns, tool
        output, <|bos|>, <|assistant_start|>). max_tokens truncates both lists.
        Assistant content may be a string or a list of parts: {"type": "text"|"python"|"python_output", "text"}.
        """
        check_conversation(messages)
        ids, mask = [self.bos_id], [0]

        def add(tokens, trained):
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        for message in messages:
            role, content = message["role"], message["content"]
            if role in ("system", "user"):
                add([self.special(f"<|{role}_start|>")], 0)
                add(self.encode(content), 0)
                add([self.special(f"<|{role}_end|>")], 0)
                continue
            add([self.special("<|assistant_start|>")], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add([self.special("<|python_start|>")] + self.encode(part["text"]) +
                        [self.special("<|python_end|>")], 1)
                else:  # python_output: the tool writes it, the model does not learn it
                    add([self.special("<|output_start|>")] + self.encode(part["text"]) +
                        [self.special("<|output_end|>")], 0)
            add([self.special("<|assistant_end|>")], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, messages):
        """A conversation whose last turn is the user's -> ids ending in <|assistant_start|>, ready to sample."""
        if messages and messages[-1].get("role") == "assistant":
            raise ValueError("render_for_completion: the last message must be the user's, not the assistant's")
        # render with a placeholder assistant turn, then cut it off after its start token
        ids, _ = self.render_conversation(list(messages) + [{"role": "assistant", "content": "x"}])
        start = len(ids) - 1 - ids[::-1].index(self.special("<|assistant_start|>"))
        return ids[:start + 1]


def special_tokens_after(first_id):
    return {name: first_id + i for i, name in enumerate(SPECIAL_TOKENS)}


def check_conversation(messages):
    """Raise ValueError unless messages is [system?] user, assistant, user, ... with non-empty content."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of {'role', 'content'} messages")
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {str(message)[:80]}")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r}; expected system, user or assistant")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if isinstance(content, list) and role == "assistant":
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
                    raise ValueError(f"message {i}: assistant parts need type text, python or python_output")
            if not any(part.get("text") for part in content):
                raise ValueError(f"message {i} ({role}): empty content")
        elif not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a string")
        elif not content.strip():
            raise ValueError(f"message {i} ({role}): empty content")
    if not turns:
        raise ValueError("a conversation needs at least one user message after the system message")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(turns)
            raise ValueError(f"message {i + offset}: expected {'an' if expected == 'assistant' else 'a'} {expected} turn, got {message['role']!r} "
                             "(turns must alternate user/assistant after an optional system message)")


# ----------------------------------------------------------------------------------------------------
# training


def count_chunks(texts, pattern=GPT4_SPLIT_PATTERN, num_proc=1):
    """
    Counter of the regex chunks (as bytes) of an iterable of strings. num_proc > 1 splits the regex work over
    that many processes (the split is most of the cost of training on a large text); the result is the same.
    """
    if num_proc <= 1:
        return _chunk_bytes(_count_strings(texts, pattern))
    import collections
    import multiprocessing
    counts = Counter()
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        # texts are grouped into ~1 MB pieces so that each task is worth sending to a process; at most two
        # pieces per process are in flight, so a long stream of texts never sits in memory all at once
        pending = collections.deque()
        for piece in _pieces(texts, pattern, 1 << 20):
            pending.append(pool.apply_async(_count_piece, (piece,)))
            if len(pending) >= 2 * num_proc:
                counts.update(pending.popleft().get())
        while pending:
            counts.update(pending.popleft().get())
    return _chunk_bytes(counts)


def _count_strings(texts, pattern):
    compiled = regex.compile(pattern)
    counts = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


def _count_piece(piece):
    texts, pattern = piece
    return _count_strings(texts, pattern)


def _pieces(texts, pattern, piece_chars):
    piece, size = [], 0
    for text in texts:
        piece.append(text)
        size += len(text)
        if size >= piece_chars:
            yield piece, pattern
            piece, size = [], 0
    if piece:
        yield piece, pattern


def _chunk_bytes(counts):
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def train_bpe(chunk_counts, vocab_size, pattern=GPT4_SPLIT_PATTERN, name="bpe", progress=None):
    """
    Byte-level BPE from a Counter of chunk bytes -> count. vocab_size includes the 256 bytes and the
    special tokens. Deterministic: ties between equally frequent pairs go to the smaller pair of ids.
    progress(merges_done, merges_total), if given, is called every 256 merges.
    """
    n_special = len(SPECIAL_TOKENS)
    if not 256 + n_special <= vocab_size <= 65536:
        raise ValueError(f"vocab_size={vocab_size}: expected {256 + n_special} (bytes + specials) to 65536")
    n_merges = vocab_size - 256 - n_special

    # words: each unique chunk as a list of token ids, with how often it occurs
    items = sorted(chunk_counts.items())
    words = [list(chunk) for chunk, _ in items]
    counts = [n for _, n in items]
    pair_counts = Counter()
    pair_words = {}  # pair -> set of word indices where it occurs
    for w, (word, n) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += n
            pair_words.setdefault(pair, set()).add(w)
    # max-heap of (-count, pair); entries go stale when counts change and are skipped when popped
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    id_of = {token: i for i, token in enumerate(vocab)}
    merges = []  # (left id, right id, merged id) in the order they were made
    merges_done = 0
    while merges_done < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale entry
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged in id_of:
            # the same bytes already exist through another pair of tokens: reuse that id (tiktoken looks
            # tokens up by bytes, so two ids with the same bytes cannot exist)
            new_id = id_of[merged]
        else:
            new_id = len(vocab)
            vocab.append(merged)
            id_of[merged] = new_id
            merges_done += 1
            if progress and merges_done % 256 == 0:
                progress(merges_done, n_merges)
        merges.append((pair[0], pair[1], new_id))
        changed = set()
        for w in pair_words.pop(pair, ()):
            word, n = words[w], counts[w]
            new_word, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                    new_word.append(new_id)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            # incremental update: remove this word's old pairs, add its new ones
            for p in zip(word, word[1:]):
                pair_counts[p] -= n
                changed.add(p)
            for p in zip(new_word, new_word[1:]):
                pair_counts[p] += n
                pair_words.setdefault(p, set()).add(w)
                changed.add(p)
            words[w] = new_word
        pair_counts.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            n = pair_counts.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p))
            else:
                pair_counts.pop(p, None)
                pair_words.pop(p, None)
    ranks = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(ranks, pattern, special_tokens_after(len(vocab)), name=name)
    tokenizer.merges = merges  # kept for inspection and tests; the tokenizer file stores only the ranks
    return tokenizer



# ----------------------------------------------------------------------------------------------------
# token files: data/<name>/{split}.bin (+ {split}.mask.bin for chat), meta.json and tokenizer.json beside them


def read_meta(source_dir):
    """meta.json of a prepared source, with a clear error when the source is missing or incomplete."""
    path = f"{source_dir}/meta.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare this source first (see prepare/ and the README)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    for key in ("tokenizer_sha256", "vocab_size", "dtype", "splits", "format"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def token_file_path(source_dir, split, mask=False):
    return f"{source_dir}/{split}.mask.bin" if mask else f"{source_dir}/{split}.bin"


def open_tokens(source_dir, split, meta, mask=False):
    """np.memmap of a split's tokens (or its loss mask), read-only."""
    import numpy as np
    path = token_file_path(source_dir, split, mask)
    try:
        return np.memmap(path, dtype=np.uint8 if mask else np.dtype(meta["dtype"]), mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare this source first (see prepare/ and the README)") from None
