"""swav_scale: distributed, sharded SwAV pretraining."""

__version__ = "0.1.0"
