"""Hugging Face ``Trainer`` integration: OsciReset as a ``TrainerCallback``.

``TrainingArguments(torch_compile_backend="nvfp4")`` is refused (accelerate checks the name against
its own list of Dynamo backends), so compile the model before handing it to the ``Trainer``::

    model.compile(backend="nvfp4", options={"recipe": "tetrajet_v2"})
    osc = fp4compile.OsciReset(model, "tetrajet_v2", start=8000)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[fp4compile.OsciResetCallback(osc)])

This module imports ``transformers``; ``import fp4compile`` does not import it (``fp4compile.OsciResetCallback``
loads it on first access).
"""

from __future__ import annotations

from transformers import TrainerCallback

from .osci_reset import OsciReset

__all__ = ["OsciResetCallback"]


class OsciResetCallback(TrainerCallback):
    """Advance an :class:`~fp4compile.OsciReset` once per optimizer step of a Hugging Face ``Trainer``.

    ``on_step_end`` runs after each optimizer step (once per step under gradient accumulation), so this is
    :meth:`OsciReset.on_step` at the place its optimizer hook would run; do not also ``register`` it.
    """

    def __init__(self, osci_reset: OsciReset) -> None:
        if not isinstance(osci_reset, OsciReset):
            raise TypeError(f"OsciResetCallback expects an fp4compile.OsciReset, got {type(osci_reset).__name__}")
        self.osci_reset = osci_reset

    def on_step_end(self, args, state, control, **kwargs):
        """Advance OsciReset's schedule by the optimizer step that just ended."""
        self.osci_reset.on_step()
