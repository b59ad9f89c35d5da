"""Long-form LibriSpeech: chapters of a generated folder in the official layout, re-joined in utterance order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.aero_runs import speak

from aero_lightning.data.audio_io import load_audio
from aero_lightning.eval.benchmarks import get_benchmark
from aero_lightning.eval.longform import librispeech_chapters, load_longform_audio, utterance_order
from aero_lightning.eval.sources import detect_format, iter_items

# speaker 1089, chapter 134686: utterances written out of order on disk (0010 before 0002 in the transcript file)
CHAPTERS = {
    ("1089", "134686"): {
        10: "he hoped there would be stew for dinner",
        2: "turnips and carrots",
        1: "stuff it into you",
    },
    ("121", "121726"): {0: "also a popular contrivance", 1: "whereby love making may be suspended"},
}


@pytest.fixture(scope="module")
def libri_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ls") / "LibriSpeech" / "test-clean"
    for (spk, chap), utts in CHAPTERS.items():
        folder = root / spk / chap
        folder.mkdir(parents=True)
        lines = []
        for i, (num, text) in enumerate(utts.items()):
            key = f"{spk}-{chap}-{num:04d}"
            sf.write(folder / f"{key}.flac", speak(text, voice=i), 16000)
            lines.append(f"{key} {text.upper()}")
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    # a third chapter whose second utterance has no audio: skipped whole, with the reason
    broken = root / "7" / "99"
    broken.mkdir(parents=True)
    sf.write(broken / "7-99-0000.flac", speak("first part"), 16000)
    (broken / "7-99.trans.txt").write_text("7-99-0000 FIRST PART\n7-99-0001 MISSING AUDIO\n")
    return root


def test_utterance_order():
    assert utterance_order("1089-134686-0012") == ("1089-134686", 12)
    with pytest.raises(ValueError):
        utterance_order("not-a-key")


def test_chapters_are_rejoined_in_utterance_order(libri_root):
    chapters, rejected = librispeech_chapters(libri_root)
    assert [c.key for c in chapters] == ["1089-134686", "121-121726"]
    first = chapters[0]
    assert first.utterance_keys == ("1089-134686-0001", "1089-134686-0002", "1089-134686-0010")
    assert first.text == "STUFF IT INTO YOU TURNIPS AND CARROTS HE HOPED THERE WOULD BE STEW FOR DINNER"
    assert [Path(p).name for p in first.audio_paths] == [f"{k}.flac" for k in first.utterance_keys]
    assert rejected == [
        {"key": "7-99", "reason": "missing_audio", "detail": "utterances without audio: ['7-99-0001']"}
    ]
    # the audio is the utterances' audio back to back, in the same order
    joined = load_longform_audio(first)
    parts = [load_audio(p) for p in first.audio_paths]
    np.testing.assert_array_equal(joined, np.concatenate(parts))
    gap = load_longform_audio(first, gap_s=0.5)
    assert len(gap) == len(joined) + 2 * 8000


def test_longform_benchmark_reads_the_folder(libri_root):
    spec = get_benchmark("librispeech_longform_test_clean")
    assert detect_format(libri_root) == "librispeech"
    rejects: Counter = Counter()
    items = list(iter_items(spec, source=libri_root, rejects=rejects))
    assert [i.key for i in items] == ["1089-134686", "121-121726"]
    assert items[1].reference == "ALSO A POPULAR CONTRIVANCE WHEREBY LOVE MAKING MAY BE SUSPENDED"
    assert items[0].duration_s > 3.0
    assert rejects == Counter({"missing_audio": 1})
    # the short-form benchmark reads the same folder utterance by utterance (the broken chapter's audio-less
    # utterance is skipped and counted, its other utterance kept)
    rejects = Counter()
    short = list(iter_items(get_benchmark("librispeech_test_clean"), source=libri_root, rejects=rejects))
    assert len(short) == 6 and rejects == Counter({"missing_audio": 1})


def test_longform_from_an_hf_copy_groups_rows_by_chapter(libri_root, tmp_path):
    """The HF layout (openslr/librispeech_asr rows with id / speaker_id / chapter_id) gives the same chapters."""
    datasets = pytest.importorskip("datasets")
    rows = {"audio": [], "text": [], "id": [], "speaker_id": [], "chapter_id": []}
    for flac in sorted(libri_root.rglob("*.flac"), reverse=True):  # rows in reverse order on purpose
        key = flac.stem
        spk, chap, _ = key.split("-")
        if spk == "7":
            continue
        text = dict(
            line.split(" ", 1) for line in flac.with_name(f"{spk}-{chap}.trans.txt").read_text().splitlines()
        )
        rows["audio"].append({"bytes": flac.read_bytes(), "path": flac.name})
        rows["text"].append(text[key])
        rows["id"].append(key)
        rows["speaker_id"].append(int(spk))
        rows["chapter_id"].append(int(chap))
    saved = tmp_path / "hf_ls"
    dataset = datasets.Dataset.from_dict(rows).cast_column(
        "audio", datasets.Audio()
    )  # struct -> Audio, no encoding
    dataset.save_to_disk(str(saved))
    assert detect_format(saved) == "hf_saved"
    from_hf = list(iter_items(get_benchmark("librispeech_longform_test_clean"), source=saved))
    from_folder = list(iter_items(get_benchmark("librispeech_longform_test_clean"), source=libri_root))
    assert [i.key for i in from_hf] == [i.key for i in from_folder]
    for a, b in zip(from_hf, from_folder):
        assert a.reference == b.reference
        np.testing.assert_array_equal(a.waveform, b.waveform)
