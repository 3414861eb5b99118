"""Progress reporting: a tqdm bar on stderr for people, plus listeners (the Prefect layer adds one that
updates a progress artifact in the UI). The library never imports Prefect."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

# listener(stage, description, done, total, metrics)
Listener = Callable[[str, str, int, int, dict[str, Any]], None]


class Bar:
    def __init__(
        self, progress: Progress, desc: str, total: int, initial: int = 0, unit: str = "step"
    ) -> None:
        self._progress = progress
        self.desc = desc
        self.total = total
        self.done = initial
        self._tqdm = tqdm(
            total=total,
            initial=initial,
            desc=f"{progress.stage}: {desc}" if progress.stage else desc,
            unit=unit,
            disable=not progress.show_bar,
            dynamic_ncols=True,
            leave=True,
        )
        self._last_emit = 0.0

    def update(self, n: int = 1, **metrics: Any) -> None:
        self.done += n
        self._tqdm.update(n)
        if metrics:
            self._tqdm.set_postfix({k: _short(v) for k, v in metrics.items()}, refresh=False)
        now = time.monotonic()
        if now - self._last_emit >= self._progress.min_interval or self.done >= self.total:
            self._last_emit = now
            for listener in self._progress.listeners:
                listener(self._progress.stage, self.desc, self.done, self.total, metrics)

    def close(self) -> None:
        self._tqdm.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Handed to every stage; `bar()` opens one progress bar for a long loop."""

    def __init__(
        self,
        stage: str = "",
        listeners: list[Listener] | None = None,
        show_bar: bool = True,
        min_interval: float = 2.0,
    ) -> None:
        self.stage = stage
        self.listeners = list(listeners or [])
        self.show_bar = show_bar
        self.min_interval = min_interval

    def for_stage(self, stage: str) -> Progress:
        return Progress(stage, self.listeners, self.show_bar, self.min_interval)

    def bar(self, desc: str, total: int, initial: int = 0, unit: str = "step") -> Bar:
        return Bar(self, desc, total, initial, unit)


def _short(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v
