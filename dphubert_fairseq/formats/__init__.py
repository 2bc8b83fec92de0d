"""Adapters between ``dphubert`` checkpoints and other formats and toolkits (e.g. s3prl's SUPERB runner)."""
