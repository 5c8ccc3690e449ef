"""``python -m realign_pipeline.app``: the same as ``realign app``."""

import argparse
import sys

from .command import add_app_arguments, run_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m realign_pipeline.app", description=__doc__)
    add_app_arguments(parser)
    run_app(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
