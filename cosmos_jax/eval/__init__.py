"""Zero-shot evaluation: retrieval and classification (spec 5.2-5.3) on the uni-modal towers.

``encode.Encoder`` turns a parameter tree into batched, jitted feature functions;
``retrieval`` and ``classification`` hold the datasets and metrics; ``report`` writes them.
"""

from cosmos_jax.eval.encode import Encoder, ImageSource

__all__ = ['Encoder', 'ImageSource']
