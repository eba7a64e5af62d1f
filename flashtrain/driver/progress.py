"""The driver's progress bar (epoch, step, images/s, loss, global batch, LR, grid)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """A tqdm bar over global steps; silent when disabled."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool = True):
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         mininterval=1.0, file=sys.stderr, disable=not enabled)

    def update(self, *, epoch: int, loss: float, ips: float, batch: int, lr: float, grid: str) -> None:
        self._bar.set_postfix_str(f"epoch {epoch} loss {loss:.3f} {ips:.0f} img/s batch {batch} "
                                  f"lr {lr:.4f} grid {grid}", refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
