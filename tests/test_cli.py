"""
One command-line convention for every script (configurator.py): --help lists each setting of the script's
header with its default and exits 0; a misspelled option, written --key=value or --key value, is one 'error:'
line naming the nearest key; every bench/ script starts (issue 20: one crashed at import).
"""

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO

NO_SETTINGS = {"report.py"}  # one argument, the run folder, and no settings


def parse(relative):
    return ast.parse((REPO / relative).read_text(encoding="utf-8"), filename=relative)


def calls_configure(node):
    return isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Call) and \
        getattr(node.value.func, "id", None) == "configure"


def is_main_block(node):
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def scripts():
    """Every file of the top level, prepare/ and bench/ that runs something when executed."""
    found = []
    for folder in (".", "prepare", "bench"):
        for name in sorted(os.listdir(REPO / folder)):
            relative = os.path.normpath(os.path.join(folder, name))
            if name.endswith(".py") and any(calls_configure(n) or is_main_block(n)
                                            for n in parse(relative).body):
                found.append(relative)
    return found


def header_settings(relative):
    """{name: default} of the plain-valued lowercase globals a script assigns before it calls configure()."""
    settings = {}
    for node in parse(relative).body:
        if calls_configure(node) or is_main_block(node):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue  # computed (num_proc = the CPU count): --help shows the value, not checked here
            plain = isinstance(value, (int, float, bool, str, type(None)))
            if plain and not name.startswith("_") and not name.isupper():
                settings.setdefault(name, value)
    return settings


def run(relative, *args, timeout=600):
    return subprocess.run([sys.executable, relative, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


SCRIPTS = [s for s in scripts() if s not in NO_SETTINGS]


@pytest.fixture(scope="module")
def help_outputs():
    """Every script's --help, run a few at a time (most of the time is torch's import)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(SCRIPTS, pool.map(lambda s: run(s, "--help"), SCRIPTS)))


def test_every_script_is_found():
    names = set(scripts())
    for expected in ("train.py", "sample.py", "eval.py", "chat.py", "export.py", "rl.py", "prepare/chat.py",
                     "prepare/tokenizer.py", "bench/loss_per_second.py", "bench/run_c.py", "report.py"):
        assert expected in names
    assert "configurator.py" not in names and "prepare/common.py" not in names  # modules, not scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_its_default(script, help_outputs):
    result = help_outputs[script]
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-3000:]}"
    settings = header_settings(script)
    assert settings, f"{script}: no settings found in its header"
    lines = result.stdout.splitlines() + [""]
    for name, value in settings.items():
        shown = f"--{name}={value}" if isinstance(value, str) else f"--{name}={value!r}"
        found = [i for i, line in enumerate(lines) if (line.strip() + " ").startswith(shown + " ")]
        assert found, f"{script} --help does not show {shown}"
        if script.startswith(("prepare", "bench")):
            # and what it means: a comment beside it, or on the next line (indented) when the default is long
            line, following = lines[found[0]], lines[found[0] + 1]
            has_comment = line.strip() != shown or following.startswith(" " * 20)
            assert has_comment, f"{script} --help: {shown} has no comment"


@pytest.mark.parametrize("script, wrong, nearest", [
    ("prepare/tokenizer.py", "--vocab_sise", "vocab_size"),
    ("prepare/chat.py", "--max_conversation", "max_conversations"),
    ("bench/tokenizer_speed.py", "--num_procs", "num_proc"),
    ("train.py", "--learning_rat", "learning_rate"),
])
def test_a_misspelled_option_is_one_error_line_naming_the_nearest_key(script, wrong, nearest):
    for args in ([f"{wrong}=2"], [wrong, "2"]):
        result = run(script, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, f"{script} {' '.join(args)}: {result.stderr[-3000:]}"
        assert lines[0].startswith("error: ") and f"did you mean {nearest!r}?" in lines[0]


def test_bench_scripts_cannot_shadow_the_projects_modules():
    # python puts bench/ first on the path of a bench script: a bench/tokenizer.py hid tokenizer.py (issue 20)
    top_level = {name for name in os.listdir(REPO) if name.endswith(".py")}
    assert not top_level & set(os.listdir(REPO / "bench"))
