"""Run an API-format workflow on a running ComfyUI server, headless.

    python -m core.client run workflows/api/sinddm_random_samples.json --server http://127.0.0.1:8188 \\
        --image 2=core/sinddm/data/coffee_250x200.png --set SIE_SinDDMTrain.steps=2000 --out results/

``--image NODE=path`` uploads a file and feeds it to that LoadImage node; ``--set
NODE.input=value`` changes an input (value parsed as JSON when it can be, else a
string).  NODE is a node id, a node title or a node class (then every node of that
class).  Progress comes from the server's WebSocket (the ``websocket-client`` package,
a dependency of the pack); node errors are printed readably; outputs are downloaded
into ``--out``.

Nothing is ever written outside ``--out``: an output whose server-given subfolder or
file name is absolute, names a drive, holds ``..``, a NUL byte, or resolves outside
``--out`` (also through a symbolic link inside it) is refused with an error naming the
path, and nothing is fetched or written for it.  The other outputs are still saved,
but the run then exits with status 1.

Exit status: 0 on success, 1 on a failed or rejected prompt or an output that could
not be saved (refused or failed download), 2 on bad arguments, 130 when interrupted
with Ctrl-C (the server is told to stop).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .comfy import ComfyClient, ComfyError, describe_error


def select(prompt: dict, ref: str) -> list[str]:
    """Node ids matching a node id, a title (``_meta.title``) or a class type."""
    if ref in prompt:
        return [ref]
    by_title = [k for k, v in prompt.items() if v.get("_meta", {}).get("title") == ref]
    if by_title:
        return by_title
    by_class = [k for k, v in prompt.items() if v.get("class_type") == ref]
    if by_class:
        return by_class
    raise ComfyError(f"no node '{ref}' in the workflow (give a node id, title or class); nodes: "
                     + ", ".join(f"{k}={v.get('class_type')}" for k, v in sorted(prompt.items())))


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_sets(prompt: dict, sets: list[str]) -> None:
    for item in sets:
        target, sep, value = item.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot or not name:
            raise ComfyError(f"--set {item!r}: write NODE.input=value")
        for node_id in select(prompt, node_ref):
            inputs = prompt[node_id]["inputs"]
            if name not in inputs:
                raise ComfyError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                                 f"'{name}' (it has: {', '.join(inputs)})")
            inputs[name] = parse_value(value)


class ProgressPrinter:
    """Prints one updating line per node from the WebSocket messages."""

    def __init__(self, prompt: dict, stream=None):
        self.prompt, self.node = prompt, None
        self.stream = sys.stderr if stream is None else stream  # looked up now, so a redirected stderr is honoured

    def label(self, node_id: str) -> str:
        node = self.prompt.get(str(node_id), {})
        return node.get("_meta", {}).get("title") or node.get("class_type") or str(node_id)

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "executing" and data.get("node") is not None:
            self._end_line()
            self.node = data["node"]
            self.stream.write(f"  {self.label(self.node)}")
            self.stream.flush()
        elif kind == "progress":
            value, total = data.get("value", 0), max(data.get("max", 1), 1)
            filled = int(30 * value / total)
            self.stream.write(f"\r  {self.label(data.get('node', self.node))} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{value}/{total}")
            self.stream.flush()
        elif kind == "execution_cached" and data.get("nodes"):
            self.stream.write(f"  cached: {', '.join(self.label(n) for n in data['nodes'])}\n")
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            self._end_line()

    def _end_line(self) -> None:
        if self.node is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.node = None


def run(args) -> int:
    path = Path(args.workflow)
    try:
        prompt = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        return 2
    if "nodes" in prompt and "links" in prompt:
        print(f"error: {path} is a UI workflow; this command takes the API format (File > Export (API), or the "
              "files in workflows/api/)", file=sys.stderr)
        return 2
    client = ComfyClient(args.server)
    try:
        for item in args.image:
            ref, sep, file = item.partition("=")
            if not sep:
                raise ComfyError(f"--image {item!r}: write NODE=path")
            name = client.upload_image(file)
            for node_id in select(prompt, ref):
                prompt[node_id]["inputs"]["image"] = name
            print(f"uploaded {file} as {name}", file=sys.stderr)
        apply_sets(prompt, args.set)
        print(f"queueing {path.name} on {args.server}", file=sys.stderr)
        result = client.run(prompt, timeout=args.timeout, on_message=ProgressPrinter(prompt))
    except KeyboardInterrupt:
        client.interrupt()
        print("interrupted; asked the server to stop", file=sys.stderr)
        return 130
    except ComfyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.status == "error":
        print(f"error: {describe_error(result.error)}", file=sys.stderr)
        return 1
    if result.status == "interrupted":
        print("the prompt was interrupted on the server", file=sys.stderr)
        return 1
    out = Path(args.out)
    files, failed = [], 0
    for node_id, ui in sorted(result.outputs.items()):
        for image in ui.get("images", []):
            if not isinstance(image, dict):
                failed += 1
                print(f"error: node {node_id}: the server listed an output that is not an object: {image!r}",
                      file=sys.stderr)
            elif image.get("type", "output") == "output" or args.all:
                try:
                    files.append(client.download(image, out))
                except (ComfyError, OSError) as e:  # an unsafe path (UnsafePathError), HTTP or disk error
                    failed += 1
                    print(f"error: node {node_id}: {e}", file=sys.stderr)
        for text in ui.get("text", []):
            print(f"{node_id} ({prompt.get(node_id, {}).get('class_type')}): {text}")
    print(f"done in {result.seconds:.1f} s; {len(files)} file(s) in {out}/"
          + (f"; {failed} output(s) NOT saved (see the errors above)" if failed else ""), file=sys.stderr)
    for f in files:
        print(f)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m core.client", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run an API-format workflow")
    p.add_argument("workflow")
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--image", action="append", default=[], metavar="NODE=PATH")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    p.add_argument("--out", default="comfy_out")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds before giving up (and interrupting)")
    p.add_argument("--all", action="store_true", help="also download temp/preview images")
    a = ap.parse_args(argv)
    t0 = time.time()
    code = run(a)
    if code and code != 2:
        print(f"failed after {time.time() - t0:.1f} s", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
