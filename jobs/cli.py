"""The command line every job shares.

``python -m jobs.<job> --config FILE [dotted.key=value ...] [--address ADDR]``: :func:`job_parser`
builds it (a job adds its own flags to the parser it gets back), and :func:`start_job` parses
it, loads and validates the config, and only then connects to Ray. A bad config ends the
process with ``error: ...`` naming the bad key, before any cluster work::

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        parser = job_parser("python -m jobs.train", __doc__)
        _, cfg = start_job(parser, argv, lambda args: load_config(args.config, args.overrides),
                           connect=init_ray)
        return run_job(cfg)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import yaml
from pydantic import ValidationError

from jobs.config_base import ConfigError, format_validation_error
from jobs.runtime import setup_logging

T = TypeVar("T")

#: What a config that cannot be read or validated raises.
CONFIG_ERRORS: tuple[type[Exception], ...] = (ConfigError, ValidationError, yaml.YAMLError)
ADDRESS_HELP = "Ray address (default: RAY_ADDRESS, or a local instance)"


def job_parser(prog: str, description: str | None, *, config_help: str | None = "YAML job config",
               overrides_help: str = "dotted.key=value overrides", address: bool = True) -> argparse.ArgumentParser:
    """The parser of a job: ``--config``, ``key=value`` overrides and ``--address``.

    Args:
        prog: How the job is run (``python -m jobs.train``).
        description: The help text (the job module's docstring).
        config_help: Help of ``--config``; ``None``: the job takes no config file and no overrides.
        overrides_help: Help of the positional overrides.
        address: Whether the job connects to Ray (and so takes ``--address``).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_help is not None:
        parser.add_argument("--config", required=True, help=config_help)
        parser.add_argument("overrides", nargs="*", help=overrides_help)
    if address:
        parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    return parser


def error_message(exc: BaseException) -> str:
    """What follows ``error:`` when a config fails: the bad keys by name."""
    if isinstance(exc, ValidationError):
        return format_validation_error(exc)
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML: {exc}"
    return str(exc)


@contextmanager
def exit_on_error(*errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` (default: :data:`CONFIG_ERRORS`) into ``SystemExit("error: ...")``: a message, no traceback."""
    caught = errors or CONFIG_ERRORS
    try:
        yield
    except caught as exc:
        raise SystemExit(f"error: {error_message(exc)}") from None


def start_job(parser: argparse.ArgumentParser, argv: list[str] | None, load: Callable[[argparse.Namespace], T], *,
              connect: Callable[[str | None], None] | None = None) -> tuple[argparse.Namespace, T]:
    """Set up logging, parse ``argv``, load the config, and only then connect to Ray.

    Args:
        parser: From :func:`job_parser`, with the job's own flags added.
        argv: The arguments (``None``: ``sys.argv[1:]``).
        load: Reads and validates the config from the parsed arguments; raises one of
            :data:`CONFIG_ERRORS` for a bad one.
        connect: Connects to Ray given ``--address`` (:func:`jobs.runtime.init_ray`, passed by
            the job so that a test can replace it there); ``None``: the job runs without Ray.

    Returns:
        The parsed arguments and what ``load`` returned.

    Raises:
        SystemExit: Bad arguments, or ``error: ...`` naming the bad key of a bad config.
    """
    setup_logging()
    args = parser.parse_args(argv)
    with exit_on_error():
        loaded = load(args)
    if connect is not None:
        connect(args.address)
    return args, loaded
