"""
nanoGPT's configuration contract, shared by every script (stages, prepare/ and bench/):

    python train.py config/a.py config/b.py --learning_rate=1e-3 --compile=False
    python train.py config/a.py --learning_rate 1e-3 --compile      # the same with spaces and a bare flag
    python train.py --help                                          # every setting, its default and comment

A script declares its settings as plain module-level globals, each with a comment, then calls

    config = configure(globals())

Positional arguments are config files applied in order: Python files (executed, so they may compute values
and read earlier ones) or JSON files (an object of settings). Then each --key=value override is applied
('--key value' works too, and a bare '--flag' sets a boolean to True). A misspelled key is an error that
names the nearest valid key; a value of the wrong type names the expected type. Booleans accept True/False.
A script whose positional arguments are inputs rather than config files (prepare/chat.py alpaca) names the
setting they fill: configure(globals(), positional="dataset"). The inputs, and any --dataset values, are joined
with ',' in the order given (prepare/tokenizer.py a.txt b.txt and --source a.txt b.txt both give 'a.txt,b.txt');
a Python file among them is still a config file (give a .py input as --source=FILE).

Settings are the script's lowercase globals holding plain values (int, float, bool, str, None); ALL_CAPS names
are constants, not settings.

On the real command line an error is one 'error: ...' line and exit status 1, never a traceback; called with
an argv list (as the tests do), configure raises ConfigError instead.
"""

import ast
import difflib
import json
import os
import re
import sys

CONFIG_TYPES = (int, float, bool, str, type(None))


class ConfigError(ValueError):
    pass


def config_keys(namespace):
    """The settings of a script: its public globals holding plain values (ALL_CAPS constants excluded)."""
    return [k for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, CONFIG_TYPES) and not isinstance(v, type)]


def unknown_key_error(key, valid, where):
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown config key {key!r}{hint} (--help lists every setting)")


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
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def equals_form(argv, defaults):
    """
    '--key value' -> '--key=value', and a bare boolean '--serve' -> '--serve=True' (unless True/False follows),
    so both spellings of a command work. An unknown '--key' is an error here already: otherwise its value
    would be taken for a config file.
    """
    result, i = [], 0
    while i < len(argv):
        arg, key = argv[i], argv[i][2:]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--") and "=" not in arg:
            if key not in defaults:
                raise unknown_key_error(key, list(defaults), f"option {arg!r}")
            if isinstance(defaults[key], bool):
                if following is not None and following.lower() in ("true", "false"):
                    result.append(f"--{key}={following}")
                    i += 2
                else:
                    result.append(f"--{key}=True")
                    i += 1
                continue
            if following is None or following.startswith("--"):
                raise ConfigError(f"option {arg!r}: expected --{key}=value (or --{key} value)")
            result.append(f"--{key}={following}")
            i += 2
            continue
        result.append(arg)
        i += 1
    return result


def read_config_file(path, settings):
    """The settings a config file assigns: a Python file is executed with the current settings visible."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (positional arguments are config files; "
                          "overrides are written --key=value)")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a JSON config file must hold one object of settings, "
                              f"e.g. {{\"max_iters\": 100}}; got {type(values).__name__}")
        return values
    if not path.endswith(".py"):
        raise ConfigError(f"config file {path!r}: expected a Python (.py) or JSON (.json) file of settings")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    scope = dict(settings)
    try:
        exec(compile(source, path, "exec"), scope)
    except Exception as e:
        raise ConfigError(f"{path}: error while running the config file: {type(e).__name__}: {e}") from e
    # only the names the file assigns: the others are the settings it was given, not ones it sets
    assigned = {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)
                and isinstance(node.ctx, ast.Store)}
    return {key: scope[key] for key in assigned if key in scope and not key.startswith("_")
            and type(scope[key]).__name__ not in ("module", "function", "type")}


def apply_arguments(namespace, argv, verbose, positional, given):
    keys = config_keys(namespace)
    defaults = {k: namespace[k] for k in keys}
    argv = equals_form(argv, defaults)
    settings = dict(defaults)
    config_files = [arg for arg in argv if not arg.startswith("--")]
    inputs = []
    if positional is not None:
        # this script's positional arguments are its inputs (prepare/chat.py alpaca), joined in order with the
        # values of --<positional> (so that --source a.txt b.txt means both files); .py files stay config files
        config_files = [arg for arg in config_files if arg.endswith(".py")]
        for arg in argv:
            if arg.startswith(f"--{positional}="):
                inputs.append(arg.split("=", 1)[1])
            elif not arg.startswith("--") and not arg.endswith(".py"):
                inputs.append(arg)
    for path in config_files:
        for key, value in read_config_file(path, settings).items():
            if key not in defaults:
                hint = f" (a .py argument is a config file; give a .py input as --{positional}=FILE)" \
                    if positional else ""
                raise ConfigError(f"{unknown_key_error(key, keys, path)}{hint}")
            settings[key] = check_type(key, value, defaults[key], path)
            given.add(key)
        if verbose:
            print(f"config: read {path}", file=sys.stderr)
    if any(inputs):
        settings[positional] = ",".join(i for i in inputs if i)
        given.add(positional)
        if verbose:
            print(f"config: {positional} = {settings[positional]!r}", file=sys.stderr)
    for arg in argv:
        if not arg.startswith("--"):
            continue
        key, raw = arg[2:].split("=", 1)
        if key == positional:
            continue  # joined with the positional inputs above
        if key not in defaults:
            raise unknown_key_error(key, keys, f"option {arg!r}")
        value = parse_override_value(raw, defaults[key])
        settings[key] = check_type(key, value, defaults[key], f"option {arg!r}")
        given.add(key)
        if verbose:
            print(f"config: {key} = {settings[key]!r}", file=sys.stderr)
    namespace.update(settings)
    return settings


HELP_COLUMN = 34  # where the comments start in --help
SETTING_LINE = re.compile(r"^([A-Za-z_]\w*)\s*=\s*(.*?)\s*(?:#\s?(.*))?$")


def settings_help(namespace, positional=None):
    """
    The --help text: the script's docstring, then every setting with its default and the comment beside it in
    the script's settings header (section comments such as '# data' become headings).
    """
    script = namespace.get("__file__") or sys.argv[0]
    keys = set(config_keys(namespace))
    doc = (namespace.get("__doc__") or "").strip()
    name = os.path.relpath(script) if script else "script.py"
    usage = f"usage: python {name} [{positional.upper()} ...] [config.py ...] [--key=value ...]" if positional \
        else f"usage: python {name} [config.py|config.json ...] [--key=value ...]"
    lines = [usage, ""] + ([doc, ""] if doc else []) + ["settings (--key=value or --key value; default, then meaning):"]
    try:
        with open(script, encoding="utf-8") as f:
            source_lines = f.read().splitlines()
    except OSError:
        source_lines = []
    # '# name' lines are section headings; '#   text' (two or more spaces) continues the last setting's comment
    shown, last_key, heading = set(), None, None
    for line in source_lines:
        match = SETTING_LINE.match(line)
        if match and match.group(1) in keys and match.group(1) not in shown:
            key, comment = match.group(1), match.group(3) or ""
            if heading:
                lines.append(f"  [{heading}]")
                heading = None
            value = namespace[key]
            option = f"  --{key}={value}" if isinstance(value, str) else f"  --{key}={value!r}"
            if comment and len(option) < HELP_COLUMN - 1:
                lines.append(option.ljust(HELP_COLUMN) + comment)
            else:
                lines += [option] + ([" " * HELP_COLUMN + comment] if comment else [])
            shown.add(key)
            last_key = key
        elif line.startswith("#  ") and last_key:
            lines.append(" " * HELP_COLUMN + line[1:].strip())
        elif re.match(r"^# \w", line):
            heading, last_key = line[2:].strip(), None
        else:
            heading, last_key = None, None
    for key in sorted(keys - shown):  # settings set in code without a header line of their own
        lines.append(f"  --{key}={namespace[key]!r}")
    if positional:
        lines.append(f"positional arguments fill --{positional} (several are joined with ','); "
                     "a .py argument is a config file")
    return "\n".join(lines)


def configure(namespace, argv=None, verbose=True, positional=None, given=None):
    """
    Apply config files and --key=value overrides from argv (default sys.argv[1:]) to the settings found in
    namespace (a script's globals()). Updates namespace in place and returns the final settings. A set passed
    as `given` receives the keys that a config file or an override set (whatever their value), for a script
    that must tell a setting the user chose from one left at its default (train.py's model shape).
    """
    given = set() if given is None else given
    if argv is not None:
        return apply_arguments(namespace, argv, verbose, positional, given)
    argv = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in argv):
        print(settings_help(namespace, positional))
        sys.exit(0)
    try:
        return apply_arguments(namespace, argv, verbose, positional, given)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
