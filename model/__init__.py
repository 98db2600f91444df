"""Two views in, logits and a queue out: MoCo v1/v2 and the encoders it trains."""

from model.moco import MoCo
from model.resnet import ARCHS, backbone_features, build_encoder

__all__ = ["MoCo", "ARCHS", "backbone_features", "build_encoder"]
