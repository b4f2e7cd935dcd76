"""Methods, one per file."""

from vislearn.models.autoencoder import Autoencoder
from vislearn.models.context_prediction import ContextPrediction
from vislearn.models.dann import DANN
from vislearn.models.exemplar import ExemplarCNN
from vislearn.models.moco import MoCo
from vislearn.models.rotnet import RotNet
from vislearn.models.simclr import SimCLR
from vislearn.models.supervised import Supervised
from vislearn.models.two_branch import TwoBranch
from vislearn.models.yolo_v1 import YoloV1

__all__ = ["Autoencoder", "ContextPrediction", "DANN", "ExemplarCNN", "MoCo", "RotNet", "SimCLR", "Supervised",
           "TwoBranch", "YoloV1"]
