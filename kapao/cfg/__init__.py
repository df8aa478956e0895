"""Configuration: inference settings and hyperparameters, the keypoint schema and head/target layouts, dataset
configs (kapao's and Ultralytics YOLO-pose YAMLs).
"""
