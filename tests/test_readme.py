"""The README states what the code does: its corpora table is the registry's, and its direct-use snippet for an
exported model runs as written and prints the pipeline's text."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import soundfile as sf
from helpers.aero_runs import SENTENCES, speak, write_lightning_run

from aero_lightning.data.corpora import corpora_markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_corpora_table_is_the_registry():
    assert corpora_markdown_table().strip() in README.read_text(encoding="utf-8")


def readme_python_block(marker: str) -> str:
    """The README's one ```python block that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


# Runs in a child process that cannot import aero_lightning (as in tests/hf/test_export.py): executes the README's
# snippet as written in the current folder (exported/demo, speech.flac), capturing what it prints, then the pipeline
# on the same file with the same budget.
CHILD = r"""
import contextlib, importlib.util, io, json, sys
repo, snippet = sys.argv[1], open(sys.argv[2]).read()
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if not (p.rstrip("/") == repo or (p.startswith(repo + "/") and "/.venv/" not in p))]
assert importlib.util.find_spec("aero_lightning") is None, "aero_lightning is still importable"
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(compile(snippet, "README.md", "exec"), {"__name__": "__readme__"})
from transformers import pipeline
asr = pipeline("automatic-speech-recognition", model="exported/demo", trust_remote_code=True)
out = {
    "printed": printed.getvalue(),
    "pipeline": asr("speech.flac", max_new_tokens=64),
    "processor": type(__import__("transformers").AutoProcessor.from_pretrained("exported/demo", trust_remote_code=True)).__name__,
    "aero_modules": sorted(m for m in sys.modules if m.startswith("aero_lightning")),
}
print("RESULT " + json.dumps(out))
"""


def test_readme_direct_use_snippet_prints_the_pipeline_text(tiny_dir, tmp_path):
    from aero_lightning.hf.export import export

    snippet = readme_python_block("AutoProcessor.from_pretrained")
    assert '"exported/demo"' in snippet and '"speech.flac"' in snippet and "max_new_tokens=64" in snippet
    ckpt = write_lightning_run(tmp_path / "run", tiny_dir, seed=3, plain_text=True)
    work = tmp_path / "work"
    export(ckpt, work / "exported" / "demo")
    sf.write(work / "speech.flac", speak(SENTENCES[0]), 16000)
    (tmp_path / "snippet.py").write_text(snippet)
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "child.py"), str(ROOT), str(tmp_path / "snippet.py")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    assert child["aero_modules"] == [] and child["processor"] == "AeroProcessor"
    text = child["pipeline"]["text"]
    assert text  # not vacuous
    assert child["printed"] == text + "\n"
