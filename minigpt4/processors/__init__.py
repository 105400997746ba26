"""Image and caption processors, built by name from config dicts."""
from minigpt4.processors.image import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_PROCESSORS,
    Blip2ImageEvalProcessor,
    Blip2ImageTrainProcessor,
    build_image_processor,
)
from minigpt4.processors.text import TEXT_PROCESSORS, BlipCaptionProcessor, build_text_processor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_PROCESSORS",
    "TEXT_PROCESSORS",
    "Blip2ImageEvalProcessor",
    "Blip2ImageTrainProcessor",
    "BlipCaptionProcessor",
    "build_image_processor",
    "build_text_processor",
]
