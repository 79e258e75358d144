"""``--print-config`` of the jobs that take a config: the effective config (defaults, environment, config file,
flags and overrides applied) with each setting's description, as commented YAML. Nothing is started or written."""

from __future__ import annotations

import argparse

from eagle.cli.exit_codes import OK
from eagle.config import JobConfig, described_yaml


def add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="Print the effective config (defaults, environment, --config, flags and overrides) "
                             "with each setting's description as commented YAML, and exit: nothing is checked, "
                             "started or written. It loads back with --config.")


def print_config(cfg: JobConfig) -> int:
    print(described_yaml(cfg), end="")
    return OK
