"""The part of ``comfy_api.latest.io`` the pack's nodes use, outside ComfyUI (see the package docstring).

A node subclasses :class:`ComfyNode`, returns a :class:`Schema` from ``define_schema`` and computes in the
classmethod ``execute``, which returns a :class:`NodeOutput`.  The classic attributes ComfyUI derives
from the schema (``INPUT_TYPES()``, ``RETURN_TYPES``, ``RETURN_NAMES``, ``OUTPUT_TOOLTIPS``, ``CATEGORY``,
``DESCRIPTION``, ``OUTPUT_NODE``, ``FUNCTION``) are derived here the same way, so tests and the workflow
builder read the same contract the server publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None):
        self.id, self.optional = id, optional
        self._opts = _pruned({"display_name": display_name, "tooltip": tooltip, "lazy": lazy})

    def v1(self) -> tuple[str, dict]:
        """The classic ``(type, options)`` declaration of this input."""
        return (self.io_type, dict(self._opts))


class _WidgetInput(_Input):
    # keyword argument -> classic option key, and the value written when the argument is not given (None: omitted)
    WIDGET: dict[str, tuple[str, Any]] = {}

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, default: Any = None,
                 force_input: bool | None = None, **widget):
        super().__init__(id, display_name, optional, tooltip, lazy)
        unknown = set(widget) - set(self.WIDGET)
        if unknown:
            raise TypeError(f"{type(self).__qualname__}: unexpected argument(s) {sorted(unknown)}")
        self._opts.update(_pruned({"default": default, "forceInput": force_input}))
        for arg, (key, absent) in self.WIDGET.items():
            value = widget.get(arg, absent)
            if value is not None:
                self._opts[key] = value


class _Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _io(io_type: str, input_base: type = _Input, widget: dict | None = None) -> type:
    """A type with its ``Input`` and ``Output`` classes, as ``io.Model``, ``io.Int``, ``io.Custom(name)``."""
    inp = type("Input", (input_base,), {"io_type": io_type, **({"WIDGET": widget} if widget else {})})
    out = type("Output", (_Output,), {"io_type": io_type})
    return type(io_type.title().replace("_", ""), (), {"io_type": io_type, "Input": inp, "Output": out})


Model, Clip, Vae = _io("MODEL"), _io("CLIP"), _io("VAE")
Conditioning, Latent, Image, Mask = _io("CONDITIONING"), _io("LATENT"), _io("IMAGE"), _io("MASK")
Guider, Sigmas = _io("GUIDER"), _io("SIGMAS")
Int = _io("INT", _WidgetInput, {"min": ("min", None), "max": ("max", None), "step": ("step", None),
                                "control_after_generate": ("control_after_generate", None)})
Float = _io("FLOAT", _WidgetInput, {"min": ("min", None), "max": ("max", None), "step": ("step", None),
                                    "round": ("round", None)})
String = _io("STRING", _WidgetInput, {"multiline": ("multiline", False), "placeholder": ("placeholder", None),
                                      "dynamic_prompts": ("dynamicPrompts", None)})
Boolean = _io("BOOLEAN", _WidgetInput, {"label_on": ("label_on", None), "label_off": ("label_off", None)})
Combo = _io("COMBO", _WidgetInput, {"options": ("options", None), "multiselect": ("multiselect", False),
                                    "control_after_generate": ("control_after_generate", None)})


def Custom(io_type: str) -> type:
    """A type of the pack's own (``io.Custom("SIE_RECIPE")``)."""
    return _io(io_type)


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False


class NodeOutput:
    """What ``execute`` returns: the outputs in order, and the node's UI message."""

    def __init__(self, *args: Any, ui: dict | None = None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class _NodeType(type):
    """The classic attributes, read off the schema whenever they are asked for (as ComfyUI does)."""

    @property
    def RETURN_TYPES(cls):
        return [o.io_type for o in cls.define_schema().outputs]

    @property
    def RETURN_NAMES(cls):
        return [o.display_name or o.io_type for o in cls.define_schema().outputs]

    @property
    def OUTPUT_TOOLTIPS(cls):
        return [o.tooltip for o in cls.define_schema().outputs]

    @property
    def OUTPUT_IS_LIST(cls):
        return [o.is_output_list for o in cls.define_schema().outputs]

    @property
    def CATEGORY(cls):
        return cls.define_schema().category

    @property
    def DESCRIPTION(cls):
        return cls.define_schema().description

    @property
    def OUTPUT_NODE(cls):
        return cls.define_schema().is_output_node


class ComfyNode(metaclass=_NodeType):
    FUNCTION = "EXECUTE_NORMALIZED"

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} declares no schema")

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} has no execute")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        spec: dict = {}
        schema = cls.define_schema()
        for inp in schema.inputs:
            spec.setdefault("optional" if inp.optional else "required", {})[inp.id] = inp.v1()
        if schema.is_output_node:  # an output node is handed the prompt and its workflow, to embed in files
            spec["hidden"] = {"prompt": ("PROMPT",), "extra_pnginfo": ("EXTRA_PNGINFO",)}
        return spec

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:
        out = cls.execute(*args, **kwargs)
        if not isinstance(out, NodeOutput):
            raise TypeError(f"{cls.__name__}.execute returned {type(out).__name__}, not io.NodeOutput")
        return out
