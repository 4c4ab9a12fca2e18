"""The conservative fine-tune of a pretrained checkpoint: --init_from=PATH (never a resume past its schedule),
shapes the checkpoint decides, samples at every evaluation, best weights as .safetensors, config/finetune.py."""

import random
import shutil

import pytest
import torch

import engine
from checkpoint import load_checkpoint, read_safetensors
from conftest import prepare_chat_source, prepare_text_source, read_log, run_stage
from tokenizer import Tokenizer

WORDS = "the cat sat on a mat while two dogs ran past the old red barn and one bird sang".split()
# a tiny model; block_size 32 is also its max_seq_len
SHAPE = ["--dim=32", "--n_layers=1", "--n_heads=2"]
RUN = ["--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
       "--num_threads=1"]


def word_lines(n, seed):
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n))


def sums(n, seed):
    """n chats: 'what is a plus b?' -> the sum."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        chats.append([{"role": "user", "content": f"what is {a} plus {b}?"},
                      {"role": "assistant", "content": str(a + b)}])
    return chats


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """'words' (random words), 'digits' (digits only: bytes 'words' never has), 'sums' (chat), byte-level."""
    root = tmp_path_factory.mktemp("finetune_data")
    tokenizer = Tokenizer.byte_level()
    prepare_text_source(root / "words", word_lines(400, 0), tokenizer)
    rng = random.Random(1)
    digits = "\n".join("".join(rng.choice("0123456789") for _ in range(40)) for _ in range(200))
    prepare_text_source(root / "digits", digits, tokenizer)
    prepare_chat_source(root / "sums", {"train": sums(60, 2), "val": sums(8, 3)}, tokenizer)
    return root


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """out_dir of a 10-step run on 'words': ckpt.pt and best.pt at step 10."""
    out = tmp_path_factory.mktemp("pretrained")
    run_stage("train.py", *SHAPE, *RUN, f"--data_dir={data_dir}", "--data=words", f"--out_dir={out}",
              "--max_iters=10", "--eval_interval=5", "--learning_rate=1e-2")
    return out


def greedy(model, tokenizer, prompt, chat, max_new_tokens):
    """What sample.py prints at temperature 0: the prompt as a user turn for a chat model."""
    if chat:
        ids = tokenizer.render_for_completion([{"role": "user", "content": prompt}])
        stop_tokens = [tokenizer.assistant_end_id, tokenizer.bos_id]
    else:
        ids, stop_tokens = tokenizer.encode(prompt, bos=True), [tokenizer.bos_id]
    pieces = engine.generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                                  tools=chat, stop_tokens=stop_tokens)
    return "".join(piece[0] for _, piece in pieces)


@pytest.fixture
def one_thread():
    """Greedy generation here and in train.py on the same number of threads: the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_past_max_iters_is_an_error_that_points_to_init_from(data_dir, pretrained, tmp_path):
    """The fine-tune as users first write it: resume a pretrained ckpt.pt with a small max_iters."""
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    before = (out / "ckpt.pt").read_bytes()
    result = run_stage("train.py", *RUN, f"--data_dir={data_dir}", "--data=words", f"--out_dir={out}",
                       "--init_from=resume", "--max_iters=5", "--learning_rate=5e-6", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is at step 10, past max_iters=5" in result.stderr
    assert f"--init_from={out / 'ckpt.pt'}" in result.stderr  # the way to fine-tune from it
    assert (out / "ckpt.pt").read_bytes() == before


def test_resume_on_other_data_warns_and_best_pt_follows_the_new_data(data_dir, pretrained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    old_best = torch.load(out / "best.pt", weights_only=True)["best_val_loss"]
    result = run_stage("train.py", *RUN, f"--data_dir={data_dir}", "--data=digits", f"--out_dir={out}",
                       "--init_from=resume", "--max_iters=14", "--eval_interval=2", "--learning_rate=3e-3")
    warning = next(line for line in result.stdout.splitlines() if line.startswith("warning: settings changed"))
    for change in ("data 'words' -> 'digits'", "learning_rate 0.01 -> 0.003", "max_iters 10 -> 14",
                   "the best val loss starts over on the new data"):
        assert change in warning, warning
    evals = read_log(out, "eval")[-3:]  # the resumed run's (log.jsonl goes on)
    assert [e["iter"] for e in evals] == [10, 12, 14]
    # digits are bytes the words never had: their loss is higher than any on the words, so only a best val
    # loss that starts over lets best.pt follow the new data
    assert min(e["val_loss"] for e in evals) > old_best
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["iter_num"] >= 10 and best["best_val_loss"] == pytest.approx(min(e["val_loss"] for e in evals))


def test_a_shape_setting_that_differs_from_the_checkpoint_is_an_error(data_dir, pretrained, tmp_path):
    def error(*args):
        result = run_stage("train.py", *RUN, f"--data_dir={data_dir}", "--data=words", *args, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        return result.stderr

    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    assert "n_layers=2 given, 1 in the checkpoint" in error(f"--out_dir={out}", "--init_from=resume",
                                                            "--max_iters=12", "--n_layers=2")
    config = tmp_path / "shape.py"
    config.write_text("n_heads = 4\n")  # a config file sets it as much as an override does
    message = error(config, f"--out_dir={tmp_path / 'tuned'}", f"--init_from={pretrained / 'best.pt'}", "--dim=48")
    assert "dim=48 given, 32 in the checkpoint" in message and "n_heads=4 given, 2 in the checkpoint" in message


def test_fine_tune_samples_each_evaluation_and_records_what_ran(data_dir, pretrained, tmp_path, one_thread):
    """No shape setting given: the defaults (dim 288, ...) are not the checkpoint's and must not matter."""
    out = tmp_path / "tuned"
    result = run_stage("train.py", *RUN, f"--data_dir={data_dir}", "--data=words", f"--out_dir={out}",
                       f"--init_from={pretrained / 'best.pt'}", "--num_epochs=0.02", "--eval_interval=2",
                       "--learning_rate=3e-3", "--min_lr=3e-4", "--sample_prompts=the cat | two dogs",
                       "--sample_max_new_tokens=12", "--save_safetensors=True")
    assert "fresh optimizer and schedule" in result.stdout
    evals, samples = read_log(out, "eval"), read_log(out, "sample")
    assert [(s["iter"], s["prompt"]) for s in samples] == [(e["iter"], p) for e in evals
                                                           for p in ("the cat", "two dogs")]
    for s in samples:
        assert f"sample: {s['prompt']!r} -> {s['text']!r}" in result.stdout
    # the last samples are what the saved model writes greedily, within sample_max_new_tokens
    model, tokenizer, checkpoint = load_checkpoint(str(out / "ckpt.pt"))
    for s in samples[-2:]:
        assert s["text"] == greedy(model, tokenizer, s["prompt"], chat=False, max_new_tokens=12)
        assert 0 < len(s["text"].encode("utf-8")) <= 12  # a byte per token
    # the checkpoint's config records what ran: the steps num_epochs made, the device and dtype 'auto' chose
    steps = checkpoint["iter_num"]
    assert f"num_epochs=0.02: {steps} steps" in result.stdout and evals[-1]["iter"] == steps
    assert checkpoint["config"]["max_iters"] == steps
    assert checkpoint["config"]["device"] == "cpu" and checkpoint["config"]["dtype"] == "float32"
    # best.safetensors: the best weights, which read_checkpoint rebuilds with their model args and tokenizer
    best_model, _, best = load_checkpoint(str(out / "best.pt"))
    st_model, st_tokenizer, st = load_checkpoint(str(out / "best.safetensors"))
    assert st["iter_num"] == best["iter_num"] and st_tokenizer.sha256 == tokenizer.sha256
    tokens = torch.tensor([tokenizer.encode("the old red barn", bos=True)])
    assert torch.equal(st_model(tokens)[0], best_model(tokens)[0])


def test_chat_samples_answer_a_user_turn_and_lora_saves_merged_safetensors(data_dir, pretrained, tmp_path,
                                                                           one_thread):
    out = tmp_path / "lora"
    prompt = "what is 2 plus 3?"
    run_stage("train.py", *RUN, f"--data_dir={data_dir}", "--data=sums", f"--out_dir={out}",
              f"--init_from={pretrained / 'best.pt'}", "--max_iters=4", "--eval_interval=2",
              "--learning_rate=3e-2", "--lora_rank=4", "--lora_targets=q,v,o,gate,up,down",
              f"--sample_prompts={prompt}", "--sample_max_new_tokens=8", "--save_safetensors=True")
    samples = read_log(out, "sample")
    assert [s["iter"] for s in samples] == [0, 2, 4]
    model, tokenizer, _ = load_checkpoint(str(out / "ckpt.pt"))  # adapters merged on load
    assert samples[-1]["text"] == greedy(model, tokenizer, prompt, chat=True, max_new_tokens=8)
    assert (out / "best.pt").exists(), "val loss never improved: nothing to compare"
    tensors, _ = read_safetensors(str(out / "best.safetensors"))
    assert not any("lora" in name for name in tensors)  # the weights merged, usable without their base
    best_model, _, _ = load_checkpoint(str(out / "best.pt"))
    st_model, _, _ = load_checkpoint(str(out / "best.safetensors"))
    tokens = torch.tensor([tokenizer.render_for_completion([{"role": "user", "content": prompt}])])
    assert torch.allclose(st_model(tokens)[0], best_model(tokens)[0], atol=1e-5)


def test_config_finetune_py(data_dir, pretrained, tmp_path):
    """The design card's command: python train.py config/finetune.py --overrides."""
    out = tmp_path / "tuned"
    result = run_stage("train.py", "config/finetune.py", f"--init_from={pretrained / 'best.pt'}",
                       f"--data_dir={data_dir}", "--data=words", f"--out_dir={out}", *RUN, "--max_iters=4",
                       "--eval_interval=2", "--sample_prompts=the cat")
    assert "fresh optimizer and schedule" in result.stdout and "warning" not in result.stdout
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["config"]["learning_rate"] <= 1e-4  # conservative
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_000002.pt", "ckpt_000004.pt"]
    assert [s["iter"] for s in read_log(out, "sample")] == [0, 2, 4]


def test_a_fine_tune_that_never_improves_keeps_its_start_as_best_pt(data_dir, pretrained, tmp_path):
    # learning rate 0: every later val loss equals the first, so the best is step 0, and best.pt (which the
    # messages name) holds the starting weights instead of not existing
    out = tmp_path / "still"
    run_stage("train.py", *RUN, f"--data_dir={data_dir}", "--data=words", f"--out_dir={out}",
              f"--init_from={pretrained / 'best.pt'}", "--max_iters=4", "--eval_interval=2",
              "--learning_rate=0", "--min_lr=0")
    best = torch.load(out / "best.pt", weights_only=True)
    start = torch.load(pretrained / "best.pt", weights_only=True)
    assert best["iter_num"] == 0 and best["best_iter"] == 0
    assert all(torch.equal(best["model"][k], start["model"][k]) for k in start["model"])
