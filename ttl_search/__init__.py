"""ttl-search: find how much of a pretrained CNN a medical image classifier should keep.

Implements TruncatedTL (Peng et al., "Rethinking Transfer Learning for Medical Image
Classification", BMVC 2023): keep the bottom of an ImageNet-pretrained CNN up to a cut point,
attach a new head, fine-tune, and search the cut with a two-stage strategy.
"""

__version__ = "0.1.0"
