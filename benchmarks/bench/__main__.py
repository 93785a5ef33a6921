"""``python -m benchmarks.bench``: the command line."""
import argparse
import os
import sys

from . import __doc__ as PACKAGE_DOC
from .config import DEFAULT_OUT, NETWORKS, QUICK_NETWORKS
from .machine import wait_for_quiet
from .report import markdown
from .run import run, write


def main(argv=None):
    """Parse the options, run, write ``--out``.json/.md and print the markdown."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny network, 2 steps x 2 repeats: checks the wiring")
    p.add_argument("--out", default=None, help=f"output path without extension (default {DEFAULT_OUT}; "
                                               "--quick writes only when given)")
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="torch and ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--networks", default=None, help="comma-separated subset of: "
                   + ", ".join(n["name"] for n in NETWORKS + QUICK_NETWORKS))
    p.add_argument("--no-sweep", action="store_true", help="skip the ONNX Runtime settings sweep")
    p.add_argument("--batches", default=None, help="comma-separated subset of the batch sizes (default: all)")
    p.add_argument("--default", default=None, help="new sampler default SOLVER:GRID:STEPS[:ETA] timed against the "
                   "old one (100 ancestral DDIM steps) on the shipped model (default: its own config)")
    p.add_argument("--max-load", type=float, default=None, help="first wait until the 1-min load is below this")
    p.add_argument("--wait", type=float, default=600, help="longest wait for --max-load, seconds")
    a = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.max_load is not None:
        wait_for_quiet(a.max_load, a.wait, log)
    from benchmarks.defaults import parse_default

    default = parse_default(a.default) if a.default else None
    res = run(quick=a.quick, threads=a.threads, networks=a.networks.split(",") if a.networks else None,
              sweep=not a.no_sweep, log=log, default=default,
              batches=[int(b) for b in a.batches.split(",")] if a.batches else None)
    out = a.out or (None if a.quick else DEFAULT_OUT)
    if out:
        write(res, out)
        log(f"wrote {out}.json and {out}.md")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
