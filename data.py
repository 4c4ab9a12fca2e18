"""
Token files and batches, for every stage. A prepared source is a folder:

    data/<name>/train.bin, val.bin        uint16 tokens (uint32 when the vocabulary exceeds 65,536), every
                                          document starting with <|bos|>; read through np.memmap
    data/<name>/train.mask.bin, ...       uint8 loss mask, chat and choice data: 1 where the model learns the
                                          token (choice data: the tokens of the choice a row scores)
    data/<name>/train.choices.bin, ...    uint8 pairs, choice data only: per question its number of choices (its
                                          rows, one document each) and the index of the right one
    data/<name>/meta.json                 tokenizer identity, dtype, token and byte counts per split, source,
                                          format
    data/<name>/tokenizer.json            a copy of the tokenizer file, so the folder stands on its own

docs/formats.md has the details. prepare/ writes these folders (TokenWriter, write_meta); train.py reads
them through Batches (below), eval.py through read_meta and open_tokens.

torch is imported only where batches become tensors (to_tensors), so that prepare/ scripts, which import
this file for TokenWriter, start without torch's import time.
"""

import json
import math
import os

import numpy as np

from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------------
# reading a prepared source

def read_meta(source_dir):
    """meta.json of a prepared source, with a clear error when the source is missing or incomplete."""
    path = f"{source_dir}/meta.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare this source first "
                                "(see prepare/ and the README)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    for key in ("tokenizer_sha256", "vocab_size", "dtype", "splits", "format"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def token_file_path(source_dir, split, mask=False):
    return f"{source_dir}/{split}.mask.bin" if mask else f"{source_dir}/{split}.bin"


def choices_file_path(source_dir, split):
    return f"{source_dir}/{split}.choices.bin"


def read_choices(source_dir, split, n_rows):
    """
    A choice source's questions: (first row, number of choices, right choice) arrays from <split>.choices.bin,
    checked against the split's rows (documents): the questions' choices must add up to them, and every answer
    must be one of its question's choices.
    """
    path = choices_file_path(source_dir, split)
    try:
        pairs = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: choice data has one beside each {split}.bin "
                                "(prepare/tasks.py --as_choices writes them)") from None
    if len(pairs) == 0 or len(pairs) % 2:
        raise ValueError(f"{path}: {len(pairs)} bytes is not a list of (choices, answer) pairs: prepare this "
                         "source again")
    n_choices, answers = pairs[0::2].astype(np.int64), pairs[1::2].astype(np.int64)
    if int(n_choices.sum()) != n_rows:
        raise ValueError(f"{path}: its {len(n_choices):,} questions have {int(n_choices.sum()):,} choices, but "
                         f"{split}.bin has {n_rows:,} rows: the files are from different preparations; prepare "
                         "this source again")
    bad = np.flatnonzero((n_choices < 2) | (answers >= n_choices))
    if len(bad):
        q = int(bad[0])
        raise ValueError(f"{path}: question {q} has {n_choices[q]} choices and answer {answers[q]}; expected at "
                         "least 2 choices and an answer below their number")
    first_rows = np.cumsum(n_choices) - n_choices
    return first_rows, n_choices, answers


def open_tokens(source_dir, split, meta, mask=False):
    """
    np.memmap of a split's tokens (or its loss mask), read-only, after checking the file against meta.json:
    a whole number of tokens, as many as meta.json counts (a file truncated by a full disk, or one left from
    another preparation, is refused here with its name instead of failing somewhere in numpy or torch).
    """
    path = token_file_path(source_dir, split, mask)
    dtype = np.dtype(np.uint8 if mask else meta["dtype"])
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare this source first "
                                "(see prepare/ and the README)") from None
    expected = meta["splits"].get(split, {}).get("tokens")
    if expected is None:
        raise ValueError(f"{source_dir}/meta.json has no token count for split {split!r}: "
                         "prepare this source again")
    if size % dtype.itemsize:
        raise ValueError(f"{path}: {size:,} bytes is not a whole number of {dtype.name} tokens "
                         f"({dtype.itemsize} bytes each): the file is truncated or damaged; prepare this "
                         "source again")
    if size // dtype.itemsize != expected:
        what = "mask entries" if mask else "tokens"
        raise ValueError(f"{path} holds {size // dtype.itemsize:,} {what} but {source_dir}/meta.json counts "
                         f"{expected:,}: the file and meta.json are from different preparations (or the file "
                         "was cut short); prepare this source again")
    if size == 0:
        raise ValueError(f"{path} is empty: prepare this source again")
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_ids(path, tokens, vocab_size, chunk=1 << 24):
    """
    Refuse a token file holding an id the vocabulary does not have (the model would fail with an IndexError
    deep in the embedding). A chunked max over the memmap: about 0.15 s per 500 MB on a 2-core CPU when the
    file is in the page cache, so once per file at start costs little next to training.
    """
    for begin in range(0, len(tokens), chunk):
        part = tokens[begin:begin + chunk]
        if int(part.max()) >= vocab_size:
            position = begin + int(np.argmax(part >= vocab_size))
            raise ValueError(f"{path}: token id {int(part[position - begin])} at position {position:,} is "
                             f"outside the vocabulary of {vocab_size} (meta.json's vocab_size): the file was "
                             "written with another tokenizer, or is damaged; prepare this source again")


# ----------------------------------------------------------------------------------------------------
# batches for train.py: text windows or whole conversations, a pure function of (seed, split, step, micro-step)

SPLIT_INDEX = {"train": 0, "val": 1}  # part of every batch's random seed


def parse_data_spec(spec):
    """'a' or 'a:0.7,b:0.3' -> [(name, weight)]."""
    sources = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"data={spec!r}: weight {weight!r} of source {name!r} is not a number") from None
        if not name or weight <= 0:
            raise ValueError(f"data={spec!r}: expected 'name' or 'name:weight,name:weight' "
                             "with positive weights")
        sources.append((name, weight))
    return sources


def to_tensors(device, *arrays):
    """int64 numpy arrays -> torch tensors on device (via pinned memory to a GPU: the copy can overlap)."""
    import torch  # here, not at the top: prepare/ imports this file and never needs torch (module docstring)
    tensors = [torch.from_numpy(a) for a in arrays]
    if device.startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


class Batches:
    """
    The batches of a training run over one or more prepared sources of one format, as tensors on the device:

      text  batch_size random windows of block_size + 1 tokens (x, and y shifted by one), each batch from
            one source chosen by weight (weights are the share of batches)
      chat  whole conversations, one per row, grouped with conversations of similar length and padded to
            the longest (x with 0, y with -1); y is -1 wherever the loss mask is 0 (with loss_mask), so only
            the assistant's tokens are learned. A weight repeats a source's conversations per epoch
            ('alpaca,identity:4'; a fraction adds a random subset)
      choice batch_size whole questions of a multiple-choice source, every choice a row (the prompt and that
            choice, y -1 but on the choice's tokens), batched like conversations; a batch is (x, y,
            n_choices, answers): the rows of question i follow those of question i - 1, and answers[i] is the
            index of its right row among them. train.py's loss ranks the rows of each question

    get_batch(split, step, micro_step) is a pure function of (seed, split, step, micro-step, rank): there is
    no sampler state to save, so a resumed run draws exactly the batches an uninterrupted one would, and
    DDP rank r's micro-batches are those a single process with world_size x the accumulation draws.
    Bad data raises ValueError or FileNotFoundError naming the file or setting and what to do.
    """

    def __init__(self, data_dir, spec, batch_size, block_size, seed=0, rank=0, world_size=1,
                 gradient_accumulation_steps=1, loss_mask=True, device="cpu"):
        self.data_dir, self.spec, self.device = data_dir, spec, device
        self.batch_size, self.block_size, self.seed, self.loss_mask = batch_size, block_size, seed, loss_mask
        self.rank, self.world_size, self.accumulation = rank, world_size, gradient_accumulation_steps
        self.sources = parse_data_spec(spec)  # [(name, weight)]
        self.names = [name for name, _ in self.sources]
        self.metas = {}
        for name in self.names:
            self.metas[name] = read_meta(self.source_dir(name))
            for split in ("train", "val"):  # fail now, not mid-run: missing, damaged or foreign token files
                tokens = open_tokens(self.source_dir(name), split, self.metas[name])
                check_token_ids(token_file_path(self.source_dir(name), split), tokens,
                                self.metas[name]["vocab_size"])
        formats = {meta["format"] for meta in self.metas.values()}
        if len(formats) > 1:
            raise ValueError(f"data={spec!r} mixes formats (" + ", ".join(
                f"{name}: {meta['format']}" for name, meta in self.metas.items()) + "); mix sources of one "
                "format: text with text, chat with chat, choice with choice")
        # a model trained on chat data is a chat model: eval.py, chat.py and sample.py read this from its
        # checkpoint
        self.format = formats.pop()
        if self.format == "choice" and not loss_mask:
            raise ValueError(f"data={spec!r} is choice data, whose loss compares the choices' own tokens: "
                             "loss_mask=False does not apply to it")
        tokenizer_shas = {meta["tokenizer_sha256"] for meta in self.metas.values()}
        if len(tokenizer_shas) > 1:
            raise ValueError(f"data={spec!r}: the sources were prepared with different tokenizers; "
                             "prepare them with the same one")
        tokenizer_path = os.path.join(self.source_dir(self.names[0]), "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        if self.tokenizer.sha256 != tokenizer_shas.pop():
            raise ValueError(f"{tokenizer_path} does not match the tokenizer_sha256 in "
                             f"{self.source_dir(self.names[0])}/meta.json")
        self.text_weights = np.array([w for _, w in self.sources]) / sum(w for _, w in self.sources)
        if self.format == "text":
            for name in self.names:
                for split in ("train", "val"):
                    n = len(self.tokens(name, split))
                    if n < block_size + 2:
                        raise ValueError(f"{self.source_dir(name)}/{split}.bin has {n} tokens, "
                                         f"too few for block_size={block_size}")
        else:
            self.index_documents()

    def source_dir(self, name):
        return os.path.join(self.data_dir, name)

    def tokens(self, name, split, mask=False):
        # a fresh memmap per batch, as nanoGPT does: a long-lived one grows the process's resident memory
        return open_tokens(self.source_dir(name), split, self.metas[name], mask=mask)

    # --- chat and choice: where each conversation (question) is, and the batches of each epoch

    def index_documents(self):
        for name in self.names:
            for split in ("train", "val"):
                if not os.path.exists(token_file_path(self.source_dir(name), split, mask=True)):
                    raise FileNotFoundError(f"data={self.spec!r}: {self.format} data needs {{split}}.mask.bin "
                                            "beside each {split}.bin (prepare/ writes both)")
        # (starts, lengths) of every conversation (choice data: every row): each one begins with <|bos|>
        self.spans = {name: {} for name in self.names}
        # what a batch is made of: conversations, or questions with all their rows; a question's length is
        # its longest row's
        self.unit_lengths = {name: {} for name in self.names}
        self.questions = {name: {} for name in self.names}  # choice data: (first row, choices, answer) arrays
        for name in self.names:
            for split in ("train", "val"):
                starts = np.flatnonzero(self.tokens(name, split) == self.tokenizer.bos_id)
                if len(starts) == 0 or starts[0] != 0:
                    raise ValueError(f"{self.source_dir(name)}/{split}.bin: {self.format} data must start every "
                                     f"{'row' if self.format == 'choice' else 'conversation'} with <|bos|>")
                lengths = np.diff(np.append(starts, len(self.tokens(name, split))))
                self.spans[name][split] = starts, lengths
                self.unit_lengths[name][split] = lengths
                if self.format == "choice":
                    first_rows, n_choices, answers = read_choices(self.source_dir(name), split, len(starts))
                    self.questions[name][split] = first_rows, n_choices, answers
                    self.unit_lengths[name][split] = np.maximum.reduceat(lengths, first_rows)
        # eval.py scores a choice with <|bos|> first only where the tokenizer's scoring puts it (SmolLM2's does
        # not); the rows are read the same way, so that training ranks exactly what evaluation compares
        self.skip_row_bos = int(self.format == "choice" and self.tokenizer.scoring_bos_id != self.tokenizer.bos_id)
        self.epoch_cache = {}  # (split, epoch) -> its batches: epoch 0 (evaluations) and the epoch in use
        self.batches_per_epoch = {split: len(self.epoch_batches(split, 0)) for split in ("val", "train")}
        # what the summary reports, and the one check that needs every conversation
        train_spans = [self.spans[name]["train"] for name in self.names]
        self.n_conversations = sum(len(starts) for starts, _ in train_spans)
        self.n_truncated = sum(int((lengths > self.block_size + 1).sum()) for _, lengths in train_spans)
        self.n_untrained = 0
        if self.format == "chat" and self.loss_mask and self.n_truncated:
            # a conversation cut before its first assistant token trains nothing (a long system prompt
            # can do that)
            for name, (starts, lengths) in zip(self.names, train_spans):
                mask = self.tokens(name, "train", mask=True)
                self.n_untrained += sum(int(mask[s:s + min(length, self.block_size + 1)].sum()) == 0
                                        for s, length in zip(starts, lengths))
            if self.n_untrained == self.n_conversations:
                raise ValueError(f"no conversation has an assistant token within "
                                 f"block_size={self.block_size} tokens: nothing would train; raise "
                                 "--block_size (a model's default system message can be long)")

    def epoch_batches(self, split, epoch):
        """
        The batches of one pass over the chat data: lists of (source index, conversation index). Each source's
        conversations appear weight times (a fraction: a random subset), shuffled, then grouped with
        conversations of similar length so that little of a batch is padding. Deterministic in (seed, split,
        epoch); val is neither repeated nor shuffled.
        """
        if (split, epoch) in self.epoch_cache:
            return self.epoch_cache[split, epoch]
        rng = np.random.default_rng([self.seed, SPLIT_INDEX[split], epoch])
        items, lengths = [], []
        for s, (name, weight) in enumerate(self.sources):
            n = len(self.unit_lengths[name][split])
            repeats = int(weight) if split == "train" else 1
            chosen = list(range(n)) * repeats
            if split == "train" and weight % 1:
                chosen += rng.choice(n, size=round(n * (weight % 1)), replace=False).tolist()
            items += [(s, c) for c in chosen]
            lengths += self.unit_lengths[name][split][chosen].tolist()
        order = rng.permutation(len(items)) if split == "train" else np.arange(len(items))
        batches = []
        group = self.batch_size * 64  # sort by length within groups of 64 batches; shuffled between them
        for g in range(0, len(order), group):
            members = sorted(order[g:g + group], key=lambda i: lengths[i])
            batches += [[items[i] for i in members[b:b + self.batch_size]]
                        for b in range(0, len(members), self.batch_size)]
        if split == "train":
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for key in [key for key in self.epoch_cache if key[0] == split and key[1] != 0]:
            del self.epoch_cache[key]
        self.epoch_cache[split, epoch] = batches
        return batches

    def row(self, name, split, r):
        """
        (inputs, targets) of document r of a chat or choice source, at most block_size of them: a conversation
        keeps its start, a choice row its end (the choice it scores).
        """
        starts, lengths = self.spans[name][split]
        start, length = starts[r] + self.skip_row_bos, lengths[r] - self.skip_row_bos
        if self.format == "choice":
            start += max(0, length - self.block_size - 1)
        length = min(length, self.block_size + 1)
        tokens = self.tokens(name, split)[start:start + length].astype(np.int64)
        mask = self.tokens(name, split, mask=True)[start:start + length]
        targets = tokens[1:].copy()
        if self.loss_mask:
            targets[mask[1:] == 0] = -1
        return tokens[:-1], targets

    def conversation_batch(self, split, conversations):
        """(x, y) for a list of (source index, conversation index)."""
        return to_tensors(self.device, *self.padded([self.row(self.names[s], split, c) for s, c in conversations]))

    def choice_batch(self, split, questions):
        """(x, y, n_choices, answers) for a list of (source index, question index): every choice a row."""
        rows, n_choices, answers = [], [], []
        for s, q in questions:
            name = self.names[s]
            first_rows, choices, right = (a[q] for a in self.questions[name][split])
            rows += [self.row(name, split, r) for r in range(first_rows, first_rows + choices)]
            n_choices.append(choices)
            answers.append(right)
        x, y = self.padded(rows)
        return to_tensors(self.device, x, y, np.array(n_choices, dtype=np.int64), np.array(answers, dtype=np.int64))

    def padded(self, rows):
        """[(inputs, targets)] -> (x, y) arrays, padded to the longest (x 8) with 0 in x, -1 in y."""
        width = max(len(x) for x, _ in rows)
        width = min(self.block_size, -(-width // 8) * 8)  # a multiple of 8 suits the GPU's matmul tiles
        x = np.zeros((len(rows), width), dtype=np.int64)
        y = np.full((len(rows), width), -1, dtype=np.int64)
        for i, (tokens, targets) in enumerate(rows):
            x[i, :len(tokens)] = tokens
            y[i, :len(targets)] = targets
        return x, y

    # --- text: random windows

    def window_batch(self, name, split, rng):
        """(x, y) of batch_size random windows of block_size + 1 tokens of one source."""
        tokens = self.tokens(name, split)
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
        x = np.stack([tokens[i:i + self.block_size] for i in starts]).astype(np.int64)
        y = np.stack([tokens[i + 1:i + 1 + self.block_size] for i in starts]).astype(np.int64)
        return to_tensors(self.device, x, y)

    # --- what train.py asks for

    def get_batch(self, split, step, micro_step):
        """(x, y) (choice data: (x, y, n_choices, answers)) for micro-batch micro_step of optimizer step `step`
        on this process (rank)."""
        global_micro_step = self.rank * self.accumulation + micro_step  # DDP ranks split one big step
        if self.format != "text":
            # the conversations (questions) in order of the (split, epoch) batches, one micro-batch after another
            index = step * self.world_size * self.accumulation + global_micro_step
            epoch, position = divmod(index, self.batches_per_epoch[split])
            return self.unit_batch(split, self.epoch_batches(split, epoch)[position])
        rng = np.random.default_rng([self.seed, SPLIT_INDEX[split], step, global_micro_step])
        name = self.names[rng.choice(len(self.names), p=self.text_weights)]
        return self.window_batch(name, split, rng)

    def eval_batches(self, split, eval_iters):
        """
        What an evaluation measures, the same batches every time: [(source, batches)]. Text: eval_iters random
        windows of each source. Chat: one group (all sources), the first eval_iters batches of the val
        conversations in order, or of the first training epoch. Each batch is made when it is reached.
        """
        if self.format != "text":
            units = self.epoch_batches(split, 0)[:eval_iters]
            return [(",".join(self.names), (self.unit_batch(split, u) for u in units))]
        return [(name, self.eval_windows(name, s, split, eval_iters)) for s, name in enumerate(self.names)]

    def unit_batch(self, split, units):
        return self.choice_batch(split, units) if self.format == "choice" else self.conversation_batch(split, units)

    def eval_windows(self, name, s, split, eval_iters):
        """The evaluation batches of text source s: the same random windows at every evaluation."""
        rng = np.random.default_rng([self.seed, 100 + s, SPLIT_INDEX[split]])
        for _ in range(eval_iters):
            yield self.window_batch(name, split, rng)

    def eval_summary(self, losses):
        """
        {(split, source): mean loss per learned token} over eval_batches -> train_loss and val_loss (text: the
        sources weighed as in training); for text also val_bpb, and val_loss_per_source when there are several.
        """
        if self.format != "text":
            return {f"{split}_loss": loss for (split, _), loss in losses.items()}
        weights = dict(zip(self.names, self.text_weights))
        result = {f"{split}_loss": float(sum(weights[name] * losses[split, name] for name in self.names))
                  for split in ("train", "val")}
        bpb = {}
        for name in self.names:
            # bits per byte: nats per token -> bits per token -> x tokens per byte of this source's val split
            counts = self.metas[name]["splits"]["val"]
            bpb[name] = losses["val", name] / math.log(2) * counts["tokens"] / max(1, counts["bytes"])
        result["val_bpb"] = float(sum(weights[name] * bpb[name] for name in self.names))
        if len(self.names) > 1:
            result["val_loss_per_source"] = {name: losses["val", name] for name in self.names}
        return result

    def steps_for_epochs(self, num_epochs):
        """Optimizer steps for num_epochs passes over the training data (on every process together)."""
        micro_batches_per_step = self.accumulation * self.world_size
        if self.format != "text":
            return math.ceil(num_epochs * self.batches_per_epoch["train"] / micro_batches_per_step)
        train_tokens = sum(self.metas[name]["splits"]["train"]["tokens"] for name in self.names)
        tokens_per_step = self.batch_size * self.block_size * micro_batches_per_step
        return math.ceil(num_epochs * train_tokens / tokens_per_step)

    def summary(self):
        """The lines train.py prints about its data: sources and weights, batch arithmetic, chat figures."""
        tokens_per_step = self.batch_size * self.block_size * self.accumulation * self.world_size
        if self.format == "text":
            sources = ", ".join(f"{name} {w:.0%}" for name, w in zip(self.names, self.text_weights))
        else:
            sources = ", ".join(f"{name} x{w:g}" for name, w in self.sources)
        # text batches are always full; chat batches are padded to their longest conversation
        lines = [f"data: {sources}; up to {tokens_per_step:,} tokens per step ({self.batch_size} x "
                 f"{self.block_size} x {self.accumulation} accumulation x {self.world_size} processes)"]
        if self.format == "text":
            return lines
        per_epoch = sum(map(len, self.epoch_batches("train", 0)))
        if self.format == "choice":
            n_questions = sum(len(self.questions[name]["train"][0]) for name in self.names)
            lines.append(f"choice data: {n_questions:,} questions ({per_epoch:,} per epoch) with "
                         f"{self.n_conversations:,} choices, {self.batches_per_epoch['train']:,} batches of "
                         f"{self.batch_size} questions per epoch; {self.n_truncated:,} choices longer than "
                         f"block_size={self.block_size} keep their last {self.block_size} tokens")
            lines.append("loss: each question's cross-entropy over its choices' summed log-likelihoods "
                         "(what eval.py's base-mode acc picks the answer by)")
            return lines
        lines.append(f"chat data: {self.n_conversations:,} conversations ({per_epoch:,} per epoch), "
                     f"{self.batches_per_epoch['train']:,} batches per epoch; "
                     f"{self.n_truncated:,} longer than block_size={self.block_size} are truncated")
        if self.n_untrained:
            lines.append(f"warning: {self.n_untrained:,} conversations have no assistant token within "
                         f"block_size={self.block_size}; they train nothing")
        total = sum(int(self.spans[name]["train"][1].sum()) for name in self.names)
        if self.loss_mask:
            trained = sum(int(self.tokens(name, "train", mask=True).sum()) for name in self.names)
            lines.append(f"loss mask ON: the loss counts only the assistant tokens ({trained:,} of {total:,} "
                         "train tokens)")
        else:
            lines.append(f"loss mask OFF: the loss counts every token ({total:,} of {total:,} train tokens)")
        return lines


# ----------------------------------------------------------------------------------------------------
# writing a prepared source (prepare/)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


class TokenWriter:
    """Appends documents' token ids (and loss masks, and questions) to a split's files; counts tokens, bytes,
    documents (and questions)."""

    def __init__(self, out_dir, split, vocab_size, with_mask=False, with_choices=False):
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.path = os.path.join(out_dir, f"{split}.bin")
        self.tokens_file = open(self.path + ".tmp", "wb")
        self.mask_file = open(os.path.join(out_dir, f"{split}.mask.bin.tmp"), "wb") if with_mask else None
        self.choices_file = open(choices_file_path(out_dir, split) + ".tmp", "wb") if with_choices else None
        self.counts = {"tokens": 0, "bytes": 0, "documents": 0, **({"questions": 0} if with_choices else {})}

    def add(self, ids, n_bytes, mask=None, documents=1):
        """Append tokens (one document, or several already joined: say how many) and count them."""
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"{self.path}: token id {int(array.max())} outside the vocabulary of "
                             f"{self.vocab_size}")
        self.tokens_file.write(array.astype(self.dtype).tobytes())
        if self.mask_file is not None:
            if mask is None or len(mask) != len(ids):
                raise ValueError(f"{self.path}: chat data needs a mask of the same length as the tokens")
            self.mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.counts["tokens"] += int(array.size)
        self.counts["bytes"] += int(n_bytes)
        self.counts["documents"] += documents

    def add_question(self, n_choices, answer):
        """Choice data: the question whose rows (one document per choice) were just added, and its answer."""
        if not 2 <= n_choices <= 255 or not 0 <= answer < n_choices:
            raise ValueError(f"{self.path}: a question needs 2 to 255 choices and an answer among them, not "
                             f"{n_choices} choices and answer {answer}")
        self.choices_file.write(bytes([n_choices, answer]))
        self.counts["questions"] += 1

    def close(self):
        """Finish the files; they only take their real names once complete."""
        for f in (self.tokens_file, self.mask_file, self.choices_file):
            if f is not None:
                f.close()
                os.replace(f.name, f.name[:-len(".tmp")])
        return self.counts


def write_meta(out_dir, tokenizer, split_counts, source, fmt="text"):
    """meta.json and a copy of the tokenizer file beside the token files."""
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    meta = {"format": fmt, "tokenizer_sha256": tokenizer.sha256, "tokenizer_name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
            "bos_id": tokenizer.bos_id, "splits": split_counts, "source": source}
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta
