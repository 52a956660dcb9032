"""The read path: shard sets (manifest, sources) planned into equal steps per rank (plan), read (reader),
cut into multi-crop views (multicrop) and batched per rank (loader); labelled splits for evaluation (labelled).

Shard sets are written and checked by swav_scale.shards.
"""
