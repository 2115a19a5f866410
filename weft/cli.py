"""The `weft` command."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weft", description="weft: a resilient transfer fabric")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the local demo")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command == "version":
        from weft import __version__

        print(__version__)
        return 0
    from weft import demo

    return demo.run()


if __name__ == "__main__":
    sys.exit(main())
