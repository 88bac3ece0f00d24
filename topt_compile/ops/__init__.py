"""The TopThetaAttention op: its one definition (schema) and its numpy reference."""
from .schema import DOMAIN, OP_TYPE, OPSET_VERSION, Attributes, Compensation, make_node

__all__ = ["DOMAIN", "OP_TYPE", "OPSET_VERSION", "Attributes", "Compensation", "make_node"]
