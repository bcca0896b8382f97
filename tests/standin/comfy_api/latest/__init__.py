"""``comfy_api.latest``: the typed node API's ``io`` module (stand-in; see the package docstring)."""

from . import io

__all__ = ["io"]
