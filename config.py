"""Configuration: TOML files and `--section.key=value` overrides into dataclasses, checked before any work.

Every entry point (train.py, sft.py, dpo.py, rl.py, merge.py) reads its settings this way, in the
manner of torchtitan: one TOML table per dataclass, each dataclass living next to the code it
configures (ModelConfig in model.py, TrainConfig in train.py, SFTConfig in sft.py, ...). An unknown
key stops the run with the closest valid one, a wrong type names the key and the type, and the
dataclass's own checks (`__post_init__`) name the setting and what would be valid. `--help` lists
every key with its default and the comment written beside the field, and every run writes its
resolved config to its folder, so any result can be reproduced from that folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import os
import sys
import tokenize
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path


class ConfigError(ValueError):
    """A setting that cannot work: the message names the key (or file) and the fix."""


def _coerce(key: str, value, hint):
    """Check a TOML value against a dataclass field's type; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, bool)):
            return str(value).lower() if isinstance(value, bool) else value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(key, v, typing.get_args(hint)[0]) for v in value)
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(key, v, typing.get_args(hint)[1]) for k, v in value.items()}
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be of type {name}, got {value!r} ({type(value).__name__})")


def parse_override(arg: str) -> tuple[str, object]:
    """'--model.n_kv_heads=4' -> ('model.n_kv_heads', 4); values are read as TOML, else as strings.
    A bare '--train.resume' means true."""
    if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
        raise ConfigError(f"cannot read argument {arg!r}; overrides look like --section.key=value, "
                          f"e.g. --model.n_kv_heads=4")
    if "=" not in arg:
        return arg[2:], True
    key, raw = arg[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = float(raw)  # numbers TOML does not accept, like .001
        except ValueError:
            value = raw
    return key, value


def all_keys(sections: dict[str, type]) -> list[str]:
    return [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file's tables, or one line naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; give an existing .toml file (configs/ has the shipped ones)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}); fix it or start from a file in configs/") from e


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple = (), *, sections: dict[str, type],
                check: Callable[[dict], None] | None = None) -> dict:
    """{section: dataclass instance} from a TOML file (None: every default) and overrides.

    `check(cfg)` may raise ConfigError (or ValueError) for settings that involve several sections."""
    raw = read_toml(path) if path is not None else {}
    flat = {}
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a table like [{next(iter(sections))}]")
        if section not in sections:
            close = difflib.get_close_matches(section, list(sections), n=1)
            raise ConfigError(f"{path}: unknown section [{section}]"
                              + (f"; did you mean [{close[0]}]?" if close else f"; sections are {list(sections)}"))
        for k, v in table.items():
            flat[f"{section}.{k}"] = v
    raw_text = {}  # an override's text as typed: a string field takes it as is (--train.name=2024)
    for arg in overrides:
        k, v = parse_override(arg)
        flat[k] = v
        raw_text[k] = arg.split("=", 1)[1] if "=" in arg else None
    valid = set(all_keys(sections))
    for key in flat:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else f"; sections are {list(sections)} (--help lists every key)"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    cfg = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in flat.items():
            if k.startswith(section + "."):
                hint = hints[k.split(".", 1)[1]]
                if hint is str and not isinstance(v, str) and raw_text.get(k) is not None:
                    v = raw_text[k]
                kwargs[k.split(".", 1)[1]] = _coerce(k, v, hint)
        try:
            cfg[section] = cls(**kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if check is not None:
        try:
            check(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return cfg


def config_dict(cfg: dict) -> dict:
    return {s: dataclasses.asdict(obj) for s, obj in cfg.items()}


def config_to_toml(cfg: dict) -> str:
    """The resolved config as TOML, so any run can be reproduced from its folder."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {fmt(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} as TOML")
    out = []
    for section, obj in cfg.items():
        out.append(f"[{section}]")
        out += [f"{k} = {fmt(v)}" for k, v in dataclasses.asdict(obj).items()]
        out.append("")
    return "\n".join(out)


def field_comments(cls: type) -> dict[str, str]:
    """The comment written beside each field of a dataclass, continued on the comment-only lines
    indented under it, read from its source: the one description of a setting, shown by --help.
    A comment-only line at the fields' own indentation is a heading for the fields below it."""
    comments: dict[str, list[str]] = {}
    current, line_has_code = None, False
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.string == "def":
            break  # methods follow the fields
        if tok.type == tokenize.NAME and tok.start[1] == 4 and not line_has_code:
            current = tok.string  # a candidate field name at class-body indentation
        if tok.type == tokenize.OP and tok.string == ":" and current and not line_has_code:
            comments.setdefault(current, [])
            line_has_code = True
        elif tok.type == tokenize.COMMENT:
            if not line_has_code and tok.start[1] <= 4:
                current = None  # a heading, not a continuation
            elif current in comments:
                comments[current].append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NEWLINE:
            line_has_code = False
        elif tok.type == tokenize.NL and line_has_code:
            line_has_code = False
    return {name: " ".join(c for c in parts if c) for name, parts in comments.items()}


def help_text(doc: str, sections: dict[str, type]) -> str:
    """The module's docstring, then every key: `--section.key` (type, default): its comment."""
    lines = [doc.strip(), "", "Settings (TOML tables, or --section.key=value on the command line):"]
    for section, cls in sections.items():
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        lines.append(f"\n[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"  --{section}.{f.name} ({kind}, default {default!r})")
            if comments.get(f.name):
                lines.append(f"      {comments[f.name]}")
    return "\n".join(lines)


def parse_cli(argv: list[str], *, doc: str, sections: dict[str, type], default_config: str | os.PathLike | None = None,
              check: Callable[[dict], None] | None = None) -> dict:
    """The config of a command line: `--config FILE` (else default_config, else every default) and
    `--section.key=value` overrides. `--help` prints help_text and exits 0; a bad setting prints one
    line and exits 2, before any work."""
    config_path, overrides = default_config, []
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            config_path = next(it, None) if arg == "--config" else arg.split("=", 1)[1]
            if not config_path or config_path.startswith("--"):
                print("error: --config needs a file, e.g. --config configs/tiny.toml", file=sys.stderr)
                sys.exit(2)
        elif arg in ("-h", "--help"):
            print(help_text(doc, sections))
            sys.exit(0)
        else:
            overrides.append(arg)
    try:
        return load_config(config_path, overrides, sections=sections, check=check)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
