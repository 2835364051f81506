"""sae_repro: a reproducible companion to three papers on sparse autoencoders.

Flow, one direction: corpus -> models -> activations -> sae/train -> analyses -> figures -> book.
"""

__version__ = "0.1.0"
