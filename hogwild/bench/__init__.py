"""The benchmarks, one module per `hogwild bench` command: `decode` (one stream against transformers and llama.cpp,
the latter through `hogwild.llamacpp`), `workers` (W workers over one shared prompt), `batch` (P collaborations in
flight at once) and `quality` (what each weights choice costs against fp32 weights); `common` holds what the
decode-speed ones share, and `bench shape` lives with the GGUF writer it runs, `hogwild.model.synthetic`. Each
prints one table measured side by side in one run: progress on stderr, the table or `--json` on stdout.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `hogwild bench` and its commands: decode, workers, batch, quality and shape."""
    # here, not at the top: importing one bench (tests use quality.greedy) loads none of the others
    from hogwild.bench import batch, decode, quality, workers
    from hogwild.model import synthetic

    bench = sub.add_parser(
        "bench",
        help="decode-speed benchmarks against transformers",
        description="Decode-speed benchmarks. Each prints one table measured side by side in one run (progress on "
        "stderr, the table or --json on stdout).",
    )
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for command in (decode, workers, batch, quality, synthetic):
        command.add_parser(benches)
