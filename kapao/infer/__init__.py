"""Inference: NMS, test-time augmentation, post-processing, the predictor and KAPAO API, output records and sinks, resume."""
