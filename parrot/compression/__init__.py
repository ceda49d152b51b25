"""LLMLingua-family compression of intermediate context.

    from parrot.compression import compress
    result = compress(long_text, rate=0.3, question="What is the access code?")
    result.context, result.ratio, result.kept_token_ids

Tokens are scored with Parrot's own model forward (``parrot.backends``): the
embedded tiny model by default, any local checkpoint folder, or a running
``TorchEngine`` (``Compressor(engine)``). See :mod:`parrot.compression.compressor`
for the method and ``python -m parrot.compression --help`` for the command line.
"""

from parrot.compression.compressor import (
    COARSE_CRITERIA,
    CompressionResult,
    Compressor,
    SegmentRanking,
    compress,
    render_kept,
)
from parrot.compression.scorer import ScoringContext, TokenScorer

__all__ = [
    "COARSE_CRITERIA", "CompressionResult", "Compressor", "ScoringContext", "SegmentRanking", "TokenScorer",
    "compress", "render_kept",
]
