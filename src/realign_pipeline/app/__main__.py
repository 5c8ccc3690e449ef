"""``python -m realign_pipeline.app``: the same as ``realign app``."""

import argparse
import sys

from ..errors import UsageError
from .command import add_app_arguments, run_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m realign_pipeline.app", description=__doc__)
    add_app_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_app(args)
    except UsageError as error:  # a user's mistake: one line, as `realign` prints it
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
