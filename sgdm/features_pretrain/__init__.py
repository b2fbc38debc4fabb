"""DINO-style self-supervised pretraining of a feature extractor for any domain."""
