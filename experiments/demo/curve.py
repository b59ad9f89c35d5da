"""Print a run's loss curve (at its validation steps) as a markdown table: python experiments/demo/curve.py RUN_DIR."""

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run_dir: str, every: int = 250) -> None:
    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    train = {e.step: e.value for e in ea.Scalars("train/loss")}
    val = (
        {e.step: e.value for e in ea.Scalars("val/demo_espeak/loss")}
        if "val/demo_espeak/loss" in tags
        else {}
    )
    lr = {e.step: e.value for e in ea.Scalars("lr-AdamW/pg1")} if "lr-AdamW/pg1" in tags else {}
    tps = [e.value for e in ea.Scalars("perf/tokens_per_s")] if "perf/tokens_per_s" in tags else []
    aps = [e.value for e in ea.Scalars("perf/audio_s_per_s")] if "perf/audio_s_per_s" in tags else []

    print("| step | train loss (mean of last 50 logged) | val loss | lr |")
    print("|---:|---:|---:|---:|")
    last = max(train)
    steps = sorted({*val, last} if val else {*range(every - 1, last + 1, every), last})
    for step in steps:
        window = [v for s, v in train.items() if step - 50 < s <= step]
        r = lr.get(max((s for s in lr if s <= step), default=min(lr))) if lr else None
        v = val.get(step)
        print(
            f"| {step + 1} | {sum(window) / len(window):.3f} | {'' if v is None else f'{v:.3f}'} | "
            f"{'' if r is None else f'{r:.2e}'} |"
        )
    if tps:
        print(f"\nmean tokens/s {sum(tps) / len(tps):.0f}, mean audio s/s {sum(aps) / len(aps):.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
