"""Samplers: models wrapped for the N-sample engine (`inference_scaling.engine.Sampler`)."""
