"""Model builders: a small from-scratch ViT, a pre-trained text encoder, and ViT pre-training."""

from fairedge.common.models.pretrain import pretrained_vision_classifier
from fairedge.common.models.text import TextClassifier, load_text_classifier
from fairedge.common.models.vision import VisionClassifier, build_vision_classifier

__all__ = [
    "TextClassifier",
    "VisionClassifier",
    "build_vision_classifier",
    "load_text_classifier",
    "pretrained_vision_classifier",
]
