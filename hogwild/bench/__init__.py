"""The benchmarks of `hogwild bench`, in `common` until they are split into one module per command."""
