"""Export of netquant networks to other formats: ONNX (float, and int8 in QDQ form)."""
from .onnx import OnnxExportError, export_float_onnx, export_quantized_onnx, float_onnx, quantized_onnx

__all__ = ["OnnxExportError", "export_float_onnx", "export_quantized_onnx", "float_onnx", "quantized_onnx"]
