"""Metric loggers behind one small protocol. The JSONL disk logger is always on (the tests
and `seal report` read it); TensorBoard is optional."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from seal.runs import append_jsonl


class Logger(Protocol):
    def log_dict(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class DiskLogger:
    """Appends `{"step", "time", ...values}` lines to `logs.jsonl` in the run directory."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "logs.jsonl"

    def log_dict(self, values, step) -> None:
        append_jsonl(self.path, [{"step": step, "time": round(time.time(), 3), **values}])

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(
                "TensorBoard logging needs: pip install 'seal-lm[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log_dict(self, values, step) -> None:
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MultiLogger:
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_dict(self, values, step) -> None:
        for lg in self.loggers:
            lg.log_dict(values, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build_logger(run_dir: Path, tensorboard: bool = False) -> Logger:
    loggers: list[Logger] = [DiskLogger(run_dir)]
    if tensorboard:
        loggers.append(TensorBoardLogger(run_dir))
    return MultiLogger(loggers)
