"""
GGUF files (gguf:FILE): the reader, dequantization of every supported type, the tokenizer in the metadata, and
tiny random llama / qwen2 models that our reader and transformers' own GGUF loader turn into the same logits.

The gguf package (test-only, .ci/run installs it) writes the fixtures and is the reference for dequantization;
transformers and tokenizers are the references for the models and tokenizers. Nothing here is committed: every
file is built in tmp_path. The real SmolLM2 GGUF is tested in tests/test_real_model.py.
"""

import itertools
import json

import numpy as np
import pytest
import torch

from conftest import run_stage, read_log, sample_file
from test_hf import CHATML_SPECIALS, CONVERSATION, hf_logits, our_logits, real_lines

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (.ci/run installs it)")
transformers = pytest.importorskip("transformers", reason="the GGUF tests need transformers (.ci/run installs it)")
tokenizers = pytest.importorskip("tokenizers")

from checkpoint import GGML_TYPES, dequantize, load_checkpoint, read_gguf  # noqa: E402
from tokenizer import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN, Tokenizer, byte_alphabet  # noqa: E402

Q = gguf.GGMLQuantizationType
# the Jinja newlines are real characters here, as in SmolLM2's GGUF (the Hub's tokenizer_config.json escapes them)
CHATML_TEMPLATE_REAL_NEWLINES = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONTROL_BYTES = [4, 6, 19, 20, 22, 29]  # control characters SmolLM2's vocabulary has no token for


def k_quant_blocks(rows, cols, qtype, rng):
    """Random bytes in the layout of a K-quant (the gguf package dequantizes these but cannot make them), with
    small float16 scales so that the values are of the size of trained weights."""
    values_per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // values_per_block, block_bytes), dtype=np.uint8)
    scale_at = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [block_bytes - 2]}[qtype]  # d (and dmin)
    top = 2e-5 if qtype == Q.Q6_K else 1e-4
    for offset in scale_at:
        scales = rng.uniform(0, top, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encoded(w, qtype, rng):
    """(array, raw_dtype) for GGUFWriter.add_tensor: w in the given type."""
    if qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return k_quant_blocks(*w.shape, qtype, rng), qtype
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_dequantize_equals_the_gguf_package(qtype):
    rng = np.random.default_rng(int(qtype))
    w = rng.normal(0, 0.05, (8, 512)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    array, raw_dtype = encoded(w, qtype, rng)
    if raw_dtype is None:  # F32, F16: numpy's own conversion is the reference
        expected = array.astype(np.float32)
    else:
        expected = gguf.quants.dequantize(array, qtype).astype(np.float32)
    got = dequantize(int(qtype), [8, 512], np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    assert got.dtype == np.float32 and got.shape == (8, 512)
    assert np.abs(expected).max() > 0.01  # values of a real weight's size, not zeros
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):  # close to what was quantized
        assert np.abs(got - w).max() < 0.01


def train_tokenizer(pre, vocab_size=700):
    """A byte-level BPE trained by Hugging Face tokenizers with the pre-split that a GGUF's pre name stands for."""
    from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pattern = LLAMA3_SPLIT_PATTERN if pre == "llama-bpe" else QWEN2_SPLIT_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines()[:4000]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return tok


def drop_byte_tokens(tok, dropped):
    """The same tokenizer without the tokens of some single bytes (no merge uses them), as SmolLM2's lacks 21."""
    d = json.loads(tok.to_str())
    gone = {byte_alphabet()[b] for b in dropped}
    assert not any(part in gone for merge in d["model"]["merges"]
                   for part in (merge.split(" ") if isinstance(merge, str) else merge))
    kept = [t for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in gone]
    d["model"]["vocab"] = {t: i for i, t in enumerate(kept)}  # ids close up; merges still grow in id order
    specials = {a["content"] for a in d["added_tokens"]}
    for added in d["added_tokens"]:
        added["id"] = d["model"]["vocab"][added["content"]]
    assert specials <= set(kept)
    return tokenizers.Tokenizer.from_str(json.dumps(d))


def add_tokenizer(writer, tok, pre, template="", add_bos=None):
    """The tokenizer metadata llama.cpp's converter writes for a byte-level BPE: tokens, types, merges, pre."""
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(CHATML_SPECIALS)
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # control / normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])  # as SmolLM2's GGUF names it
    writer.add_eos_token_id(vocab["<|im_end|>"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if template:
        writer.add_chat_template(template)
    return len(tokens)


def write_file(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "llama-bpe", "qwen2"])
def test_tokenizer_from_gguf_encodes_like_hugging_face(tmp_path, pre):
    tok = train_tokenizer(pre)
    if pre == "smollm":
        tok = drop_byte_tokens(tok, CONTROL_BYTES + [0xC0, 0xC1, 0xF1, 0xFF])
    path = tmp_path / f"{pre}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(writer, tok, pre, CHATML_TEMPLATE_REAL_NEWLINES, add_bos=pre == "llama-bpe")
    write_file(writer)

    ours = Tokenizer.from_file(f"gguf:{path}")
    lines = real_lines(600)
    if pre == "smollm":  # bytes with no token are left out, as Hugging Face's BPE does with no unk_token
        lines += [line[:9] + chr(CONTROL_BYTES[i % 6]) * (1 + i % 2) + line[9:] for i, line in enumerate(lines[:200])]
        lines += [".\x04.", "\x06abc", "12\x1434", "\x04", "a \x13\x16 b", "x\U00050000y"]  # U+50000: 0xF1 first
        assert sorted(ours.missing_bytes) == CONTROL_BYTES + [0xC0, 0xC1, 0xF1, 0xFF]
    expected = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
    got = ours.encode_batch(lines)
    mismatches = [line for line, a, b in zip(lines, expected, got) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(lines)} lines differ, e.g. {mismatches[0]!r}"
    if pre == "smollm":  # the byte is not there for the merges either
        assert ours.encode(".\x04.") == ours.encode("..")
    # the chat format and its default system message, though the template's newlines are real ones
    assert ours.chat_format == "chatml" and ours.bos_token == "<|endoftext|>"
    assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    # the token put before scored text: the file's add_bos_token (llama.cpp's default for llama-bpe only)
    assert ours.scoring_bos_id == (tok.token_to_id("<|im_start|>") if pre == "llama-bpe" else None)
    assert ours.normalizer == ("NFC" if pre == "qwen2" else "")


def write_tiny_model(path, arch, tok, pre, tied, types, seed=0):
    """A random llama or qwen2 model in llama.cpp's layout, each weight in one of the given types in turn."""
    rng = np.random.default_rng(seed)
    dim, hidden, n_layers, n_heads, n_kv_heads = 256, 512, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), arch)
    vocab_size = add_tokenizer(writer, tok, pre, CHATML_TEMPLATE_REAL_NEWLINES, add_bos=False)
    writer.add_context_length(512)
    writer.add_embedding_length(dim)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(dim // n_heads)
    kv = n_kv_heads * dim // n_heads
    shapes = {"attn_q": (dim, dim), "attn_k": (kv, dim), "attn_v": (kv, dim), "attn_output": (dim, dim),
              "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim), "ffn_down": (dim, hidden)}
    turn = itertools.cycle(types)

    def add(name, w, qtype=None):
        array, raw_dtype = encoded(w, next(turn) if qtype is None else qtype, rng)
        writer.add_tensor(name, array, raw_dtype=raw_dtype)

    add("token_embd.weight", rng.normal(0, 0.5, (vocab_size, dim)), Q.Q8_0)
    for layer in range(n_layers):
        for name, shape in shapes.items():
            add(f"blk.{layer}.{name}.weight", rng.normal(0, 0.08, shape))
            if arch == "qwen2" and name in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{layer}.{name}.bias", rng.normal(0, 0.5, shape[0]), Q.F32)
        add(f"blk.{layer}.attn_norm.weight", rng.uniform(0.5, 1.5, dim), Q.F32)
        add(f"blk.{layer}.ffn_norm.weight", rng.uniform(0.5, 1.5, dim), Q.F32)
    add("output_norm.weight", rng.uniform(0.5, 1.5, dim), Q.F32)
    if not tied:
        add("output.weight", rng.normal(0, 0.1, (vocab_size, dim)), Q.Q6_K)
    write_file(writer)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    return train_tokenizer("smollm")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_model_gives_the_logits_of_transformers(tmp_path, arch, smollm_tokenizer):
    types = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32]
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_model(path, arch, smollm_tokenizer, "smollm", tied=arch == "qwen2", types=types)
    kinds = {GGML_TYPES[t][0] for t, _, _ in read_gguf(str(path))[1].values()}
    assert kinds == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}

    model, tokenizer, checkpoint = load_checkpoint(f"gguf:{path}")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    assert model.args.attention_bias == (arch == "qwen2") and model.args.tie_embeddings == (arch == "qwen2")
    ids = tokenizer.encode(sample_file("wikitext-2/valid.txt").read_text(encoding="utf-8")[:3000])[:200]
    expected = hf_logits(reference, ids)
    assert expected.abs().max() > 1.0  # logits big enough that 1e-4 means something
    assert (expected - our_logits(model, ids)).abs().max().item() < 1e-4
    assert checkpoint["data_format"] == "chat"
    prompt = tokenizer.render_for_completion(CONVERSATION)
    assert tokenizer.decode(prompt).startswith("<|endoftext|><|im_start|>system\nYou are a helpful AI")

    if arch == "llama":  # export.py reads it like any checkpoint: a Hugging Face folder with the same logits
        run_stage("export.py", f"--ckpt=gguf:{path}", "--format=hf", f"--out={tmp_path / 'hf'}")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
        assert (hf_logits(reloaded, ids) - expected).abs().max().item() < 1e-4
        again, again_tokenizer, _ = load_checkpoint(f"hf:{tmp_path / 'hf'}")
        assert again_tokenizer.encode_batch(real_lines(200)) == tokenizer.encode_batch(real_lines(200))


def test_lora_fine_tune_of_a_gguf_model(tmp_path, smollm_tokenizer):
    """prepare with the GGUF's tokenizer, LoRA from the GGUF, then the adapters find their base by path and sha256."""
    path = tmp_path / "tiny.gguf"
    write_tiny_model(path, "llama", smollm_tokenizer, "smollm", tied=True, types=[Q.Q8_0, Q.F16])
    qa = "\n".join(f"Q: What is {a} plus {b}?\nA: {a} plus {b} is {a + b}.\n" for a in range(2, 10) for b in range(2, 8))
    (tmp_path / "qa.txt").write_text(qa)
    run_stage("prepare/chat.py", tmp_path / "qa.txt", "--name", "qa", "--tokenizer", f"gguf:{path}",
              "--data_dir", tmp_path / "data")
    out = tmp_path / "lora"
    run_stage("train.py", f"--init_from=gguf:{path}", f"--data_dir={tmp_path / 'data'}", "--data=qa",
              f"--out_dir={out}", "--lora_rank=4", "--lora_targets=q,v", "--block_size=128", "--batch_size=8",
              "--max_iters=12", "--eval_interval=12", "--eval_iters=1", "--learning_rate=1e-2", "--warmup_iters=2",
              "--num_threads=1")
    losses = [r["loss"] for r in read_log(out)]
    assert losses[-1] < losses[0] - 0.3, losses
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["base_checkpoint"] == f"gguf:{path}"
    model, _, _ = load_checkpoint(str(out / "ckpt.pt"))  # merged onto the verified base
    base, _, _ = load_checkpoint(f"gguf:{path}")
    assert not torch.equal(model.layers[0].attention.wq.weight, base.layers[0].attention.wq.weight)


def test_bad_gguf_files_get_clear_errors(tmp_path, smollm_tokenizer):
    path = tmp_path / "tiny.gguf"
    write_tiny_model(path, "llama", smollm_tokenizer, "smollm", tied=True, types=[Q.Q8_0])
    data = path.read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.gguf not found"):
        load_checkpoint(f"gguf:{tmp_path / 'missing.gguf'}")
    cases = {"truncated GGUF file": data[:2000],
             "tensor output_norm.weight ends at byte .*truncated": data[:len(data) - 100],
             "not a GGUF file": b"PK\x03\x04" + data[4:], "GGUF version 4": data[:4] + b"\x04\0\0\0" + data[8:],
             "GGUF version 1": data[:4] + b"\x01\0\0\0" + data[8:]}
    for message, content in cases.items():
        (tmp_path / "bad.gguf").write_bytes(content)
        with pytest.raises(ValueError, match=f"bad.gguf: {message}"):
            load_checkpoint(f"gguf:{tmp_path / 'bad.gguf'}")
    # an architecture model.py does not have, and a quantization type the reader does not know, are named
    other = tmp_path / "gemma.gguf"
    (other).write_bytes(data.replace(b"llama", b"gemma"))
    with pytest.raises(ValueError, match="general.architecture is 'gemma'"):
        load_checkpoint(f"gguf:{other}")
    q5 = tmp_path / "q5.gguf"
    write_tiny_model(q5, "llama", smollm_tokenizer, "smollm", tied=True, types=[Q.Q5_0])
    with pytest.raises(ValueError, match="tensor blk.0.attn_q.weight is Q5_0"):
        load_checkpoint(f"gguf:{q5}")
    # a SentencePiece vocabulary (Llama 2's) is refused by name
    spm = tmp_path / "spm.gguf"
    (spm).write_bytes(data.replace(b"\x04\x00\x00\x00\x00\x00\x00\x00gpt2", b"\x04\x00\x00\x00\x00\x00\x00\x00llam"))
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llam'.*SentencePiece"):
        load_checkpoint(f"gguf:{spm}")
