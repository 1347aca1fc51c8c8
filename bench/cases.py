"""Names of the benchmark models and configurations, importable without TensorFlow."""

MODELS = ("tiny", "mlp", "cnn", "lstm")
CONFIGS = ("plain", "gradwatch", "gradwatch_all", "tensorboard", "naive")
