"""``spatialtune`` command line: parse, call one library function, format.

Library errors (:class:`~spatialtune.errors.SpatialtuneError`) become one line on stderr and exit
code 2; ``--debug`` shows the traceback instead. Each command group is a module of this package
that registers its subcommands with an ``add_*`` function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ..errors import SpatialtuneError
from .bundle import add_bundle
from .common import EXIT_USAGE, Parser, fail
from .db import add_db
from .lookup import add_lookup
from .model import add_model
from .model_export import add_model_export, route
from .report import add_report
from .serve import add_serve
from .tune import add_show, add_tune, add_workloads

log = logging.getLogger("spatialtune")

COMMANDS: list[Callable] = [add_tune, add_workloads, add_show]
COMMANDS += [add_lookup, add_report, add_db]
COMMANDS += [add_bundle, add_serve, add_model, add_model_export]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="spatialtune", description="Partial-resource kernel auto-tuner")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="store_true", help="info logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(route(sys.argv[1:] if argv is None else list(argv)))
    level = logging.DEBUG if a.debug else logging.INFO if a.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # MetaSchedule logs every evolution round at INFO; keep it for --debug.
    logging.getLogger("tvm").setLevel(logging.DEBUG if a.debug else logging.WARNING)
    if not getattr(a, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return a.func(a) or 0
    except SpatialtuneError as e:
        if a.debug:
            raise
        return fail(str(e))
    except KeyboardInterrupt:
        print("spatialtune: interrupted; everything measured so far is in the database", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `spatialtune show | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except Exception as e:  # a bug of ours: still one line, with the way to the traceback
        if a.debug:
            raise
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"spatialtune: internal error: {type(e).__name__}: {first} (run with --debug for the traceback; "
              "please report it)", file=sys.stderr)
        return 1

