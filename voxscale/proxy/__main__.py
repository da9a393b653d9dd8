"""`python -m voxscale.proxy`: the door alone, without loading the rest of the command line (a lighter start)."""

from __future__ import annotations

import argparse
import sys

from voxscale.proxy import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxscale proxy", description=cli.__doc__)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
