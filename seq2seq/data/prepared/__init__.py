"""The prepared data cache: the sentencepiece model(s) and the encoded ids of every split, built once
and read by every process (DDP ranks, DataLoader workers, later runs) through the OS page cache.

One job a module: :mod:`.format`, the folder's layout (:class:`~.format.SplitWriter` writes it,
:class:`~.format.RaggedIds` and :func:`~.format.open_prepared` read it); :mod:`.build`, sentencepiece
and the encoding of every split into a folder; :mod:`.cache`, which folder a run reads (reused if up to
date, else built under a lock); :mod:`.read_ahead`, the training ids read into the page cache. This file
imports none of them, so that importing one loads only what it needs.
"""
