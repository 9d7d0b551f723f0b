"""The ``athomic`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from athomic import __version__
    from athomic.republisher import cli as republisher_cli

    parser = argparse.ArgumentParser(
        prog="athomic", description="Ray-native event publishing to Apache Kafka")
    parser.add_argument("--version", action="version", version=f"athomic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    republisher_cli.add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "republisher":
        return republisher_cli.main(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
