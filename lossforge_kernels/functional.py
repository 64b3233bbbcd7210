"""The functional API: one function per loss (each family's module holds its own)."""
from .losses.contrastive import info_nce, siglip_loss, supcon_loss
from .losses.cross_entropy import cross_entropy, focal_loss
from .losses.linear_cross_entropy import linear_cross_entropy
from .losses.sigmoid_focal import sigmoid_focal_loss
from .losses.triplet import triplet_loss

__all__ = ["cross_entropy", "focal_loss", "linear_cross_entropy", "sigmoid_focal_loss", "info_nce", "supcon_loss",
           "siglip_loss", "triplet_loss"]
