"""The suites and what the report makes of them: the one place that names a suite's tests.

A suite is a file under ``suites/`` whose tests carry its marker; each test records under its
function's name (a record's ``test``, up to its parameters). The report's parts read records by
the names below: the headline's sections (``report.headline``), the plots (``report.plots``),
the side-by-side table of several runs (``report.markdown``) and gpu-check's verdict
(``gpucheck``). A test the catalog does not know is a user's own: the terminal prints its full
table instead of a headline.

A new suite is its file and one entry in ``SUITES``: its marker, what it measures, and its tests
with the parts of the report that read each (none: the report's full table only). A part that
reads a new test names it here, as ``catalog.<NAME>``, never as a string of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

# The built-in suites' tests, by what they measure.
TRAINABLE_PARAMETERS = "test_trainable_parameters"
PUBLISHED_COUNTS = "test_published_counts"
WEIGHT_STORAGE = "test_weight_storage"
STEP_MEMORY = "test_step_memory"
STEP_MEMORY_8BIT = "test_step_memory_with_an_8bit_state"
STEP_PEAK_MEMORY = "test_step_peak_memory"
PAGED_OPTIMIZER = "test_paged_optimizer_under_pressure"
ANALYTIC_PUBLISHED_SHAPES = "test_analytic_step_of_published_shapes"
STEP_TIME = "test_step_time"
BASE_BUILD_TIME = "test_base_build_time"
HARNESS_OVERHEAD = "test_harness_overhead"
MERGE_FULL_PRECISION = "test_merge_full_precision"
MERGE_QUANTIZED = "test_merge_quantized"
MERGE_TRAINED = "test_merge_on_a_trained_model"
SAVE_AND_RELOAD = "test_save_and_reload"
WEIGHTED_ADAPTERS = "test_weighted_adapters"
BASE_LEARNT_TASK_A = "test_the_base_has_learnt_task_a"
FORGETTING_LORA = "test_forgetting_lora"
FORGETTING_FULL = "test_forgetting_full_finetuning"
SERVING_LATENCY = "test_serving_latency"
MIXED_ADAPTER_BATCH = "test_mixed_adapter_batch"
ADAPTER_FILE = "test_adapter_file"
BASE_QUALITY = "test_base_quality"
QUALITY_LORA = "test_quality_lora"
QUALITY_FULL = "test_quality_full_finetuning"


@dataclass(frozen=True)
class Suite:
    """One suite: its marker, what it measures, and each test with the parts of the report that read it."""

    marker: str
    about: str
    tests: dict[str, tuple[str, ...]]

    @property
    def name(self) -> str:
        """The suite's short name, as records and ``-m`` give it (``memory`` for ``lora_memory``)."""
        return self.marker.removeprefix("lora_")


SUITES = (
    Suite("lora_params", "trainable and total parameters", {
        TRAINABLE_PARAMETERS: ("headline: parameters", "side by side"),
        PUBLISHED_COUNTS: ("headline: published counts",),
    }),
    Suite("lora_memory", "memory of a training step", {
        WEIGHT_STORAGE: ("headline: memory", "plot: memory"),
        STEP_MEMORY: ("headline: memory", "plot: memory", "side by side"),
        STEP_MEMORY_8BIT: ("headline: memory",),
        STEP_PEAK_MEMORY: ("headline: memory", "plot: memory", "gpu-check"),
        PAGED_OPTIMIZER: (),
        ANALYTIC_PUBLISHED_SHAPES: (),
    }),
    Suite("lora_step_time", "training step time", {
        STEP_TIME: ("headline: speed", "plot: speed", "side by side", "gpu-check"),
        BASE_BUILD_TIME: ("gpu-check",),
        HARNESS_OVERHEAD: ("gpu-check",),
    }),
    Suite("lora_merge", "correctness of weight merging", {
        MERGE_FULL_PRECISION: ("headline: merge", "plot: merge"),
        MERGE_QUANTIZED: ("headline: merge", "plot: merge"),
        MERGE_TRAINED: ("headline: merge", "side by side"),
        SAVE_AND_RELOAD: (),
        WEIGHTED_ADAPTERS: (),
    }),
    Suite("lora_forgetting", "forgetting and learning", {
        BASE_LEARNT_TASK_A: ("headline: forgetting",),
        FORGETTING_LORA: ("headline: forgetting", "plot: forgetting", "side by side"),
        FORGETTING_FULL: ("headline: forgetting", "plot: forgetting", "side by side"),
    }),
    Suite("lora_serving", "latency and files of a trained adapter, merged and unmerged", {
        SERVING_LATENCY: ("headline: serving",),
        MIXED_ADAPTER_BATCH: (),
        ADAPTER_FILE: (),
    }),
    Suite("lora_quality", "quality of the fine-tune per format, rank, learning rate and init", {
        BASE_QUALITY: ("headline: quality", "side by side"),
        QUALITY_LORA: ("headline: quality", "plot: quality", "side by side"),
        QUALITY_FULL: ("headline: quality", "plot: quality"),
    }),
)

def built_in_tests() -> frozenset[str]:
    """Every test of the built-in suites (a record of any other is a user's own)."""
    return frozenset(test for suite in SUITES for test in suite.tests)


def readers(test: str) -> tuple[str, ...]:
    """The parts of the report that read a test's records (empty for a test of no built-in suite)."""
    return next((suite.tests[test] for suite in SUITES if test in suite.tests), ())
