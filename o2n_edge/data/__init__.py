"""Data sets, image decoding and k-shot sampling (``load_dataset`` is the entry point).

numpy + pillow only: the torch-free runtime reuses the image decoder.
"""

from o2n_edge.data.datasets import list_categories, load_dataset
from o2n_edge.data.images import (
    MAX_PIXELS,
    MIN_SIDE,
    ImageError,
    decode_image,
    load_image,
    load_mask,
)
from o2n_edge.data.layouts import (
    DATASETS,
    ENV_DATA,
    IMAGE_SUFFIXES,
    Dataset,
    DatasetError,
    Sample,
    detect_layout,
    list_images,
)
from o2n_edge.data.sampling import sample_shots
from o2n_edge.data.textile import (
    TEXTILE_TEST_DEFECT,
    TEXTILE_TEST_GOOD,
    TEXTILE_TRAIN,
    TEXTILE_VAL_GOOD,
)

__all__ = [
    "DATASETS",
    "ENV_DATA",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "TEXTILE_TEST_DEFECT",
    "TEXTILE_TEST_GOOD",
    "TEXTILE_TRAIN",
    "TEXTILE_VAL_GOOD",
    "Dataset",
    "DatasetError",
    "ImageError",
    "Sample",
    "decode_image",
    "detect_layout",
    "list_categories",
    "list_images",
    "load_dataset",
    "load_image",
    "load_mask",
    "sample_shots",
]
