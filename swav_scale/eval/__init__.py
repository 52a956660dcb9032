"""Evaluation of frozen features: the encoders compared and their features (features.py), the weighted kNN
(knn.py), the linear probe (linear.py) and BatchNorm statistics re-estimated at the evaluation size
(precise_bn.py). The training loop imports none of it; the job that runs it passes the evaluation in."""
