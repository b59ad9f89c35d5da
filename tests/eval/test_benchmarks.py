"""The benchmark registry, its Hydra configs (names, lists, suites) and source detection."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from aero_lightning.eval.benchmarks import BENCHMARKS, SUITES, BenchmarkSpec, get_benchmark
from aero_lightning.eval.sources import _answer_index, detect_format

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=["ckpt=x", *overrides])


def test_every_registry_entry_has_a_config_and_every_config_a_registry_entry():
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (CONF / "benchmark").glob("*.yaml")}
    singles = {name for name in files if name not in SUITES}
    assert singles == set(BENCHMARKS)
    for name in singles:
        assert list(files[name]) == [name], f"conf/benchmark/{name}.yaml must nest its options under '{name}'"
    for suite, members in SUITES.items():
        assert files[suite]["defaults"] == list(members)


def test_open_asr_is_the_leaderboard_eight_from_esb():
    assert len(SUITES["open_asr"]) == 8
    for name in SUITES["open_asr"]:
        spec = get_benchmark(name)
        assert spec.task == "asr" and spec.hf_id == "hf-audio/esb-datasets-test-only-sorted"
    assert get_benchmark("librispeech_test_other").hf_split == "test.other"
    refs = [get_benchmark(n).reference for n in SUITES["open_asr"] if get_benchmark(n).reference is not None]
    assert sum(refs) / len(refs) == pytest.approx(5.64, abs=0.01)  # Aero blog: mean of its six sets


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("demo", ["demo"]),
        ("tedlium", ["tedlium"]),
        ("[ami,tedlium]", ["ami", "tedlium"]),
        ("open_asr", list(SUITES["open_asr"])),
        ("[open_asr,librispeech_longform]", [*SUITES["open_asr"], *SUITES["librispeech_longform"]]),
        ("[mmau_test_mini,air_bench_foundation]", ["mmau_test_mini", *SUITES["air_bench_foundation"]]),
    ],
)
def test_benchmark_selection_composes(selection, expected):
    cfg = _compose_eval(f"benchmark={selection}")
    assert list(cfg.benchmark) == expected


def test_benchmark_options_are_overridable():
    cfg = _compose_eval(
        "benchmark=open_asr", "benchmark.tedlium.source=/data/ted", "benchmark.ami.max_samples=10"
    )
    assert cfg.benchmark.tedlium.source == "/data/ted" and cfg.benchmark.ami.max_samples == 10
    assert cfg.benchmark.ami.prompt == cfg.asr_prompt
    assert _compose_eval("benchmark=mmau_test_mini").benchmark.mmau_test_mini.prompt.startswith("Answer with")


def test_detect_format(tmp_path):
    assert detect_format("hf-audio/esb-datasets-test-only-sorted") == "hub"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(tmp_path / "missing")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    assert detect_format(tmp_path / "shards") == "shards"
    (tmp_path / "x.jsonl").write_text("")
    assert detect_format(tmp_path / "x.jsonl") == "jsonl"
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a known benchmark layout"):
        detect_format(tmp_path / "other")


def test_answer_index_forms():
    choices = ["dog", "Cat", "B"]
    assert _answer_index("Cat", choices, "text") == 1
    assert _answer_index("cat", choices, "text") == 1  # case-insensitive fallback
    assert _answer_index(2, choices, "text") == 2  # an int is an index
    assert _answer_index("A", choices, "letter") == 0
    assert _answer_index("B", choices, "text") == 2  # a one-letter option's text wins over the letter
    assert _answer_index("bird", choices, "text") is None
    assert _answer_index(5, choices, "index") is None


def test_invalid_spec_is_rejected():
    with pytest.raises(ValueError, match="choices column"):
        BenchmarkSpec(name="x", task="choice", description="", columns={"question": "q", "answer": "a"})
    with pytest.raises(KeyError, match="known"):
        get_benchmark("nope")
