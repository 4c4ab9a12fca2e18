"""
nanoGPT's configuration contract, shared by every stage script:

    python train.py config/a.py config/b.py --learning_rate=1e-3 --compile=False

A stage script declares its settings as plain module-level globals, then calls

    config = configure(globals())

Positional arguments are Python files executed in order (they may read earlier values), then each
--key=value override is applied ('--key value' works too, and a bare '--flag' sets a boolean to True). A misspelled key is an error that names the nearest valid key; a value of
the wrong type is an error that names the expected type. Booleans accept True/False.
"""

import ast
import difflib
import os
import sys

CONFIG_TYPES = (int, float, bool, str, type(None))


def config_keys(namespace):
    """The settings of a stage script: its public globals holding plain values."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, CONFIG_TYPES) and not isinstance(v, type)]


class ConfigError(ValueError):
    pass


def unknown_key_error(key, valid, where):
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def check_type(key, value, default, where):
    """Return value converted to the type of default, or raise ConfigError naming the expected type."""
    if default is None or value is None:
        return value
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e4 is fine for max_iters
    elif isinstance(value, expected):
        return value
    raise ConfigError(f"{where}: {key} expects {expected.__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")


def parse_override_value(raw, default):
    """The text after '=' -> a Python value: a literal if it parses as one, else the text itself."""
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return raw
    if isinstance(default, str):
        return raw  # strings stay as typed: --out_dir=123 is the folder '123'
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def equals_form(argv, defaults):
    """
    '--key value' -> '--key=value' where key is a setting and a value follows, and a bare boolean '--serve' ->
    '--serve=True' (unless True/False follows), so both spellings of the README's commands work.
    """
    result, i = [], 0
    while i < len(argv):
        arg, key = argv[i], argv[i][2:]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--") and "=" not in arg and key in defaults:
            if isinstance(defaults[key], bool):
                if following is not None and following.lower() in ("true", "false"):
                    result.append(f"--{key}={following}")
                    i += 2
                else:
                    result.append(f"--{key}=True")
                    i += 1
                continue
            if following is not None and not following.startswith("--"):
                result.append(f"--{key}={following}")
                i += 2
                continue
        result.append(arg)
        i += 1
    return result


def configure(namespace, argv=None, verbose=True):
    """
    Apply config files and --key=value overrides from argv (default sys.argv[1:]) to the settings found in
    namespace (a stage script's globals()). Updates namespace in place and returns the final settings.
    """
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    defaults = {k: namespace[k] for k in keys}
    argv = equals_form(argv, defaults)
    settings = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: plain Python, run with the current settings visible
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (positional arguments are config files; "
                                  "overrides are written --key=value)")
            with open(arg, encoding="utf-8") as f:
                source = f.read()
            scope = dict(settings)
            try:
                exec(compile(source, arg, "exec"), scope)
            except Exception as e:
                raise ConfigError(f"{arg}: error while running the config file: {type(e).__name__}: {e}") from e
            for key, value in scope.items():
                if key.startswith("_") or key == "__builtins__" or type(value).__name__ in ("module", "function"):
                    continue
                if key not in defaults:
                    raise unknown_key_error(key, keys, arg)
                settings[key] = check_type(key, value, defaults[key], arg)
            if verbose:
                print(f"config: read {arg}", file=sys.stderr)
        else:
            if "=" not in arg:
                raise ConfigError(f"override {arg!r}: expected --key=value")
            key, raw = arg[2:].split("=", 1)
            if key not in defaults:
                raise unknown_key_error(key, keys, f"override {arg!r}")
            value = parse_override_value(raw, defaults[key])
            settings[key] = check_type(key, value, defaults[key], f"override {arg!r}")
            if verbose:
                print(f"config: {key} = {settings[key]!r}", file=sys.stderr)
    namespace.update(settings)
    return settings
