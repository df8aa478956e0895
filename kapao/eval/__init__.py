"""Evaluation: COCO / CrowdPose keypoint metrics, the val verb, the keypoint-confidence study."""
