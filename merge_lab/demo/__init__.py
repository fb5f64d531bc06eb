"""Built-in demo checkpoints (tiny widths, real key layouts) for `merge-lab demo` and the tests."""
