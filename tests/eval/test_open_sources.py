"""Open-task sources: an HF copy with one caption per row joined by its group_by column (AudioCaps), reference
fields of JSON Lines rows, and accounting of the joined rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from aero_lightning.data.rejects import RejectCounter
from aero_lightning.eval.benchmarks import get_benchmark, spec_from_options
from aero_lightning.eval.sources import iter_items, source_size


def _wav(path, seconds, seed):
    sf.write(
        path,
        (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32),
        16000,
    )
    return str(path)


def test_audiocaps_rows_are_joined_by_youtube_id(tmp_path):
    datasets = pytest.importorskip("datasets")
    a, b = _wav(tmp_path / "a.wav", 0.5, 0), _wav(tmp_path / "b.wav", 0.3, 1)
    rows = {  # AudioCaps' layout: one caption per row, the clip's rows not adjacent
        "audiocap_id": [1, 2, 3, 4, 5],
        "youtube_id": ["yA", "yB", "yA", "yA", "yB"],
        "start_time": [0, 30, 0, 0, 30],
        "audio": [a, b, a, a, b],
        "caption": ["a dog barks", "rain falls", "a dog is barking", "barking", "heavy rain"],
    }
    folder = tmp_path / "hf"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    spec = get_benchmark("audiocaps_test")
    rejects = RejectCounter()
    items = list(iter_items(spec, source=str(folder), rejects=rejects))
    assert [(i.key, i.references, i.num_rows) for i in items] == [
        ("yA", ("a dog barks", "a dog is barking", "barking"), 3),
        ("yB", ("rain falls", "heavy rain"), 2),
    ]
    assert items[0].duration_s == pytest.approx(0.5) and not rejects
    assert source_size(spec, str(folder)) == 5  # rows: the accounting adds up the rows behind each item


def test_jsonl_reference_fields_and_a_row_without_one(tmp_path):
    _wav(tmp_path / "a.wav", 0.2, 2)
    rows = [
        {"audio": "a.wav", "answer": ["yes", "yeah"], "question": "Is it loud?", "context": "loud"},
        {"audio": "a.wav", "label": "dog", "id": "k2"},
        {"audio": "a.wav", "captions": ["one", "two"]},
        {"audio": "a.wav", "question": "nothing to score against"},
    ]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_options("mine", {"task": "aqa", "source": str(path)})
    rejects = RejectCounter()
    items = list(iter_items(spec, source=str(path), rejects=rejects))
    assert [i.references for i in items] == [("yes", "yeah"), ("dog",), ("one", "two")]
    assert items[0].question == "Is it loud?" and items[0].context == "loud" and items[1].key == "k2"
    assert dict(rejects) == {"missing_text": 1}
    with pytest.raises(ValueError, match="needs benchmark.mine.source"):
        spec_from_options("mine", {"task": "aqa"})
    assert spec_from_options("labels", {"task": "classify", "source": "x", "labels": ["a", "b"]}).labels == (
        "a",
        "b",
    )
