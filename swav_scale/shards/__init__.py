"""The write path: making shard sets (make_shards: inputs -> builder -> tar) and checking copies (verify).

Training reads them through swav_scale.data; both share the manifest format (data/manifest.py).
"""
