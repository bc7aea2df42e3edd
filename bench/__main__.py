"""`python -m bench <op> [options]`: time longattn's kernels against their peers on a CUDA GPU."""
from __future__ import annotations

import argparse
import signal
import sys

from . import autotune, flash, memory, mla, moba, nsa, profile, rollout
from .common import NoCudaError, every_autotuner_compiling_ahead, write_unfinished

SUITES = {"flash": flash, "moba": moba, "nsa": nsa, "mla": mla, "memory": memory, "profile": profile,
          "rollout": rollout, "autotune": autotune}  # autotune last: it lists what the others tuned


def parser() -> tuple:
    """The command line's parser and its sub-parsers (one per op)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="op", required=True)
    for name, mod in SUITES.items():
        mod.add_args(sub.add_parser(name, help=mod.__doc__.splitlines()[0]))
    all_p = sub.add_parser("all", help="every benchmark with its default options")
    all_p.add_argument("--out", default=None)
    return parser, sub


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser_, sub = parser()
    args = parser_.parse_args(argv)
    # a time limit's SIGTERM (gpu_suite.sh's `timeout`) stops a run as Ctrl-C does: the rows measured so far are
    # written (see Results), also when a benchmark fails part-way
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with every_autotuner_compiling_ahead():
            if args.op == "all":
                for name, mod in SUITES.items():
                    print(f"== {name}")
                    sub_args = sub.choices[name].parse_args(["--out", args.out] if args.out else [])
                    mod.run(sub_args, [name] + (["--out", args.out] if args.out else []))
            else:
                SUITES[args.op].run(args, argv)
    except NoCudaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    finally:
        write_unfinished()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
