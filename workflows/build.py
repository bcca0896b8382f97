"""Generate the bundled workflows: each graph once, written in both formats.

    python workflows/build.py            # rewrite workflows/*.json and workflows/api/*.json

A graph is described once, in its paper's module under ``workflows/graphs/`` (node types,
widget values by input name, links), and written as the UI (litegraph, version 0.4) workflow that ComfyUI shows as a template and
as its API-format twin that ``POST /prompt`` takes.  Widget order and the extra
widget values the frontend stores (the "control after generate" value of seeds, the
upload button of image loaders) come from the node schemas (``graphs/builder.py``): ours
from the pack, core nodes' from tests/data/comfyui_object_info.json.  The API twins live in
``workflows/api/`` so that ComfyUI's template scanner (which reads ``workflows/*.json``)
does not offer them as templates.  tests/test_workflows.py re-checks every file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from graphs import GRAPHS  # noqa: E402  (one module per paper: graphs/sinddm.py, imagic.py, sine.py, ...)
from graphs.builder import ROOT, load_schemas  # noqa: E402


def main() -> None:
    schemas = load_schemas()
    (ROOT / "workflows" / "api").mkdir(exist_ok=True)
    for make in GRAPHS:
        g = make()
        (ROOT / "workflows" / f"{g.name}.json").write_text(json.dumps(g.ui(schemas), indent=1) + "\n")
        (ROOT / "workflows" / "api" / f"{g.name}.json").write_text(json.dumps(g.api(schemas), indent=1) + "\n")
        print(f"wrote workflows/{g.name}.json and workflows/api/{g.name}.json")


if __name__ == "__main__":
    main()
