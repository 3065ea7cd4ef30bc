"""What one record costs the results store, at the start of a run and 10,000 records in.

Each ``ResultsStore.put`` appends the record to the run's log and fsyncs it (``results.runlog``),
so its cost should not grow with the run. This times every put of a 10,000-record run into a
real directory (the disk's fsync included) and prints the median and the quartiles of records
1-100 and 9,901-10,000, and their ratio; ``--json PATH`` writes them too. It asserts nothing:
the figures go to the notes and the README. Run it with ``make store-bench`` (about a minute on
a disk whose fsync takes 2 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pytest_lora.results.store import ResultsStore

RECORDS = 10_000
WINDOW = 100


def a_record(index: int) -> dict:
    """A step-time record of the built-in suites' size: a case, twelve metrics, ten samples."""
    samples = [0.0123 + 0.0001 * (step % 7) for step in range(10)]
    return {"suite": "step_time", "test": f"suites/test_step_time.py::test_step_time[case-{index}]", "model": "llama-3.2-1b-tiny",
            "quant": "nf4", "lora": {"r": 16, "alpha": 32.0, "targets": "all-linear", "dropout": 0.05, "variant": "lora", "bias": "none",
                                     "modules_to_save": []},
            "workload": {"seq_len": 64, "batch": 2, "grad_ckpt": False, "compile": False, "optimizer": "adamw"}, "status": "ok",
            "metrics": {f"metric_{k}": 1.0 + k for k in range(12)}, "units": {f"metric_{k}": "s" for k in range(12)}, "error": None,
            "warnings": [], "samples": {"step_time_median_s": samples, "tokens_per_s": [128 / s for s in samples]}}


def quartiles(values: list[float]) -> dict[str, float]:
    low, median, high = statistics.quantiles(values, n=4)
    return {"median_ms": median * 1e3, "q1_ms": low * 1e3, "q3_ms": high * 1e3}


def measure(directory: Path, records: int = RECORDS) -> dict:
    store = ResultsStore(directory, {"id": "bench", "status": "running", "builds": []}, {"device": "cpu"})
    seconds = []
    for index in range(records):
        record = a_record(index)
        start = time.perf_counter()
        store.put(record)
        seconds.append(time.perf_counter() - start)
    first, last = quartiles(seconds[:WINDOW]), quartiles(seconds[-WINDOW:])
    return {"records": records, "first_100": first, "last_100": last, "ratio_of_medians": last["median_ms"] / first["median_ms"],
            "log_bytes": store.log.path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", help="where the log is written (default: a temporary directory)")
    parser.add_argument("--json", help="also write the figures here")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=arguments.directory) as directory:
        figures = measure(Path(directory))
    for window in ("first_100", "last_100"):
        shown = figures[window]
        print(f"records {window.replace('_', ' ')}: median {shown['median_ms']:.3f} ms (IQR {shown['q1_ms']:.3f}-{shown['q3_ms']:.3f})")
    print(f"last / first median: {figures['ratio_of_medians']:.2f}; log {figures['log_bytes']:,d} bytes for {figures['records']:,d} records")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
