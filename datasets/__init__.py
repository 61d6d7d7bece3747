"""Data pipeline: annotation files and images to the tensors the model takes."""
from .annotations import DataError, image_file_name, load_annotations
from .image_io import image_size, read_image
from .letterbox import (box_to_yolo, chw, clip_to_image, letterbox_geometry, letterbox_image, letterbox_to_original,
                        normalize_images, original_to_letterbox)
from .loader import EpochSampler, ShardSampler, build_loader
from .pseudo_labels import check_training_file, training_entries
from .refer_dataset import EntryExpressions, FirstExpression, RefDataset
from .tokens import PAD, UNK, CLS, SPECIAL_TOKENS, build_vocab, encode, select_expressions, tokenize
from .word_vectors import load_word_vectors

__all__ = [
    "CLS", "DataError", "EntryExpressions", "EpochSampler", "FirstExpression", "PAD", "RefDataset", "SPECIAL_TOKENS",
    "ShardSampler", "UNK", "box_to_yolo", "build_loader", "build_vocab", "check_training_file", "chw", "clip_to_image",
    "encode", "image_file_name", "image_size", "letterbox_geometry", "letterbox_image", "letterbox_to_original",
    "load_annotations", "load_word_vectors", "normalize_images", "original_to_letterbox", "read_image",
    "select_expressions", "tokenize", "training_entries",
]
