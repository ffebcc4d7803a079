"""Step 2: the model. ``manifest`` reads a model folder (``model.yaml``), ``preprocess`` turns a
volume into the model's input, ``inference`` runs the backbone once and every head over a series,
``runtimes`` are the backends (ONNX Runtime, TensorRT, PyTorch), ``select`` picks one, ``gate``
checks a reduced precision against FP32, ``engine_cache`` keeps built TensorRT engines.
"""
