"""Export of a trained student: ONNX, TorchScript and ultralytics layouts, checked against the model."""
