"""Training metrics: appended to ``metrics.jsonl`` (and TensorBoard when installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON lines, one per logged optimizer step: ``{"stage", "step", "tokens", ...}``."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            stage, step = record.get("stage"), record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("stage", "step"):
                    self._tb.add_scalar(f"stage{stage}/{key}", value, step)

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop records logged after (stage, step): on resume they are logged again."""
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and (json.loads(line)["stage"], json.loads(line)["step"]) <= (stage, step)
        ]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class DiscardedMetrics(MetricsLog):
    """The metrics log of ranks other than 0 under ``torchrun``: writes nothing (rank 0 logs the run)."""

    def __init__(self) -> None:
        self.path = Path(os.devnull)
        self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, stage: int, step: int) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return []
