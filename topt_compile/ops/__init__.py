"""The TopThetaAttention and TopThetaCalibrate ops: their one definition (schema) and their numpy
references (reference.py, calibrate_reference.py)."""
from .schema import (CALIBRATE_OP_TYPE, DOMAIN, OP_TYPE, OPSET_VERSION, Attributes, Compensation,
                     make_calibrate_node, make_node)

__all__ = ["DOMAIN", "OP_TYPE", "OPSET_VERSION", "Attributes", "Compensation", "make_node",
           "CALIBRATE_OP_TYPE", "make_calibrate_node"]
