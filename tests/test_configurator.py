"""configurator.py: config files in order, then overrides; clear errors for wrong keys and types."""

import pytest

from configurator import equals_form, ConfigError, configure


def settings():
    return {"learning_rate": 1e-3, "max_iters": 100, "compile": True, "out_dir": "out", "hidden_dim": 0,
            "init_from": "scratch", "wandb_run_name": "run"}


def test_files_in_order_then_overrides(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("max_iters = 500\nlearning_rate = 3e-4\n")
    b = tmp_path / "b.py"
    b.write_text("# b reads what a set\nmax_iters = max_iters * 2\nimport math\nhidden_dim = int(math.sqrt(16))\n")
    ns = settings()
    configure(ns, [str(a), str(b), "--learning_rate=1e-2", "--compile=False", "--out_dir=123"], verbose=False)
    assert ns["max_iters"] == 1000 and ns["hidden_dim"] == 4
    assert ns["learning_rate"] == 1e-2 and ns["compile"] is False
    assert ns["out_dir"] == "123"  # a string setting keeps the text as typed


def test_override_value_forms():
    ns = settings()
    configure(ns, ["--compile=false", "--max_iters=1e4", "--learning_rate=1", "--init_from=out/best.pt"], verbose=False)
    assert ns["compile"] is False and ns["max_iters"] == 10000 and ns["learning_rate"] == 1.0
    assert isinstance(ns["learning_rate"], float) and ns["init_from"] == "out/best.pt"
    configure(ns, ["--compile=True"], verbose=False)
    assert ns["compile"] is True
    # '--key value' with a space, as eval.py's documented command writes it
    configure(ns, ["--init_from", "out/ckpt.pt", "--max_iters", "7", "--compile=False"], verbose=False)
    assert ns["init_from"] == "out/ckpt.pt" and ns["max_iters"] == 7 and ns["compile"] is False
    configure(ns, ["--compile", "--max_iters", "8"], verbose=False)  # a bare boolean flag means True
    assert ns["compile"] is True and ns["max_iters"] == 8


def test_misspelled_key_names_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'; did you mean 'learning_rate'\?"):
        configure(settings(), ["--learning_rat=1e-3"], verbose=False)
    bad = tmp_path / "bad.py"
    bad.write_text("max_iter = 10\n")
    with pytest.raises(ConfigError, match=r"bad.py: unknown config key 'max_iter'; did you mean 'max_iters'\?"):
        configure(settings(), [str(bad)], verbose=False)
    with pytest.raises(ConfigError, match="valid keys"):
        configure(settings(), ["--zzzz=1"], verbose=False)


def test_wrong_type_names_the_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"max_iters expects int \(default 100\), got str 'many'"):
        configure(settings(), ["--max_iters=many"], verbose=False)
    with pytest.raises(ConfigError, match=r"compile expects bool"):
        configure(settings(), ["--compile=maybe"], verbose=False)
    with pytest.raises(ConfigError, match=r"max_iters expects int .* got float 2.5"):
        configure(settings(), ["--max_iters=2.5"], verbose=False)
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 'fast'\n")
    with pytest.raises(ConfigError, match=r"bad.py: learning_rate expects float"):
        configure(settings(), [str(bad)], verbose=False)


def test_malformed_arguments():
    with pytest.raises(ConfigError, match="not found"):
        configure(settings(), ["config/does_not_exist.py"], verbose=False)
    with pytest.raises(ConfigError, match="expected --out_dir=value"):
        configure(settings(), ["--out_dir"], verbose=False)
    # an unknown '--key value' names the nearest key (its value is not taken for a config file)
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'; did you mean 'learning_rate'\?"):
        configure(settings(), ["--learning_rat", "0.5"], verbose=False)


def test_json_config_files_are_read_like_python_ones(tmp_path):
    good = tmp_path / "pretrain.json"
    good.write_text('{"max_iters": 500, "learning_rate": 3e-4, "compile": false, "out_dir": "out/x"}')
    ns = settings()
    configure(ns, [str(good), "--max_iters=7"], verbose=False)
    assert ns["max_iters"] == 7 and ns["learning_rate"] == 3e-4 and ns["compile"] is False and ns["out_dir"] == "out/x"
    typo = tmp_path / "typo.json"
    typo.write_text('{"max_iter": 500}')
    with pytest.raises(ConfigError, match=r"typo.json: unknown config key 'max_iter'; did you mean 'max_iters'\?"):
        configure(settings(), [str(typo)], verbose=False)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"max_iters": "many"}')
    with pytest.raises(ConfigError, match=r"wrong.json: max_iters expects int"):
        configure(settings(), [str(wrong)], verbose=False)
    for text, message in (("[1, 2]", "one object of settings"), ("{max_iters: 5}", "not valid JSON")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            configure(settings(), [str(bad)], verbose=False)
    yaml = tmp_path / "config.yaml"
    yaml.write_text("max_iters: 5\n")
    with pytest.raises(ConfigError, match=r"expected a Python \(.py\) or JSON \(.json\) file"):
        configure(settings(), [str(yaml)], verbose=False)


def test_equals_form_accepts_spaces_and_bare_flags():
    defaults = {"ckpt": "", "serve": False, "port": 8000}
    assert equals_form(["--ckpt", "a.pt", "--serve", "--port=9"], defaults) == ["--ckpt=a.pt", "--serve=True",
                                                                                 "--port=9"]
    assert equals_form(["--serve", "false", "cfg.py"], defaults) == ["--serve=false", "cfg.py"]


def test_positional_inputs_join_with_their_option_and_python_files_stay_config_files(tmp_path):
    defaults = {"source": "", "vocab_size": 4096}
    # prepare/tokenizer.py a.txt b.txt, and its old spelling --source a.txt b.txt: the same two inputs
    for argv in (["a.txt", "b.txt"], ["--source", "a.txt", "b.txt"], ["--source=a.txt", "b.txt"]):
        ns = dict(defaults)
        configure(ns, argv, verbose=False, positional="source")
        assert ns["source"] == "a.txt,b.txt", argv
    preset = tmp_path / "preset.py"
    preset.write_text("vocab_size = 512\nsource = 'from_the_config.txt'\n")
    ns = dict(defaults)
    configure(ns, [str(preset), "corpus.txt", "--vocab_size=300"], verbose=False, positional="source")
    assert ns == {"source": "corpus.txt", "vocab_size": 300}  # the command line wins over the config file
    ns = dict(defaults)
    configure(ns, [str(preset)], verbose=False, positional="source")
    assert ns["source"] == "from_the_config.txt"
    code = tmp_path / "code.py"
    code.write_text("def f():\n    return 1\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'x'.*give a .py input as --source=FILE"):
        configure(dict(defaults), [str(code)], verbose=False, positional="source")
    ns = dict(defaults)
    configure(ns, [f"--source={code}"], verbose=False, positional="source")
    assert ns["source"] == str(code)


def test_all_caps_constants_are_not_settings():
    ns = {"BASE_URL": "https://example.com/", "VERSION": 1, "max_iters": 10}
    with pytest.raises(ConfigError, match=r"unknown config key 'VERSION'"):
        configure(ns, ["--VERSION=2"], verbose=False)
    configure(ns, ["--max_iters=5"], verbose=False)
    assert ns == {"BASE_URL": "https://example.com/", "VERSION": 1, "max_iters": 5}
