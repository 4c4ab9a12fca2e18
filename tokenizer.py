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
import os
import re
import unicodedata
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

# The chat formats a tokenizer can render. Ours is nanollama's; the others are those of imported open-weight
# models (Tokenizer.from_hf): ChatML (SmolLM2, Qwen2.5) and Llama 3's header format.
#   chatml:  <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n
#   llama3:  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>...
CHAT_FORMATS = {
    "nanollama": {"special_tokens": SPECIAL_TOKENS, "end_of_turn": "<|assistant_end|>"},
    "chatml": {"special_tokens": ["<|im_start|>", "<|im_end|>"], "end_of_turn": "<|im_end|>"},
    "llama3": {"special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "end_of_turn": "<|eot_id|>"},
    "none": {"special_tokens": [], "end_of_turn": None},  # an imported base model with no chat template we know
}

FILE_FORMAT = "tokenizer"
FILE_VERSION = 1
# the tokenizer file's fields for imported tokenizers, with the values of our own (written only when they differ)
OPTIONAL_FIELDS = {"chat_format": "nanollama", "bos_token": "<|bos|>", "chat_template": "", "default_system": "",
                   "normalizer": "", "unk_token": "", "scoring_bos_token": None}


class Tokenizer:
    """Ranks (token bytes -> id), a split pattern and special tokens, encoded and decoded by tiktoken."""

    def __init__(self, mergeable_ranks, pattern, special_tokens, name="bpe", chat_format="nanollama",
                 bos_token="<|bos|>", chat_template="", default_system="", normalizer="", unk_token="",
                 scoring_bos_token=None):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"tokenizer {name}: chat_format {chat_format!r}, expected one of {list(CHAT_FORMATS)}")
        required = CHAT_FORMATS[chat_format]["special_tokens"] + [bos_token]
        required += [token for token in (unk_token, scoring_bos_token) if token]
        missing = [t for t in required if t not in special_tokens]
        if missing:
            raise ValueError(f"tokenizer {name}: missing special tokens {missing} ({chat_format} chat format)")
        if normalizer not in ("", "NFC"):
            raise ValueError(f"tokenizer {name}: normalizer {normalizer!r}, expected '' or 'NFC'")
        self.mergeable_ranks = mergeable_ranks  # dict bytes -> id
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)  # dict name -> id
        self.name = name
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.vocab_size = self.encoding.n_vocab
        # Imported (Hugging Face) tokenizers keep their model's own chat format and document-start token; ours
        # is 'nanollama' (docs/formats.md). chat_template is the Jinja text transformers uses, kept for export only.
        self.chat_format = chat_format
        self.bos_token = bos_token
        self.bos_id = self.special_tokens[bos_token]  # starts every document (and every nanollama/llama3 conversation)
        end_of_turn = CHAT_FORMATS[chat_format]["end_of_turn"] or bos_token
        self.assistant_end_id = self.special_tokens[end_of_turn]  # where a reply ends
        self.has_tools = chat_format == "nanollama"  # the calculator's tokens exist only in our format
        self.chat_template = chat_template
        self.default_system = default_system  # the system message the model's template adds when none is given
        self.normalizer = normalizer  # 'NFC': unicode-normalize text before encoding (Qwen2's tokenizer does)
        # The token lm-evaluation-harness's tokenizer puts before every text it scores: ours always start with
        # <|bos|>; an imported one does what its files say (tokenizer_config.json's add_bos_token or its
        # tokenizer.json's post-processor, a GGUF's tokenizer.ggml.add_bos_token), None when it adds nothing.
        # scoring_bos_token None means the document-start token (ours, and files written before this field).
        self.scoring_bos_token = scoring_bos_token
        start = bos_token if scoring_bos_token is None else scoring_bos_token
        self.scoring_bos_id = self.special_tokens[start] if start else None
        # Bytes with no token of their own (SmolLM2 has none for 21 of the 256, such as 0x04): Hugging Face's
        # BPE leaves such a byte out of its pre-split piece and merges the rest as if it was not there, or,
        # when the tokenizer names an unk_token, puts that token in its place (one per run of such bytes).
        # tiktoken cannot encode them (it needs every byte), so text containing one takes encode_with_gaps.
        self.missing_bytes = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        self.unk_token = unk_token
        self.unk_id = self.special_tokens[unk_token] if unk_token else None
        if self.missing_bytes:
            self._split_regex = regex.compile(pattern)
            self._missing_run = re.compile(b"[" + re.escape(self.missing_bytes) + b"]+")
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
        for key, kind in (("pattern", str), ("special_tokens", dict), ("ranks", list)):
            if not isinstance(d.get(key), kind):
                raise ValueError(f"{source}: tokenizer file without a valid \"{key}\" (expected a JSON "
                                 f"{ {str: 'string', dict: 'object', list: 'array'}[kind]})")
        # ranks[i] is the bytes of the token with id i; null where a special token holds the id (imported
        # tokenizers often put their specials first)
        ranks = {}
        for rank, token in enumerate(d["ranks"]):
            if token is None:
                continue
            try:
                token_bytes = base64.b64decode(token, validate=True) if isinstance(token, str) else b""
            except ValueError:  # binascii.Error: a character outside base64's alphabet, or bad padding
                token_bytes = b""
            if not token_bytes or base64.b64encode(token_bytes).decode("ascii") != token:  # canonical only
                raise ValueError(f"{source}: \"ranks\"[{rank}] is {json.dumps(token)[:40]}; expected the "
                                 "token's bytes in base64 (or null for an id a special token holds)")
            ranks[token_bytes] = rank
        if len(ranks) != sum(token is not None for token in d["ranks"]):
            raise ValueError(f"{source}: tokenizer has duplicate tokens")
        extra = {key: d[key] for key in OPTIONAL_FIELDS if key in d}
        tokenizer = cls(ranks, d["pattern"], d["special_tokens"], name=d.get("name", "bpe"), **extra)
        tokenizer._json = text
        return tokenizer

    @classmethod
    def from_file(cls, path):
        """A tokenizer file; 'gpt2' or 'bytes'; 'hf:DIR', a Hugging Face model folder's tokenizer.json; or
        'gguf:FILE', the tokenizer in a GGUF model file's metadata."""
        if path == "gpt2":
            return cls.gpt2()
        if path == "bytes":
            return cls.byte_level()
        if path.startswith("hf:"):
            return cls.from_hf(path[len("hf:"):])
        if path.startswith("gguf:"):
            from checkpoint import read_gguf  # with the other weight formats (it imports torch, so only here)
            metadata, _ = read_gguf(path[len("gguf:"):])
            return cls(**gguf_tokenizer_args(metadata, path[len("gguf:"):]))
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read(), source=path)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {path} not found (train one with prepare/tokenizer.py)") from None

    @classmethod
    def from_hf(cls, folder):
        """The tokenizer of a Hugging Face model folder (tokenizer.json, tokenizer_config.json); see read_hf_tokenizer."""
        return cls(**read_hf_tokenizer(folder))

    def to_json(self):
        if self._json is None:
            by_id = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
            ranks = [None] * (by_id[-1][1] + 1)
            for token, rank in by_id:
                ranks[rank] = base64.b64encode(token).decode("ascii")
            d = {"format": FILE_FORMAT, "version": FILE_VERSION, "name": self.name, "pattern": self.pattern,
                 "special_tokens": self.special_tokens, "ranks": ranks}
            # the fields of imported tokenizers, written only when set (our own files stay byte-identical)
            d.update({key: getattr(self, key) for key, default in OPTIONAL_FIELDS.items()
                      if getattr(self, key) != default})
            self._json = json.dumps(d)
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
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        ids = self._encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def _encode_ordinary(self, text):
        if self.missing_bytes and self._has_missing_bytes(text):
            return self.encode_with_gaps(text)
        return self.encoding.encode_ordinary(text)

    def _has_missing_bytes(self, text):
        # one pass in C over the UTF-8 bytes, ~1% of what encoding the text costs
        data = text.encode("utf-8", "surrogatepass")
        return len(data.translate(None, self.missing_bytes)) != len(data)

    def encode_with_gaps(self, text):
        """
        Encoding as Hugging Face's BPE does it when some bytes have no token: the text is pre-split as usual,
        then in each piece a byte with no token is left out (or becomes unk_token, once per run of such bytes)
        and the rest of the piece is merged as one. Slower than encode (one call per piece): only text that
        contains such a byte comes here.
        """
        try:
            pieces = [piece.encode("utf-8") for piece in self._split_regex.findall(text)]
        except UnicodeEncodeError:  # a lone surrogate: U+FFFD instead, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            pieces = [piece.encode("utf-8") for piece in self._split_regex.findall(text)]
        ids = []
        for data in pieces:
            if self.unk_id is None:
                data = data.translate(None, self.missing_bytes)
                ids.extend(self.encoding._encode_single_piece(data) if data else [])
                continue
            for i, part in enumerate(self._missing_run.split(data)):
                if i > 0:
                    ids.append(self.unk_id)
                ids.extend(self.encoding._encode_single_piece(part) if part else [])
        return ids

    def encode_batch(self, texts, bos=False, num_threads=8):
        """Many texts at once, on num_threads threads (tiktoken's Rust encoder runs without the GIL)."""
        texts = list(texts)
        if self.normalizer:
            texts = [unicodedata.normalize(self.normalizer, t) for t in texts]
        encode = self._encode_ordinary
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
        A conversation -> (ids, mask), per docs/formats.md: <|bos|>, then each turn wrapped in its role's start and
        end tokens. mask[i] is 1 where ids[i] is a token the model must learn to produce: the assistant's text,
        its tool calls and its <|assistant_end|>; 0 for everything it is given (system and user turns, tool
        output, <|bos|>, <|assistant_start|>). max_tokens truncates both lists.
        Assistant content may be a string or a list of parts: {"type": "text"|"python"|"python_output", "text"}.
        """
        check_conversation(messages)
        if self.chat_format == "none":
            raise ValueError(f"tokenizer {self.name} has no chat format (its model came without a ChatML or Llama 3 "
                             "chat template): use it for plain text, or fine-tune a model that has one")
        if self.chat_format != "nanollama":
            ids, mask = self._render_imported_format(messages)
            return (ids[:max_tokens], mask[:max_tokens]) if max_tokens is not None else (ids, mask)
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
        """A conversation whose last turn is the user's -> ids ending with the assistant's header, ready to sample."""
        if messages and messages[-1].get("role") == "assistant":
            raise ValueError("render_for_completion: the last message must be the user's, not the assistant's")
        ids, _ = self.render_conversation(messages)
        if self.chat_format == "chatml":
            return ids + [self.special("<|im_start|>")] + self.encode("assistant\n")
        if self.chat_format == "llama3":
            return ids + [self.special("<|start_header_id|>")] + self.encode("assistant") + \
                [self.special("<|end_header_id|>")] + self.encode("\n\n")
        return ids + [self.special("<|assistant_start|>")]

    def _render_imported_format(self, messages):
        """
        ChatML or Llama 3 rendering, token for token what transformers' apply_chat_template gives for these
        models' templates (text between special tokens is encoded as one piece, as Hugging Face tokenizers do),
        with one addition for ChatML: the document-start token first (<|endoftext|> for SmolLM2 and Qwen2.5),
        as every conversation here starts with it, because token files are split into conversations at it.
        The mask trains the assistant's content and its end-of-turn token, never the role header.
        """
        if self.default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        ids, mask = [], []

        def add(tokens, trained):
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        def add_after_header(header, content, trained):
            # header and content are one piece of text: encode it whole, then train only the tokens that
            # start after the header's bytes
            tokens = self.encode(header + content)
            header_bytes, position = len(header.encode("utf-8")), 0
            for token in tokens:
                add([token], trained if position >= header_bytes else 0)
                position += len(self.decode_bytes([token]))

        add([self.bos_id], 0)  # llama3's <|begin_of_text|>, or ChatML's document separator
        for message in messages:
            role, content = message["role"], message["content"]
            if not isinstance(content, str):
                if any(part["type"] != "text" for part in content):
                    raise ValueError(f"tool calls need the nanollama chat format; this tokenizer ({self.name}) "
                                     f"uses {self.chat_format}")
                content = "".join(part["text"] for part in content)
            trained = 1 if role == "assistant" else 0
            if self.chat_format == "chatml":
                add([self.special("<|im_start|>")], 0)
                add_after_header(role + "\n", content, trained)
                add([self.special("<|im_end|>")], trained)
                add(self.encode("\n"), 0)
            else:  # Llama 3's templates trim each message's content
                add([self.special("<|start_header_id|>")] + self.encode(role) + [self.special("<|end_header_id|>")], 0)
                add_after_header("\n\n", content.strip(), trained)
                add([self.special("<|eot_id|>")], trained)
        return ids, mask


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
# Hugging Face tokenizer.json: byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2) in and out
#
# A byte-level BPE tokenizer.json holds the vocabulary as strings in GPT-2's byte alphabet (every byte shown
# as one printable character), the merges in priority order, a pre-tokenizer (the regex split) and the added
# (special) tokens. tiktoken needs bytes -> rank, with the rank also the id; that is the same BPE when the
# ids of merged tokens grow in merge order, which read_hf_tokenizer checks.

# GPT-2's pre-split, and SmolLM2's: GPT-2's with every digit its own piece (a Digits pre-tokenizer in front).
# In SmolLM2's, a whitespace run before a digit ends at the digit, as it does when digits are split first.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_DIGITS_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# the Jinja chat template of our own format, for exports that transformers reads
NANOLLAMA_CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}")


def byte_alphabet():
    """GPT-2's map byte -> printable character: printable Latin-1 bytes stand for themselves, the others
    (control characters, space, ...) take the characters from U+0100 on, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


def read_json_file(path, required=True):
    """A JSON file of a Hugging Face folder; errors name the file. Not required and missing: {}."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise FileNotFoundError(f"{path} not found: expected a Hugging Face model folder") from None
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _token_name(value):
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def split_pattern_of(pre_tokenizer, path):
    """The one regex that splits text as a tokenizer.json's pre-tokenizer does, or a ValueError."""
    kind = (pre_tokenizer or {}).get("type")
    steps = pre_tokenizer.get("pretokenizers", []) if kind == "Sequence" else [pre_tokenizer or {}]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        raise ValueError(f"{path}: pre-tokenizer {kinds}: only byte-level BPE tokenizers (ending in ByteLevel, "
                         "without add_prefix_space) can be imported, such as SmolLM2's, Llama 3's and Qwen2's")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2_SPLIT_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return GPT2_DIGITS_SPLIT_PATTERN
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        split = steps[0]
        if split.get("behavior") == "Isolated" and not split.get("invert") and "Regex" in split.get("pattern", {}):
            return split["pattern"]["Regex"]
    raise ValueError(f"{path}: pre-tokenizer {kinds} is not one this importer knows (ByteLevel; Digits + "
                     "ByteLevel; an isolating regex Split + ByteLevel)")


def hf_folder(name):
    """
    The local folder of 'hf:NAME': NAME itself when it is a folder; otherwise a Hub repository id such as
    HuggingFaceTB/SmolLM2-135M-Instruct, downloaded once (needs internet and the optional huggingface_hub
    package) into Hugging Face's cache.
    """
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"hf:{name}: not a folder, nor a Hub repository id like 'owner/name' (expected a "
                                "Hugging Face model folder with config.json, model.safetensors and tokenizer.json)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"hf:{name}: no such folder; to download it from the Hugging Face Hub, "
                                "pip install huggingface_hub (or download the folder yourself and give its path)") from None
    print(f"downloading {name} from the Hugging Face Hub (config, safetensors weights, tokenizer)...", flush=True)
    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])


def read_hf_tokenizer(folder):
    """
    A Hugging Face folder's byte-level BPE tokenizer as Tokenizer's arguments: ranks, split pattern, special
    tokens (its added tokens), its chat format read from the chat template (chat_template.jinja, else
    tokenizer_config.json), the token that starts a document and the one put before scored text.
    SentencePiece-style tokenizers (Llama 2, TinyLlama: Metaspace, byte-fallback tokens <0x00>...) are refused:
    their merges work on characters, not bytes, and tiktoken cannot run them.
    """
    folder = hf_folder(folder)
    path = f"{folder}/tokenizer.json"
    d = read_json_file(path)
    model = d.get("model") or {}
    vocab = model.get("vocab") or {}
    # byte_fallback only fires for a byte whose <0xNN> token exists; transformers' GGUF loader sets it on
    # byte-level vocabularies that have none, where it does nothing
    fallback = model.get("byte_fallback") and any(regex.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) for t in vocab)
    if model.get("type") != "BPE" or fallback:
        raise ValueError(f"{path}: a {model.get('type')} model{' with byte fallback' if fallback else ''}"
                         "; only byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2, GPT-2) can be imported")
    pattern = split_pattern_of(d.get("pre_tokenizer"), path)
    normalizer = d.get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    normalizer = "".join(step.get("type", "?") for step in steps if step)  # '' or 'NFC': what encode can do
    if normalizer not in ("", "NFC"):
        raise ValueError(f"{path}: normalizer {normalizer!r} is not supported (none or NFC)")
    special_tokens = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
    ranks = byte_level_ranks(((text, i) for text, i in vocab.items() if text not in special_tokens), path)
    check_merge_order(model.get("merges", []), vocab, path)
    unk_token = model.get("unk_token") or ""
    if unk_token and all(bytes([b]) in ranks for b in range(256)):
        unk_token = ""  # never used: every byte has a token
    if unk_token and (unk_token not in special_tokens or not model.get("fuse_unk")):
        problem = "not an added token" if unk_token not in special_tokens else "not fused (fuse_unk)"
        raise ValueError(f"{path}: unk_token {unk_token!r} stands for bytes with no token, but it is {problem}; "
                         "only an added, fused unk token (or none: such bytes are left out) is supported")

    config = read_json_file(f"{folder}/tokenizer_config.json", required=False)
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if os.path.exists(f"{folder}/chat_template.jinja"):  # transformers 4.43+ saves it alone, and reads it first
        with open(f"{folder}/chat_template.jinja", encoding="utf-8") as f:
            template = f.read()
    bos = _token_name(config.get("bos_token"))
    if config.get("tokenizer_class", "").startswith("LlamaTokenizer"):
        # LlamaTokenizerFast rebuilds its post-processor from add_bos_token (True unless the config says so)
        scoring_bos_token = bos if config.get("add_bos_token", True) else ""
    else:  # the other fast tokenizers prepend what tokenizer.json's post-processor says, whatever the config
        scoring_bos_token = post_processor_prefix(d.get("post_processor"))
    if scoring_bos_token and scoring_bos_token not in special_tokens:
        raise ValueError(f"{folder}: the token put before every text ({scoring_bos_token!r}) is not an added "
                         "token of tokenizer.json")
    bos_candidates = [bos, "<|endoftext|>", _token_name(config.get("eos_token"))]
    return {"mergeable_ranks": ranks, "pattern": pattern, "special_tokens": special_tokens,
            "name": os.path.basename(os.path.abspath(folder)), "normalizer": normalizer, "unk_token": unk_token,
            "scoring_bos_token": scoring_bos_token,
            **chat_settings(template, bos_candidates, special_tokens, folder)}


def byte_level_ranks(tokens, source):
    """(text in GPT-2's byte alphabet, id) pairs -> {token bytes: id}; every byte need not have a token."""
    to_byte = {c: b for b, c in byte_alphabet().items()}
    ranks = {}
    for text, token_id in tokens:
        try:
            ranks[bytes(to_byte[c] for c in text)] = token_id
        except KeyError:
            raise ValueError(f"{source}: token {text!r} (id {token_id}) is not in the byte-level alphabet") \
                from None
    return ranks


def check_merge_order(merges, vocab, source):
    """tiktoken merges the pair whose token has the lowest id first: the same BPE if ids grow in merge order."""
    previous = -1
    for i, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged_id = vocab.get(left + right)
        if merged_id is None or merged_id <= previous:
            raise ValueError(f"{source}: merge {i} ({left!r} + {right!r}) does not make a token with a higher id "
                             "than the merges before it, so tiktoken's BPE (lowest id first) would encode "
                             "differently")
        previous = merged_id


def post_processor_prefix(post_processor):
    """The special token a tokenizer.json's post-processor puts before a single text (Llama 3's), or ''."""
    post_processor = post_processor or {}
    sequence = post_processor.get("type") == "Sequence"
    steps = post_processor.get("processors", []) if sequence else [post_processor]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            return first["SpecialToken"]["id"] if "SpecialToken" in first else ""
    return ""


def chat_settings(template, bos_candidates, special_tokens, source):
    """
    The chat format a Jinja chat template renders (ChatML, Llama 3 or none we know), the default system message
    a ChatML template adds, and the document-start token: the first of bos_candidates that exists and is not a
    ChatML turn token (SmolLM2 names <|im_start|> its bos_token; its documents start with <|endoftext|>).
    """
    if "<|im_start|>" in template:
        chat_format = "chatml"
    elif "<|start_header_id|>" in template:
        chat_format = "llama3"
    else:
        chat_format = "none"
    default_system = ""
    if chat_format == "chatml":
        # SmolLM2's and Qwen2.5's templates open with a fixed system message when the conversation has none; the
        # newlines in the Jinja string are escaped (\n) in the Hub's files, real ones in SmolLM2's GGUF
        found = regex.search(r"'<\|im_start\|>system(?:\\n|\n)([^'{}]*)<\|im_end\|>(?:\\n|\n)'", template)
        default_system = found.group(1).replace("\\n", "\n") if found else ""
    turn_tokens = {"<|im_start|>", "<|im_end|>"}
    bos_token = next((t for t in bos_candidates if t in special_tokens and t not in turn_tokens), None)
    if bos_token is None:
        looked_for = ", ".join(map(str, bos_candidates))
        raise ValueError(f"{source}: no token to start documents with (looked for {looked_for})")
    return {"chat_format": chat_format, "bos_token": bos_token, "chat_template": template,
            "default_system": default_system}


# GGUF names for pre-splits (tokenizer.ggml.pre, as llama.cpp's converter writes them) -> the same split as a
# regex; the patterns are those of each model's own tokenizer.json
LLAMA3_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GGUF_PRE_SPLITS = {"gpt2": (GPT2_SPLIT_PATTERN, ""), "smollm": (GPT2_DIGITS_SPLIT_PATTERN, ""),
                   "llama-bpe": (LLAMA3_SPLIT_PATTERN, ""), "qwen2": (QWEN2_SPLIT_PATTERN, "NFC")}
GGUF_TOKEN_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused", 6: "byte"}


def gguf_tokenizer_args(metadata, path):
    """
    The tokenizer of a GGUF file's metadata (checkpoint.read_gguf) as Tokenizer's arguments. Only byte-level BPE
    ('gpt2' model): tokens in GPT-2's byte alphabet, merges, token types (control and user-defined tokens are
    the special tokens, unused ones leave their id empty), tokenizer.ggml.pre naming the pre-split. Bytes with
    no token are left out of the text, as the original Hugging Face tokenizer does (transformers' own GGUF
    conversion maps them to the unknown token instead).
    """
    def get(key, default=None):
        if key not in metadata and default is None:
            raise ValueError(f"{path}: GGUF metadata has no {key} (needed for the tokenizer)")
        return metadata.get(key, default)

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2': SmolLM2, "
                         "Llama 3, Qwen2) can be imported, not SentencePiece ('llama': Llama 2, TinyLlama)")
    pre = get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_SPLITS:
        raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}, a pre-split this importer does not know "
                         f"(known: {', '.join(GGUF_PRE_SPLITS)})")
    pattern, normalizer = GGUF_PRE_SPLITS[pre]
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type")
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    special_tokens, ordinary = {}, []
    for token_id, (text, type_number) in enumerate(zip(tokens, types)):
        token_type = GGUF_TOKEN_TYPES.get(int(type_number))
        if token_type == "normal":
            ordinary.append((text, token_id))
        elif token_type in ("control", "user-defined", "unknown"):
            special_tokens[text] = token_id
        elif token_type == "byte":
            raise ValueError(f"{path}: token {text!r} is a byte-fallback token (SentencePiece style); only "
                             "byte-level BPE can be imported")
        elif token_type is None:
            raise ValueError(f"{path}: token {token_id} has token type {types[token_id]}, expected 1 to 6")
    ranks = byte_level_ranks(ordinary, path)
    check_merge_order(get("tokenizer.ggml.merges", []), {text: i for text, i in ordinary}, path)
    named = lambda key: tokens[metadata[key]] if key in metadata and metadata[key] < len(tokens) else None
    bos = named("tokenizer.ggml.bos_token_id")
    # llama.cpp prepends BOS unless the file says not to (only its Llama 3 pre-split does by default)
    scoring_bos_token = bos if bos and get("tokenizer.ggml.add_bos_token", pre == "llama-bpe") else ""
    name = os.path.splitext(os.path.basename(path))[0]
    return {"mergeable_ranks": ranks, "pattern": pattern, "special_tokens": special_tokens, "name": name,
            "normalizer": normalizer, "scoring_bos_token": scoring_bos_token,
            **chat_settings(metadata.get("tokenizer.chat_template", ""),
                            [bos, "<|endoftext|>", named("tokenizer.ggml.eos_token_id")], special_tokens, path)}


def merge_parts(token, ranks):
    """The two tokens BPE joins to make token: its bytes encoded with only the ranks below its own (or None)."""
    rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best_rank, i = min(pairs)
        if best_rank >= rank:
            return None  # only ever made whole (a pre-split piece that is itself a token)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts if len(parts) == 2 else None


def hf_tokenizer_files(tokenizer, max_seq_len):
    """(tokenizer.json, tokenizer_config.json) as dicts that transformers' PreTrainedTokenizerFast reads."""
    alphabet = byte_alphabet()
    as_text = lambda token: "".join(alphabet[b] for b in token)
    by_rank = sorted(tokenizer.mergeable_ranks.items(), key=lambda kv: kv[1])
    merges = []
    for token, _ in by_rank:
        parts = merge_parts(token, tokenizer.mergeable_ranks) if len(token) > 1 else None
        if parts:
            merges.append([as_text(parts[0]), as_text(parts[1])])
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in specials],
        "normalizer": {"type": tokenizer.normalizer} if tokenizer.normalizer else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,  # no token before each text, as our exports have always been
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        # ignore_merges: a piece that is a token as a whole is that token, as in tiktoken
        # a byte with no token: left out, or unk_token once per run of them (encode_with_gaps)
        "model": {"type": "BPE", "dropout": None, "unk_token": tokenizer.unk_token or None,
                  "fuse_unk": bool(tokenizer.unk_token), "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "byte_fallback": False, "ignore_merges": True,
                  # the special tokens are in the vocabulary too: Hugging Face gives an added token that is not
                  # an id after the whole vocabulary instead of the id it names
                  "vocab": {**{as_text(token): rank for token, rank in by_rank}, **dict(specials)},
                  "merges": merges},
    }
    if tokenizer.chat_format != "nanollama" and tokenizer.scoring_bos_id is not None:
        # an imported tokenizer that puts a token before every text (Llama 3's <|begin_of_text|>) keeps doing so
        start = tokenizer.scoring_bos_token or tokenizer.bos_token
        tokenizer_json["post_processor"] = {
            "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": start, "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {start: {"id": start, "ids": [tokenizer.scoring_bos_id], "tokens": [start]}}}
    end_of_turn = CHAT_FORMATS[tokenizer.chat_format]["end_of_turn"] or tokenizer.bos_token
    template = NANOLLAMA_CHAT_TEMPLATE if tokenizer.chat_format == "nanollama" else tokenizer.chat_template
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
                        "eos_token": end_of_turn, "pad_token": tokenizer.bos_token,
                        "add_bos_token": tokenizer_json["post_processor"] is not None,
                        "add_eos_token": False, "clean_up_tokenization_spaces": False,
                        "model_max_length": max_seq_len}
    if template:
        tokenizer_config["chat_template"] = template
    return tokenizer_json, tokenizer_config


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
