"""QLoRA: NF4 and int8 codes of the frozen base (model.py); train.py --base_quantize and its checkpoints."""

import copy
import random

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import prepare_chat_source, prepare_text_source, random_model, read_log, run_stage
from model import (NF4_BLOCK, NF4_LEVELS, LoRALinear, QuantizedLinear, apply_lora, dequantize_int8,
                   dequantize_nf4, merge_lora, quantize_int8, quantize_nf4)
from tokenizer import Tokenizer

# the NF4 table printed in the QLoRA paper's appendix (Dettmers et al. 2023), to 4 digits
PAPER_NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
SHAPE = ["--dim=64", "--n_layers=1", "--n_heads=2"]
RUN = ["--block_size=64", "--batch_size=4", "--eval_iters=1", "--log_interval=1", "--warmup_iters=2",
       "--num_threads=1", "--deterministic=True"]
ALL = "q,k,v,o,gate,up,down"
QLORA = ["--lora_rank=16", "--lora_alpha=32", f"--lora_targets={ALL}", "--learning_rate=1e-2",
         "--min_lr=1e-3"]


def test_nf4_levels_are_the_papers():
    levels = NF4_LEVELS.tolist()
    assert len(levels) == 16 and levels == sorted(levels) and len(set(levels)) == 16
    assert levels[0] == -1.0 and levels[7] == 0.0 and levels[-1] == 1.0
    assert torch.allclose(NF4_LEVELS, torch.tensor(PAPER_NF4), atol=1e-4)


def test_nf4_round_trip_error_bound():
    """
    Each value v of a block with absmax a is a * (v / a), and v / a in [-1, 1] lies within half the widest
    gap between neighbouring levels of the nearest one (the levels include -1 and 1): |v - a * level| <=
    a * max_gap / 2. The 1e-6 * a on top covers float32 rounding of the division and the product.
    """
    torch.manual_seed(0)
    weight = torch.randn(100, 70)  # 7000 values: not a multiple of the block, the last block is padded
    codes, scales = quantize_nf4(weight)
    assert codes.dtype == torch.uint8 and codes.numel() == 110 * NF4_BLOCK // 2  # ceil(7000 / 64) blocks
    assert scales.dtype == torch.float32 and scales.numel() == 110
    restored = dequantize_nf4(codes, scales, weight.shape)
    assert restored.shape == weight.shape
    max_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()
    error = torch.nn.functional.pad((restored - weight).abs().reshape(-1), (0, 40)).view(-1, NF4_BLOCK)
    bound = scales * (max_gap / 2 + 1e-6)
    assert (error.amax(dim=1) <= bound).all()
    assert (error.amax(dim=1) > 0).any()  # it is a lossy code: the bound is not trivially met
    # the absmax of each block is kept exactly (it maps to the level -1 or 1)
    blocks = torch.nn.functional.pad(weight.reshape(-1), (0, 40)).view(-1, NF4_BLOCK)
    assert torch.equal(scales, blocks.abs().amax(dim=1))


def test_nf4_codes_pack_two_per_byte_exactly():
    """Values that are levels times a block scale come back exactly; each byte is (first << 4) | second."""
    generator = torch.Generator().manual_seed(1)
    want = torch.randint(0, 16, (4, NF4_BLOCK), generator=generator)
    want[:, 0] = 15  # the level 1.0 in each block: its absmax is the scale
    block_scales = torch.tensor([0.5, 2.0, 0.125, 8.0])
    weight = NF4_LEVELS[want] * block_scales[:, None]
    codes, scales = quantize_nf4(weight.view(8, 32))
    flat = want.reshape(-1)
    assert torch.equal(codes, (flat[0::2] * 16 + flat[1::2]).to(torch.uint8))
    assert torch.equal(scales, block_scales)
    assert torch.equal(dequantize_nf4(codes, scales, (8, 32)), weight.view(8, 32))


def test_int8_round_trip_error_bound():
    """Per row: scale = absmax / 127, so every value is within scale / 2 of its code times the scale."""
    torch.manual_seed(2)
    weight = torch.randn(48, 80)
    codes, scales = quantize_int8(weight)
    assert codes.dtype == torch.int8 and scales.shape == (48,)
    error = (dequantize_int8(codes, scales) - weight).abs()
    assert (error.amax(dim=1) <= scales * (0.5 + 1e-5)).all()


def dequantized_twin(model, kind):
    """A plain-LoRA copy of a QLoRA model whose block weights are the QLoRA model's dequantized ones."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer, twin_layer in zip(model.layers, twin.layers):
            for parent, twin_parent in ((layer.attention, twin_layer.attention),
                                        (layer.feed_forward, twin_layer.feed_forward)):
                for attr, module in parent.named_children():
                    if isinstance(module, LoRALinear):
                        plain = torch.nn.Linear(module.in_features, module.out_features, bias=False)
                        plain.weight.copy_(module.quantized.dequantized_weight())
                        rank = module.lora_a.shape[0]
                        lora = LoRALinear(plain, rank, module.scale * rank, 0.0)
                        lora.lora_a.copy_(module.lora_a)
                        lora.lora_b.copy_(module.lora_b)
                        setattr(twin_parent, attr, lora)
                    elif isinstance(module, QuantizedLinear):
                        plain = torch.nn.Linear(module.in_features, module.out_features, bias=False)
                        plain.weight.copy_(module.dequantized_weight())
                        plain.weight.requires_grad = False
                        setattr(twin_parent, attr, plain)
    return twin


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_forward_and_gradients_equal_lora_on_the_dequantized_weights(kind):
    model = apply_lora(random_model(), rank=4, alpha=8.0, dropout=0.0, targets="q,v,gate,down", quantize=kind)
    assert all(isinstance(m, (LoRALinear, QuantizedLinear)) for layer in model.layers
               for m in (layer.attention.wk, layer.attention.wo, layer.feed_forward.w3))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0, 0.1)  # B starts at zero; make the adapters do something
    twin = dequantized_twin(model, kind)
    x = torch.randint(0, 300, (2, 16))
    logits, twin_logits = model(x)[0], twin(x)[0]
    assert torch.allclose(logits, twin_logits, atol=1e-5)
    _, loss = model(x, x)
    _, twin_loss = twin(x, x)
    loss.backward()
    twin_loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            twin_name = name.replace(".quantized", "")
            assert torch.allclose(p.grad, twin_params[twin_name].grad, atol=1e-5), name
    # merging folds the adapters into the dequantized weights: the same logits
    with torch.no_grad():
        merged, _ = merge_lora(model)(x)
    assert not any(isinstance(m, (LoRALinear, QuantizedLinear)) for m in model.modules())
    assert torch.allclose(merged, logits.detach(), atol=1e-5)


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="base_quantize='nf3': expected nf4 or int8"):
        apply_lora(random_model(), 4, 8.0, 0.0, "q", quantize="nf3")


def motto_chats(n, seed):
    """n chats: 'what is a plus b?' -> always the same motto, a reply a tiny model learns by heart."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"what is {rng.randrange(10)} plus {rng.randrange(10)}?"},
             {"role": "assistant", "content": "the old red barn is where the cat sat."}] for _ in range(n)]


@pytest.fixture(scope="module")
def qlora_setup(tmp_path_factory):
    """A byte-level data_dir with 'words' (text) and 'motto' (4 chats: one batch of 4 is all of them), and
    the out_dir of a 10-step pretraining run on 'words' (its ckpt.pt is the base)."""
    root = tmp_path_factory.mktemp("qlora")
    tokenizer = Tokenizer.byte_level()
    rng = random.Random(0)
    words = "the cat sat on a mat while two dogs ran past the old red barn".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300))
    prepare_text_source(root / "data" / "words", text, tokenizer)
    chats = motto_chats(4, 1)
    prepare_chat_source(root / "data" / "motto", {"train": chats, "val": chats}, tokenizer)
    run_stage("train.py", *SHAPE, *RUN, f"--data_dir={root / 'data'}", "--data=words",
              f"--out_dir={root / 'base'}", "--max_iters=10", "--eval_interval=10", "--learning_rate=1e-2")
    return root


def test_qlora_training_resume_checkpoint_and_loading(qlora_setup, tmp_path):
    root, base = qlora_setup, qlora_setup / "base" / "ckpt.pt"
    common = [*RUN, f"--data_dir={root / 'data'}", "--data=motto", f"--init_from={base}", *QLORA,
              "--base_quantize=nf4", "--eval_interval=20", "--lr_decay_iters=40"]
    result = run_stage("train.py", *common, f"--out_dir={tmp_path / 'one'}", "--max_iters=40")
    assert "its block weights stored nf4 (QLoRA)" in result.stdout
    losses = [s["loss"] for s in read_log(tmp_path / "one")]
    # the same 4 conversations every step: the adapters learn them (here from 2.98 to 2.73; a tiny model with
    # a frozen tied head learns slowly, but a float-error-sized change could not move it by 0.1 nats)
    assert len(losses) == 40 and losses[-1] < losses[0] - 0.1
    # the checkpoint holds the adapters and names its base, not the base's (quantized) weights
    checkpoint = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert "model" not in checkpoint and checkpoint["lora"]["base_quantize"] == "nf4"
    assert checkpoint["adapters"] and all(".lora_" in k for k in checkpoint["adapters"])
    assert (tmp_path / "one" / "best.pt").stat().st_size < base.stat().st_size / 2
    # resume continues exactly: 20 steps, resume, 20 more == 40 steps in one run
    run_stage("train.py", *common, f"--out_dir={tmp_path / 'two'}", "--max_iters=20")
    # (resuming keeps the checkpoint's base_quantize: it need not be given again)
    run_stage("train.py", *RUN, f"--data_dir={root / 'data'}", "--data=motto", *QLORA, "--eval_interval=20",
              "--lr_decay_iters=40", f"--out_dir={tmp_path / 'two'}", "--max_iters=40", "--init_from=resume")
    assert [s["loss"] for s in read_log(tmp_path / "two")] == losses
    resumed = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, resumed["adapters"][k]) for k, v in checkpoint["adapters"].items())
    # loading merges the adapters into the nf4-dequantized base (not into the float base)
    merged, _, _ = load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))
    by_hand, _, _ = load_checkpoint(str(base))
    apply_lora(by_hand, 16, 32.0, 0.0, ALL, quantize="nf4")
    by_hand.load_state_dict({**by_hand.state_dict(), **checkpoint["adapters"]})
    x = torch.randint(0, 260, (2, 24))
    with torch.no_grad():
        unmerged, _ = by_hand(x)
        merged_by_hand, _ = merge_lora(by_hand)(x)
        logits, _ = merged(x)
    assert torch.allclose(logits, merged_by_hand, atol=1e-5) and torch.allclose(logits, unmerged, atol=1e-5)
    sample = run_stage("sample.py", f"--ckpt={tmp_path / 'one' / 'best.pt'}", "--max_new_tokens=5")
    assert "chat model" in sample.stderr
    run_stage("export.py", f"--ckpt={tmp_path / 'one' / 'best.pt'}", f"--out={tmp_path / 'model.bin'}",
              f"--tokenizer_out={tmp_path / 'tokenizer.bin'}")  # merged as for LoRA
    assert (tmp_path / "model.bin").stat().st_size > 0


def test_qlora_setting_errors(qlora_setup, tmp_path):
    root, base = qlora_setup, qlora_setup / "base" / "ckpt.pt"
    common = [*RUN, f"--data_dir={root / 'data'}", "--data=motto", f"--init_from={base}", "--max_iters=2"]
    no_lora = run_stage("train.py", *common, f"--out_dir={tmp_path / 'a'}", "--base_quantize=nf4",
                        check=False)
    assert no_lora.returncode == 1
    assert no_lora.stderr.strip().splitlines()[-1].startswith("error: base_quantize=nf4")
    assert "--lora_rank" in no_lora.stderr
    unknown = run_stage("train.py", *common, f"--out_dir={tmp_path / 'b'}", "--lora_rank=4",
                        "--base_quantize=nf3", check=False)
    assert unknown.returncode == 1 and "error: base_quantize='nf3': expected nf4 or int8" in unknown.stderr
