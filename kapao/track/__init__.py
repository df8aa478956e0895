"""Tracking: ultralytics ByteTrack / BoT-SORT behind one per-frame step, and One Euro keypoint smoothing."""
