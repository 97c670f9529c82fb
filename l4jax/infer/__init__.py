"""Inference: the ``Model`` handle (``model``), ``load`` and ``init`` (``load``), prefill and decode
(``generate``), next-token sampling (``sampling``) and the host-side input checks (``inputs``)."""

from .load import init, load
from .model import Model

__all__ = ["Model", "init", "load"]
