"""Runtimes that run the network: the runtime interface, the one dispatcher, the exported-model cache, the traced
ONNX graph, int8.
"""
