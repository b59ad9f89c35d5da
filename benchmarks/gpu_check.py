"""One prepared command that checks the whole GPU path on one GPU in under 10 minutes (``make gpu-check``).

``benchmarks/gpu_check.sh`` runs this file; ``benchmarks/README.md`` says what every step checks. Steps, in order:

1. ``environment``: torch and its CUDA build, the device, ``torch.nn.attention.varlen``, liger-kernel, deepspeed,
   flash-attn (optional), espeak-ng, free disk; missing optional packages are reported, not fatal.
2. ``pytest_gpu``: ``pytest -m gpu tests``.
3. ``corpus``: a small corpus spoken by espeak-ng (``python -m aero_lightning.data.synth``) or, where espeak-ng is
   missing, synthetic tone waveforms written with the project's shard writer (the row says which).
4. ``components``: a Whisper-large-v3-shaped encoder and a Qwen2.5-1.5B-shaped LLM (vocabulary 151 936), random
   init, written with ``save_pretrained`` with a small BPE tokenizer trained on the corpus.
5. ``train_zero2``: ``train.py experiment=aero_full`` on those, 20 steps on 1 GPU (its own ZeRO-2 strategy), with
   validation loss and WER at steps 10 and 20, a checkpoint and test decoding.
6. ``transcribe``: a 15-minute recording transcribed in one pass from that checkpoint (RTFx, peak GPU memory).
7. ``train_zero3``, ``train_fsdp2``: the same for 3 steps with ``strategy=deepspeed_zero3`` / ``strategy=fsdp2``.
8. ``mfu``: ``benchmarks/mfu.py`` at Aero's shapes (random init from config), padded 4096 vs packed 32768, Liger
   off / on, MFU in both conventions, each row's timed loop capped. Last, so that it is the step the budget drops
   first (``python benchmarks/mfu.py`` reruns it alone).
9. With ``--devices N`` (N >= 2), ``preemption_drill``: ``train.py experiment=aero_full trainer.devices=N`` at tiny
   shapes, SIGUSR1 sent to every rank in the middle of a backward pass three times, each run bounded by a timeout:
   every signal gives ``hpc_ckpt_<step+1>``, every restart resumes from it, the ranks together train each step
   exactly once and nothing hangs.

Every step runs in its own process, under a timeout and a wall-clock budget for the whole check (``--budget-s``,
570 s by default, plus 600 s for the drill): a step that no longer fits is marked ``skipped (time budget)``. The
result goes to ``benchmarks/results/gpu_check_<device>.json`` and one table is printed. Exit status: 0 when no step
failed, 1 otherwise, 2 without CUDA (unless ``--dry-run``).

``--dry-run`` runs the same steps on the CPU at tiny shapes with fewer steps (the test suite runs it, so the script
cannot rot). Lightning's DeepSpeed strategies refuse a CPU accelerator, so the ZeRO-2 run uses ``strategy=ddp``
(one process) in their place and the ZeRO-3 run is ``skipped (needs CUDA)``; FSDP2 runs on the CPU as it is.

Internal subcommands (one process each, started by the steps above): ``_env``, ``_synthetic-corpus``,
``_components``, ``_transcribe``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

TORCH_PIN = "2.13.0"
INSTALL_HINT = f'pip install torch=={TORCH_PIN} --index-url https://download.pytorch.org/whl/cu128 && pip install -e ".[gpu,dev]"'
"""The install the check expects (the CUDA wheel of the pinned torch first, then the project's gpu and dev extras)."""

WORDS = (
    "the a one two three red green blue small large old new cat dog bird fish house river tree stone road city "
    "sees finds takes makes hears likes moves holds opens keeps near under over after before with from into "
    "quickly slowly again often never today morning evening light water music paper window garden table"
).split()
"""Vocabulary of the generated sentences (letters only, so espeak-ng and the demo's sentence filter accept them)."""

CORPUS_NAME = "gpu_check"
"""The corpus's name in ``data.train`` / ``data.val_dirs`` (TensorBoard tags ``val/gpu_check/...``)."""


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the GPU run or the CPU dry run."""

    shape: str  # components: "aero" (Whisper-large-v3 + Qwen2.5-1.5B shapes) or "tiny"
    corpus: tuple[int, int, int]  # train / validation / test utterances
    shard_size: int
    zero2_steps: int
    val_every: int
    short_steps: int  # ZeRO-3 and FSDP2
    packing_length: int
    buffer_size: int
    num_workers: int
    throughput_window: int
    mfu_args: tuple[str, ...]
    long_audio_s: float
    transcribe_new_tokens: int
    decode_new_tokens: int  # WER callback and test decoding of the train runs
    wer_samples: int
    drill_packing_length: int
    caps: dict  # step: (timeout, least time left to start it), seconds


GPU_PLAN = Plan(
    shape="aero",
    corpus=(256, 16, 8),
    shard_size=32,
    zero2_steps=20,
    val_every=10,
    short_steps=3,
    packing_length=32768,
    buffer_size=1024,
    num_workers=8,
    throughput_window=5,
    mfu_args=("--steps", "3", "--warmup", "2", "--docs", "400", "--max-seconds", "10"),
    long_audio_s=900.0,
    transcribe_new_tokens=128,
    decode_new_tokens=32,
    wer_samples=8,
    drill_packing_length=4096,
    # (timeout, least time left to start it) per step, seconds. Estimates for an H100/H200 with a local disk (never
    # measured: no GPU run yet): 20 s environment, 45 s pytest, 10 s corpus, 45 s components, 150 s ZeRO-2 (one 31 GB
    # checkpoint), 60 s transcription (the ZeRO checkpoint consolidated on the CPU), 75 s each ZeRO-3 / FSDP2, 90 s mfu
    caps={
        "environment": (120, 15),
        "pytest_gpu": (240, 60),
        "mfu": (180, 60),
        "corpus": (120, 20),
        "components": (240, 45),
        "train_zero2": (330, 150),
        "transcribe": (180, 60),
        "train_zero3": (240, 90),
        "train_fsdp2": (240, 90),
        "preemption_drill": (600, 120),
    },
)
DRY_PLAN = Plan(
    shape="tiny",
    corpus=(32, 8, 4),
    shard_size=8,
    zero2_steps=4,
    val_every=2,
    short_steps=2,
    packing_length=1024,
    buffer_size=32,
    num_workers=1,
    throughput_window=2,
    mfu_args=("--tiny", "--steps", "1", "--warmup", "0", "--padded-length", "512", "--packed-length", "1024"),
    long_audio_s=900.0,
    transcribe_new_tokens=8,
    decode_new_tokens=4,
    wer_samples=4,
    drill_packing_length=512,
    caps={
        "environment": (120, 10),
        "pytest_gpu": (240, 20),
        "mfu": (240, 20),
        "corpus": (120, 10),
        "components": (120, 10),
        "train_zero2": (300, 30),
        "transcribe": (180, 20),
        "train_zero3": (300, 30),
        "train_fsdp2": (300, 30),
        "preemption_drill": (900, 60),
    },
)
DRILL_SIGNAL_STEPS = (1, 3, 5)
"""``trainer.global_step`` values whose backward pass gets SIGUSR1 (one per run of the drill)."""
DRILL_MAX_STEPS = 8

STEPS = (
    "environment",
    "pytest_gpu",
    "corpus",
    "components",
    "train_zero2",
    "transcribe",
    "train_zero3",
    "train_fsdp2",
    "mfu",
    "preemption_drill",
)
SKIPPABLE = ("pytest_gpu", "mfu", "train_zero2", "transcribe", "train_zero3", "train_fsdp2")


@dataclass
class Row:
    """One step of the check, as it goes into the JSON and the table."""

    step: str
    what: str
    status: str = "skipped"
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)
    note: str = ""
    command: list[str] | None = None
    log: str | None = None
    log_tail: str | None = None


# ------------------------------------------------------------------------------------------------ helpers


def slugify(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia_h200"`` (the results file's suffix)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences of 5 to 12 words from :data:`WORDS`, capitalised with a full stop, deterministic."""
    import random

    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        sentence = " ".join(words).capitalize() + "."
        if sentence.casefold() not in seen:
            seen.add(sentence.casefold())
            out.append(sentence)
    return out


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def child_env(extra_pythonpath: list[Path] | None = None, cpu_only: bool = False) -> dict[str, str]:
    """The environment of every step: offline (no hub downloads), no SLURM or torchrun variables (the check starts
    its own processes, and Lightning launches the ranks itself), unbuffered output; ``cpu_only`` (the dry run) hides
    every GPU, so that a dry run is the same on a GPU machine."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_"))
        and k not in ("AERO_ROOT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT")
    }
    paths = [str(p) for p in (extra_pythonpath or [])]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env |= {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> int | None:
    """Run ``cmd`` in its own process group from the repository root, output to ``log``; the exit status, or None
    when it ran past ``timeout_s`` (then the whole group is killed: SIGTERM, SIGKILL 15 s later)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            out.write(f"\n[gpu_check] killed after {timeout_s:.0f} s (timeout)\n")
            return None


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``tb_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
    return out


def dir_size_gib(path: Path) -> float:
    path = path.resolve()
    if path.is_file():
        return path.stat().st_size / 2**30
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and x != x):  # None or NaN
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def strict_json(obj):
    """``obj`` with every NaN or infinity replaced by None (``json.dumps`` would write ``NaN``, which is not JSON)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _size(gib: float | None) -> str:
    if gib is None:
        return "n/a"
    return f"{gib:.1f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def key_numbers(row: Row) -> str:
    """The table's summary of a row's numbers."""
    n = row.numbers
    if not n:
        return ""
    if row.step == "environment":
        parts = [f"torch {n.get('torch')} (CUDA {n.get('torch_cuda')})", str(n.get("device"))]
        parts += [f"{k} {n.get(k)}" for k in ("varlen", "liger-kernel", "deepspeed", "flash-attn")]
        return ", ".join(parts)
    if row.step == "pytest_gpu":
        return f"{n.get('passed', 0)} passed, {n.get('failed', 0)} failed, {n.get('skipped', 0)} skipped"
    if row.step == "mfu":
        cells = [
            f"{name}: MFU {_fmt(r.get('mfu'))} / {_fmt(r.get('mfu_llm'))} (LLM), {r.get('tokens_per_s', 0):.0f} tok/s, "
            f"{_fmt(r.get('peak_mem_gib'), 1)} GiB"
            for name, r in n.get("rows", {}).items()
        ]
        return "; ".join(cells)
    if row.step == "corpus":
        return f"{n.get('source')}: {n.get('train')}/{n.get('validation')}/{n.get('test')} utterances, {n.get('hours', 0):.3f} h"
    if row.step == "components":
        return (
            f"encoder {n.get('encoder_params_m', 0):.4g}M ({n.get('encoder_shape')}), "
            f"LLM {n.get('llm_params_m', 0):.4g}M ({n.get('llm_shape')}, vocab {n.get('llm_vocab')}), "
            f"tokenizer {n.get('tokenizer_size')}"
        )
    if row.step.startswith("train_"):
        return (
            f"step {n.get('global_step')}, loss {_fmt(n.get('loss_first'))} -> {_fmt(n.get('loss_last'))}, "
            f"{_fmt(n.get('tokens_per_s'), 0)} tok/s, MFU {_fmt(n.get('mfu'))} / {_fmt(n.get('mfu_llm'))} (LLM), "
            f"peak {_fmt(n.get('peak_mem_gib'), 1)} GiB, val WER {_fmt(n.get('val_wer'))} x{n.get('wer_evals', 0)}, "
            f"test WER {_fmt(n.get('test_wer'))}, checkpoint {_size(n.get('checkpoint_gib'))}"
        )
    if row.step == "transcribe":
        return (
            f"{n.get('audio_s', 0):.0f} s in {_fmt(n.get('inference_s'))} s (RTFx {_fmt(n.get('rtfx'), 1)}), "
            f"{n.get('audio_tokens')} audio tokens, {n.get('new_tokens')} new tokens, "
            f"peak {_fmt(n.get('peak_mem_gib'), 1)} GiB"
        )
    if row.step == "preemption_drill":
        return (
            f"{n.get('preemptions', 0)} signals (ranks reached {n.get('ranks_signalled')}) -> "
            f"{', '.join(n.get('hpc_checkpoints', []))}; "
            f"resumed {n.get('resumes', 0)}x; steps trained once each: {n.get('steps_once')}; final step "
            f"{n.get('final_step')}"
        )
    return ", ".join(f"{k} {v}" for k, v in n.items() if not isinstance(v, (dict, list)))


def render_table(rows: list[Row]) -> str:
    lines = ["| step | status | seconds | key numbers | note |", "|---|---|---:|---|---|"]
    for r in rows:
        cells = [r.step, r.status, f"{r.seconds:.1f}", key_numbers(r), r.note]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ subcommands


def sub_env(argv: list[str]) -> None:
    """Versions and import checks, as JSON (``--json FILE``)."""
    import importlib
    import importlib.metadata

    parser = argparse.ArgumentParser(prog="gpu_check.py _env")
    parser.add_argument("--json", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["torch_pin"] = TORCH_PIN
    info["torch_matches_pin"] = torch.__version__.split("+")[0] == TORCH_PIN
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": torch.cuda.get_device_name(0),
            "device_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    else:
        info["device"] = "cpu"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        info["varlen"] = "ok"
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        info["varlen"] = f"missing ({type(err).__name__}: {err})"
    for dist, module in (
        ("transformers", "transformers"),
        ("lightning", "lightning"),
        ("liger-kernel", "liger_kernel"),
        ("deepspeed", "deepspeed"),
        ("flash-attn", "flash_attn"),
    ):
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as err:
            info[dist] = "missing" if err.name == module else f"broken ({err})"
            continue
        except Exception as err:  # noqa: BLE001 - e.g. a flash-attn built against another torch
            info[dist] = f"broken ({type(err).__name__}: {err})"
            continue
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = str(getattr(imported, "__version__", "installed"))
    espeak = shutil.which("espeak-ng")
    info["espeak-ng"] = espeak or "missing"
    usage = shutil.disk_usage(args.workdir)
    info["disk_free_gib"] = round(usage.free / 2**30, 1)
    info["cpu_count"] = os.cpu_count()
    Path(args.json).write_text(json.dumps(info, indent=2))


def sub_synthetic_corpus(argv: list[str]) -> None:
    """A corpus of synthetic waveforms (one tone per word) written with the project's shard writer."""
    import zlib

    import numpy as np

    from aero_lightning.data.shards import (
        ShardWriter,
        asr_sample_json,
        build_manifest,
        encode_flac,
        write_manifest,
    )

    parser = argparse.ArgumentParser(prog="gpu_check.py _synthetic-corpus")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sentences", required=True, type=Path)
    parser.add_argument("--train", type=int, required=True)
    parser.add_argument("--val", type=int, required=True)
    parser.add_argument("--test", type=int, required=True)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args(argv)
    sentences = args.sentences.read_text().splitlines()
    counts = {"test": args.test, "validation": args.val, "train": args.train}
    if sum(counts.values()) > len(sentences):
        raise SystemExit(f"{args.sentences} holds {len(sentences)} sentences, {sum(counts.values())} needed")
    rate = 16000
    start = 0
    for split, count in counts.items():
        writer = ShardWriter(args.out / split, f"{CORPUS_NAME}_synthetic-{split}", args.shard_size)
        with writer:
            for i, text in enumerate(sentences[start : start + count]):
                rng = np.random.default_rng(zlib.crc32(text.encode()))
                parts = []
                for word in text.lower().strip(".").split():
                    n = int(rate * (0.12 + 0.03 * len(word)))
                    t = np.arange(n) / rate
                    f0 = 180.0 + 20.0 * (zlib.crc32(word.encode()) % 40)
                    tone = np.sin(2 * np.pi * f0 * t) + 0.4 * np.sin(4 * np.pi * f0 * t)
                    parts += [0.3 * np.hanning(n) * tone, np.zeros(int(0.05 * rate))]
                wave = np.concatenate(parts).astype(np.float32)
                wave += (0.003 * rng.standard_normal(len(wave))).astype(np.float32)
                record = asr_sample_json(
                    corpus=f"{CORPUS_NAME}_synthetic",
                    text=text,
                    duration_s=round(len(wave) / rate, 6),
                    source="synthetic tones, one per word (benchmarks/gpu_check.py)",
                )
                writer.write(f"{CORPUS_NAME}-{split}-{i:06d}", encode_flac(wave), record)
        start += count
        manifest = build_manifest(
            corpus=f"{CORPUS_NAME}_synthetic",
            split=split,
            shards=writer.shards,
            durations_s=writer.durations_s,
        )
        write_manifest(args.out / split, manifest)


def sub_components(argv: list[str]) -> None:
    """Random-init encoder and LLM at Aero's (or tiny) shapes, written with ``save_pretrained``."""
    import torch
    from transformers import Qwen2ForCausalLM

    from aero_lightning.model.encoders import PaddingFreeWhisperEncoder
    from aero_lightning.model.tiny import corpus_texts, tiny_whisper_config, train_tokenizer

    sys.path.insert(0, str(BENCH))
    from mfu import AERO_ENCODER, QWEN2_5_1_5B_VOCAB, TINY_ENCODER, aero_llm_config, tiny_llm_config

    parser = argparse.ArgumentParser(prog="gpu_check.py _components")
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shape", choices=("aero", "tiny"), required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = train_tokenizer(corpus_texts(args.corpus), vocab_size=1000 if args.shape == "aero" else 300)
    torch.manual_seed(0)
    enc_kwargs = AERO_ENCODER if args.shape == "aero" else TINY_ENCODER
    with torch.device(device):  # a GPU initialises 2.2B weights in about a second
        encoder = PaddingFreeWhisperEncoder(tiny_whisper_config(**enc_kwargs))
    encoder.save_pretrained(args.out / "encoder")
    enc_params = sum(p.numel() for p in encoder.parameters())
    del encoder
    # the LLM's vocabulary is larger than the tokenizer, as Qwen2.5's (151 936 rows for 151 665 tokens)
    config = aero_llm_config() if args.shape == "aero" else tiny_llm_config(512)
    with torch.device(device):
        llm = Qwen2ForCausalLM(config)
    llm.save_pretrained(args.out / "llm")
    tokenizer.save_pretrained(args.out / "llm")
    llm_params = sum(p.numel() for p in llm.parameters())
    result = {
        "encoder_shape": "whisper-large-v3" if args.shape == "aero" else "tiny",
        "llm_shape": "qwen2.5-1.5b" if args.shape == "aero" else "tiny",
        "encoder_params_m": enc_params / 1e6,
        "llm_params_m": llm_params / 1e6,
        "llm_vocab": config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "qwen_vocab_expected": QWEN2_5_1_5B_VOCAB if args.shape == "aero" else None,
        "encoder": dict(enc_kwargs),
        "llm": {
            k: getattr(config, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
            )
        },
        "init_device": device.type,
    }
    Path(args.json).write_text(json.dumps(result, indent=2))


def sub_transcribe(argv: list[str]) -> None:
    """Build a long recording from the corpus's validation and test audio, transcribe it in one pass."""
    import numpy as np
    import soundfile as sf
    import torch

    from aero_lightning.data.rejects import RejectCounter
    from aero_lightning.data.shard_reader import iter_tar, resolve_split
    from aero_lightning.data.shards import decode_audio
    from aero_lightning.eval.decode import GenerationOptions
    from aero_lightning.tasks.transcribe import transcribe_files

    parser = argparse.ArgumentParser(prog="gpu_check.py _transcribe")
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--ckpt", default=None, help="a run folder or checkpoint; none: the components")
    parser.add_argument("--components", required=True, type=Path)
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--audio-out", required=True, type=Path)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    waves = []
    for split in ("validation", "test"):
        for url in resolve_split(args.corpus / split):
            for sample in iter_tar(url, RejectCounter()):
                wave, _ = decode_audio(sample["flac"])
                waves += [wave, np.zeros(4800, dtype=np.float32)]
    joined = np.concatenate(waves)
    n = int(args.seconds * 16000)
    long_wave = np.tile(joined, -(-n // len(joined)))[:n]
    args.audio_out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.audio_out, long_wave, 16000, subtype="PCM_16")
    t0 = time.perf_counter()
    if args.ckpt:
        from aero_lightning.model.build import load_model

        model = load_model(args.ckpt, device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else None)
        source = f"checkpoint {args.ckpt}"
    else:  # the train run left no checkpoint: Aero's architecture from the components, fresh projector
        import functools

        from aero_lightning.model.build import build_aero_model
        from aero_lightning.model.projector import AvgPoolProjector

        torch.manual_seed(0)
        model = build_aero_model(
            encoder={"name_or_path": str(args.components / "encoder")},
            llm={"name_or_path": str(args.components / "llm")},
            projector=functools.partial(AvgPoolProjector, pool=2),
            attn_implementation="varlen",
        ).eval()
        model = model.to("cuda", dtype=torch.bfloat16) if cuda else model
        source = f"components {args.components} (fresh projector)"
    load_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        weights_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    summary = transcribe_files(
        model,
        [args.audio_out],
        options=GenerationOptions(max_new_tokens=args.max_new_tokens),
        batch_size=1,
        progress=False,
    )
    record = summary["records"][0]
    if "error" in record:
        raise SystemExit(f"transcription failed: {record['error']}")
    result = {
        "model": source,
        "load_s": load_s,
        "audio_s": summary["audio_s"],
        "inference_s": summary["inference_s"],
        "rtfx": summary["rtfx"],
        "audio_tokens": model.audio_token_counter()(len(long_wave)),
        "new_tokens": record["num_new_tokens"],
        "max_new_tokens": args.max_new_tokens,
        "finished": record["finished"],
        "text_chars": len(record["text"]),
        "dtype": str(next(model.parameters()).dtype),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "weights_gib": weights_gib if cuda else None,
    }
    Path(args.json).write_text(json.dumps(result, indent=2))


SUBCOMMANDS = {
    "_env": sub_env,
    "_synthetic-corpus": sub_synthetic_corpus,
    "_components": sub_components,
    "_transcribe": sub_transcribe,
}


# ------------------------------------------------------------------------------------------ the overrides

ENCODER_EXPECT = {
    "aero": "{d_model: 1280, encoder_layers: 32, num_mel_bins: 128}",
    "tiny": "{d_model: 64, encoder_layers: 2, num_mel_bins: 128}",
}
LLM_EXPECT = {
    "aero": "{hidden_size: 1536, num_hidden_layers: 28}",
    "tiny": "{hidden_size: 64, num_hidden_layers: 2}",
}


def aero_full_overrides(
    *,
    run_dir: Path,
    corpus: Path,
    components: Path,
    shape: str,
    devices: int,
    steps: int,
    packing_length: int,
    buffer_size: int,
    num_workers: int,
    cpu: bool,
) -> list[str]:
    """``train.py experiment=aero_full`` on the generated components and corpus: the recipe as it is (strategy,
    precision, Liger, activation checkpointing, packed rows), with the data folders, the architecture checks
    (``model.*.expect``), the device count and the step count replaced. ``cpu``: fp32 on the CPU accelerator."""
    overrides = [
        "experiment=aero_full",
        f"hydra.run.dir='{run_dir}'",
        f"model.encoder.name_or_path='{components / 'encoder'}'",
        f"model.llm.name_or_path='{components / 'llm'}'",
        f"model.encoder.expect={ENCODER_EXPECT[shape]}",
        f"model.llm.expect={LLM_EXPECT[shape]}",
        "~data.train",
        f"+data.train={{{CORPUS_NAME}: {{dir: '{corpus / 'train'}', weight: 1.0}}}}",
        "~data.val_dirs",
        f"+data.val_dirs={{{CORPUS_NAME}: '{corpus / 'validation'}'}}",
        f"data.test_dir='{corpus / 'test'}'",
        f"data.packing.packing_length={packing_length}",
        f"data.packing.buffer_size={buffer_size}",
        f"data.num_workers={num_workers}",
        f"trainer.devices={devices}",
        "trainer.num_nodes=1",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
    ]
    if cpu:
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    return overrides


def train_overrides(
    plan: Plan, dry: bool, run_dir: Path, corpus: Path, components: Path, steps: int, strategy: str | None
) -> list[str]:
    """One train step: validation loss and WER every ``plan.val_every`` steps (at most ``steps``), one checkpoint
    at the last step, test decoding, every step logged. ``strategy`` None keeps aero_full's (ZeRO-2)."""
    val_every = min(plan.val_every, steps)
    overrides = aero_full_overrides(
        run_dir=run_dir,
        corpus=corpus,
        components=components,
        shape=plan.shape,
        devices=1,
        steps=steps,
        packing_length=plan.packing_length,
        buffer_size=plan.buffer_size,
        num_workers=plan.num_workers,
        cpu=dry,
    )
    overrides += [
        f"trainer.val_check_interval={val_every}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        f"callbacks.wer.every_n_train_steps={val_every}",
        f"callbacks.wer.max_samples={plan.wer_samples}",
        f"+callbacks.wer.generation={{max_new_tokens: {plan.decode_new_tokens}}}",
        f"callbacks.throughput.window={min(plan.throughput_window, steps)}",
        f"module.max_new_tokens={plan.decode_new_tokens}",
    ]
    if strategy is not None:
        overrides.append(f"strategy={strategy}")
    return overrides


def drill_overrides(
    plan: Plan, dry: bool, run_dir: Path, corpus: Path, components: Path, devices: int
) -> list[str]:
    """The preemption drill's runs: ``devices`` ranks (aero_full's ZeRO-2; ``ddp`` on the CPU), no evaluation, no
    periodic checkpoint, every training batch recorded per rank by ``helpers.batch_recorder.BatchRecorder``
    (``tests/`` on ``PYTHONPATH``) into ``<run_dir>/../run{{i}}.rank<r>.jsonl``; ``{{i}}`` is the run's index."""
    overrides = aero_full_overrides(
        run_dir=run_dir,
        corpus=corpus,
        components=components,
        shape="tiny",
        devices=devices,
        steps=DRILL_MAX_STEPS,
        packing_length=plan.drill_packing_length,
        buffer_size=32,
        num_workers=1,  # a forked DataLoader worker per rank: the signal reaches it too
        cpu=dry,
    )
    overrides += [
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=0",
        "run_test=false",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        "callbacks.wer.every_n_train_steps=0",
        "callbacks.throughput.window=1",
        "+callbacks.recorder._target_=helpers.batch_recorder.BatchRecorder",
        f"+callbacks.recorder.path='{run_dir.parent}/run{{{{i}}}}.rank{{rank}}.jsonl'",
    ]
    if dry:
        overrides.append("strategy=ddp")
    return overrides


# ------------------------------------------------------------------------------------------------ the check


class Check:
    """Runs the steps in order under the time budget and collects their rows."""

    def __init__(self, args, plan: Plan, device: str):
        self.args = args
        self.plan = plan
        self.device = device
        self.dry = args.dry_run
        self.py = sys.executable
        self.work = Path(args.workdir).resolve()
        self.logs = self.work / "logs"
        self.rows: list[Row] = []
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.corpus = self.work / "corpus"
        self.components = self.work / "components"
        self.runs = self.work / "runs"
        self.corpus_ok = self.components_ok = False
        self.env_info: dict = {}

    # ------------------------------------------------------------------ plumbing
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(f"[gpu_check {time.monotonic() - self.start:6.1f} s] {text}", flush=True)  # noqa: T201

    def begin(self, step: str, what: str) -> Row | None:
        """A new row; None (and a skipped row) when the step is skipped or no longer fits the budget."""
        row = Row(step=step, what=what)
        self.rows.append(row)
        if step in self.args.skip:
            row.status = "skipped (--skip)"
            return None
        least = self.plan.caps[step][1]
        if self.remaining() < least:
            row.status = "skipped (time budget)"
            row.note = f"{max(self.remaining(), 0):.0f} s of the {self.args.budget_s:.0f} s budget left, {least} s needed"
            self.say(f"{step}: skipped, {row.note}")
            return None
        row.status = "running"
        self.say(f"{step}: {what}")
        return row

    def cap(self, step: str) -> float:
        return min(self.plan.caps[step][0], self.remaining())

    def run(
        self, row: Row, cmd: list[str], env: dict | None = None, log_name: str | None = None
    ) -> int | None:
        log = self.logs / f"{log_name or row.step}.log"
        row.command = row.command or cmd
        row.log = str(log)
        t0 = time.monotonic()
        code = run_logged(cmd, log, self.cap(row.step), env or child_env(cpu_only=self.dry))
        row.seconds += time.monotonic() - t0
        if code is None:
            row.status = "timeout"
            row.note = (row.note + "; " if row.note else "") + f"killed after {row.seconds:.0f} s"
        elif code != 0:
            row.status = "failed"
            row.note = (row.note + "; " if row.note else "") + f"exit {code}"
        return code

    def finish(self, row: Row, ok: bool, note: str = "") -> None:
        if row.status not in ("timeout", "failed"):
            row.status = "ok" if ok else "failed"
        if note:
            row.note = f"{row.note}; {note}" if row.note else note
        if row.status != "ok":
            row.log_tail = tail(Path(row.log) if row.log else None)
        self.say(f"{row.step}: {row.status} ({row.seconds:.1f} s){' - ' + row.note if row.note else ''}")

    # ------------------------------------------------------------------ steps
    def step_environment(self) -> None:
        row = self.begin("environment", "versions and import checks")
        if row is None:
            return
        out = self.work / "environment.json"
        code = self.run(
            row, [self.py, str(Path(__file__)), "_env", "--json", str(out), "--workdir", str(self.work)]
        )
        if code != 0:
            return self.finish(row, False)
        info = json.loads(out.read_text())
        self.env_info = info
        if not self.dry:
            self.device = info.get("device", self.device)
        row.numbers = info
        problems, notes = [], []
        if not self.dry:
            if info.get("torch_cuda") is None:
                problems.append("torch has no CUDA build")
            if info.get("varlen") != "ok":
                problems.append(
                    "torch.nn.attention.varlen is not importable (packed rows fall back to per-document SDPA)"
                )
        if not info.get("torch_matches_pin"):
            notes.append(f"torch {info.get('torch')} is not the pinned {TORCH_PIN}")
        missing = [k for k in ("liger-kernel", "deepspeed", "flash-attn") if info.get(k) == "missing"]
        if missing:
            notes.append("missing optional: " + ", ".join(missing))
        if info.get("espeak-ng") == "missing":
            notes.append("no espeak-ng: synthetic corpus")
        if not self.dry and info.get("disk_free_gib", 0) < 45:
            notes.append(
                f"only {info.get('disk_free_gib')} GiB free: an aero_full checkpoint takes about 31 GB"
            )
        self.finish(row, not problems, "; ".join(problems + notes))

    def step_pytest(self) -> None:
        row = self.begin("pytest_gpu", "pytest -m gpu tests")
        if row is None:
            return
        report = self.work / "pytest_gpu.xml"
        code = self.run(
            row,
            [
                self.py,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests",
                f"--junitxml={report}",
            ],
        )
        counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        if report.exists():
            import xml.etree.ElementTree as ET

            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            total = int(suite.get("tests", 0))
            counts = {
                "failed": int(suite.get("failures", 0)),
                "errors": int(suite.get("errors", 0)),
                "skipped": int(suite.get("skipped", 0)),
            }
            counts["passed"] = total - counts["failed"] - counts["errors"] - counts["skipped"]
        row.numbers = counts
        if self.dry:
            ok = code == 0 and counts["failed"] == counts["errors"] == 0
            note = "dry run: the gpu tests skip without CUDA" if ok else ""
        else:
            ok = code == 0 and counts["passed"] > 0
            note = "" if counts["skipped"] == 0 else f"{counts['skipped']} skipped (see the log)"
        self.finish(row, ok, note)

    def step_mfu(self) -> None:
        what = (
            "benchmarks/mfu.py --tiny: padded 512 vs packed 1024, toy shapes, fp32 on CPU"
            if self.dry
            else "benchmarks/mfu.py: padded 4096 vs packed 32768, Liger off/on, Aero shapes"
        )
        row = self.begin("mfu", what)
        if row is None:
            return
        out = self.work / "mfu.json"
        code = self.run(row, [self.py, str(BENCH / "mfu.py"), *self.plan.mfu_args, "--out", str(out)])
        if code != 0 or not out.exists():
            return self.finish(row, False)
        result = json.loads(out.read_text())
        keep = ("steps", "tokens_per_s", "audio_s_per_s", "mfu", "mfu_llm", "peak_mem_gib", "wall_s")
        rows = {
            name: {k: r.get(k) for k in keep} | {"liger": any(r["liger"].values())}
            for name, r in result["rows"].items()
        }
        row.numbers = {"device": result["device"], "peak_flops": result["peak_flops"], "rows": rows}
        expected = 2 if self.dry else 4
        problems = []
        if len(rows) != expected:
            problems.append(f"{len(rows)} rows, {expected} expected")
        if not self.dry:
            if any(r["mfu"] is None for r in rows.values()):
                problems.append(
                    f"no peak FLOP/s for {result['device']} (aero_lightning.model.flops.PEAK_FLOPS_BF16)"
                )
            liger_on = [r["liger"] for name, r in rows.items() if "liger on" in name]
            if self.env_info.get("liger-kernel", "missing") != "missing" and not all(liger_on):
                problems.append("liger-kernel is installed but the Liger rows ran without it")
        note = "dry run: toy shapes, no MFU on a CPU; Liger rows need CUDA" if self.dry else ""
        self.finish(row, not problems, "; ".join(problems) or note)

    def step_corpus(self) -> None:
        train, val, test = self.plan.corpus
        row = self.begin(
            "corpus", f"generated corpus: {train} train, {val} validation, {test} test utterances"
        )
        if row is None:
            return
        shutil.rmtree(self.corpus, ignore_errors=True)
        sentences = self.work / "sentences.txt"
        sentences.write_text("\n".join(make_sentences(train + val + test)) + "\n")
        sizes = [
            "--train",
            str(train),
            "--val",
            str(val),
            "--test",
            str(test),
            "--shard-size",
            str(self.plan.shard_size),
        ]
        mode = self.args.corpus
        if mode == "auto":
            mode = "espeak" if shutil.which("espeak-ng") else "synthetic"
        source = None
        if mode == "espeak":
            cmd = [
                self.py,
                "-m",
                "aero_lightning.data.synth",
                "--out",
                str(self.corpus),
                "--sentences",
                str(sentences),
                *sizes,
            ]
            if self.run(row, cmd) == 0:
                source = "espeak-ng"
            elif self.args.corpus == "auto":  # espeak-ng is there but failed: fall back
                row.status, row.note = (
                    "running",
                    f"espeak-ng failed ({row.note}), synthetic waveforms instead",
                )
                shutil.rmtree(self.corpus, ignore_errors=True)
                mode = "synthetic"
        if mode == "synthetic":
            cmd = [
                self.py,
                str(Path(__file__)),
                "_synthetic-corpus",
                "--out",
                str(self.corpus),
                "--sentences",
                str(sentences),
                *sizes,
            ]
            if self.run(row, cmd, log_name="corpus_synthetic") == 0:
                source = "synthetic waveforms" + ("" if shutil.which("espeak-ng") else " (no espeak-ng)")
        if source is None:
            return self.finish(row, False)
        manifests = {
            s: json.loads((self.corpus / s / "manifest.json").read_text())
            for s in ("train", "validation", "test")
        }
        row.numbers = {
            "source": source,
            **{s: m["num_samples"] for s, m in manifests.items()},
            "hours": sum(m["hours"] for m in manifests.values()),
            "dir": str(self.corpus),
        }
        self.corpus_ok = all(m["num_samples"] > 0 for m in manifests.values())
        self.finish(row, self.corpus_ok)

    def step_components(self) -> None:
        what = (
            "random-init Whisper-large-v3 encoder + Qwen2.5-1.5B LLM (save_pretrained)"
            if self.plan.shape == "aero"
            else "random-init tiny encoder + LLM (save_pretrained)"
        )
        row = self.begin("components", what)
        if row is None:
            return
        if not self.corpus_ok:
            row.status = "skipped (no corpus)"
            return
        shutil.rmtree(self.components, ignore_errors=True)
        out = self.work / "components.json"
        cmd = [
            self.py,
            str(Path(__file__)),
            "_components",
            "--corpus",
            str(self.corpus),
            "--out",
            str(self.components),
            "--shape",
            self.plan.shape,
            "--json",
            str(out),
        ]
        if self.run(row, cmd) != 0:
            return self.finish(row, False)
        row.numbers = json.loads(out.read_text())
        row.numbers["disk_gib"] = dir_size_gib(self.components)
        self.components_ok = True
        self.finish(row, True)

    def train_overrides(self, run_dir: Path, steps: int, strategy: str | None) -> list[str]:
        return train_overrides(self.plan, self.dry, run_dir, self.corpus, self.components, steps, strategy)

    def step_train(self, step: str, strategy: str, steps: int) -> None:
        label = {
            "train_zero2": "deepspeed_zero2 (aero_full's own)",
            "train_zero3": "deepspeed_zero3",
            "train_fsdp2": "fsdp2",
        }[step]
        device = "CPU" if self.dry else "1 GPU"
        row = self.begin(step, f"train.py experiment=aero_full, {label}, {steps} steps, {device}")
        if row is None:
            return
        if not (self.corpus_ok and self.components_ok):
            row.status = "skipped (no corpus or components)"
            return
        use = strategy
        if self.dry and strategy.startswith("deepspeed"):
            if strategy == "deepspeed_zero3":
                row.status = "skipped (needs CUDA)"
                row.note = "Lightning's DeepSpeed strategies refuse a CPU accelerator"
                self.say(f"{step}: {row.status}")
                return
            use = "ddp"
            row.note = (
                "dry run: strategy=ddp in place of deepspeed_zero2 (DeepSpeed refuses a CPU accelerator)"
            )
        if not self.dry and strategy.startswith("deepspeed") and self.env_info.get("deepspeed") == "missing":
            row.status = "skipped (deepspeed missing)"
            return
        run_dir = self.runs / step
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = self.train_overrides(run_dir, steps, None if use == "deepspeed_zero2" else use)
        code = self.run(row, [self.py, "train.py", *overrides])
        numbers, problems = self.inspect_run(run_dir, steps, min(self.plan.val_every, steps))
        row.numbers = numbers
        self.finish(row, code == 0 and not problems, "; ".join(problems))

    def inspect_run(self, run_dir: Path, steps: int, val_every: int) -> tuple[dict, list[str]]:
        """Key numbers of a finished train.py run and what is missing from it."""
        numbers: dict = {"run_dir": str(run_dir)}
        problems: list[str] = []
        result_file = run_dir / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if not result:
            problems.append("no result.json")
        ckpt = result.get("last_checkpoint") or ""
        if ckpt and Path(ckpt).exists():
            from aero_lightning.callbacks.preemption import checkpoint_step

            numbers["checkpoint"] = ckpt
            numbers["checkpoint_gib"] = dir_size_gib(Path(ckpt))
            numbers["global_step"] = checkpoint_step(ckpt)
            if numbers["global_step"] != steps:
                problems.append(f"checkpoint at step {numbers['global_step']}, {steps} expected")
        elif result:
            problems.append("no checkpoint")
        test = result.get("test") or {}
        numbers["test_wer"] = test.get("wer")
        if result and "wer" not in test:
            problems.append("no test WER")
        tb = run_dir / "tensorboard"
        scalars = read_scalars(tb) if tb.exists() else {}
        loss = [v for _, v in sorted(scalars.get("train/loss", []))]
        if loss:
            numbers["loss_first"], numbers["loss_last"] = loss[0], loss[-1]
        for tag, key in (
            ("perf/tokens_per_s", "tokens_per_s"),
            ("perf/mfu", "mfu"),
            ("perf/mfu_llm", "mfu_llm"),
            ("perf/audio_s_per_s", "audio_s_per_s"),
            ("perf/peak_mem_gib", "peak_mem_gib"),
            ("perf/data_wait_frac", "data_wait_frac"),
        ):
            values = [v for _, v in sorted(scalars.get(tag, []))]
            if values:  # the first window includes the first step's start-up; later windows are the speed
                later = values[1:] or values
                numbers[key] = max(values) if key == "peak_mem_gib" else sum(later) / len(later)
        wer = sorted(scalars.get(f"val/{CORPUS_NAME}/wer", []))
        numbers["wer_evals"] = len(wer)
        numbers["val_wer"] = wer[-1][1] if wer else None
        val_loss = sorted(scalars.get(f"val/{CORPUS_NAME}/loss", []))
        numbers["val_loss"] = val_loss[-1][1] if val_loss else None
        if len(wer) != steps // val_every:
            problems.append(f"{len(wer)} validation WERs logged, {steps // val_every} expected")
        if not val_loss:
            problems.append("no validation loss")
        return numbers, problems

    def drop_checkpoints(self, run_dir: Path) -> None:
        """Free the disk (an aero_full checkpoint is about 31 GB) unless --keep."""
        if not self.args.keep:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            for hpc in run_dir.glob("hpc_ckpt_*"):
                shutil.rmtree(hpc) if hpc.is_dir() else hpc.unlink()

    def step_transcribe(self) -> None:
        row = self.begin(
            "transcribe", f"one {self.plan.long_audio_s / 60:.0f}-minute recording in a single pass"
        )
        if row is None:
            return
        if not (self.corpus_ok and self.components_ok):
            row.status = "skipped (no corpus or components)"
            return
        zero2 = self.runs / "train_zero2"
        ckpt = zero2 if (zero2 / "checkpoints" / "last.ckpt").exists() else None
        out = self.work / "transcribe.json"
        cmd = [
            self.py,
            str(Path(__file__)),
            "_transcribe",
            "--corpus",
            str(self.corpus),
            "--components",
            str(self.components),
            "--seconds",
            str(self.plan.long_audio_s),
            "--max-new-tokens",
            str(self.plan.transcribe_new_tokens),
            "--audio-out",
            str(self.work / "long_audio.flac"),
            "--json",
            str(out),
        ] + (["--ckpt", str(ckpt)] if ckpt else [])
        code = self.run(row, cmd)
        if code != 0:
            return self.finish(row, False)
        row.numbers = json.loads(out.read_text())
        expected_tokens = round(self.plan.long_audio_s * 25)
        problems = []
        if row.numbers["audio_tokens"] != expected_tokens:
            problems.append(f"{row.numbers['audio_tokens']} audio tokens, {expected_tokens} expected")
        note = f"model: {'the train_zero2 checkpoint' if ckpt else 'components, fresh projector (no checkpoint)'}"
        if not row.numbers["finished"]:
            note += f"; no end of turn (an untrained model): decoding ran to its {row.numbers['max_new_tokens']}-token budget"
        self.finish(row, not problems, "; ".join(problems) or note)

    def step_drill(self) -> None:
        n = self.args.devices
        row = self.begin(
            "preemption_drill", f"SIGUSR1 mid-backward to all {n} ranks, three times, tiny shapes"
        )
        if row is None:
            return
        if not self.corpus_ok:
            row.status = "skipped (no corpus)"
            return
        p = self.plan
        drill = self.work / "drill"
        shutil.rmtree(drill, ignore_errors=True)
        components = drill / "components"
        cmd = [
            self.py,
            str(Path(__file__)),
            "_components",
            "--corpus",
            str(self.corpus),
            "--out",
            str(components),
            "--shape",
            "tiny",
            "--json",
            str(drill / "components.json"),
        ]
        if self.run(row, cmd, log_name="preemption_drill_components") != 0:
            return self.finish(row, False)
        run_dir = drill / "run"
        base = drill_overrides(p, self.dry, run_dir, self.corpus, components, n)
        # helpers.batch_recorder (tests/helpers): records every rank's batches, sends the signal from rank 0 to the
        # process group of the run (every rank and DataLoader worker) during a backward pass
        env = child_env([ROOT / "tests"], cpu_only=self.dry)
        hpc, resumes, signalled, problems = [], 0, [], []
        runs = [*DRILL_SIGNAL_STEPS, None]
        for i, at_step in enumerate(runs):
            overrides = [o.replace("{{i}}", str(i)) for o in base]
            if at_step is not None:
                overrides += [
                    "+callbacks.recorder.signal_name=SIGUSR1",
                    f"+callbacks.recorder.signal_in_backward_at_step={at_step}",
                ]
            log = self.logs / f"preemption_drill_run{i}.log"
            code = self.run(
                row, [self.py, "train.py", *overrides], env=env, log_name=f"preemption_drill_run{i}"
            )
            if code != 0:
                row.log = str(log)
                problems.append(
                    f"run {i}: {'no exit within the timeout (hang)' if code is None else f'exit {code}'}"
                )
                break
            text = log.read_text(errors="replace")
            if i > 0:
                previous = DRILL_SIGNAL_STEPS[i - 1] + 1
                if f"hpc_ckpt_{previous}.ckpt (global step {previous}" in text:
                    resumes += 1
                else:
                    problems.append(f"run {i} did not resume from hpc_ckpt_{previous}")
            if at_step is not None:
                ranks = [r for r in range(n) if f"rank {r}: SIGUSR1 received" in text]
                signalled.append(len(ranks))
                if len(ranks) != n:
                    problems.append(f"run {i}: SIGUSR1 reached ranks {ranks} of {n}")
                found = run_dir / f"hpc_ckpt_{at_step + 1}.ckpt"
                if found.exists():
                    hpc.append(found.name)
                else:
                    problems.append(f"run {i}: no {found.name}")
                    break
        from aero_lightning.callbacks.preemption import checkpoint_step

        steps_once = True
        for rank in range(n):
            trained = []
            for i in range(len(runs)):
                path = drill / f"run{i}.rank{rank}.jsonl"
                if path.exists():
                    trained += [json.loads(line)["step"] for line in path.read_text().splitlines()]
            if trained != list(range(DRILL_MAX_STEPS)):
                steps_once = False
                problems.append(f"rank {rank} trained steps {trained}")
        last = run_dir / "checkpoints" / "last.ckpt"
        final = checkpoint_step(last) if last.exists() else None
        if final != DRILL_MAX_STEPS:
            problems.append(f"final checkpoint at step {final}, {DRILL_MAX_STEPS} expected")
        row.numbers = {
            "devices": n,
            "preemptions": len(hpc),
            "ranks_signalled": signalled,
            "hpc_checkpoints": hpc,
            "resumes": resumes,
            "steps_once": steps_once,
            "final_step": final,
        }
        row.note = "dry run: ddp on CPU (gloo)" if self.dry else "aero_full's deepspeed_zero2, NCCL"
        self.drop_checkpoints(run_dir)
        shutil.rmtree(components, ignore_errors=True)
        self.finish(row, not problems, "; ".join(problems))

    # ------------------------------------------------------------------ all
    def run_all(self) -> list[Row]:
        p = self.plan
        self.step_environment()
        self.step_pytest()
        self.step_corpus()
        self.step_components()
        self.step_train("train_zero2", "deepspeed_zero2", p.zero2_steps)
        self.step_transcribe()
        self.drop_checkpoints(self.runs / "train_zero2")
        self.step_train("train_zero3", "deepspeed_zero3", p.short_steps)
        self.drop_checkpoints(self.runs / "train_zero3")
        self.step_train("train_fsdp2", "fsdp2", p.short_steps)
        self.drop_checkpoints(self.runs / "train_fsdp2")
        self.step_mfu()  # last of the one-GPU steps: a benchmark, and `python benchmarks/mfu.py` reruns it alone
        if self.args.devices > 1:
            self.deadline += self.plan.caps["preemption_drill"][0]
            self.step_drill()
        if not self.args.keep:
            shutil.rmtree(self.components, ignore_errors=True)
            (self.work / "long_audio.flac").unlink(missing_ok=True)
        return self.rows


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.sh",
        description="Check the whole GPU path on one GPU in under 10 minutes (benchmarks/README.md).",
    )
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny shapes")
    parser.add_argument(
        "--devices", type=int, default=1, help="N >= 2 adds the preemption drill on N devices"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget (570 s; dry run 900 s)"
    )
    parser.add_argument(
        "--workdir", default=str(ROOT / "outputs" / "gpu_check"), help="corpus, models, runs, logs"
    )
    parser.add_argument(
        "--out", default=None, help="results JSON (benchmarks/results/gpu_check_<device>.json)"
    )
    parser.add_argument("--corpus", choices=("auto", "espeak", "synthetic"), default="auto")
    parser.add_argument(
        "--skip", default="", help=f"comma-separated steps to leave out: {', '.join(SKIPPABLE)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the components and checkpoints")
    args = parser.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    unknown = sorted(set(args.skip) - set(SKIPPABLE))
    if unknown:
        parser.error(f"--skip: unknown step(s) {unknown}; choose from {', '.join(SKIPPABLE)}")
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    if args.budget_s is None:
        args.budget_s = 900.0 if args.dry_run else 570.0
    caller = Path(
        os.environ.get("GPU_CHECK_CWD") or os.getcwd()
    )  # gpu_check.sh runs from the repository root
    args.workdir = str(caller / args.workdir)
    args.out = str(caller / args.out) if args.out else None
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])
        return 0
    args = parse_args(argv)
    import torch  # no CUDA context is created here: every step runs in its own process

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(  # noqa: T201
            f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}). This check "
            "needs one GPU. On a GPU machine install with\n  "
            + INSTALL_HINT
            + "\nor rehearse on the CPU with "
            "`benchmarks/gpu_check.sh --dry-run`.",
            file=sys.stderr,
        )
        return 2
    if cuda and not args.dry_run and args.devices > torch.cuda.device_count():
        print(
            f"gpu_check: --devices {args.devices} but {torch.cuda.device_count()} GPU(s) visible",
            file=sys.stderr,
        )  # noqa: T201
        return 2
    device = "cpu (dry run)" if args.dry_run else "cuda"  # the environment step reads the device's name
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    work = Path(args.workdir).resolve()
    for sub in ("corpus", "components", "runs", "drill", "logs"):  # only what this script writes there
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args, plan, device)
    check.say(f"device: {device}; workdir {work}; budget {args.budget_s:.0f} s; python {sys.executable}")
    check.say(f"expected install: {INSTALL_HINT}")
    rows = check.run_all()
    device = check.device
    total = time.monotonic() - check.start
    table = render_table(rows)
    failed = [r.step for r in rows if r.status in ("failed", "timeout")]
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"gpu_check_{slugify('cpu_dry_run' if args.dry_run else device)}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "script": "benchmarks/gpu_check.sh",
        "dry_run": args.dry_run,
        "device": device,
        "devices": args.devices,
        "plan": asdict(plan),
        "budget_s": args.budget_s,
        "total_s": total,
        "environment": check.env_info,
        "ok": not failed,
        "failed": failed,
        "rows": [asdict(r) for r in rows],
        "table": table,
    }
    out.write_text(json.dumps(strict_json(summary), indent=2, default=str) + "\n")
    print("\n" + table)  # noqa: T201
    ok = sum(r.status == "ok" for r in rows)
    print(  # noqa: T201
        f"\n{device}: {ok} ok, {len(rows) - ok - len(failed)} skipped, {len(failed)} failed in {total:.0f} s"
        f"{' (' + ', '.join(failed) + ')' if failed else ''}; logs in {check.logs}; results {out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
