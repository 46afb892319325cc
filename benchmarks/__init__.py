"""Side-by-side measurements: ``python -m benchmarks NAME [--quick]``.

Each benchmark module exposes ``run(quick: bool) -> dict``; it prints its own table as it goes and
returns the summary figures, which ``__main__`` prints as one JSON object on the last line.
"""
