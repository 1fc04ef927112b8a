"""Model builders: a small from-scratch ViT, pre-trained image backbones and text encoders, and ViT pre-training."""

from fairedge.common.models.hf_vision import HFVisionClassifier, load_hf_vision_classifier
from fairedge.common.models.pretrain import pretrained_vision_classifier
from fairedge.common.models.text import TextClassifier, load_text_classifier
from fairedge.common.models.vision import VisionClassifier, build_vision_classifier

__all__ = [
    "HFVisionClassifier",
    "TextClassifier",
    "VisionClassifier",
    "build_vision_classifier",
    "load_hf_vision_classifier",
    "load_text_classifier",
    "pretrained_vision_classifier",
]
