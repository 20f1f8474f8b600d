"""Benchmarks (being written)."""


def add_parser(sub, add_engine_arguments) -> None:
    pass
