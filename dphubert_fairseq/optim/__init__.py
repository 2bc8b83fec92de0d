"""fairseq optimizers of the plugin; importing this package registers them."""

from .torch_adamw import TorchAdamW, TorchAdamWConfig  # noqa: F401
