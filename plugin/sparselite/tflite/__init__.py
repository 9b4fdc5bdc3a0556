"""The TFLite file format, the ground floor of sparselite: flatbuffer read/write, op and tensor names,
the op list, and reading (sparse) constant tensors back.

Everything above reads and writes ``.tflite`` files through this package (export's passes, the
runtime, ``inspect``); it imports nothing of sparselite but ``errors``.
"""
