"""Methods, one per file."""

from vislearn.models.autoencoder import Autoencoder
from vislearn.models.context_prediction import ContextPrediction
from vislearn.models.dann import DANN
from vislearn.models.exemplar import ExemplarCNN
from vislearn.models.icmlm import ICMLM
from vislearn.models.moco import MoCo
from vislearn.models.rotnet import RotNet
from vislearn.models.simclr import SimCLR
from vislearn.models.supervised import Supervised
from vislearn.models.two_branch import TwoBranch
from vislearn.models.two_branch_similarity import TwoBranchSimilarity
from vislearn.models.yolo_v1 import YoloV1

__all__ = ["Autoencoder", "ContextPrediction", "DANN", "ExemplarCNN", "ICMLM", "MoCo", "RotNet", "SimCLR", "Supervised",
           "TwoBranch", "TwoBranchSimilarity", "YoloV1"]
