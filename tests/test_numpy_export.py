"""export.py --format=npz and run_numpy.py: NumPy logits equal PyTorch's on every kind of model, greedy tokens
equal engine.py's (calculator included), sampling behaves, and the script runs with torch unimportable."""

import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import engine
import run_numpy
from checkpoint import save_checkpoint
from conftest import REPO, random_model, run_stage
from export import write_npz
from tokenizer import Tokenizer

TOKENIZER = Tokenizer.byte_level()

# model.py's options, each on a tiny random model (dim 64, 2 layers, head size 16)
CONFIGURATIONS = {
    "plain": dict(n_heads=4, n_kv_heads=4),
    "grouped_query": dict(n_heads=4, n_kv_heads=2),
    "untied_one_kv_head": dict(n_heads=4, n_kv_heads=1, tie_embeddings=False),
    "attention_biases": dict(attention_bias=True, tie_embeddings=False),  # Qwen2's
    # Llama 3.1's: an original context of 16 puts the blend of slow and kept frequencies inside head size 16
    "rope_scaling": dict(rope_scaling=8.0, rope_original_max_seq_len=16, rope_theta=500000.0),
}


def export(model, path, data_format="text"):
    write_npz(model, TOKENIZER, {"data_format": data_format, "iter_num": 5}, str(path))
    return run_numpy.load_model(str(path))


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_numpy_logits_equal_pytorch(name, tmp_path):
    model = random_model(vocab_size=TOKENIZER.vocab_size, **CONFIGURATIONS[name])
    loaded, tokenizer = export(model, tmp_path / "model.npz")
    assert tokenizer.sha256 == TOKENIZER.sha256 and loaded["args"] == asdict(model.args)
    assert np.abs(loaded["rope_cos"] - model.rope_cos.numpy()).max() < 1e-6
    assert np.abs(loaded["rope_sin"] - model.rope_sin.numpy()).max() < 1e-6
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TOKENIZER.vocab_size, (64,), generator=generator).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0][0].numpy()  # (64, vocab_size)
    whole = run_numpy.forward(loaded, tokens, 0, run_numpy.new_cache(loaded["args"], 64))
    assert np.abs(whole - expected).max() < 1e-4
    # with the KV cache, as generation runs: 40 tokens in one pass, then one at a time
    cache = run_numpy.new_cache(loaded["args"], 64)
    steps = [run_numpy.forward(loaded, tokens[:40], 0, cache)]
    steps += [run_numpy.forward(loaded, [t], 40 + i, cache) for i, t in enumerate(tokens[40:])]
    assert np.abs(np.concatenate(steps) - expected).max() < 1e-4


def test_greedy_tokens_equal_the_engines_with_the_calculator(tmp_path):
    model = random_model(vocab_size=TOKENIZER.vocab_size, max_seq_len=128, tie_embeddings=False)
    python_start, python_end = TOKENIZER.special("<|python_start|>"), TOKENIZER.special("<|python_end|>")
    with torch.no_grad():
        # only the sign of the first normalized feature decides the next token: <|python_start|> or
        # <|python_end|>, so the model keeps calling the calculator, and the engine forcing its answers in
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.output.weight.zero_()
        model.output.weight[python_start, 0], model.output.weight[python_end, 0] = 1.0, -1.0
    loaded, _ = export(model, tmp_path / "model.npz", data_format="chat")
    prompt = TOKENIZER.render_for_completion([{"role": "user", "content": "What is 2 + 3?"}])
    expected = list(engine.generate(model, TOKENIZER, prompt, 80, temperature=0.0))
    got = list(run_numpy.generate(loaded, TOKENIZER, prompt, 80, temperature=0.0))
    assert [t for t, _ in got] == [tokens[0] for tokens, _ in expected]
    assert [f for _, f in got] == [forced[0] for _, forced in expected]
    assert sum(f for _, f in got) > 10  # the calculator's answers were forced in, and read by the model


def test_sampling_temperature_and_top_p(tmp_path):
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    assert run_numpy.sample(logits, 0.0, 1.0, rng) == 0
    counts = np.bincount([run_numpy.sample(logits, 1.0, 1.0, rng) for _ in range(4000)], minlength=3) / 4000
    assert np.abs(counts - [0.5, 0.3, 0.2]).max() < 0.03
    # top-p 0.6: the smallest set of most likely tokens reaching 0.6 is {0, 1}, renormalized to 5/8, 3/8
    counts = np.bincount([run_numpy.sample(logits, 1.0, 0.6, rng) for _ in range(4000)], minlength=3) / 4000
    assert counts[2] == 0 and abs(counts[0] - 5 / 8) < 0.03
    # a low temperature sharpens towards the most likely token
    assert np.mean([run_numpy.sample(logits, 0.1, 1.0, rng) == 0 for _ in range(200)]) > 0.95
    loaded, _ = export(random_model(vocab_size=TOKENIZER.vocab_size), tmp_path / "model.npz")
    prompt = TOKENIZER.encode("Once", bos=True)

    def draw(seed):
        return [t for t, _ in run_numpy.generate(loaded, TOKENIZER, prompt, 30, 1.0, 1.0, seed, False, [])]

    assert draw(7) == draw(7) and draw(7) != draw(8)  # seeded


def test_bad_files_are_refused_with_the_reason(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not written by export.py --format=npz"):
        run_numpy.load_model(str(tmp_path / "other.npz"))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz: not a readable .npz file"):
        run_numpy.load_model(str(tmp_path / "garbage.npz"))
    model = random_model(vocab_size=TOKENIZER.vocab_size)
    export(model, tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz") as npz:
        entries = {name: npz[name] for name in npz.files if name != "layers.1.feed_forward.w2.weight"}
    np.savez(tmp_path / "cut.npz", **entries)
    with pytest.raises(ValueError, match=r"cut.npz: weights do not match model_args: missing "
                                         r"\['layers.1.feed_forward.w2.weight'\]"):
        run_numpy.load_model(str(tmp_path / "cut.npz"))


def test_run_numpy_runs_without_torch_and_replies_as_the_engine(tmp_path):
    model = random_model(vocab_size=TOKENIZER.vocab_size, max_seq_len=128)
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(),
                     "tokenizer": TOKENIZER.to_json(), "data_format": "chat", "iter_num": 3},
                    str(tmp_path / "ckpt.pt"))
    npz = tmp_path / "model.npz"
    exported = run_stage("export.py", f"--ckpt={tmp_path / 'ckpt.pt'}", "--format=npz", f"--out={npz}")
    # the command it suggests is one run_numpy.py takes (it once said run.c's -m chat -i)
    assert f"python run_numpy.py {npz} --mode=chat --prompt=\"Hello\"" in exported.stdout
    # torch made unimportable: `import torch` anywhere in run_numpy.py or what it imports fails
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['run_numpy.py'] + sys.argv[1:]; "
            "runpy.run_path('run_numpy.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, str(npz), "--mode=chat", "--prompt=Hello",
                             "--temperature=0", "--steps=40", "--show_tokens"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    prompt = TOKENIZER.render_for_completion([{"role": "user", "content": "Hello"}])
    expected = [tokens[0] for tokens, _ in engine.generate(model, TOKENIZER, prompt, 40, temperature=0.0)]
    assert result.stdout.splitlines()[-1] == "tokens: " + " ".join(map(str, expected))
    assert "achieved tok/s" in result.stderr
