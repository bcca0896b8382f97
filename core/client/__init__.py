"""Headless use of a running ComfyUI server: ``python -m core.client run WORKFLOW_API.json ...``."""

from .comfy import ComfyClient, ComfyError, RunResult, describe_error, describe_rejection

__all__ = ["ComfyClient", "ComfyError", "RunResult", "describe_error", "describe_rejection"]
