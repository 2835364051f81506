"""`sae-repro` / `python -m sae_repro`: run notebooks under a profile, build the book, list things.

  sae-repro run --profile quick --only dark_matter_synthetic -p seed 1 --jobs 2
  sae-repro book
  sae-repro list
"""

from __future__ import annotations

import argparse
import ast
import logging
import signal
import subprocess
import sys
from typing import Any

from sae_repro import pipeline
from sae_repro.cache import read_json
from sae_repro.figures import figures_dir
from sae_repro.profiles import PROFILE_NAMES, profile


def _value(text: str) -> Any:
    """Parse a -p value as a Python literal when it is one, else keep the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _list(name: str | None) -> None:
    """Notebooks with their parameters, a profile's values and the figures (of `name`, or of every
    profile when None)."""
    shown = name or "default"
    values = profile(shown)
    print(f"notebooks (parameter: type = value under profile {shown} (allowed)):")
    for nb in pipeline.notebook_paths():
        print(f"  {nb.stem}")
        for param, default in pipeline.declared_parameters(nb).items():
            if param != "profile":  # set with --profile, not -p
                print(f"    {pipeline.describe_parameter(param, values.get(param, default))}")
    if name:
        print(f"profile {name}:")
        for param, value in values.items():
            print(f"  {param} = {value!r}")
    else:
        print(f"profiles: {', '.join(PROFILE_NAMES)} (`sae-repro list --profile NAME` shows one's values)")
    print("figures:")
    for name in [name] if name else PROFILE_NAMES:
        path = figures_dir(name) / "manifest.json"
        manifest = read_json(path)
        for fig_id, e in sorted(manifest.items()):
            if e["profile"] == name:
                stale = "  STALE" if e.get("stale") else ""
                print(f"  {fig_id} ({name}, {e['notebook']}, {e['time']}){stale}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sae-repro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks with papermill under a profile",
                       description="Run the notebooks under a profile; a notebook whose inputs are unchanged "
                                   "since its last successful run is skipped. Figures are published only by "
                                   "a notebook that finishes.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--profile", default="default", choices=PROFILE_NAMES,
                   help="ci: the tiny random model, ~4 min; quick: a SmolLM2-135M preview, ~9 min cold; "
                        "default: the committed figures/ on SmolLM2-135M (cold time: the Reproducibility page); "
                        "full: GPT-2 small from the hub, for a GPU (times on this project's 2-core machine; "
                        "`sae-repro list --profile NAME` shows a profile's values)")
    r.add_argument("--only", action="append", metavar="NOTEBOOK",
                   help="run only this notebook (repeatable; default: all)")
    r.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                   help="override one parameter (a Python literal, else a string); checked with the "
                        "profile's other values before any notebook starts")
    r.add_argument("--force", action="store_true", help="rerun even if inputs are unchanged")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run up to N independent notebooks in parallel processes")
    r.add_argument("--dry-run", action="store_true",
                   help="say which notebooks would run and why (parameters checked), and run none")
    sub.add_parser("book", help="build the HTML book from the executed notebooks")
    ls = sub.add_parser("list", help="show notebooks, profiles and figures")
    ls.add_argument("--profile", choices=PROFILE_NAMES, default=None,
                    help="show this profile's values (default: every profile, notebooks at `default`)")
    args = ap.parse_args(argv)
    # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored: restore it,
    # so that Ctrl-C or `kill -INT` stops a run cleanly (nothing published) however it was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.cmd == "run" and args.dry_run:
            for name, why in pipeline.pending(args.profile, args.only, {k: _value(v) for k, v in args.p}):
                detail = "current" if why is None and not args.force else f"would run ({why or '--force'})"
                print(f"[sae-repro] {name} ({args.profile}): {detail}", flush=True)
        elif args.cmd == "run":
            pipeline.run(args.profile, args.only, {k: _value(v) for k, v in args.p}, args.force,
                         jobs=args.jobs)
        elif args.cmd == "book":
            from sae_repro import book

            book.build()
        else:
            _list(args.profile)
    except (pipeline.RunInterrupted, KeyboardInterrupt) as e:
        # the dead kernel's pending tasks would log tracebacks at exit: the summary says it all
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print(f"sae-repro: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except (pipeline.NotebookFailed, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"sae-repro: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
