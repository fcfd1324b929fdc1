"""The asset graph.

``sdata -> patches -> model -> latents -> cluster_reference -> clusters -> graph_stats -> embedding``.
"""
