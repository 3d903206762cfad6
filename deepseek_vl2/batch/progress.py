"""The progress bar of a batch run, on stderr: rows done of the rows to do, rows/s, time left (tqdm's),
and generated tokens/s since the start."""
import sys
import time

from tqdm import tqdm

REFRESH_S = 0.5


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.bar = tqdm(total=total, unit="row", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                        smoothing=0.05, desc="rows")
        self.started = time.perf_counter()
        self.tokens = 0
        self._shown = 0.0

    def advance(self, tokens: int) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._shown >= REFRESH_S:
            self._shown = now
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.started, 1e-9):.0f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.started, 1e-9):.0f} tok/s",
                                 refresh=False)
        self.bar.close()
