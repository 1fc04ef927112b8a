"""Tasks as tensors: the built-in digits-domains and digit-shift tasks, user data loaders, client partitioning."""

from fairedge.common.data.digit_shift import DIGIT_SHIFT_DOMAINS, digit_shift_source_ids, make_digit_shift
from fairedge.common.data.digits_domains import DIGITS_DOMAINS, digits_domains_source_ids, make_digits_domains
from fairedge.common.data.partition import PartitionMode, partition_clients
from fairedge.common.data.task_data import (
    PIXEL_MEAN,
    PIXEL_STD,
    LabeledData,
    TaskData,
    normalize_pixels,
    stratified_split,
)
from fairedge.common.data.user_data import IMAGE_SUFFIXES, load_hf_image_dataset, load_image_folder, load_text_table

__all__ = [
    "DIGITS_DOMAINS",
    "DIGIT_SHIFT_DOMAINS",
    "IMAGE_SUFFIXES",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "LabeledData",
    "PartitionMode",
    "TaskData",
    "digit_shift_source_ids",
    "digits_domains_source_ids",
    "load_hf_image_dataset",
    "load_image_folder",
    "load_text_table",
    "make_digit_shift",
    "make_digits_domains",
    "normalize_pixels",
    "partition_clients",
    "stratified_split",
]
