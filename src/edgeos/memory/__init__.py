"""Agent memory: short-term run context, long-term semantic memory, retention, replication.

Nothing heavy is imported here: numpy and ONNX Runtime come with the first recall.
"""
