"""nn.Module wrappers, with the same arguments as the functions."""
from .losses.contrastive import InfoNCELoss, SigLIPLoss, SupConLoss
from .losses.cross_entropy import CrossEntropyLoss, FocalLoss
from .losses.linear_cross_entropy import LinearCrossEntropyLoss
from .losses.sigmoid_focal import SigmoidFocalLoss
from .losses.triplet import TripletLoss

__all__ = ["CrossEntropyLoss", "FocalLoss", "LinearCrossEntropyLoss", "SigmoidFocalLoss", "InfoNCELoss",
           "SupConLoss", "SigLIPLoss", "TripletLoss"]
