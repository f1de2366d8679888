"""curate: select the best image-text pairs of a web-scale corpus with a CLIP teacher."""

__version__ = "0.2.0"
