"""``pop-connector``: parse the command line (parser.py), then run the command (commands.py).

The parse comes first and imports nothing a command needs, so that ``--help`` and usage errors answer at
once; each command imports what it uses when it runs.

Exit codes: 0 everything succeeded, 1 an account or message failed, 2 configuration or usage error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from connector.cli.parser import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, build_parser

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
            from connector.cli.commands import run

            return run(args)
        finally:
            # Whatever is still buffered, while a closed pipe can still be told apart from a failure.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`pop-connector status | head`): exit quietly. Python flushes stdout once
        # more at exit, which would fail again; point it at /dev/null (Python's docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
