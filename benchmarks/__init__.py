"""Load tests and side-by-side benchmarks (``detserve bench``); see benchmarks/README.md."""
