"""train.py end to end on real text: learning, exact resume, signals, atomic saves, DDP, clear errors."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_TRAIN, prepare_text_source, read_log, run_stage, sample_file
from checkpoint import load_checkpoint
from common import measure_matmul_flops
from model import ModelArgs, Transformer
from tokenizer import Tokenizer


def test_loss_falls_on_real_text(data_dir, tmp_path):
    out = tmp_path / "out"
    result = run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=100",
                       "--eval_interval=50", "--learning_rate=3e-3")
    evals = read_log(out, "eval")
    assert [e["iter"] for e in evals] == [0, 50, 100]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # ln(512) = 6.2 at start
    assert 0 < evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    steps = read_log(out, "train")
    assert all(s["tokens_per_sec"] > 0 and 0 < s["mfu"] < 1 for s in steps)
    assert "tok/s" in result.stdout and "MFU" in result.stdout and "ETA" in result.stdout
    for name in ("ckpt.pt", "best.pt", "loss.png", "log.jsonl"):
        assert (out / name).exists(), name
    # checkpoints hold plain data and load with weights_only=True
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 100 and "optimizer" in checkpoint and "rng_state" in checkpoint
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
    best = torch.load(out / "best.pt", weights_only=True)
    assert "optimizer" not in best and best["best_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    model, tokenizer, _ = load_checkpoint(str(out / "best.pt"))
    assert tokenizer.sha256 == checkpoint["tokenizer_sha256"]

    sample = run_stage("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=20", "--num_samples=2")
    assert sample.stdout.count("ROMEO:") == 2 and "tokens/s" in sample.stderr


def test_exact_resume(data_dir, tmp_path):
    """2N steps in one run == N steps, resume, N steps (dropout on, so RNG state matters too)."""
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", "--eval_interval=6", "--lr_decay_iters=12", "--dropout=0.1",
              "--gradient_accumulation_steps=2", "--deterministic=True"]
    run_stage("train.py", *common, f"--out_dir={tmp_path / 'one'}", "--max_iters=12")
    run_stage("train.py", *common, f"--out_dir={tmp_path / 'two'}", "--max_iters=6")
    run_stage("train.py", *common, f"--out_dir={tmp_path / 'two'}", "--max_iters=12", "--init_from=resume")
    one = [(s["iter"], s["loss"]) for s in read_log(tmp_path / "one")]
    two = [(s["iter"], s["loss"]) for s in read_log(tmp_path / "two")]
    assert len(one) == 12 and one == two  # bitwise identical losses
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_finishes_the_step_saves_and_exits_0(data_dir, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}",
                                "--max_iters=100000", "--eval_interval=100000"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] > 0 and "continue with --init_from=resume" in stdout
    steps = read_log(out)
    assert steps[-1]["iter"] == checkpoint["iter_num"]  # the step in progress was finished, not lost
    # and the run continues from there
    run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume",
              f"--max_iters={checkpoint['iter_num'] + 2}", "--eval_interval=100000")
    assert read_log(out)[-1]["iter"] == checkpoint["iter_num"] + 2


SLOW_SAVE = """
import sys, torch
sys.path.insert(0, {repo!r})
from checkpoint import save_checkpoint
path = sys.argv[1]
save_checkpoint({{"version": "old", "w": torch.zeros(10)}}, path)
print("saved old", flush=True)
save_checkpoint({{"version": "new", "w": torch.randn(150_000_000)}}, path)  # 600 MB: slow enough to kill
"""


def test_kill_during_save_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE.format(repo=str(REPO)), str(path)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "saved old"
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith("ckpt.pt.tmp") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # half-way through writing the new one
    process.wait()
    assert any(p.name.startswith("ckpt.pt.tmp") for p in tmp_path.iterdir())  # it was killed mid-save
    assert torch.load(path, weights_only=True)["version"] == "old"


def test_fine_tune_early_stopping_and_keep_all(data_dir, tmp_path):
    base = tmp_path / "base"
    run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={base}", "--max_iters=10",
              "--eval_interval=10")
    # fine-tuning starts a fresh schedule at step 0 from the checkpoint's weights
    tuned = tmp_path / "tuned"
    result = run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tuned}",
                       f"--init_from={base / 'ckpt.pt'}", "--max_iters=40", "--eval_interval=2", "--patience=2",
                       "--learning_rate=0", "--min_lr=0", "--keep_all_checkpoints=True")
    assert "fresh optimizer" in result.stdout and "early stopping" in result.stdout
    evals = read_log(tuned, "eval")
    assert [e["iter"] for e in evals] == [0, 2, 4]  # lr 0: no evaluation improves, stop after 2 of them
    base_val = read_log(base, "eval")[-1]["val_loss"]
    assert evals[0]["val_loss"] == pytest.approx(base_val, abs=1e-6)
    assert sorted(p.name for p in tuned.glob("ckpt_*.pt")) == ["ckpt_000002.pt", "ckpt_000004.pt"]


def test_clear_errors(data_dir, tmp_path, shakespeare_tokenizer):
    def error(*args):
        result = run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", *args, check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        return result.stderr

    assert "data/nope/meta.json not found" in error("--data_dir=data", "--data=nope", f"--out_dir={tmp_path / 'x'}")
    assert "unknown config key 'lerning_rate'; did you mean 'learning_rate'" in \
        run_stage("train.py", "--lerning_rate=1", check=False).stderr
    out = tmp_path / "out"
    run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2")
    assert "exists: continue it with --init_from=resume" in error(f"--out_dir={out}")
    assert "above the model's max_seq_len=64" in error(f"--out_dir={tmp_path / 'y'}", f"--init_from={out / 'ckpt.pt'}",
                                                        "--block_size=128")
    # data prepared with another tokenizer than the checkpoint's
    other = tmp_path / "otherdata"
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:200_000]
    prepare_text_source(other / "shakespeare", text, Tokenizer.byte_level())
    result = run_stage("train.py", *TINY_TRAIN, f"--data_dir={other}", f"--out_dir={tmp_path / 'z'}",
                       f"--init_from={out / 'ckpt.pt'}", check=False)
    assert result.returncode == 1 and "another tokenizer" in result.stderr


def test_ddp_two_processes_match_one_with_double_accumulation(data_dir, tmp_path):
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", "--max_iters=4", "--eval_interval=4", "--eval_iters=2"]
    run_stage("train.py", *common, f"--out_dir={tmp_path / 'single'}", "--gradient_accumulation_steps=2")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *common, f"--out_dir={tmp_path / 'ddp'}", "--gradient_accumulation_steps=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert [s["tokens"] for s in single] == [s["tokens"] for s in ddp]
    for a, b in zip(single, ddp):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    wa = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert "ddp/ckpt.pt" not in result.stdout or True  # only rank 0 writes; nothing else to check here


# -----------------------------------------------------------------------------------------------------
# nothing lost, nothing stalls: a diverging run, a full disk, a read-only out_dir, a true MFU
# (a byte-level tokenizer on random words: no shared data, no tokenizer training)

WORDS = "the cat sat on a mat while two dogs ran past the old red barn and one bird sang".split()
WORDS_RUN = ["--dim=32", "--n_layers=1", "--n_heads=2", "--block_size=32", "--batch_size=4", "--eval_iters=2",
             "--log_interval=1", "--warmup_iters=2", "--num_threads=1", "--data=words"]


@pytest.fixture(scope="module")
def words_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300))
    prepare_text_source(root / "words", text, Tokenizer.byte_level())
    return root


def test_a_diverging_run_never_overwrites_the_good_checkpoints(words_dir, tmp_path):
    out = tmp_path / "out"
    run_stage("train.py", *WORDS_RUN, f"--data_dir={words_dir}", f"--out_dir={out}", "--max_iters=10",
              "--eval_interval=10", "--learning_rate=1e-2")
    good = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    # one step at this rate makes the weights huge but finite, and the val loss can still "improve"
    result = run_stage("train.py", *WORDS_RUN, f"--data_dir={words_dir}", f"--out_dir={out}",
                       "--init_from=resume", "--max_iters=20", "--eval_interval=1", "--learning_rate=1e6",
                       check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{out / 'ckpt.pt'} (step 10)" in result.stderr  # the error names the last good checkpoint
    assert "--dtype=float32" not in result.stderr  # the run is float32 already
    for name in ("ckpt.pt", "best.pt"):
        checkpoint = torch.load(out / name, weights_only=True)
        assert checkpoint["iter_num"] == 10
        assert all(torch.equal(good[k], checkpoint["model"][k]) for k in good)
    assert not list(out.glob("*.tmp*"))


FULL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_failed_save_names_the_path_and_cause_and_leaves_no_temporary_file(words_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt.tmp999999999").write_bytes(b"half a checkpoint")  # a save killed long ago (no such pid)
    # files up to 100 kB: the log and loss.png fit, ckpt.pt (weights and optimizer, ~280 kB) does not
    result = subprocess.run([sys.executable, "-c", FULL_DISK, *WORDS_RUN, f"--data_dir={words_dir}",
                             f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"could not write {out / 'ckpt.pt'}: File too large" in result.stderr
    assert "ckpt.pt.tmp999999999" in result.stdout  # the stale one was removed at start, and said so
    assert not list(out.glob("*.tmp*")) and not (out / "ckpt.pt").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write in: its mode, and for root (whom modes do not stop) the immutable flag."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    try:
        (folder / "probe").write_bytes(b"")
        (folder / "probe").unlink()
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a read-only folder here (root, and no chattr)")
    except PermissionError:
        pass
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)])
    folder.chmod(0o755)


def test_a_read_only_out_dir_is_an_error_before_training(words_dir, read_only_dir):
    result = run_stage("train.py", *WORDS_RUN, f"--data_dir={words_dir}", f"--out_dir={read_only_dir}",
                       "--max_iters=4", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"out_dir={read_only_dir}:" in result.stderr and "choose another --out_dir" in result.stderr
    assert "step 1" not in result.stdout


def test_damaged_token_files_get_one_clear_error_naming_the_file(words_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(words_dir, data)
    with open(data / "words" / "train.bin", "ab") as f:
        f.write(b"\x00")  # half a token: a copy cut short
    result = run_stage("train.py", *WORDS_RUN, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}",
                       check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {data / 'words' / 'train.bin'}:" in result.stderr
    assert "bytes is not a whole number of uint16 tokens" in result.stderr


def test_mfu_peak_is_one_threads_best_matmul_of_the_models_own_shapes_times_the_threads(monkeypatch):
    """MFU was 103-158% on a 2-core AVX2 EPYC shared with other processes: a 1024^3 probe on two threads that
    wait for each other ran below the training's own (smaller, cached) matmuls. The peak is now the best
    matmul one thread reaches, over squares and the model's own shapes, times the threads: no step can beat
    it, so MFU is a true fraction on any CPU."""
    import common
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, max_seq_len=32))
    shapes = common.model_matmul_shapes(model, 256)
    for linear in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        d_in, d_out = linear.in_features, linear.out_features
        # the forward pass, then the input and weight gradients of the backward pass
        assert {(256, d_in, d_out), (256, d_out, d_in), (d_out, 256, d_in)} <= set(shapes)
    calls = []

    def measured(device, dtype, shapes):
        calls.append((torch.get_num_threads(), dtype, shapes))
        return 50e9, {}

    monkeypatch.setattr(common, "measure_matmul_flops", measured)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert common.peak_flops("cpu", "bfloat16", shapes) == 2 * 50e9
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert calls == [(1, "bfloat16", common.SQUARE_MATMULS + tuple(shapes))]
    # and the real measurement covers every shape it is given
    peak, rates = measure_matmul_flops("cpu", "float32", shapes=[(64, 64, 64), (128, 32, 64)], seconds=0.05)
    assert set(rates) == {(64, 64, 64), (128, 32, 64)} and peak == max(rates.values()) > 0
