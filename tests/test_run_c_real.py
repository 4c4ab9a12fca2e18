"""
run.c on a real model: SmolLM2-135M-Instruct, exported by export.py from its Hugging Face folder (hf:) and from its
GGUF (gguf:), answers "What is the capital of France?" in chat mode with PyTorch's greedy tokens (float32), from the
float32 and the int8 file, and encodes real text holding the bytes its vocabulary has no token for as tokenizer.py
does.

The model files are not part of the repository, and the tests skip without them:
    NANOLLAMA_SMOLLM2_HF    its Hugging Face folder (default ~/.cache/smollm2-135m-instruct)
    NANOLLAMA_SMOLLM2_GGUF  its GGUF file (default ~/.cache/nanollama/SmolLM2-135M-Instruct.Q4_1.gguf)
The real-model tier (tests/test_real_model.py) calls check_run_c_on_real_model with the files it fetches itself.
About a minute a source on 2 cores (the float32 file is 540 MB).
"""

import inspect
import os
from pathlib import Path

import pytest

import checkpoint
from checkpoint import load_checkpoint
from conftest import run_stage
from test_export import UNENCODABLE, c_encode, compile_run, real_lines, run_c, tokens_line
from tokenizer import Tokenizer

PARIS = "What is the capital of France?"
SOURCES = {"hf": ("NANOLLAMA_SMOLLM2_HF", "~/.cache/smollm2-135m-instruct"),
           "gguf": ("NANOLLAMA_SMOLLM2_GGUF", "~/.cache/nanollama/SmolLM2-135M-Instruct.Q4_1.gguf")}


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


@pytest.mark.parametrize("kind", list(SOURCES))
def test_run_c_chats_as_pytorch_on_smollm2(kind, tmp_path):
    variable, default = SOURCES[kind]
    path = Path(os.environ.get(variable, default)).expanduser()
    if not path.exists():
        pytest.skip(f"{path} not found: set {variable} to SmolLM2-135M-Instruct's {kind} files to run this test")
    if "unk_token" not in inspect.signature(Tokenizer).parameters or not hasattr(checkpoint, "read_gguf"):
        pytest.skip("this checkout cannot import SmolLM2 (GGUF files, vocabularies without some byte tokens)")
    check_run_c_on_real_model(f"{kind}:{path}", tmp_path, compile_run(tmp_path / "run", "-O2", "-march=native",
                                                                      "-fopenmp-simd"))
