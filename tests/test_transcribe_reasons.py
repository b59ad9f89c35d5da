"""transcribe_files lists a 0-byte file and a WAV cut inside its data with their own reasons, beside a good file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from aero_lightning.eval.decode import GenerationOptions
from aero_lightning.tasks.transcribe import transcribe_files


def test_an_empty_file_and_a_truncated_wav_are_listed_with_their_reasons(model, tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, 0.3 * np.sin(np.arange(16000) / 9).astype(np.float32), 16000, subtype="PCM_16")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[: 44 + 2 * 6000])  # the header promises 16 000 frames, 6 000 follow
    model.eval()
    out = transcribe_files(
        model, [good, empty, cut], options=GenerationOptions(max_new_tokens=2), progress=False
    )
    by_name = {Path(r["path"]).name: r for r in out["records"]}
    assert "text" in by_name["good.wav"]
    assert (by_name["empty.wav"]["reason"], by_name["cut.wav"]["reason"]) == ("empty_file", "truncated_file")
    assert by_name["empty.wav"]["error"] == f"{empty}: the file is empty (0 bytes)"
    assert (
        by_name["cut.wav"]["error"]
        == f"{cut}: the audio data stops after 6000 of the 16000 frames its header gives"
    )
    assert out["failed_by_reason"] == {"empty_file": 1, "truncated_file": 1}
