"""polyclip: few-label image classification that borrows from language and pretrained models.

The library imports without Ray: data, backbones, losses, methods, metrics, the ensemble
and reports live here; Ray entrypoints live in ``jobs/`` and ``serve/``.
"""

__version__ = "0.1.0"
