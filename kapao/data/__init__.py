"""Data: image/video/stream sources, letterboxing and augmentation, COCO and YOLO-pose labels, the training
dataset, the dataset doctor and converter.
"""
