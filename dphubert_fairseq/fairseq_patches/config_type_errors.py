"""Patch: a config value of the wrong type is a one-line ``ConfigError`` naming the key and the fix.

Target: ``fairseq.dataclass.utils.merge_with_parent``, where ``fairseq-hydra-train`` merges the registered
dataclass of each config section (model, task, criterion, ...) with the command line. A value of the wrong
type (e.g. ``model.prune_units=conv``, a string for a list) ends there in omegaconf's multi-line
ValidationError about "AnyNode".
Guard: ``merge_with_parent`` lets omegaconf's ``ValidationError`` through (its source does not handle it).
"""

import inspect

from fairseq.dataclass import utils as dataclass_utils
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from ..errors import ConfigError
from .patch import function_patch


def needed() -> bool:
    return "ValidationError" not in inspect.getsource(inspect.unwrap(dataclass_utils.merge_with_parent))


def _merge_naming_the_key(original):
    def merge_with_parent(dc, cfg, remove_missing=False):
        try:
            return original(dc, cfg, remove_missing)
        except ValidationError as err:
            section = cfg._key() if OmegaConf.is_config(cfg) else None
            key = ".".join(str(k) for k in (section, err.full_key) if k)
            field = getattr(dc, "__dataclass_fields__", {}).get(str(err.full_key).split(".")[0])
            value = cfg.get(err.full_key) if OmegaConf.is_config(cfg) and err.full_key in cfg else None
            if field is not None and "List" in str(field.type) and isinstance(value, (str, int, float)):
                raise ConfigError(
                    f"{key}: got {value!r}, a single value, but it takes a list; write {key}=[{value}] "
                    f"(several: {key}=[a,b])"
                ) from None
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{key or dc.__name__}: {reason}") from None

    return merge_with_parent


PATCH = function_patch(
    "config_type_errors", dataclass_utils, "merge_with_parent", needed, _merge_naming_the_key
)
