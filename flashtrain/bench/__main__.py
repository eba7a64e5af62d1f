"""``python -m flashtrain.bench <name> [args]``: run one benchmark.

Each benchmark is the module ``flashtrain.bench.<name>`` with ``main(argv) -> int``; it is
imported only when asked for, so one benchmark's heavy imports never slow another.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("allreduce", "costmodel", "throughput", "elastic", "chaos", "rehearsal", "recipe",
              "control", "data", "digest")
USAGE = f"usage: python -m flashtrain.bench <{'|'.join(BENCHMARKS)}> [options]  (--help per benchmark)"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"flashtrain.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"flashtrain.bench.{name}":
            raise  # a missing dependency inside the benchmark is a real error
        print(f"benchmark {name!r} is not available in this checkout "
              f"(no module flashtrain.bench.{name})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
