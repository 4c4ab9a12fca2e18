"""Choice data (prepare/tasks.py --as_choices) and train.py's ranking loss on it: the loss and accuracy train.py
reports are those of eval.py's base-mode scores on the same questions, a model learns to rank from it, and bad
choice files get a clear error."""

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch.nn.functional as F
import torch

from checkpoint import save_checkpoint
from conftest import SAMPLE_DATA, random_model, read_log, run_stage
from tokenizer import Tokenizer

TOKENIZER = Tokenizer.byte_level()


@pytest.fixture(scope="module")
def choice_dir(tmp_path_factory):
    """A task folder of 8 OpenBookQA questions (train and dev the same ones), its choice source 'choice', and a
    random byte-level checkpoint."""
    root = tmp_path_factory.mktemp("choice")
    lines = (SAMPLE_DATA / "openbookqa" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (root / "src" / "openbookqa").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "src" / "openbookqa" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_stage("prepare/tasks.py", f"--source={root / 'src'}", "--tasks=openbookqa", f"--out={root / 'tasks'}",
              "--as_choices=choice", "--tokenizer=bytes", f"--data_dir={root / 'data'}")
    model = random_model(seed=3, vocab_size=TOKENIZER.vocab_size, max_seq_len=512)
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(), "tokenizer": TOKENIZER.to_json(),
                     "tokenizer_sha256": TOKENIZER.sha256,
                     "data_format": "text", "iter_num": 0}, str(root / "random" / "ckpt.pt"))
    return root


CHOICE_RUN = ["--data=choice", "--batch_size=4", "--block_size=512", "--eval_iters=10", "--num_threads=1",
              "--log_interval=1"]


def test_the_loss_and_accuracy_are_those_of_evals_scores_of_the_same_questions(choice_dir):
    reported = run_stage("train.py", f"--init_from={choice_dir / 'random' / 'ckpt.pt'}", "--eval_only=True",
                         f"--data_dir={choice_dir / 'data'}", *CHOICE_RUN).stdout
    val_loss, val_acc = re.search(r"val loss ([\d.]+), .*val acc ([\d.]+)%", reported).groups()
    run_stage("eval.py", f"--ckpt={choice_dir / 'random' / 'ckpt.pt'}", "--tasks=openbookqa", "--split=val",
              f"--source={choice_dir / 'src'}", "--mode=base", "--num_threads=1")
    items = json.loads(next((choice_dir / "random").glob("eval_*.json")).read_text())["tasks"]["openbookqa"]["items"]
    assert len(items) == 8
    # eval.py's per-choice log-likelihoods -> the cross-entropy of the right one under a softmax over them
    expected_loss = np.mean([float(F.cross_entropy(torch.tensor([item["loglikelihoods"]]),
                                                   torch.tensor([item["answer"]]))) for item in items])
    assert float(val_loss) == pytest.approx(expected_loss, abs=2e-3)
    assert float(val_acc) == pytest.approx(100 * np.mean([item["acc"] for item in items]), abs=0.06)


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
    import shutil
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
