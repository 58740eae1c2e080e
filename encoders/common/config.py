"""Typed run configs: dataclass defaults, a YAML file, then `key=value` overrides, in that order.

Every command of the project (trainers, fine-tunes, demo) describes its settings as a dataclass.
`parse_config_cli` reads `--config FILE` and `key=value` arguments (dotted keys reach nested
dataclasses: `subspace.dim=8`), converts each value to the field's type, and fails with an error
that names the key and the file when a key is unknown or a value does not fit. `save_config` writes
the resolved config next to a run's outputs so every result says how it was made.

It lives on the ground floor (`encoders.common`): every part of the project may import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .files import atomic_write_text

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and where it came from."""


def keyed_field(help: str, default: Any = None, factory: Any = None) -> Any:
    """A dataclass field with its `--help` line (shown by `describe_keys`); `factory` for mutable defaults."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _aliases(cls: type) -> dict[str, str]:
    """Old key spellings a config class still accepts: its `CONFIG_ALIASES` {old: new}, base classes' too."""
    merged: dict[str, str] = {}
    for klass in reversed(getattr(cls, "__mro__", (cls,))):
        merged.update(getattr(klass, "__dict__", {}).get("CONFIG_ALIASES", {}))
    return merged


def _canonical_keys(cls: type, data: dict) -> dict:
    """`data` with aliased keys renamed to their current names; an alias may name a nested key
    (`resolution` -> `data.resolution`). An alias and its key together is an error."""
    aliases = _aliases(cls)
    if not aliases:
        return data
    out: dict = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        *parents, leaf = name.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = config_to_dict(child) if dataclasses.is_dataclass(child) else {}
            node = child
        if leaf not in node:
            node[leaf] = value
        elif isinstance(node[leaf], dict) and isinstance(value, dict):
            node[leaf].update(value)  # a group given both as `data: {...}` and through an old flat key
        else:
            spellings = sorted({key, name, *(old for old, new in aliases.items() if new == name)})
            raise ConfigError(f"config key {name!r} is given twice (as {' and '.join(map(repr, spellings))}: keep one)")
    return out


def _unknown_key(key: str, known: list[str], origin: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {origin}{hint}; known keys: {', '.join(sorted(known))}")


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise ConfigError."""

    def fail(why: str = "") -> ConfigError:
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        return ConfigError(f"bad value for {key!r} in {origin}: {value!r} is not a valid {name}{why}")

    origin_tp = get_origin(tp)
    if tp is Any:
        return value
    if origin_tp in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError as err:
                errors.append(str(err))
        raise fail()
    if origin_tp is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(
            f"bad value for {key!r} in {origin}: {value!r}; choose one of {', '.join(map(repr, choices))}"
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail(" (expected a mapping of its keys)")
        return _build(tp, value, origin, prefix=f"{key}.")
    if origin_tp in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            parsed = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise fail(" (expected a list, e.g. [1, 2] or 1,2)")
        args = get_args(tp)
        if origin_tp is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail(f" (expected {len(args)} items)")
            return tuple(_coerce(v, a, f"{key}[{i}]", origin) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
        return tuple(items) if (origin_tp is tuple or tp is tuple) else items
    if origin_tp is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail(" (expected a mapping)")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail(" (use true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise fail() from None
                if as_float.is_integer():
                    return int(as_float)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (dict, list)):
            raise fail()
        return str(value)
    if tp is Path:
        return Path(value)
    raise ConfigError(f"config key {key!r} has a type this loader does not handle: {tp}")


def _coerce_fields(cls: type, data: dict, origin: str, prefix: str = "") -> dict:
    """Check every key of `data` against `cls`'s fields and convert its value to the field's type."""
    data = _canonical_keys(cls, data)
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            raise _unknown_key(prefix + key, [prefix + k for k in [*types_, *_aliases(cls)]], origin)
    return {k: _coerce(v, types_[k], prefix + k, origin) for k, v in data.items()}


def _with_nested_defaults(cls: type, data: dict) -> dict:
    """`data` with each nested config it names laid over that field's own default (a subclass may give a
    nested config other defaults through its factory: `data.resolution=64` keeps them)."""
    out = dict(data)
    for f in dataclasses.fields(cls):
        value = out.get(f.name)
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                out[f.name] = {**config_to_dict(default), **_canonical_keys(type(default), value)}
    return out


def _build(cls: type[T], data: dict, origin: str, prefix: str = "") -> T:
    kwargs = _coerce_fields(cls, _with_nested_defaults(cls, _canonical_keys(cls, data)), origin, prefix)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin}: {err}") from err


def _merge(base: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = base
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None or not dataclasses.is_dataclass(child) else config_to_dict(child)
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """Split `key=value` strings; a string without '=' is an error that shows it."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        pairs.append((key, value))
    return pairs


def _check_path(cls: type, key: str, origin: str) -> str:
    """The dotted `key` with each part's alias resolved; an unknown part is an error naming the key."""
    node: Any = cls
    walked = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            raise _unknown_key(key, [".".join(walked)], origin)
        types_ = _field_types(node)
        *hops, part = _aliases(node).get(part, part).split(".")  # an alias may lead into a nested group
        for hop in hops:
            walked.append(hop)
            node = types_[hop]
            types_ = _field_types(node)
        if part not in types_:
            prefix = ".".join(walked + [""]) if walked else ""
            raise _unknown_key(key, [prefix + k for k in [*types_, *_aliases(node)]], origin)
        walked.append(part)
        node = types_[part]
        if get_origin(node) in (Union, types.UnionType):
            inner = [a for a in get_args(node) if dataclasses.is_dataclass(a)]
            node = inner[0] if inner else node
    return ".".join(walked)


PACKAGED_CONFIGS = "zsp_configs"  # the repository's configs/ as installed from a wheel


def packaged_configs() -> Path | None:
    """The folder of the installed copy of `configs/` (None when the package is not installed)."""
    from importlib.util import find_spec

    try:
        spec = find_spec(PACKAGED_CONFIGS)
    except (ImportError, ValueError):
        return None
    # a namespace package (no __init__.py): its folder is the first real directory of its path
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location).is_dir():
            return Path(location)
    return None


def resolve_config_path(path: str | os.PathLike) -> Path:
    """`path` itself when it exists; else `configs/<rest>` read from the installed package, so the
    commands' documented `--config configs/train/global_mapping.yaml` works from a wheel install in
    any folder. A missing file is a ConfigError naming both places."""
    path = Path(path)
    if path.is_file():
        return path
    parts = path.parts
    if not path.is_absolute() and parts and parts[0] == "configs" and (root := packaged_configs()) is not None:
        packaged = root.joinpath(*parts[1:])
        if packaged.is_file():
            return packaged
        raise ConfigError(f"config file {path} does not exist (nor {packaged} in the installed package)")
    raise ConfigError(f"config file {path} does not exist")


def write_configs(out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Copy the installed `configs/` to `out_dir/configs/` to edit; existing files are kept unless `force`."""
    root = packaged_configs()
    if root is None:
        raise ConfigError(f"the configs are not installed with the package ({PACKAGED_CONFIGS} not found)")
    written = []
    for source in sorted(root.rglob("*")):
        if not source.is_file() or source.suffix not in (".yaml", ".json", ".sbatch"):
            continue
        target = Path(out_dir) / "configs" / source.relative_to(root)
        if target.exists() and not force:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        written.append(target)
    return written


def write_configs_main(argv: list[str] | None = None) -> int:
    """`zsp-configs [--out DIR]`: write the example configs out of an installed package."""
    parser = argparse.ArgumentParser(
        prog=program_name("python -m encoders.common.config"),
        description="Copy the installed example configs to DIR/configs/ to edit.",
    )
    parser.add_argument("--out", default=".", help="folder that receives configs/ (default: here)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = parser.parse_args(argv)
    try:
        written = write_configs(args.out, args.force)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files under {Path(args.out) / 'configs'}")
    return 0


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, updated by the YAML file at `path` (`resolve_config_path`: the installed copy
    of `configs/...` when there is no such file here), then by `key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    origin = str(path) if path is not None else "the defaults"
    _coerce_fields(cls, data, origin)  # check the file alone first, so its errors name the file
    data = _canonical_keys(cls, data)
    for key, value in parse_overrides(overrides or []):
        _merge(data, _check_path(cls, key, "the command line"), value)
    return _build(cls, data, "the command line" if overrides else origin)


def config_defaults(cls: type) -> dict:
    """`config_to_dict` of a config class's field defaults, without building (and so validating) an instance:
    some configs need a key set before they are valid."""
    out = {}
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            out[item.name] = config_to_dict(item.default)
        elif item.default_factory is not dataclasses.MISSING:
            out[item.name] = config_to_dict(item.default_factory())
    return out


def config_to_dict(cfg: Any) -> dict:
    """Plain-YAML-able dict of a config dataclass (tuples become lists, Paths strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: temp name, then rename)."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_keys(cls: type, prefix: str = "", instance: Any = None) -> list[str]:
    """One line per key: name, type, default and the field's `help` metadata (for --help); nested
    configs show the defaults their field gives them (`instance`)."""
    lines = []
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            if instance is not None:
                nested = getattr(instance, f.name)
            lines.extend(describe_keys(tp, prefix=f"{prefix}{f.name}.", instance=nested))
            continue
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        type_name = str(tp).replace("typing.", "") if get_origin(tp) else getattr(tp, "__name__", str(tp))
        help_text = f.metadata.get("help", "")
        lines.append(f"  {prefix}{f.name} ({type_name}, default {default!r}){': ' + help_text if help_text else ''}")
    return lines


def program_name(module_form: str) -> str:
    """The name a usage line should show: the console script when the command was started as one
    (`zsp generate ...`), otherwise its `python -m` form."""
    started_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if started_as and not started_as.endswith(".py"):
        from importlib.metadata import entry_points

        package = module_form.replace("python -m ", "").split(".")[0]
        for script in entry_points(group="console_scripts"):
            if script.name == started_as and script.value.split(".")[0] == package:
                return started_as
    return module_form


def dashed_overrides(argv: list[str]) -> list[str]:
    """`--key=value`, `--key value` and a bare `--flag` (how diffusers' and the papers' scripts are called)
    as `key=value` / `flag=true`; dashes inside the name become underscores. `--config`, `-h`/`--help`
    and plain `key=value` pass through unchanged."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token[2:].split("=", 1)[0]
        if not token.startswith("--") or name in ("config", "help") or not name:
            out.append(token)
            i += 1
            continue
        key = name.replace("-", "_")
        if "=" in token:
            out.append(f"{key}={token.split('=', 1)[1]}")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
            out.append(f"{key}={argv[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")
        i += 1
    return out


def keyed_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The other half of the one grammar: in a command of `--option value` flags, `key=value` means `--key value`
    (`num_images=4` -> `--num-images 4`, `spatial_guidance=true` -> `--spatial-guidance`) where `--key` is an option of
    the parser or of the subcommand chosen in `argv`. Anything else (a prompt, a file, a data_prep setting) passes
    unchanged, and so does every token that is the value of the option before it."""
    options = _option_actions(parser)
    out: list[str] = []
    expects_value = False
    for token in argv:
        if expects_value:
            out.append(token)
            expects_value = False
            continue
        sub = _subparser_for(parser, token) if not token.startswith("-") else None
        if sub is not None:
            parser, options = sub, _option_actions(sub)
            out.append(token)
            continue
        key, eq, value = token.partition("=")
        action = options.get("--" + key.replace("_", "-")) if eq and not token.startswith("-") else None
        if action is None:
            out.append(token)
            expects_value = token in options and options[token].nargs != 0 and "=" not in token
            continue
        if action.nargs == 0:  # a switch: key=true turns it on, key=false leaves it off
            if value.lower() in ("1", "true", "yes", "on"):
                out.append(action.option_strings[-1])
            elif value.lower() not in ("0", "false", "no", "off"):
                raise ConfigError(f"{key}={value}: {key} is a switch; write {key}=true or {key}=false")
        else:
            out += ["--" + key.replace("_", "-"), value]
    return out


def parse_keyed_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args` for a flag command that also takes `key=value` for its options (`keyed_options`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return parser.parse_args(keyed_options(parser, argv))
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for action in parser._actions for name in action.option_strings}


def _subparser_for(parser: argparse.ArgumentParser, token: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and token in action.choices:
            return action.choices[token]
    return None


def parse_config_cli(cls: type[T], argv: list[str] | None = None, prog: str | None = None, description: str = "") -> T:
    """Command-line entry for a config: `[--config FILE] [key=value ...]` (also `--key=value`, `--key value`);
    `--help` lists every key."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="keys (set with key=value; dotted keys reach nested groups):\n" + "\n".join(describe_keys(cls)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with keys to set; key=value arguments override it")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config keys to set (--key=value and --key value work too)"
    )
    args = parser.parse_args(dashed_overrides(list(sys.argv[1:] if argv is None else argv)))
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


if __name__ == "__main__":
    sys.exit(write_configs_main())
