"""Translation as a service: ``python -m seq2seq.serve ckpt=PATH`` (see ``__main__``).

The package's modules import FastAPI only where they serve (``app``); this file imports nothing, so
``python -m seq2seq.serve --help`` answers without loading torch or the web framework.
"""
