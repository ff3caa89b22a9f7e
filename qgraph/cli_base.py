"""What every ``qgraph`` subcommand shares: exit codes, the one-line argparse parser, the usage error, and
`run`, the error reporter. `qgraph.cli` and the subcommand modules (`qgraph.search.cli`, `qgraph.llm.cli`)
import it; it imports none of them, so the command modules form no import cycle.

Exit codes: 0 success; 2 wrong usage; 3 bad input (model, target, pipeline, calibration data); 4 the lowered
model failed verification; 1 an unexpected internal error.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from qgraph.errors import PassError, QGraphError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_VERIFY = 0, 1, 2, 3, 4


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"qgraph: error: {message} (see qgraph {self.prog.split()[-1]} --help)\n"
                  if " " in self.prog else f"qgraph: error: {message} (see qgraph --help)\n")


class UsageError(Exception):
    """Options that parse but do not go together (exit 2)."""


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; every failure becomes one line on stderr and an exit code (see the module doc)."""
    try:
        return args.func(args)
    except UsageError as e:
        print(f"qgraph: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PassError as e:  # a bug in a pass, not bad input: internal error, with the pass named
        print(f"qgraph: internal error: {str(e).splitlines()[0]} (set QGRAPH_DEBUG=1 for the traceback)",
              file=sys.stderr)
        if os.environ.get("QGRAPH_DEBUG"):
            traceback.print_exception(e)
        return EXIT_INTERNAL
    except QGraphError as e:
        first = str(e).strip("\n").splitlines() or [type(e).__name__]
        print(f"qgraph: error: {first[0].strip()}", file=sys.stderr)
        for line in first[1:]:  # kept as they are: a caret line points at a column of the line above
            print(f"  {line.rstrip()}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("qgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: one line, the traceback only on request
        print(f"qgraph: internal error: {type(e).__name__}: {e} (set QGRAPH_DEBUG=1 for the traceback)",
              file=sys.stderr)
        if os.environ.get("QGRAPH_DEBUG"):
            traceback.print_exc()
        return EXIT_INTERNAL
