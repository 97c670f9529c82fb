"""``l4jax plan``: the real train, prefill or decode step of any model on any mesh, compiled for an H100 host or a
TPU slice without the hardware (``targets``), from abstract shapes only (``programs``), with its memory plan and
program summary (``report``), the model FLOPs and bytes that bound it (``costs``), and the command's output
(``planner``)."""
