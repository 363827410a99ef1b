"""Text data: the built-in corpus and calibration token windows.

* :mod:`~sparseforge.data.corpus`: the shipped Shakespeare corpus, split by whole works (stdlib only);
* :mod:`~sparseforge.data.calibration`: tokenised text and random calibration windows;
* :mod:`~sparseforge.data.mqar`: multi-query associative recall examples (a synthetic recall task).

Example:
    >>> from sparseforge.data import corpus
    >>> "hamlet" in corpus.list_works("heldout")
    True
"""
