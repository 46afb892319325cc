"""Harnesses the test suite and the benchmarks share: real faults (process kills) and emulated
hosts (network namespaces). Nothing here is imported by training code."""
