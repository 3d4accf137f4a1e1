"""Images to features, cached: the frozen backbone and everything that runs it.

One front door, :class:`tlx.extraction.frozen.FrozenBackbone`; behind it the backbone's building
(``backbone``, ``weights``, ``flip``), the feature cache (``store``), the pipeline that decodes and
batches images (``pipeline``, ``preprocess``), what runs the backbone (``runtimes``, ``device``) and
where (``engines``).
"""
