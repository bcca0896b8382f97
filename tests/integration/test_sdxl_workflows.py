"""The bundled SDXL workflows execute on a random-weight SDXL in a real ComfyUI server, CPU-sized.

Heavy (the random SDXL is 6.9 GB and the server holds it in memory), so marked ``sdxl`` and run by hand:
``SIE_SDXL=1 COMFYUI_DIR=... python -m pytest -m sdxl``.  The server runs with ``--bf16-unet`` (fp32 SDXL
plus training's per-call weight copies does not fit in 24 GB); the graphs are the shipped ones with the
same CPU-sized overrides as their SD 1.5 twins (``test_workflows_execute.OVERRIDES``).
"""

from __future__ import annotations

import pytest
from test_sdxl_comfy import SDXL_REASON, random_sdxl
from test_workflows_execute import (IMAGES, REPO, SDXL_WORKFLOWS, ComfyClient, ComfyServer, execute,
                                    random_open_clip, random_rectifier, random_sam)

from comfy_server import skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.sdxl,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
              pytest.mark.skipif(SDXL_REASON is not None, reason=SDXL_REASON or "")]


@pytest.fixture(scope="module")
def sdxl_server():
    models = {"checkpoints": [random_sdxl()], "open_clip": [random_open_clip()], "sams": [random_sam()],
              "single_image_edit/rectifier": [random_rectifier()]}
    with ComfyServer(models=models, extra_args=["--bf16-unet"]) as srv:
        client = ComfyClient(srv.url)
        client.upload_image(IMAGES / "coffee_250x200.png")
        client.upload_image(REPO / "core" / "layerdiffusion" / "data" / "table_by_the_sea_512.png")
        yield srv


@pytest.mark.parametrize("name", [f"{n}_sdxl" for n in SDXL_WORKFLOWS])
def test_sdxl_workflow_executes(sdxl_server, name):
    execute(sdxl_server, name)
