"""`sae-repro` / `python -m sae_repro`: run notebooks under a profile, build the book, list things."""

from __future__ import annotations

import argparse
import ast
import json
import sys

from sae_repro import pipeline
from sae_repro.profiles import PROFILE_NAMES, profile


def _value(text: str):
    """Parse a -p value as a Python literal when it is one, else keep the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sae-repro", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks with papermill under a profile")
    r.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    r.add_argument("--only", action="append", help="notebook name (repeatable)")
    r.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                   help="override one parameter")
    r.add_argument("--force", action="store_true", help="rerun even if inputs are unchanged")
    sub.add_parser("book", help="build the HTML book from the executed notebooks")
    sub.add_parser("list", help="show notebooks, profiles and figures")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            pipeline.run(args.profile, args.only, {k: _value(v) for k, v in args.p}, args.force)
        elif args.cmd == "book":
            pipeline.build_book()
        else:
            for nb in pipeline.notebook_paths():
                print(f"notebook {nb.stem}: parameters {sorted(pipeline.declared_parameters(nb))}")
            for name in PROFILE_NAMES:
                print(f"profile {name}: {json.dumps(profile(name))}")
    except (pipeline.NotebookFailed, ValueError) as e:
        print(f"sae-repro: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
