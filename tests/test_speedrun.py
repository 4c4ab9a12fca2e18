"""The whole pipeline end to end: speedrun.sh's CI preset on the repository's sample of real data, and its report card."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from configurator import check_type, read_config_file
from report import paired_difference
from test_cli import header_settings

# the config files of a preset (config/speedrun/<preset>/) and the script that reads each
PRESET_CONFIGS = {"tokenizer.py": "prepare/tokenizer.py", "tinystories.py": "prepare/tinystories.py",
                  "pretrain.py": "train.py", "alpaca.py": "prepare/chat.py", "arithmetic.py": "prepare/arithmetic.py",
                  "sft.py": "train.py", "rl.py": "rl.py", "eval.py": "eval.py"}


def speedrun(*args, env=None, timeout=1800):  # generous: the suite runs two files at once
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("PRESET", None)
    return subprocess.run(["bash", "speedrun.sh", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("speedrun") / "run"
    result = speedrun("ci", f"--run_dir={run}")  # no --data_dir: the sample in prepare/sample
    assert result.returncode == 0, f"speedrun.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return run, result.stdout


def test_every_stage_runs_and_leaves_its_output(ci_run):
    run, stdout = ci_run
    for banner in ("1 tokenizer", "2 pretraining", "3 sft", "4 rl", "5 eval", "6 export", "7 run"):
        assert f"=== [{banner}]" in stdout, f"no banner for stage {banner}"
        assert f"--- {banner} done in" in stdout
    for path in ("data/tokenizer.json", "data/tinystories/train.bin", "data/arith/test.jsonl", "base/ckpt.pt",
                 "base/loss.png", "sft/ckpt.pt", "sft/loss.png", "rl/ckpt.pt", "rl/reward.png", "eval/base.json",
                 "eval/sft.json", "eval/rl.json", "eval/rl_arith.json", "export/model.bin", "export/model_int8.bin",
                 "export/tokenizer.bin", "report.md", "report.json", "scores.png"):
        assert (run / path).exists(), f"{path} is missing from the run folder"
    # int8 weights are about a quarter of fp32 (norms and scales stay float)
    assert (run / "export/model_int8.bin").stat().st_size < 0.5 * (run / "export/model.bin").stat().st_size
    assert "data from prepare/sample" in stdout and "data_dir=prepare/sample" in (run / "run.txt").read_text()


def test_logs_hold_whole_lines(ci_run):
    # progress bars redraw a line with '\r' on a terminal only: a log file gets one whole line per report
    run, _ = ci_run
    logs = sorted((run / "logs").glob("*.log"))
    assert len(logs) >= 10
    for log in logs:
        assert "\r" not in log.read_text(encoding="utf-8", errors="replace"), f"{log.name} holds a carriage return"


def test_what_must_improve_did(ci_run):
    run, _ = ci_run
    figures = json.loads((run / "report.json").read_text())
    base, sft, rl = figures["base"], figures["sft"], figures["rl"]
    assert base["last_train_loss"] < base["first_train_loss"] - 0.5, "pretraining loss did not fall"
    assert base["best_val_loss"] < base["first_val_loss"] - 0.5
    assert sft["best_val_loss"] < sft["first_val_loss"], "SFT val loss did not fall"
    scores = figures["eval"]
    # the base model never answers in the '#### <number>' format; after SFT most answers do
    assert scores["sft"]["arithmetic format"]["value"] >= 0.5
    assert scores["sft"]["arithmetic format"]["value"] > scores["base"]["arithmetic format"]["value"] + 0.3
    assert rl["last_steps_reward"] > rl["first_steps_reward"], "RL's mean reward did not rise"
    assert 0 < scores["base"]["bpb"]["value"] < scores["base"]["bpb"]["random_baseline"]


def test_report_card_has_a_table_per_stage_and_the_pictures(ci_run):
    run, _ = ci_run
    report = (run / "report.md").read_text()
    for heading in ("## 1. Tokenizer", "## 2. Pretraining", "## 3. SFT", "## 4. RL", "## 5. Evaluation",
                    "## 6. Export", "## 7. C inference"):
        assert heading in report
    assert "(did not run)" not in report
    assert "RL's change in arithmetic accuracy, on the same 50 problems" in report  # the paired comparison
    for picture in ("base/loss.png", "sft/loss.png", "rl/reward.png", "scores.png"):
        assert f"]({picture})" in report and (run / picture).stat().st_size > 1000
    figures = json.loads((run / "report.json").read_text())
    replies = figures["run_c"]
    assert {r["model"] for r in replies} == {"model.bin", "model_int8.bin"}
    assert all(r["reply"] and r["tokens_per_sec"] > 0 for r in replies)
    assert figures["base"]["tokens_per_sec"] > 0 and figures["base"]["model"]["parameters"] > 0


def test_paired_difference_of_arithmetic_accuracy(tmp_path):
    # 10 problems: 6 right before and after, 3 newly right, 1 newly wrong -> +0.2, paired over problems
    before = [True] * 6 + [False] * 3 + [True]
    after = [True] * 6 + [True] * 3 + [False]
    (tmp_path / "eval").mkdir()
    for name, right in (("sft", before), ("rl", after)):
        items = [{"id": f"p{i}", "answer": "7", "strict": "7" if ok else ("8" if i % 2 else None)}
                 for i, ok in enumerate(right)]
        (tmp_path / "eval" / f"{name}_arith.json").write_text(json.dumps({"tasks": {"gsm8k": {"items": items}}}))
    change = paired_difference(str(tmp_path))
    assert (change["n"], change["gained"], change["lost"]) == (10, 3, 1)
    assert change["difference"] == pytest.approx(0.2)
    diffs = [1, 1, 1, -1] + [0] * 6  # sample std of the differences over sqrt(n)
    mean = sum(diffs) / 10
    assert change["stderr"] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 9 / 10) ** 0.5)
    assert paired_difference(str(tmp_path / "elsewhere")) is None


def test_report_help_names_its_setting():
    result = subprocess.run([sys.executable, "report.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "--run=" in result.stdout and "usage: python report.py" in result.stdout


def test_report_of_an_empty_run_says_what_did_not_run(tmp_path):
    result = subprocess.run([sys.executable, "report.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.md").read_text().count("(did not run)") == 7
    missing = subprocess.run([sys.executable, "report.py", str(tmp_path / "nothing")], cwd=REPO, capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr


def test_bad_arguments_are_clear_errors(tmp_path):
    result = speedrun("laptop")
    assert result.returncode == 1 and "unknown argument 'laptop'" in result.stderr
    result = speedrun(f"--data_dir={tmp_path / 'nothing'}", f"--run_dir={tmp_path / 'run'}")
    assert result.returncode == 1 and "is not a folder" in result.stderr


@pytest.mark.parametrize("preset", sorted(os.listdir(REPO / "config" / "speedrun")))
def test_every_preset_config_holds_settings_of_the_script_that_reads_it(preset):
    # the cpu and gpu presets run for 15 minutes or more: a misspelled key must not wait until then to show
    folder = REPO / "config" / "speedrun" / preset
    assert sorted(os.listdir(folder)) == sorted(PRESET_CONFIGS)
    for name, script in PRESET_CONFIGS.items():
        defaults = header_settings(script)
        values = read_config_file(str(folder / name), {})
        assert values, f"{preset}/{name} sets nothing"
        for key, value in values.items():
            assert key in defaults, f"config/speedrun/{preset}/{name}: {key} is not a setting of {script}"
            check_type(key, value, defaults[key], f"config/speedrun/{preset}/{name}")
