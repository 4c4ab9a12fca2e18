"""
Open weights at a real size: a random model with SmolLM2-135M's exact shape (dim 576, 30 layers, 9 heads, 3 KV
heads, hidden 1536, vocab 49152, tied head, rope_theta 100000), saved by transformers, imported with
hf:DIR, checked against transformers' logits, and timed: import, forward, a full and a LoRA training step,
export back to a Hugging Face folder.

    python bench/hf_import.py                  # needs transformers and tokenizers (pip install transformers)
    python bench/hf_import.py --layers=4       # a quicker, shallower run

Random weights: the figures are about speed and exactness, not quality. Prints figures; asserts nothing.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's modules first
sys.path.append(os.path.join(REPO, "tests"))  # test_hf's tokenizer builder
from checkpoint import load_checkpoint  # noqa: E402
from common import fail  # noqa: E402
from configurator import configure  # noqa: E402
from export import write_hf  # noqa: E402
from model import apply_lora, configure_optimizer, count_params  # noqa: E402

# -----------------------------------------------------------------------------------------------------
layers = 30  # SmolLM2-135M has 30
seq = 256  # tokens per sequence
batch = 4  # sequences per training step
# -----------------------------------------------------------------------------------------------------


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    # here, not at the top: transformers is optional (pip install transformers), and --help works without it
    try:
        import transformers
        from test_hf import CHATML_SPECIALS, CHATML_TEMPLATE, build_hf_tokenizer
    except ImportError as e:
        fail(f"this benchmark needs transformers and tokenizers ({e}): pip install transformers")

    folder = Path(tempfile.mkdtemp(prefix="smollm2-shape-"))
    try:
        build_hf_tokenizer(folder, "digits", CHATML_SPECIALS, CHATML_TEMPLATE, vocab_size=2048)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                          max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                          tie_word_embeddings=True)
        reference = transformers.LlamaForCausalLM(config).eval()
        reference.save_pretrained(str(folder))
        size = os.path.getsize(folder / "model.safetensors")
        print(f"SmolLM2-135M shape, {layers} layers: {count_params(reference) / 1e6:.1f}M parameters, "
              f"model.safetensors {size / 1e6:.0f} MB (float32), torch threads {torch.get_num_threads()}")

        t0 = time.perf_counter()
        model, tokenizer, _ = load_checkpoint(f"hf:{folder}")
        print(f"import (hf:DIR -> model.py): {time.perf_counter() - t0:.2f} s")

        text = open(os.path.join(REPO, "prepare", "sample", "tinystories", "tinystories_val.txt"),
                    encoding="utf-8").read(20000)
        ids = tokenizer.encode(text.replace("<|endoftext|>", ""))[:seq]
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (reference(x).logits - model(x)[0]).abs().max().item()
            ours_s = timed(lambda: model(x))
            theirs_s = timed(lambda: reference(x))
        print(f"max |logit difference| vs transformers on {len(ids)} real tokens: {diff:.2e}")
        print(f"forward of 1 x {len(ids)} tokens: ours {ours_s * 1e3:.0f} ms, transformers {theirs_s * 1e3:.0f} ms")

        training_tokens = torch.randint(0, 2048, (batch, seq + 1))
        for name, lora in (("full fine-tune", False), ("LoRA r8 q,v", True)):
            m, _, _ = load_checkpoint(f"hf:{folder}")
            m.train()
            if lora:
                apply_lora(m, 8, 16, 0.0, "q,v")
            optimizer = configure_optimizer(m, 0.0, 1e-4, (0.9, 0.95), "cpu")

            def step():
                _, loss = m(training_tokens[:, :-1], training_tokens[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()  # warm up (optimizer state)
            seconds = timed(step, repeat=2)
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            print(f"{name}: {seconds * 1e3:.0f} ms per step of {batch} x {seq} tokens "
                  f"({batch * seq / seconds:.0f} tok/s), {trainable / 1e6:.2f}M trainable parameters")

        t0 = time.perf_counter()
        write_hf(model, tokenizer, str(folder / "exported"))
        print(f"export --format=hf: {time.perf_counter() - t0:.2f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    configure(globals())
    main()
