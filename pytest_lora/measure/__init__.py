"""Measurements, one module per concern: ``params`` (trainable / total parameters), ..."""
