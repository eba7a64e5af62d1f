"""The driver: the training loop that runs the grid (top layer).

It uses the elastic controller (:mod:`flashtrain.elastic`) and the training pieces
(:mod:`flashtrain.train`: worker, clock, data, checkpoints, metrics); nothing below
imports it. The job CLI (:mod:`flashtrain.jobs.imagenet`) and the benchmarks sit on top.
"""
