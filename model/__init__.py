"""RetinaNet in plain PyTorch (Lin et al., arXiv 1708.02002): no Ray, DALI, storage or distributed calls."""

from model.build import build_retinanet
from model.config import RetinaNetConfig, torchvision_config
from model.loss import RetinaNetLoss
from model.postprocess import PostProcess
from model.retinanet import Outputs, RetinaNet
from model.torchvision_compat import load_torchvision_state_dict

__all__ = [
    "Outputs",
    "PostProcess",
    "RetinaNet",
    "RetinaNetConfig",
    "RetinaNetLoss",
    "build_retinanet",
    "load_torchvision_state_dict",
    "torchvision_config",
]
