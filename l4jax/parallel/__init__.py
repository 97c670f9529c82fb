"""Where the model runs: the rules table mapping logical axes onto mesh axes (``rules``), meshes and placing host
arrays on them (``mesh``), the shardings of every parameter (``shardings``) and multi-process helpers
(``distributed``)."""

from ..model.axes import Partitioning, ShardingError
from .mesh import make_mesh, pad_batch, parse_mesh, platform, put, simulate_cpu_devices
from .rules import MESH_AXES, RULES, batch_multiple, partitioning, rules_for
from . import distributed
from .shardings import param_shardings

__all__ = ["MESH_AXES", "RULES", "Partitioning", "ShardingError", "batch_multiple", "distributed", "make_mesh",
           "pad_batch", "param_shardings", "parse_mesh", "partitioning", "platform", "put", "rules_for",
           "simulate_cpu_devices"]
