"""Midtraining / SFT in train.py: the loss mask, whole-conversation batches, epochs, overfitting guards, LoRA."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_TRAIN, alpaca_conversations, prepare_chat_source, random_model, read_log, run_stage
from checkpoint import load_checkpoint
from model import LoRALinear, apply_lora, merge_lora

# fine-tuning keeps the base checkpoint's shape: only the training settings of TINY_TRAIN
SHAPE = ("--data=", "--dim=", "--n_layers=", "--n_heads=", "--n_kv_heads=")
SFT = [a for a in TINY_TRAIN if not a.startswith(SHAPE)] + ["--block_size=128"]


# Eight questions, each with a training answer and a validation answer that differs in one detail. Training on the
# first lowers the validation loss while the model learns the words the two share, then raises it without bound:
# the surer the model is of "blue", the less probability is left for "green" (loss >= -log(1 - p("blue"))).
FACTS = [("What color is the sky on a clear day?", "The sky is blue.", "The sky is green."),
         ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
         ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Rome."),
         ("What do bees make?", "Bees make honey.", "Bees make milk."),
         ("Which planet do we live on?", "We live on the Earth.", "We live on the Moon."),
         ("What is frozen water called?", "Frozen water is called ice.", "Frozen water is called sand."),
         ("Which animal says moo?", "The cow says moo.", "The dog says moo."),
         ("How many days are in a week?", "A week has seven days.", "A week has five days.")]


def short_alpaca_conversations(tokenizer):
    """The first 8 of the 50 Alpaca training conversations that render to at most 96 tokens: few and short
    enough for a tiny model to learn by heart in a test."""
    short = [m for m in alpaca_conversations(50) if len(tokenizer.render_conversation(m)[0]) <= 96][:8]
    assert len(short) == 8
    return short


@pytest.fixture(scope="module")
def chat_data(data_dir, shakespeare_tokenizer):
    """data_dir gains 'alpaca' (50 train / 10 val real Alpaca pairs), 'alpaca_short' (8 short ones of those 50),
    'facts' (FACTS: the right answers to train on, the changed ones to validate on) and 'partial' (half the
    conversations have no assistant turn, so whole micro-batches have nothing to learn)."""
    prepare_chat_source(data_dir / "alpaca", {"train": alpaca_conversations(50), "val": alpaca_conversations(10, 50)},
                        shakespeare_tokenizer)
    prepare_chat_source(data_dir / "alpaca_short", {"train": short_alpaca_conversations(shakespeare_tokenizer),
                                                    "val": alpaca_conversations(10, 50)}, shakespeare_tokenizer)

    def conversation(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prepare_chat_source(data_dir / "facts", {"train": [conversation(q, right) for q, right, _ in FACTS],
                                             "val": [conversation(q, changed) for q, _, changed in FACTS]},
                        shakespeare_tokenizer)
    user_only = [[{"role": "user", "content": "Say something."}]]
    prepare_chat_source(data_dir / "partial", {"train": user_only + alpaca_conversations(1),
                                               "val": alpaca_conversations(2, 60)}, shakespeare_tokenizer)
    return data_dir


@pytest.fixture(scope="module")
def base_checkpoint(chat_data, tmp_path_factory):
    """A tiny model pretrained for a few steps on tiny shakespeare (the 'base' of the fine-tuning tests)."""
    out = tmp_path_factory.mktemp("base")
    run_stage("train.py", *TINY_TRAIN, f"--data_dir={chat_data}", f"--out_dir={out}", "--max_iters=30",
              "--eval_interval=30", "--block_size=128", "--dim=128", "--learning_rate=3e-3")
    return out / "ckpt.pt"


def hand_computed_loss(checkpoint_path, conversations, tokenizer, block_size, mask_on=True):
    """Mean cross-entropy over the assistant tokens (or all tokens) of each conversation on its own."""
    model, _, _ = load_checkpoint(str(checkpoint_path))
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            ids, mask = tokenizer.render_conversation(messages, max_tokens=block_size + 1)
            x = torch.tensor([ids[:-1]])
            y = torch.tensor([t if (m or not mask_on) else -1 for t, m in zip(ids[1:], mask[1:])])
            logits, _ = model(x)
            total += F.cross_entropy(logits[0], y, ignore_index=-1, reduction="sum").item()
            count += int((y != -1).sum())
    return total / count


def test_masked_loss_equals_hand_computation_over_assistant_tokens(chat_data, base_checkpoint, shakespeare_tokenizer,
                                                                   tmp_path):
    val = alpaca_conversations(10, 50)
    for mask_on in (True, False):
        out = tmp_path / f"mask{mask_on}"
        result = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca", f"--out_dir={out}",
                           f"--init_from={base_checkpoint}", "--max_iters=1", "--eval_interval=1",
                           "--eval_iters=100", "--learning_rate=0", "--min_lr=0", f"--loss_mask={mask_on}")
        assert ("loss mask ON: the loss counts only the assistant tokens" in result.stdout) == mask_on
        logged = read_log(out, "eval")[-1]["val_loss"]
        expected_masked = hand_computed_loss(out / "ckpt.pt", val, shakespeare_tokenizer, 128, mask_on=True)
        expected_all = hand_computed_loss(out / "ckpt.pt", val, shakespeare_tokenizer, 128, mask_on=False)
        assert abs(expected_masked - expected_all) > 0.05  # the two differ, so the check below means something
        assert logged == pytest.approx(expected_masked if mask_on else expected_all, abs=1e-4)


def test_micro_batch_with_nothing_to_learn(chat_data, base_checkpoint, shakespeare_tokenizer, tmp_path):
    """batch_size 1 x 2 micro-batches: one conversation has no assistant turn. The step's loss is the other
    conversation's mean, not NaN and not halved."""
    out = tmp_path / "out"
    run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=partial", f"--out_dir={out}", "--batch_size=1",
              "--gradient_accumulation_steps=2", f"--init_from={base_checkpoint}", "--max_iters=1",
              "--learning_rate=0", "--min_lr=0")
    step = read_log(out)[0]
    assert math.isfinite(step["loss"])
    expected = hand_computed_loss(out / "ckpt.pt", alpaca_conversations(1), shakespeare_tokenizer, 128)
    assert step["loss"] == pytest.approx(expected, abs=1e-4)


def test_sft_on_real_alpaca_learns_the_format(chat_data, base_checkpoint, shakespeare_tokenizer, tmp_path):
    """SFT teaches the chat format. Forced, not hoped for: 8 short real Alpaca conversations, one full batch, 150
    epochs, so the model learns them by heart and greedy replies to those prompts are exactly the training replies
    (checked over 5 seeds, 1 and 2 threads, AVX2 and scalar kernels: every reply token beat the runner-up by at
    least 4.8 logits)."""
    out = tmp_path / "sft"
    result = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca_short", f"--out_dir={out}",
                       f"--init_from={base_checkpoint}", "--num_epochs=150", "--eval_interval=50",
                       "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=10")
    assert "num_epochs=150.0: 150 steps" in result.stdout  # 8 conversations / batch 8 = 1 batch per epoch
    evals = read_log(out, "eval")
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.0
    model, tokenizer, checkpoint = load_checkpoint(str(out / "ckpt.pt"))
    assert checkpoint["data_format"] == "chat"
    assistant_end = tokenizer.special("<|assistant_end|>")
    conversations = short_alpaca_conversations(shakespeare_tokenizer)
    for messages in conversations:
        prompt = tokenizer.render_for_completion(messages[:1])
        reply = [t[0] for t, _ in model.generate(prompt, 150, temperature=0.0, stop_tokens=[assistant_end])]
        text = [t for t in reply[:-1] if not tokenizer.is_special(t)]
        # text, then the end of the turn, and no other template token
        assert reply[-1] == assistant_end and len(text) >= 2 and len(text) == len(reply) - 1, \
            f"not text followed by <|assistant_end|>: {tokenizer.decode(reply)!r}"
        assert tokenizer.decode(text) == messages[1]["content"]
    # sample.py takes the chat checkpoint without extra flags and answers the prompt as a user turn (a prompt
    # continued as plain text would not give the learned reply)
    question, answer = next((m[0]["content"], m[1]["content"]) for m in conversations if "\n" not in m[0]["content"])
    sample = run_stage("sample.py", f"--ckpt={out / 'ckpt.pt'}", f"--start={question}", "--temperature=0",
                       "--max_new_tokens=100")
    assert "chat model" in sample.stderr and sample.stdout.strip() == answer


def test_overfitting_warning_and_early_stopping(chat_data, base_checkpoint, tmp_path):
    """Forced, not hoped for: on FACTS the val loss falls while the model learns the words that the train and val
    answers share, then rises at every evaluation as it grows sure of the training answers, while the train loss
    keeps falling (one full batch at a modest constant learning rate: smooth steps). Checked over 5 seeds, 1 and 2
    threads, AVX2 and scalar kernels: val loss fell by at least 2.9 before the best step, then rose by 0.04-0.16
    at each of the 4 evaluations up to the early stop."""
    out = tmp_path / "overfit"
    result = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=facts", f"--out_dir={out}",
                       f"--init_from={base_checkpoint}", "--max_iters=300", "--eval_interval=8",
                       "--learning_rate=2e-3", "--min_lr=2e-3", "--warmup_iters=0", "--patience=4",
                       "--overfit_warning_evals=2")
    evals = read_log(out, "eval")
    assert "warning: overfitting? val loss rose for 2 evaluations while train loss fell" in result.stdout
    assert "early stopping" in result.stdout and evals[-1]["iter"] < 300
    best = min(evals, key=lambda e: e["val_loss"])
    assert best["iter"] > 0  # val loss fell before it rose: there is a best.pt
    assert f"the best checkpoint is step {best['iter']}" in result.stdout
    assert torch.load(out / "best.pt", weights_only=True)["iter_num"] == best["iter"]


def test_oversampling_and_refusals(chat_data, base_checkpoint, tmp_path):
    result = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca,partial:3",
                       f"--out_dir={tmp_path / 'mix'}", f"--init_from={base_checkpoint}", "--num_epochs=0.5")
    assert "52 conversations (56 per epoch), 7 batches per epoch" in result.stdout  # 50 + 3 x 2, 8 per batch
    assert "num_epochs=0.5: 4 steps" in result.stdout  # half of 7 batches, rounded up
    mixed = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca,shakespeare",
                      f"--out_dir={tmp_path / 'bad'}", check=False)
    assert mixed.returncode == 1 and "mixes formats (alpaca: chat, shakespeare: text)" in mixed.stderr
    scratch_lora = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca", "--lora_rank=4",
                             f"--out_dir={tmp_path / 'bad2'}", check=False)
    assert scratch_lora.returncode == 1 and "set --init_from" in scratch_lora.stderr


def test_freeze_embeddings(chat_data, base_checkpoint, tmp_path):
    out = tmp_path / "frozen"
    result = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca", f"--out_dir={out}",
                       f"--init_from={base_checkpoint}", "--max_iters=5", "--freeze_embeddings=True")
    assert "embeddings frozen" in result.stdout
    before = torch.load(base_checkpoint, weights_only=True)["model"]
    after = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert torch.equal(before["tok_embeddings.weight"], after["tok_embeddings.weight"])
    assert not torch.equal(before["layers.0.attention.wq.weight"], after["layers.0.attention.wq.weight"])


def test_lora_merge_gives_the_same_logits():
    model = random_model(n_kv_heads=4)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets="q,k,v,o,gate,up,down")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0, 0.1)  # B starts at zero; make the adapters do something
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dims = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64), "gate": (64, 192), "up": (64, 192),
            "down": (192, 64)}
    assert trainable == 2 * sum(4 * (i + o) for i, o in dims.values())  # 2 layers x rank x (in + out)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        unmerged, _ = model(x)
        merged, _ = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(unmerged, merged, atol=1e-5)


def test_lora_training_checkpoint_and_base_check(chat_data, base_checkpoint, tmp_path):
    base = tmp_path / "base.pt"
    base.write_bytes(base_checkpoint.read_bytes())
    out = tmp_path / "lora"
    result = run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca", f"--out_dir={out}",
                       f"--init_from={base}", "--max_iters=20", "--eval_interval=10", "--lora_rank=4",
                       "--lora_alpha=8", "--lora_targets=q,v,down", "--learning_rate=1e-2")
    # exactly the adapters train: 2 layers x rank 4 x (in + out) of q (128+128), v (128+64: 2 kv heads of 32)
    # and down (352+128)
    assert "LoRA rank 4 on q,v,down: 7,424 trainable parameters" in result.stdout
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert "model" not in checkpoint and set(checkpoint["adapters"]) == {
        f"layers.{i}.{m}.{ab}" for i in range(2) for m in ("attention.wq", "attention.wv", "feed_forward.w2")
        for ab in ("lora_a", "lora_b")}
    evals = read_log(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # the adapters learn something
    # the base weights did not move, and loading merges the adapters
    merged, _, _ = load_checkpoint(str(out / "ckpt.pt"))
    base_model, _, _ = load_checkpoint(str(base))
    assert not torch.equal(merged.layers[0].attention.wq.weight, base_model.layers[0].attention.wq.weight)
    assert torch.equal(merged.layers[0].attention.wk.weight, base_model.layers[0].attention.wk.weight)
    # resume continues the adapters
    run_stage("train.py", *SFT, f"--data_dir={chat_data}", "--data=alpaca", f"--out_dir={out}", "--init_from=resume",
              "--max_iters=25", "--eval_interval=10", "--lora_rank=4", "--lora_targets=q,v,down")
    assert read_log(out)[-1]["iter"] == 25
    sample = run_stage("sample.py", f"--ckpt={out / 'best.pt'}", "--max_new_tokens=10")
    assert "chat model" in sample.stderr
    # adapters on another base are refused with a clear message
    run_stage("train.py", *TINY_TRAIN, f"--data_dir={chat_data}", f"--out_dir={tmp_path / 'other'}",
              "--max_iters=3", "--block_size=128")
    base.write_bytes((tmp_path / "other" / "ckpt.pt").read_bytes())
    with pytest.raises(ValueError, match="adapters were trained on a base checkpoint with sha256"):
        load_checkpoint(str(out / "ckpt.pt"))


def test_show_mask_highlights_exactly_the_trained_tokens(chat_data):
    result = subprocess.run([sys.executable, "prepare/show_mask.py", str(chat_data / "alpaca"), "--plain"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    conversation = alpaca_conversations(1)[0]
    # the whole reply and its end token are marked; nothing of the user's turn is
    assert f"[[{conversation[1]['content']}<|assistant_end|>\n]]" in result.stdout
    assert "[[" not in result.stdout.split("<|assistant_start|>")[0]
    assert "tokens are trained (mask 1)" in result.stderr
