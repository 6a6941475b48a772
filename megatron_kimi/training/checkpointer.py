"""When to save and when a preemption stops the run, decided in one place for every loop.

``Checkpointer.save(step, last_step=...)`` (torchtitan's shape) is called once after every step of a
loop (an optimizer step for ``train`` / ``sft``, an iteration for ``rl``) on every rank. It saves
every ``checkpoint.save_interval`` steps, at the last step (``checkpoint.save_at_end``), and when a
preemption was requested (:mod:`megatron_kimi.platform.preemption`); after a preemption save it
confirms the checkpoint and answers "stop", and the command exits with ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from megatron_kimi.config import to_dict
from megatron_kimi.platform import preemption


class Checkpointer:
    """Saves ``trainer`` (its ``save(root, keep_last, extra)``) under ``root`` when due.

    ``stopped`` is True once a preemption save has been made and confirmed: the loop must end.
    """

    def __init__(self, trainer, root: str | Path, interval: int = 0, at_end: bool = True, keep_last: int = 0,
                 extra: Optional[dict] = None, should_stop: Callable[[], bool] = preemption.requested):
        self.trainer = trainer
        self.root = Path(root)
        self.interval = interval
        self.at_end = at_end
        self.keep_last = keep_last
        self.extra = extra or {}
        self.should_stop = should_stop
        self.stopped = False

    @classmethod
    def from_config(cls, cfg, trainer) -> "Checkpointer":
        c = cfg.checkpoint
        return cls(trainer, Path(cfg.run_dir) / "checkpoints", interval=c.save_interval, at_end=c.save_at_end,
                   keep_last=c.keep_last, extra={"config": to_dict(cfg)})

    def save(self, step: int, last_step: bool = False, before_save: Optional[Callable[[], None]] = None) -> bool:
        """After ``step`` (1-based, in the loop's unit): save if due; True iff the run must stop now.

        A preemption request on the last step does not stop the run: it ends anyway (and saves if
        ``at_end``). ``before_save`` runs just before a save (e.g. files the checkpoint must agree
        with). Collective: every rank calls it after every step (the preemption check all-reduces).
        """
        # Asked on every step, also the last: every rank must make the same collective calls.
        stop = self.should_stop() and not last_step
        due = stop or (self.interval and step % self.interval == 0) or (self.at_end and last_step)
        if not due:
            return False
        if before_save is not None:
            before_save()
        saved = self.trainer.save(self.root, self.keep_last, self.extra)
        if stop:
            preemption.confirm_saved(saved, self.trainer.state.step)
            self.stopped = True
        return stop
