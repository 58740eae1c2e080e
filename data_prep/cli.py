"""`python -m data_prep <subcommand> ...`: a small registry of argparse subcommands.

Adding a subcommand: one module, one decorated function, one line in `SUBCOMMAND_MODULES`.

    # data_prep/my_source.py
    from .cli import add_writer_arguments, register_subcommand, shard_job_from_args

    def _configure(parser):  # this subcommand's arguments (nested subparsers are fine)
        parser.add_argument("--annotations", required=True)
        add_writer_arguments(parser, default_name="mine")  # --out --name --shard-size --workers --node-rank ...

    @register_subcommand("mine", help="my source -> crop shards", configure=_configure)
    def run_mine(args) -> int:  # an exit code; raise SourceError/WriterError/ShardSpecError/ConfigError
        job = shard_job_from_args(args)  # for clear one-line errors
        write_shards(items, process, job, settings=...)
        return 0

then add "data_prep.my_source" to `SUBCOMMAND_MODULES` below. Every subcommand registers this way, at import
of its module, so a subcommand module must not do heavy work at import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from encoders.common.config import ConfigError, describe_keys, load_config, parse_keyed_args, program_name
from encoders.common.files import OutputPathError, describe_write_error
from encoders.common.processes import available_cpus
from encoders.common.shards import ShardSpecError

from .manifests import merge_manifests
from .sources import SourceError
from .writer import ShardJob, WriterError, check_output_folder

SUBCOMMAND_MODULES = (
    "data_prep.crop_commands",
    "data_prep.inspect_shards",
    "data_prep.latents",
    "data_prep.pairs_cli",
    "data_prep.world",
)


@dataclass
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None
    epilog: str | None = None


_REGISTRY: dict[str, Subcommand] = {}


def register_subcommand(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
    epilog: str | None = None,
):
    """Decorator: register `run(args) -> exit code` as `python -m data_prep NAME`."""

    def decorate(run: Callable[[argparse.Namespace], int | None]):
        if name in _REGISTRY and _REGISTRY[name].run is not run:
            raise ValueError(f"data_prep subcommand {name!r} is registered twice")
        _REGISTRY[name] = Subcommand(name, help, configure, run, description, epilog)
        return run

    return decorate


def registered_subcommands() -> dict[str, Subcommand]:
    """Every subcommand, after importing the modules that register them."""
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


# ---- helpers shared by shard-writing subcommands -------------------------------------------------


def add_writer_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """--out, --name, --shard-size, --workers, --node-rank, --num-nodes, --overwrite, --no-progress."""
    group = parser.add_argument_group("output and parallelism")
    group.add_argument("--out", required=True, help="output folder for NAME-000000.tar ... and manifest.json")
    group.add_argument("--name", default=default_name, help=f"shard name prefix (default {default_name})")
    group.add_argument("--shard-size", type=int, default=1000, help="work items per shard (default 1000)")
    group.add_argument(
        "--workers",
        type=int,
        default=available_cpus(),
        help=f"worker processes (default: the cores this process may use, here {available_cpus()})",
    )
    group.add_argument(
        "--node-rank", type=int, default=0, help="this node's rank, e.g. $SLURM_ARRAY_TASK_ID (default 0)"
    )
    group.add_argument(
        "--num-nodes", type=int, default=1, help="nodes sharing the job, e.g. $SLURM_ARRAY_TASK_COUNT (default 1)"
    )
    group.add_argument(
        "--overwrite", action="store_true", help="delete this name's shards in --out first instead of resuming"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument(
        "--log-first", type=int, default=5, help="log this many bad records with their files (default 5)"
    )


def shard_job_from_args(args: argparse.Namespace, unit: str = "items") -> ShardJob:
    """The `ShardJob` of the writer options; `--out` is checked writable here, before any input is read."""
    check_output_folder(Path(args.out))
    return ShardJob(
        out_dir=args.out,
        name=args.name,
        shard_size=args.shard_size,
        workers=args.workers,
        node_rank=args.node_rank,
        num_nodes=args.num_nodes,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        log_first=args.log_first,
        unit=unit,
    )


def add_config_arguments(parser: argparse.ArgumentParser, settings_cls: type) -> None:
    """`--config FILE` and trailing `key=value` overrides for a settings dataclass (keys in --help)."""
    parser.add_argument("--config", help="YAML file of settings (see configs/data/); key=value arguments override it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings to change, after the options")
    parser.epilog = (parser.epilog or "") + "settings (key=value):\n" + "\n".join(describe_keys(settings_cls))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def settings_from_args(args: argparse.Namespace, settings_cls: type):
    return load_config(settings_cls, args.config, args.overrides)


# ---- merge -----------------------------------------------------------------------------------------


def _configure_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="shard folder holding manifest.node-R-of-K.json files")
    parser.add_argument("--verify", action="store_true", help="also check every shard's sha256")


@register_subcommand(
    "merge",
    help="combine the per-node manifests of a multi-node run into manifest.json",
    configure=_configure_merge,
    description="Checks that all K nodes finished, ran the same job and left every shard, then writes manifest.json.",
)
def run_merge(args: argparse.Namespace) -> int:
    merge_manifests(args.dir, verify=args.verify)
    return 0


# ---- entry point -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m data_prep"),
        description="Offline data pipelines: object crops with masks and boxes into WebDataset shards, and tools to "
        "check them.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, sub in sorted(registered_subcommands().items()):
        child = subparsers.add_parser(name, help=sub.help, description=sub.description or sub.help, epilog=sub.epilog)
        child.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
        if sub.configure is not None:
            sub.configure(child)
        child.set_defaults(_run=sub.run)
    return parser


_SETTING = re.compile(r"^[A-Za-z_][\w.]*=")


def _rescue_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`key=value` written after an option that takes several files (`--boxes a.csv b.csv mask_from_box=true`)
    is a setting, not a file: move it to the overrides, or stop with an error where the command has none."""
    for name, value in vars(args).items():
        if name == "overrides" or not isinstance(value, list):
            continue
        settings = [
            item for item in value if isinstance(item, str) and _SETTING.match(item) and not os.path.exists(item)
        ]
        if not settings:
            continue
        if not hasattr(args, "overrides"):
            parser.error(f"{settings[0]!r} looks like a setting, but {args.command} takes no key=value settings")
        kept = [item for item in value if item not in settings]
        if not kept:
            parser.error(f"--{name.replace('_', '-')} names no file, only settings: {' '.join(settings)}")
        setattr(args, name, kept)
        args.overrides = [*args.overrides, *settings]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_keyed_args(parser, argv)
    _rescue_settings(args, parser)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        code = args._run(args)
    except (SourceError, WriterError, ShardSpecError, ConfigError, OutputPathError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk or a folder turned read-only mid-run: one line, finished shards kept
        reason = describe_write_error(err)
        if reason is None:
            raise
        where = getattr(err, "filename", None) or getattr(args, "out", None) or "the output"
        print(f"error: cannot write {where}: {reason} (finished shards are kept; rerun to resume)", file=sys.stderr)
        return 2
    return int(code or 0)
