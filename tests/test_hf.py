"""
Open weights in and out: Hugging Face model folders imported as checkpoints (hf:DIR) and exported back.

transformers and tokenizers are test-only dependencies (.ci/run installs them): they build the tiny random
Llama / Qwen2 models and byte-level BPE tokenizers these tests import, and load what export.py writes.
"""

import json
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO, run_stage, read_log, sample_file

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (.ci/run installs it)")
tokenizers = pytest.importorskip("tokenizers")

from checkpoint import load_checkpoint, read_safetensors  # noqa: E402
from tokenizer import GPT4_SPLIT_PATTERN, Tokenizer, byte_alphabet  # noqa: E402

# SmolLM2's chat template (ChatML, with a default system message) and a Llama 3 style one (trimmed content)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [{"role": "user", "content": "Hello there, what is 12 + 7?"},
                {"role": "assistant", "content": "It is 19.\n\nAnything else?"},
                {"role": "user", "content": "  Thanks!  "}]


def real_lines(n):
    """n real lines of TinyStories, WikiText-2 and Shakespeare, plus a few hard cases for the pre-split."""
    stories = sample_file("tinystories/tinystories_val.txt").read_text(encoding="utf-8").splitlines()
    wiki = sample_file("wikitext-2/valid.txt").read_text(encoding="utf-8").splitlines()
    # the stories' '<|endoftext|>' separator lines are left out: Hugging Face encodes special-token text as the
    # special token, tokenizer.encode as plain text (on purpose: text in a document never becomes a control token)
    keep = lambda lines: [line for line in lines if line.strip() and "<|endoftext|>" not in line]
    lines = (keep(stories)[:n // 2] + keep(wiki)[:n // 2])[:n - 4]
    return lines + ["The year 1999 had  123 people,   and 4,567 items!!", "  spaces   \n\n  x 12 \t\t9 ",
                    "café naïve — “quotes” 日本語 ﬁ Ａ", "don't I'LL we've 3.14159"]


def build_hf_tokenizer(folder, style, specials, template, vocab_size=700, special_ids_at=None):
    """A byte-level BPE tokenizer.json trained with Hugging Face tokenizers, and its tokenizer_config.json.
    style: 'gpt2' (ByteLevel split), 'digits' (SmolLM2: Digits + ByteLevel), 'split' (Llama 3/Qwen2: regex Split)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "split"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "split")
    if style == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif style == "split":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
                                                     byte_level])
        tok.normalizer = normalizers.NFC()  # as Qwen2's
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines()[:4000]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if special_ids_at is not None:
        # move the special tokens to ids above 65,535 (as Llama 3's 128K vocabulary has them)
        d = json.loads((folder / "tokenizer.json").read_text())
        for i, added in enumerate(d["added_tokens"]):
            d["model"]["vocab"].pop(added["content"])
            added["id"] = special_ids_at + i
            d["model"]["vocab"][added["content"]] = added["id"]
        (folder / "tokenizer.json").write_text(json.dumps(d))
    bos, eos = (specials[0], specials[-1])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def build_hf_model(folder, kind="llama", vocab_size=700, **config):
    """A tiny random LlamaForCausalLM / Qwen2ForCausalLM saved with save_pretrained (safetensors)."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  rope_theta=50000.0, initializer_range=0.1)  # wider than usual: logits of a few units
    common.update(config)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(str(folder))
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """SmolLM2-like: Llama with grouped-query heads, rope_theta 50000, separate head, ChatML tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    build_hf_tokenizer(folder, "split", CHATML_SPECIALS, CHATML_TEMPLATE)
    model = build_hf_model(folder, "llama", tie_word_embeddings=False)
    return folder, model


@pytest.mark.parametrize("style", ["gpt2", "digits", "split"])
def test_imported_tokenizer_encodes_like_hugging_face(tmp_path, style):
    build_hf_tokenizer(tmp_path, style, CHATML_SPECIALS, CHATML_TEMPLATE)
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_file(f"hf:{tmp_path}")
    lines = real_lines(1000)
    expected = [e.ids for e in reference.encode_batch(lines)]
    got = ours.encode_batch(lines)
    mismatches = [line for line, a, b in zip(lines, expected, got) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(lines)} lines differ, e.g. {mismatches[0]!r}"
    assert all(ours.decode(ids) == line for ids, line in zip(got, lines) if line.isascii())
    assert ours.chat_format == "chatml" and ours.bos_token == "<|endoftext|>"
    assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    # the tokenizer file round-trips, holes for the special ids included
    assert Tokenizer.from_json(ours.to_json()).encode_batch(lines[:50]) == got[:50]


# the ChatML template above with real newlines in its Jinja strings, as SmolLM2's GGUF (and transformers' conversion
# of it, in chat_template.jinja) has it
CHATML_TEMPLATE_REAL_NEWLINES = CHATML_TEMPLATE.replace("\\n", "\n")
CONTROL_BYTES = [4, 6, 19, 20, 22, 29]  # control characters SmolLM2's vocabulary has no token for


def with_control_characters(lines):
    """lines, then the same lines with runs of the control characters SmolLM2 has no token for inside them."""
    spoiled = [line[:i % 7] + chr(CONTROL_BYTES[i % 6]) * (1 + i % 3) + line[i % 7:] + "\x1d"
               for i, line in enumerate(lines[::2])]
    # U+50000's UTF-8 starts with 0xF1, another byte without a token
    return lines + spoiled + [".\x04.", "\x06abc", "12\x1434", "\x04", "a \x13\x16 b", "x\U00050000y, \U00050001!"]


def transformers_gguf_style_folder(folder, unk_token, add_bos_token):
    """
    A tokenizer folder shaped as the one transformers saves for SmolLM2's GGUF: no token for some bytes (ids close
    up), byte_fallback on with no <0xNN> token to fall back to, an empty normalizer Sequence, optionally an unk
    token for the missing bytes, the chat template in chat_template.jinja with real newlines, LlamaTokenizerFast.
    """
    build_hf_tokenizer(folder, "gpt2", CHATML_SPECIALS, "")
    d = json.loads((folder / "tokenizer.json").read_text())
    alphabet = byte_alphabet()
    gone = {alphabet[b] for b in CONTROL_BYTES + [0xC0, 0xC1, 0xF1, 0xFF]}
    kept = [t for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in gone]
    d["model"]["vocab"] = {t: i for i, t in enumerate(kept)}
    d["model"].update(byte_fallback=True, unk_token=unk_token, fuse_unk=True)
    d["normalizer"] = {"type": "Sequence", "normalizers": []}
    for added in d["added_tokens"]:
        added["id"] = d["model"]["vocab"][added["content"]]
    (folder / "tokenizer.json").write_text(json.dumps(d))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "add_bos_token": add_bos_token, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE_REAL_NEWLINES)


@pytest.mark.parametrize("unk_token", [None, "<|endoftext|>"])
def test_real_vocabulary_quirks_encode_like_transformers(tmp_path, unk_token):
    """A byte with no token: left out of its piece (merges join what is around it), or its unk token, per file."""
    transformers_gguf_style_folder(tmp_path, unk_token, add_bos_token=unk_token is not None)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_file(f"hf:{tmp_path}")
    assert sorted(ours.missing_bytes) == CONTROL_BYTES + [0xC0, 0xC1, 0xF1, 0xFF]
    lines = with_control_characters(real_lines(600))
    expected = [reference(line, add_special_tokens=False)["input_ids"] for line in lines]
    got = ours.encode_batch(lines)
    mismatches = [line for line, a, b in zip(lines, expected, got) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(lines)} lines differ, e.g. {mismatches[0]!r}"
    unk = [ours.special("<|endoftext|>")] if unk_token else []
    assert ours.encode("a\x04\x06b") == ours.encode("a") + unk + ours.encode("b")
    # the template of chat_template.jinja, its default system message found though its newlines are real ones
    assert ours.chat_format == "chatml" and ours.bos_token == "<|endoftext|>"
    assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    prompt = reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    assert ours.render_for_completion(CONVERSATION) == [ours.bos_id] + prompt
    # the token lm-evaluation-harness's tokenizer puts before scored text: LlamaTokenizerFast's add_bos_token
    added = reference("Hello")["input_ids"][:-len(ours.encode("Hello"))]
    assert added == ([ours.special("<|im_start|>")] if unk_token else [])  # add_bos_token True in the first case
    assert ours.scoring_bos_id == (added[0] if added else None)
    # the tokenizer file keeps all of it, and an export for transformers encodes the same ids
    again = Tokenizer.from_json(ours.to_json())
    assert again.encode_batch(lines[-300:]) == got[-300:] and again.scoring_bos_id == ours.scoring_bos_id
    from tokenizer import hf_tokenizer_files
    tokenizer_json, tokenizer_config = hf_tokenizer_files(ours, 512)
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (exported / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    reloaded = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert [reloaded(line)["input_ids"] for line in lines[-300:]] == [added + ids for ids in got[-300:]]


def test_scoring_start_token_from_the_post_processor(tmp_path):
    """Llama 3's tokenizer.json puts <|begin_of_text|> before every text (its post-processor); SmolLM2's nothing."""
    build_hf_tokenizer(tmp_path, "split", LLAMA3_SPECIALS, LLAMA3_TEMPLATE)
    d = json.loads((tmp_path / "tokenizer.json").read_text())
    begin = d["model"]["vocab"]["<|begin_of_text|>"]
    d["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [begin],
                                                  "tokens": ["<|begin_of_text|>"]}}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_file(f"hf:{tmp_path}")
    assert ours.scoring_bos_id == reference("Hello")["input_ids"][0] == begin
    assert [ours.scoring_bos_id] + ours.encode("Hello there") == reference("Hello there")["input_ids"]
    # our own tokenizers score after <|bos|>
    assert Tokenizer.byte_level().scoring_bos_id == Tokenizer.byte_level().special("<|bos|>")


def test_import_gives_the_logits_of_transformers(llama_folder):
    folder, reference = llama_folder
    model, tokenizer, checkpoint = load_checkpoint(f"hf:{folder}")
    text = sample_file("tinystories/tinystories_val.txt").read_text(encoding="utf-8")[:4000].replace("<|endoftext|>", "")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.encode(text)[:500]
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"][:500]
    expected, got = hf_logits(reference, ids), our_logits(model, ids)
    assert expected.abs().max() > 1.0  # logits big enough that 1e-5 means something
    assert (expected - got).abs().max().item() < 1e-5
    assert checkpoint["data_format"] == "chat" and not model.args.tie_embeddings
    # the chat prompt is the one transformers' template renders (after our document-start token)
    prompt = tokenizer.render_for_completion(CONVERSATION)
    assert prompt[0] == tokenizer.bos_id
    assert prompt[1:] == hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)


def test_llama3_rope_scaling_and_chat_format(tmp_path):
    build_hf_tokenizer(tmp_path, "split", LLAMA3_SPECIALS, LLAMA3_TEMPLATE)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # a short original context, so 400 tokens use the scaling
    reference = build_hf_model(tmp_path, "llama", tie_word_embeddings=True, rope_scaling=scaling)
    model, tokenizer, _ = load_checkpoint(f"hf:{tmp_path}")
    assert model.args.rope_scaling == 8.0 and tokenizer.chat_format == "llama3"
    ids = tokenizer.encode(sample_file("wikitext-2/valid.txt").read_text(encoding="utf-8")[:3000])[:400]
    assert (hf_logits(reference, ids) - our_logits(model, ids)).abs().max().item() < 1e-5
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    assert tokenizer.render_for_completion(CONVERSATION) == expected
    # the loss mask trains the assistant's words and its <|eot_id|>, nothing of the headers or the user's turns
    ids, mask = tokenizer.render_conversation(CONVERSATION[:2])
    trained = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained[:-1]) == "It is 19.\n\nAnything else?"
    assert trained[-1] == tokenizer.special("<|eot_id|>")


def test_qwen2_attention_biases_round_trip(tmp_path):
    source = tmp_path / "qwen"
    build_hf_tokenizer(source, "split", CHATML_SPECIALS, CHATML_TEMPLATE)
    reference = build_hf_model(source, "qwen2", tie_word_embeddings=True)
    model, tokenizer, _ = load_checkpoint(f"hf:{source}")
    assert model.args.attention_bias
    ids = tokenizer.encode(sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:3000])[:300]
    expected = hf_logits(reference, ids)
    assert (expected - our_logits(model, ids)).abs().max().item() < 1e-5

    exported = tmp_path / "exported"
    run_stage("export.py", f"--ckpt=hf:{source}", "--format=hf", f"--out={exported}")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert (hf_logits(reloaded, ids) - expected).abs().max().item() < 1e-5
    # run.c adds the biases: its greedy tokens are PyTorch's
    run_stage("export.py", f"--ckpt=hf:{source}", f"--out={tmp_path / 'model.bin'}",
              f"--tokenizer_out={tmp_path / 'tokenizer.bin'}")
    prompt = tokenizer.decode(ids[:30])
    start = tokenizer.encode(prompt, bos=True)
    expected = [t[0] for t, _ in model.generate(start, 40, temperature=0, stop_tokens=[tokenizer.bos_id])]
    assert run_c_tokens(run_c_binary(tmp_path), tmp_path, "-i", prompt) == expected and len(expected) >= 20


def test_our_model_exports_to_transformers(tmp_path, shakespeare_tokenizer):
    from conftest import random_model
    from checkpoint import save_checkpoint
    from dataclasses import asdict
    model = random_model(vocab_size=shakespeare_tokenizer.vocab_size, max_seq_len=128, tie_embeddings=False)
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(),
                     "tokenizer": shakespeare_tokenizer.to_json(), "tokenizer_sha256": shakespeare_tokenizer.sha256,
                     "data_format": "chat", "iter_num": 7}, path)
    run_stage("export.py", f"--ckpt={path}", "--format=hf", f"--out={tmp_path / 'hf'}")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    lines = real_lines(1000)
    assert [hf_tokenizer(line)["input_ids"] for line in lines] == shakespeare_tokenizer.encode_batch(lines)
    ids = shakespeare_tokenizer.encode(" ".join(lines))[:120]
    assert (hf_logits(reloaded, ids) - our_logits(model, ids)).abs().max().item() < 1e-5
    # our chat format as a Jinja template: transformers renders the same prompt ids
    assert hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True) == \
        shakespeare_tokenizer.render_for_completion(CONVERSATION)

    # --format=safetensors: one file that every stage reads back as a checkpoint
    run_stage("export.py", f"--ckpt={path}", "--format=safetensors", f"--out={tmp_path / 'model.safetensors'}")
    again, tokenizer, checkpoint = load_checkpoint(str(tmp_path / "model.safetensors"))
    assert torch.equal(our_logits(again, ids), our_logits(model, ids))
    assert tokenizer.sha256 == shakespeare_tokenizer.sha256 and checkpoint["iter_num"] == 7


def test_lora_fine_tune_of_an_imported_model(llama_folder, tmp_path):
    """A user's Q/A file on an imported model: prepare, LoRA, sample, export for transformers and for run.c."""
    folder, _ = llama_folder
    qa = "\n".join(f"Q: What is {a} times {b}?\nA: {a} times {b} is {a * b}.\n" for a in range(2, 10) for b in range(2, 8))
    (tmp_path / "qa.txt").write_text(qa)
    run_stage("prepare/chat.py", tmp_path / "qa.txt", "--name", "qa", "--tokenizer", f"hf:{folder}",
              "--data_dir", tmp_path / "data")
    out = tmp_path / "lora"
    run_stage("train.py", f"--init_from=hf:{folder}", f"--data_dir={tmp_path / 'data'}", "--data=qa", f"--out_dir={out}",
              "--lora_rank=4", "--lora_targets=q,v,gate", "--block_size=128", "--batch_size=8", "--max_iters=30",
              "--eval_interval=30", "--eval_iters=2", "--learning_rate=1e-2", "--warmup_iters=3", "--num_threads=1")
    losses = [r["loss"] for r in read_log(out)]
    assert losses[-1] < losses[0] - 0.5, losses
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["base_checkpoint"].startswith("hf:") and "model" not in checkpoint  # adapters only

    model, tokenizer, _ = load_checkpoint(str(out / "ckpt.pt"))
    run_stage("export.py", f"--ckpt={out / 'ckpt.pt'}", "--format=hf", f"--out={tmp_path / 'hf'}")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = tokenizer.render_for_completion([{"role": "user", "content": "What is 3 times 4?"}])
    assert (hf_logits(reloaded, ids) - our_logits(model, ids)).abs().max().item() < 1e-5

    # run.c: greedy tokens equal sample.py's on the merged model
    sample = run_stage("sample.py", f"--ckpt={out / 'ckpt.pt'}", "--start=What is 3 times 4?", "--temperature=0",
                       "--max_new_tokens=24", "--show_tokens=True")
    python_tokens = [int(t) for t in sample.stdout.split("tokens:")[1].split()]
    binary = run_c_binary(tmp_path)
    export = run_stage("export.py", f"--ckpt={out / 'ckpt.pt'}", f"--out={tmp_path / 'model.bin'}",
                       f"--tokenizer_out={tmp_path / 'tokenizer.bin'}")
    assert "-m chat -y 'You are a helpful AI assistant named SmolLM" in export.stdout  # the template's system message
    prompt = tokenizer.decode(tokenizer.encode("To be, or not to be"))
    c_tokens = run_c_tokens(binary, tmp_path, "-i", prompt)
    start = tokenizer.encode(prompt, bos=True)
    expected = [t[0] for t, _ in model.generate(start, 40, temperature=0, stop_tokens=[tokenizer.bos_id])]
    assert c_tokens == expected and len(expected) == 40
    # chat mode in ChatML: run.c's reply is sample.py's (which adds the default system message run.c gets by -y)
    c_reply = run_c_tokens(binary, tmp_path, "-m", "chat", "-y", tokenizer.default_system, "-i", "What is 3 times 4?")
    assert c_reply == python_tokens[:len(c_reply)] and len(c_reply) > 0
    assert python_tokens[len(c_reply)] == tokenizer.assistant_end_id  # both ended the turn at <|im_end|>


def run_c_binary(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for run.c")
    binary = tmp_path / "run"
    subprocess.run([cc, "-O2", "-o", str(binary), str(REPO / "run.c"), "-lm"], check=True)
    return binary


def run_c_tokens(binary, folder, *args, n=40):
    """The token ids ./run prints with -v 1, greedy."""
    c = subprocess.run([str(binary), str(folder / "model.bin"), "-z", str(folder / "tokenizer.bin"), "-t", "0",
                        "-n", str(n), "-v", "1", *args], capture_output=True, check=True, stdin=subprocess.DEVNULL)
    return [int(t) for t in c.stdout.decode("utf-8", "replace").split("tokens:")[1].splitlines()[0].split()]


def test_run_c_chats_in_llama3_format(tmp_path):
    build_hf_tokenizer(tmp_path, "split", LLAMA3_SPECIALS, LLAMA3_TEMPLATE)
    build_hf_model(tmp_path, "llama", tie_word_embeddings=True, rope_theta=500000.0)
    model, tokenizer, _ = load_checkpoint(f"hf:{tmp_path}")
    run_stage("export.py", f"--ckpt=hf:{tmp_path}", f"--out={tmp_path / 'model.bin'}",
              f"--tokenizer_out={tmp_path / 'tokenizer.bin'}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Name three colours. "}]
    prompt = tokenizer.render_for_completion(messages)
    expected = []
    for tokens, _ in model.generate(prompt, 30, temperature=0, stop_tokens=[tokenizer.assistant_end_id, tokenizer.bos_id]):
        if tokens[0] in (tokenizer.assistant_end_id, tokenizer.bos_id):
            break
        expected.append(tokens[0])
    got = run_c_tokens(run_c_binary(tmp_path), tmp_path, "-m", "chat", "-y", "Be brief.", "-i", "  Name three colours. ",
                       n=30)
    assert got == expected and len(got) > 0


def test_vocabulary_above_65536_uses_uint32_token_files(tmp_path):
    """Token ids above 65,535 (Llama 3's 128K vocabulary) go to uint32 files that train.py reads."""
    folder = tmp_path / "big-vocab"
    build_hf_tokenizer(folder, "split", CHATML_SPECIALS, CHATML_TEMPLATE, special_ids_at=70_000)
    build_hf_model(folder, "llama", vocab_size=70_016, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, tie_word_embeddings=True)
    tokenizer = Tokenizer.from_file(f"hf:{folder}")
    assert tokenizer.vocab_size == 70_003 and tokenizer.bos_id == 70_000
    lines = "\n".join(json.dumps({"messages": c}) for c in
                      [[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]
                       for w in ["yes", "no", "maybe", "hello", "goodbye", "thanks"] * 5])
    (tmp_path / "chats.jsonl").write_text(lines)
    run_stage("prepare/chat.py", tmp_path / "chats.jsonl", "--name", "big", "--tokenizer", f"hf:{folder}",
              "--data_dir", tmp_path / "data", "--val_count", "4")
    meta = json.loads((tmp_path / "data/big/meta.json").read_text())
    assert meta["dtype"] == "uint32"
    tokens = np.fromfile(tmp_path / "data/big/train.bin", dtype=np.uint32)
    assert tokens.max() >= 70_000 and (tokens == 70_000).sum() == meta["splits"]["train"]["documents"]
    run_stage("train.py", f"--init_from=hf:{folder}", f"--data_dir={tmp_path / 'data'}", "--data=big",
              f"--out_dir={tmp_path / 'out'}", "--block_size=128", "--batch_size=4", "--max_iters=8", "--eval_interval=8",
              "--eval_iters=1", "--learning_rate=3e-3", "--warmup_iters=2", "--log_interval=1", "--num_threads=1")
    losses = [r["loss"] for r in read_log(tmp_path / "out")]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_bad_folders_get_clear_errors(tmp_path, llama_folder):
    folder, _ = llama_folder
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_checkpoint(f"hf:{tmp_path / 'missing'}")
    # a SentencePiece-style tokenizer (Llama 2, TinyLlama: byte fallback to <0x00>...) is refused, naming the file
    bad = tmp_path / "sentencepiece"
    shutil.copytree(folder, bad)
    d = json.loads((bad / "tokenizer.json").read_text())
    d["model"]["byte_fallback"] = True
    d["model"]["vocab"]["<0x41>"] = len(d["model"]["vocab"])
    (bad / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="tokenizer.json.*byte fallback"):
        Tokenizer.from_file(f"hf:{bad}")
    # an architecture model.py does not have
    other = tmp_path / "gemma"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(ValueError, match="config.json: model_type 'gemma'"):
        load_checkpoint(f"hf:{other}")
    # a truncated weights file
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: tensor .*truncated"):
        load_checkpoint(f"hf:{cut}")
    header_len = struct.unpack("<Q", data[:8])[0]
    (cut / "model.safetensors").write_bytes(data[:8 + header_len // 2])
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(str(cut / "model.safetensors"))
