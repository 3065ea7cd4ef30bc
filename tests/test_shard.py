"""Sharding a matrix over machines (``--lora-shard=K/N``) and joining the shards (``pytest-lora merge``).

The shards of a small matrix of the built-in parameter and memory suites, run one after another
here as three machines would run them, must hold exactly the records of the unsharded run (the
numbers these suites record are deterministic; single-shot timings aside), with every base's
tests in one shard.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from pytest_lora import cli
from pytest_lora.dist import shard
from pytest_lora.models import registry
from pytest_lora.results.identity import config_key

SMALL = ("--lora-models=llama-3.2-1b-tiny,gpt2-medium-tiny", "--lora-quant=none,nf4", "--lora-ranks=8", "--lora-targets=default",
         "-m", "lora_params or lora_memory", "-p", "no:cacheprovider")
TIMINGS = {"count_time_s"}


def run(pytester, results: str, *args: str) -> dict:
    result = pytester.runpytest("--lora-bench", *SMALL, f"--lora-results={results}", *args)
    assert result.ret == 0, result.stdout.str()[-3000:]
    return json.loads((pytester.path / results / "latest.json").read_text())


def measured(records: list[dict]) -> dict:
    return {config_key(r): (r["status"], {k: v for k, v in r["metrics"].items() if k not in TIMINGS}) for r in records}


@pytest.mark.slow
def test_three_shards_merged_hold_the_records_of_the_unsharded_run(pytester):
    whole = run(pytester, "whole")
    shards = [run(pytester, f"shard{k}", f"--lora-shard={k}/3") for k in (1, 2, 3)]
    assert [s["run"]["shard"] for s in shards] == ["1/3", "2/3", "3/3"] and "shard" not in whole["run"]
    assert all(s["records"] for s in shards)
    bases = [{(r["model"], r["quant"]) for r in s["records"] if r["workload"] or r["suite"] == "memory"} for s in shards]
    assert not (bases[0] & bases[1] or bases[0] & bases[2] or bases[1] & bases[2])  # a base is built in one shard only
    out = pytester.path / "joined" / "run.json"
    assert cli.main(["merge", *(str(pytester.path / f"shard{k}") for k in (1, 2, 3)), "-o", str(out)]) == 0
    joined = json.loads(out.read_text())
    assert len(joined["records"]) == len(whole["records"]) > 20
    assert measured(joined["records"]) == measured(whole["records"])
    counted = joined["run"]["builds"]
    assert sorted(counted, key=str) == sorted(whole["run"]["builds"], key=str)
    assert counted and all(build["count"] == 1 for build in counted)  # each base built once, in one shard
    assert joined["run"]["status"] == "passed" and [s["shard"] for s in joined["run"]["shards"]] == ["1/3", "2/3", "3/3"]
    assert (out.parent / "run.md").read_text().startswith(f"# pytest-lora run {joined['run']['id']}")


def item(model: str | None, quant: str | None, module: str = "suites/test_memory.py", tokens: int | None = None):
    params = {}
    if model:
        params["model_spec"] = SimpleNamespace(id=model, config_dict=lambda: {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000})
    if quant:
        params["quant_spec"] = SimpleNamespace(id=quant)
    if tokens:
        params["workload_spec"] = SimpleNamespace(tokens=tokens)
    return SimpleNamespace(callspec=SimpleNamespace(params=params), nodeid=f"{module}::test_x[{model}-{quant}-{tokens}]")


def test_every_test_is_in_exactly_one_shard_with_its_base_and_the_shards_balance():
    items = [item(m, q, tokens=t) for m in ("a", "b", "c") for q in ("bf16", "nf4", "int8") for t in (128, 2048)]
    items += [item(None, None, module="suites/test_params.py"), item(None, "nf4", module="suites/test_merge.py")]
    empty = item(None, None, module="suites/test_merge.py")  # an empty parametrization leaves NOTSET in callspec.params
    empty.callspec.params.update(model_spec=object(), quant_spec=object())
    assert shard.group_of(empty) == "module:suites/test_merge.py" and shard.cost_of(empty, {}) == shard.NO_MODEL_COST
    chosen = [shard.select(items, k, 4)[0] for k in (1, 2, 3, 4)]
    assert sorted(id(i) for part in chosen for i in part) == sorted(id(i) for i in items)
    groups = [{shard.group_of(i) for i in part} for part in chosen]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == 11  # 9 bases + 2 modules, none split
    sizes: dict = {}
    loads = [sum(shard.cost_of(i, sizes) for i in part) for part in chosen]
    heaviest_group = 2 * shard.parameter_estimate({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000}) * (2048 + 128) / 2
    assert max(loads) - min(loads) <= heaviest_group * 2  # LPT: within one group of each other
    assert shard.select(list(reversed(items)), 2, 4)[0] == [i for i in reversed(items) if i in chosen[1]]  # order-independent


def test_the_parameter_estimate_is_near_the_published_sizes():
    """GPT-2 medium has 354.8M parameters (its 1M position embeddings left out here), Llama-3.1-8B 8.03B
    (grouped-query attention makes its k and v smaller than the estimate's 4h^2)."""
    assert shard.parameter_estimate(registry.load_config_dict("gpt2-medium")) == pytest.approx(354.8e6, rel=0.01)
    assert shard.parameter_estimate(registry.load_config_dict("llama-3.1-8b")) == pytest.approx(8.03e9, rel=0.05)


@pytest.mark.parametrize("value", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_a_bad_shard_is_a_usage_error(pytester, value):
    result = pytester.runpytest("--lora-bench", *SMALL, f"--lora-shard={value}")
    assert result.ret == 4
    result.stderr.fnmatch_lines([f"*--lora-shard: {value!r} is not a shard; allowed: K/N with 1 <= K <= N, e.g. 2/4*"])


def document(records: list[dict], **machine) -> dict:
    return {"schema_version": 1, "run": {"id": "x", "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T01:00:00+00:00",
                                         "git": {"commit": "abc", "dirty": False}, "status": "passed", "argv": []},
            "machine": {"device": "cpu", "cpu": "c", "torch": "2.13.0", **machine}, "records": records}


RECORD = {"suite": "params", "test": "t.py::test_a[x]", "model": "m", "quant": "none", "lora": None, "workload": None, "status": "ok",
          "metrics": {"n": 1}, "units": {"n": "params"}, "error": None, "warnings": []}


def test_merge_refuses_what_would_make_one_run_a_lie(tmp_path, capsys):
    def write(name, data):
        (tmp_path / name).write_text(json.dumps(data))
        return str(tmp_path / name)

    other = dict(RECORD, test="t.py::test_a[y]")
    a, b = write("a.json", document([RECORD])), write("b.json", document([other]))
    same = write("same.json", document([RECORD]))
    newer = write("newer.json", document([other], torch="2.14.0"))
    old = write("old.json", dict(document([other]), schema_version=0))
    out = str(tmp_path / "run.json")
    for shards, why in (([a, same], "test_a[x] is in"), ([a, old], "schema_version 0"), ([a, newer], "torch 2.13.0 in")):
        assert cli.main(["merge", *shards, "-o", out]) == cli.USAGE_ERROR
        assert why in capsys.readouterr().err
    assert cli.main(["merge", a, b, "-o", str(tmp_path / "run.txt")]) == cli.USAGE_ERROR
    assert cli.main(["merge", a, newer, "-o", out, "--allow-mixed"]) == 0
    joined = json.loads((tmp_path / "run.json").read_text())
    assert [m["torch"] for m in joined["run"]["machines"]] == ["2.13.0", "2.14.0"] and len(joined["records"]) == 2
    failed = copy.deepcopy(document([other]))
    failed["run"]["status"] = "failed"
    assert cli.main(["merge", a, write("failed.json", failed), "-o", out]) == 0
    assert json.loads((tmp_path / "run.json").read_text())["run"]["status"] == "failed"
