"""Entry point: ``python -m benchmarks NAME [--quick]`` runs benchmarks/NAME.py."""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    """Benchmark names: the modules of this package that define ``run``."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if "\ndef run(" in (here / f"{m.name}.py").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=available())
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", help="results directory (benchmark 'all' only; default results/)")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"benchmarks.{args.name}")
    summary = module.run(quick=args.quick, **({"out": args.out} if args.out else {}))
    sys.stdout.flush()
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
