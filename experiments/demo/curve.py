"""Print a run's TensorBoard scalars as a markdown table: python experiments/demo/curve.py outputs/demo_long."""

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

    def near(d: dict, step: int):
        if not d:
            return None
        k = min(d, key=lambda s: abs(s - step))
        return d[k] if abs(k - step) <= 10 else None

    print("| step | train loss (mean of last 50) | val loss | lr |")
    print("|---:|---:|---:|---:|")
    last = max(train)
    for step in [*range(every, last + 1, every), *([last] if last % every else [])]:
        window = [v for s, v in train.items() if step - 50 < s <= step]
        v, r = near(val, step), near(lr, step)
        print(
            f"| {step} | {sum(window) / len(window):.3f} | {'' if v is None else f'{v:.3f}'} | "
            f"{'' if r is None else f'{r:.2e}'} |"
        )
    if tps:
        print(f"\nmean tokens/s {sum(tps) / len(tps):.0f}, mean audio s/s {sum(aps) / len(aps):.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
