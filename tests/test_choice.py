"""Choice data (prepare/tasks.py --as_choices) and train.py's ranking loss on it: the loss and accuracy train.py
reports are those of eval.py's base-mode scores on the same questions, a model learns to rank from it, and bad
choice files get a clear error."""

import json
import re
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import save_checkpoint
from conftest import SAMPLE_DATA, random_model, read_log, run_stage
from tokenizer import Tokenizer

TOKENIZER = Tokenizer.byte_level()


def openbookqa_choice_source(root, tokenizer):
    """root/src: a task folder of 8 OpenBookQA questions (train and dev the same ones); root/data/choice: their
    choice source in the given tokenizer."""
    lines = (SAMPLE_DATA / "openbookqa" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (root / "src" / "openbookqa").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "src" / "openbookqa" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_stage("prepare/tasks.py", f"--source={root / 'src'}", "--tasks=openbookqa", f"--out={root / 'tasks'}",
              "--as_choices=choice", f"--tokenizer={tokenizer}", f"--data_dir={root / 'data'}")


def reported_and_evals(ckpt, root, out_dir):
    """((val loss, val acc %) train.py reports on root/data/choice, (the same two from eval.py's base-mode scores
    of root/src's questions)): each question's cross-entropy over its choices' log-likelihoods, and acc."""
    reported = run_stage("train.py", f"--init_from={ckpt}", "--eval_only=True", f"--data_dir={root / 'data'}",
                         *CHOICE_RUN).stdout
    val_loss, val_acc = re.search(r"val loss ([\d.]+), .*val acc ([\d.]+)%", reported).groups()
    run_stage("eval.py", f"--ckpt={ckpt}", "--tasks=openbookqa", "--split=val", f"--source={root / 'src'}",
              "--mode=base", f"--results_file={out_dir / 'eval.json'}", f"--out_dir={out_dir / 'report'}",
              "--num_threads=1")  # out_dir: where an hf: model's report card goes (made if missing)
    items = json.loads((out_dir / "eval.json").read_text())["tasks"]["openbookqa"]["items"]
    assert len(items) == 8
    expected_loss = np.mean([float(F.cross_entropy(torch.tensor([item["loglikelihoods"]]),
                                                   torch.tensor([item["answer"]]))) for item in items])
    return (float(val_loss), float(val_acc)), (expected_loss, 100 * np.mean([item["acc"] for item in items]))


@pytest.fixture(scope="module")
def choice_dir(tmp_path_factory):
    """openbookqa_choice_source in the byte-level tokenizer, and a random byte-level checkpoint random/ckpt.pt."""
    root = tmp_path_factory.mktemp("choice")
    openbookqa_choice_source(root, "bytes")
    model = random_model(seed=3, vocab_size=TOKENIZER.vocab_size, max_seq_len=512)
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(), "tokenizer": TOKENIZER.to_json(),
                     "tokenizer_sha256": TOKENIZER.sha256,
                     "data_format": "text", "iter_num": 0}, str(root / "random" / "ckpt.pt"))
    return root


CHOICE_RUN = ["--data=choice", "--batch_size=4", "--block_size=512", "--eval_iters=10", "--num_threads=1",
              "--log_interval=1"]


def test_the_loss_and_accuracy_are_those_of_evals_scores_of_the_same_questions(choice_dir, tmp_path):
    (val_loss, val_acc), (expected_loss, expected_acc) = reported_and_evals(choice_dir / "random" / "ckpt.pt",
                                                                           choice_dir, tmp_path)
    assert val_loss == pytest.approx(expected_loss, abs=2e-3)  # printed with 4 decimals, from scores with 4
    assert val_acc == pytest.approx(expected_acc, abs=0.06)  # printed with 1 decimal: k/8 exactly


def test_a_model_learns_to_rank_the_right_choices_first(choice_dir, tmp_path):
    run_stage("train.py", f"--init_from={choice_dir / 'random' / 'ckpt.pt'}", f"--data_dir={choice_dir / 'data'}",
              f"--out_dir={tmp_path}", "--max_iters=40", "--eval_interval=20", "--learning_rate=3e-3",
              "--min_lr=3e-4", "--warmup_iters=2", "--weight_decay=0", *CHOICE_RUN)
    evals = read_log(tmp_path, "eval")
    # the same 8 questions in train and val: a ranking the model can learn by heart
    assert evals[-1]["val_acc"] == 1.0 and evals[-1]["val_loss"] < evals[0]["val_loss"] / 4
    assert evals[0]["val_acc"] < 1.0


def test_bad_choice_data_is_an_error_naming_the_file_or_setting(choice_dir, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(choice_dir / "data" / "choice", broken / "choice")
    pairs = np.fromfile(broken / "choice" / "val.choices.bin", dtype=np.uint8)
    pairs[:-2].tofile(broken / "choice" / "val.choices.bin")  # the last question left out
    result = run_stage("train.py", f"--init_from={choice_dir / 'random' / 'ckpt.pt'}", f"--data_dir={broken}",
                       f"--out_dir={tmp_path / 'out'}", "--max_iters=1", *CHOICE_RUN, check=False)
    assert result.returncode == 1
    assert "val.choices.bin: its 7 questions have 28 choices, but val.bin has 32 rows" in result.stderr
    result = run_stage("train.py", f"--init_from={choice_dir / 'random' / 'ckpt.pt'}",
                       f"--data_dir={choice_dir / 'data'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1",
                       "--loss_mask=False", *CHOICE_RUN, check=False)
    assert result.returncode == 1 and "loss_mask=False does not apply" in result.stderr
