"""Print a run's loss curve (at its validation steps) as a markdown table: python experiments/demo/curve.py RUN_DIR.

Columns: optimizer step; minutes since the first logged step (wall clock); train LM loss (mean of the last 50
logged steps); train CTC loss, when the run logged one; validation LM loss; the LR of the first param group; and,
for a run with ``module.unfreeze``, the LR of the groups it trains later.
"""

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _at(series: dict, step: int):
    """The last value logged at or before ``step`` (None if there is none)."""
    before = [s for s in series if s <= step]
    return series[max(before)] if before else None


def _mean_last(series: dict, step: int, window: int = 50):
    values = [v for s, v in series.items() if step - window < s <= step]
    return sum(values) / len(values) if values else None


def main(run_dir: str, every: int = 250) -> None:
    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]

    def series(tag: str) -> dict:
        return {e.step: e.value for e in ea.Scalars(tag)} if tag in tags else {}

    train_events = ea.Scalars("train/loss")
    t0 = train_events[0].wall_time
    train = {e.step: e.value for e in train_events}
    minutes = {e.step: (e.wall_time - t0) / 60 for e in train_events}
    ctc = series("train/ctc_loss")
    val = series("val/demo_espeak/loss")
    lr = series("lr-AdamW/pg1")
    lr_later = series("lr-AdamW/pg3")  # module.unfreeze's groups come after the two default ones
    tps = [e.value for e in ea.Scalars("perf/tokens_per_s")] if "perf/tokens_per_s" in tags else []
    aps = [e.value for e in ea.Scalars("perf/audio_s_per_s")] if "perf/audio_s_per_s" in tags else []

    def fmt(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    header = ["step", "minutes", "train loss (mean of last 50 logged)"]
    header += ["train CTC loss"] if ctc else []
    header += ["val loss", "lr"]
    header += ["lr of the parts unfrozen later"] if lr_later else []
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    last = max(train)
    steps = sorted({*val, last} if val else {*range(every - 1, last + 1, every), last})
    for step in steps:
        cells = [str(step + 1), fmt(_at(minutes, step), ".1f"), fmt(_mean_last(train, step), ".3f")]
        cells += [fmt(_mean_last(ctc, step), ".3f")] if ctc else []
        cells += [fmt(val.get(step), ".3f"), fmt(_at(lr, step), ".2e")]
        cells += [fmt(_at(lr_later, step), ".2e")] if lr_later else []
        print("| " + " | ".join(cells) + " |")
    if tps:
        print(f"\nmean tokens/s {sum(tps) / len(tps):.0f}, mean audio s/s {sum(aps) / len(aps):.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
