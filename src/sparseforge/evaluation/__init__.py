"""Measuring a model: quality (perplexity, embedding fidelity) and generation speed.

* :mod:`~sparseforge.evaluation.quality`: the project's one perplexity protocol and encoder fidelity;
* :mod:`~sparseforge.evaluation.speed`: tokens per second and memory, dense vs compressed;
* :mod:`~sparseforge.evaluation.mqar`: associative recall of the shipped MQAR model under a KV-cache policy.

Example:
    >>> from sparseforge.evaluation.quality import DEFAULT_SEQLEN
    >>> DEFAULT_SEQLEN
    256
"""
