"""Where the model runs: the rules table mapping logical axes onto mesh axes (``rules``), meshes and placing host
arrays on them (``mesh``), the shardings of every parameter (``shardings``) and multi-process helpers
(``distributed``). Each name loads its module on first use (``l4jax._lazy``)."""

from .._lazy import exports

_NAMES = {"Partitioning": "..model.axes", "ShardingError": "..model.axes", "MESH_AXES": ".rules", "RULES": ".rules",
          "batch_multiple": ".rules", "partitioning": ".rules", "rules_for": ".rules", "distributed": ".distributed",
          "make_mesh": ".mesh", "pad_batch": ".mesh", "parse_mesh": ".mesh", "platform": ".mesh", "put": ".mesh",
          "simulate_cpu_devices": ".mesh", "param_shardings": ".shardings"}
__getattr__, __dir__ = exports(__name__, _NAMES)
__all__ = sorted(_NAMES)
