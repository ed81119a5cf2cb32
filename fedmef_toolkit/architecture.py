"""Architecture descriptions: the JSON that rebuilds a model from a file.

Two kinds, stored in the metadata of every model file we write:
  {"kind": "registry", "kwargs": {"name": ..., "num_classes": ..., "norm": ..., ...}}
  {"kind": "converted", "source": {...}, "converted": [conv names], "nsconv": {...}}
"""

from __future__ import annotations

import json

import torch.nn as nn

from .errors import UserError


def registry_description(kwargs: dict) -> dict:
    return {"kind": "registry", "kwargs": dict(kwargs)}


def build_from_description(desc: dict) -> nn.Module:
    kind = desc.get("kind") if isinstance(desc, dict) else None
    if kind == "registry":
        from .models import build_from_kwargs

        try:
            kwargs = dict(desc["kwargs"])
            # files written before the key existed trained centred depthwise filters
            if kwargs.get("norm") == "nsconv":
                kwargs.setdefault("nsconv_center_depthwise", True)
            return build_from_kwargs(kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"invalid model description: {exc}") from None
    if kind == "converted":
        from .convert import build_converted

        return build_converted(desc)
    raise UserError(f"unknown model description kind {kind!r}")


def parse_description(text: str, source: str) -> dict:
    try:
        desc = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise UserError("corrupt model description in metadata", source) from None
    if not isinstance(desc, dict) or "kind" not in desc:
        raise UserError("model description in metadata has no 'kind'", source)
    return desc
