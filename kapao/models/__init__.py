"""The network (YOLOv5-P6-style CSP feature pyramid with the KAPAO head) and its training loss."""
