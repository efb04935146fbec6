"""``python -m jaxgrad.bench``: every gradient strategy timed side by side in one run."""

from jaxgrad.bench.run import format_table, machine_description, run_suite
from jaxgrad.bench.suite import CASES, STRATEGIES

__all__ = ["CASES", "STRATEGIES", "format_table", "machine_description", "run_suite"]
