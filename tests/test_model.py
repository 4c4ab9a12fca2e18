"""model.py: llama2.c-compatible math, causality, KV-cache generation, sampling, checkpoints."""

import pytest
import torch

from conftest import random_model
from checkpoint import load_checkpoint, save_checkpoint
from model import (KVCache, ModelArgs, Transformer, apply_rope, count_params, flops_per_token, precompute_rope,
                   sample_next_token)
from tokenizer import Tokenizer


def test_hidden_dim_follows_llama2c_rule():
    # llama2.c's stories15M / 42M / 110M feed-forward sizes
    assert ModelArgs(dim=288).hidden_dim == 768
    assert ModelArgs(dim=512, n_heads=8).hidden_dim == 1376
    assert ModelArgs(dim=768, n_heads=12).hidden_dim == 2048
    assert ModelArgs(dim=64, n_heads=4, hidden_dim=100).hidden_dim == 100


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        ModelArgs(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)


def test_rope_matches_llama2c_complex_formulation():
    # llama2.c's model.py rotates (x[2i], x[2i+1]) as the complex number x[2i] + i x[2i+1] times e^(i pos freq_i)
    head_dim, T = 16, 10
    x = torch.randn(2, T, 3, head_dim)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(T).float(), freqs)
    x_complex = torch.view_as_complex(x.reshape(2, T, 3, head_dim // 2, 2))
    expected = torch.view_as_real(x_complex * torch.polar(torch.ones_like(angles), angles)[None, :, None, :])
    cos, sin = precompute_rope(head_dim, T, 10000.0)
    assert torch.allclose(apply_rope(x, cos, sin), expected.flatten(3), atol=1e-5)


def test_tied_and_untied_heads():
    tied = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, tie_embeddings=True))
    untied = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert count_params(untied) - count_params(tied) == 50 * 32


def test_causality_later_tokens_never_change_earlier_logits():
    model = random_model()
    tokens = torch.randint(0, 300, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_loss_from_the_counted_positions_equals_the_loss_from_every_logit():
    # forward() runs the output layer only where a target counts; loss and gradients must not change
    model = random_model(dim=32, n_heads=2, n_kv_heads=2)
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (3, 12))
    targets = torch.randint(0, 300, (3, 12))
    targets[0, :7] = -1  # a prompt, as in chat data
    targets[2, 5] = -1
    for reduction in ("mean", "sum", "none"):
        model.zero_grad()
        logits, _ = model(tokens)
        expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                                     ignore_index=-1, reduction=reduction)
        expected = expected.view(3, 12) if reduction == "none" else expected
        expected.sum().backward()
        expected_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        returned_logits, loss = model(tokens, targets, loss_reduction=reduction)
        assert returned_logits is None and loss.shape == expected.shape
        assert torch.allclose(loss, expected, atol=1e-5)
        loss.sum().backward()
        for got, want in zip((p.grad for p in model.parameters()), expected_grads):
            assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_forward_equals_full_recomputation(n_kv_heads):
    model = random_model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 300, (3, 30))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = KVCache(model.args, 3, 30, "cpu", torch.float32)
        prefill, _ = model(tokens[:, :10], kv_cache=cache)  # a prompt
        chunk, _ = model(tokens[:, 10:14], kv_cache=cache)  # a chunk that continues mid-sequence
        steps = [model(tokens[:, t:t + 1], kv_cache=cache)[0] for t in range(14, 30)]  # one token at a time
    cached = torch.cat([prefill, chunk] + steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5)


def naive_greedy(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence at every step (the thing the KV cache avoids)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_generate_with_cache_equals_recomputation():
    model = random_model()
    prompt = [1, 5, 9, 200]
    generated = [tokens[0] for tokens, _ in model.generate(prompt, 40, temperature=0.0)]
    assert generated == naive_greedy(model, prompt, 40)


def test_generate_costs_one_forward_per_new_token():
    model = random_model()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[1]))
    list(model.generate([1, 2, 3, 4, 5], 20, temperature=0.0))
    assert calls == [5] + [1] * 19  # the prompt once, then single-token steps


def test_generate_sampling_options():
    model = random_model()
    prompt = [3, 4, 5]

    def run(**kw):
        return [t[0] for t, _ in model.generate(prompt, 30, **kw)]

    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)  # seeded sampling repeats
    assert run(temperature=1.0, seed=7) != run(temperature=1.0, seed=8)
    assert run(temperature=1.0, top_k=1, seed=3) == run(temperature=0.0)  # top-k 1 is greedy
    assert run(temperature=1.0, top_p=1e-6, seed=3) == run(temperature=0.0)  # a tiny top-p is greedy
    # stop tokens: the sample ends right after the first stop token
    greedy = run(temperature=0.0)
    stop = greedy[5]
    stopped = run(temperature=0.0, stop_tokens=[stop])
    assert stopped == greedy[:greedy.index(stop) + 1]
    # max_seq_len bounds generation
    assert len(run(temperature=0.0) + prompt) <= model.args.max_seq_len
    assert len([t for t in model.generate(prompt, 1000, temperature=0.0)]) == model.args.max_seq_len - len(prompt)


def test_generate_batch_of_samples_and_tool_hook():
    model = random_model()
    prompt = [7, 8, 9]
    steps = list(model.generate(prompt, 25, temperature=1.0, seed=1, num_samples=4))
    samples = [[s[0][i] for s in steps] for i in range(4)]
    assert len({tuple(s) for s in samples}) > 1  # the samples differ
    # each row of a batch matches its own greedy recomputation
    greedy_rows = [[s[0][i] for s in model.generate(prompt, 12, temperature=0.0, num_samples=3)] for i in range(3)]
    assert all(row == naive_greedy(model, prompt, 12) for row in greedy_rows)

    # a tool hook forces tokens into the sequence; the model then continues from them
    forced_text = [250, 251, 252]

    def hook(i, sequence):
        return forced_text if len(sequence) == len(prompt) + 2 else None

    steps = list(model.generate(prompt, 10, temperature=0.0, tool_hook=hook))
    tokens = [t[0] for t, _ in steps]
    forced = [f[0] for _, f in steps]
    assert tokens[2:5] == forced_text and forced == [False, False, True, True, True] + [False] * 5
    assert tokens[5:] == naive_greedy(model, prompt + tokens[:5], 5)


def test_sample_next_token_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, 1.0, 0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn
    draws = {int(sample_next_token(logits, 1.0, 2, 1.0, g)) for _ in range(300)}
    assert draws == {0, 1}


def test_flops_per_token_counts_matmul_weights():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=64)
    model = Transformer(args)
    matmul_params = count_params(model, non_embedding=True) - (2 * 2 + 1) * 64 + 300 * 64  # no norms, + head
    assert flops_per_token(args, 64) == 6 * matmul_params + 12 * 2 * 64 * 64


def test_checkpoint_roundtrip_weights_only_and_shape_errors(tmp_path):
    model = random_model()
    tokenizer = Tokenizer.byte_level()
    model_args = dict(model.args.__dict__)
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model_args": model_args, "model": model.state_dict(), "tokenizer": tokenizer.to_json()}, path)
    assert set(torch.load(path, weights_only=True)) == {"model_args", "model", "tokenizer"}
    loaded, loaded_tokenizer, _ = load_checkpoint(str(path))
    x = torch.randint(0, 267, (1, 10))
    assert torch.equal(loaded(x)[0], model(x)[0])
    assert loaded_tokenizer.sha256 == tokenizer.sha256

    other = random_model(dim=32, n_heads=2, n_kv_heads=2)
    save_checkpoint({"model_args": model_args, "model": other.state_dict(), "tokenizer": tokenizer.to_json()}, path)
    with pytest.raises(ValueError, match=r"wrong shape: tok_embeddings.weight: file \(300, 32\) vs model \(300, 64\)"):
        load_checkpoint(str(path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
