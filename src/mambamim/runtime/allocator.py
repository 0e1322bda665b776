"""The CUDA caching allocator's settings the command line starts with (torch-free: the CLI calls it before
any command imports torch, which reads ``PYTORCH_CUDA_ALLOC_CONF`` once, when CUDA starts).

``expandable_segments:True`` lets the allocator grow a segment in place instead of caching fixed-size blocks
that later requests of other sizes cannot reuse. On an H100, the compiled pre-training step under CUDA graphs
held 23.94 GiB reserved for 16.03 GiB allocated without it and 18.55 GiB with it, at the same step time
(benchmarks/RESULTS.md, twelfth session). A setting the user made is left alone.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def apply_allocator_defaults(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to :data:`DEFAULT_ALLOC_CONF` unless it is set (even to ""); returns the
    value in force. Takes effect only if CUDA has not started in this process yet."""
    env = os.environ if environ is None else environ
    return env.setdefault(ALLOC_CONF, DEFAULT_ALLOC_CONF)
