"""Copy serve/config.yaml into the RayService's serveConfigV2 (docker/k8s/rayservice.yaml).

    python docker/k8s/render_serve_config.py           # rewrite the serveConfigV2 block
    python docker/k8s/render_serve_config.py --check   # exit 1 when rayservice.yaml is stale

The RayService must run the Serve config of serve/config.yaml (the deploy task changes only
``user_config.model_version`` in it), with two differences: ``http_options.host`` is 0.0.0.0, since
in a pod the Serve proxy has to listen on every interface; and production replicas: at least
``PRODUCTION_MIN_REPLICAS``, at most one per Ray node, so that a lost node or replica leaves one
serving (serve/config.yaml keeps 1 for the local demo). Only the lines between the two marker
comments of rayservice.yaml are rewritten; the rest of that file is written by hand. The comments
of serve/config.yaml are not carried over (the block is the parsed config, dumped again).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO_ROOT / "serve" / "config.yaml"
RAYSERVICE = Path(__file__).resolve().with_name("rayservice.yaml")
BEGIN_MARKER = "# >>> serveConfigV2"
END_MARKER = "# <<< serveConfigV2"
POD_HTTP_HOST = "0.0.0.0"
KEY_INDENT = "  "  # serveConfigV2 is a key of the RayService's spec
BLOCK_INDENT = KEY_INDENT * 2
REGENERATE = "python docker/k8s/render_serve_config.py"
PRODUCTION_MIN_REPLICAS = 2
MAX_REPLICAS_PER_NODE = 1


class RenderError(ValueError):
    """rayservice.yaml does not have the marker comments the script needs, or renders wrongly."""


def expected_serve_config(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config the RayService must carry: serve/config.yaml with the proxy on 0.0.0.0 and
    at least ``PRODUCTION_MIN_REPLICAS`` replicas of every deployment, one per Ray node."""
    config = copy.deepcopy(serve_config)
    config["http_options"] = {**(config.get("http_options") or {}), "host": POD_HTTP_HOST}
    for app in config.get("applications") or []:
        for deployment in app.get("deployments") or []:
            if scaling := deployment.get("autoscaling_config"):
                least = max(PRODUCTION_MIN_REPLICAS, scaling.get("min_replicas") or 0)
                deployment["autoscaling_config"] = {
                    **scaling,
                    "min_replicas": least,
                    "initial_replicas": max(least, scaling.get("initial_replicas") or 0),
                    "max_replicas": max(least, scaling.get("max_replicas") or 0),
                }
            else:
                deployment["num_replicas"] = max(PRODUCTION_MIN_REPLICAS, deployment.get("num_replicas") or 1)
            deployment["max_replicas_per_node"] = MAX_REPLICAS_PER_NODE
    return config


def _differences(expected: Any, actual: Any, path: str) -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in [*expected, *(k for k in actual if k not in expected)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in actual:
                found.append(f"{where}: missing in the RayService (serve/config.yaml: {expected[key]!r})")
            elif key not in expected:
                found.append(f"{where}: only in the RayService ({actual[key]!r})")
            else:
                found += _differences(expected[key], actual[key], where)
        return found
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        found = []
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            found += _differences(left, right, f"{path}[{index}]")
        return found
    if expected != actual or type(expected) is not type(actual):
        return [f"{path or '<root>'}: serve/config.yaml says {expected!r}, the RayService {actual!r}"]
    return []


def serve_config_differences(rayservice_config: dict[str, Any], serve_config: dict[str, Any]) -> list[str]:
    """How the RayService's parsed serveConfigV2 differs from what serve/config.yaml requires.

    Empty when they agree: same config, except the host and replicas of :func:`expected_serve_config`.
    """
    return _differences(expected_serve_config(serve_config), rayservice_config, "")


def rayservice_serve_config(manifest_text: str) -> dict[str, Any]:
    """The parsed serveConfigV2 of the (only) RayService in ``manifest_text``."""
    services = [doc for doc in yaml.safe_load_all(manifest_text) if doc and doc.get("kind") == "RayService"]
    if len(services) != 1:
        raise RenderError(f"expected one RayService, found {len(services)}")
    return yaml.safe_load(services[0]["spec"]["serveConfigV2"])


def render_block(serve_config: dict[str, Any]) -> list[str]:
    """The ``serveConfigV2: |`` lines for ``serve_config``."""
    text = yaml.safe_dump(
        expected_serve_config(serve_config), sort_keys=False, default_flow_style=False, width=1000
    )
    return [f"{KEY_INDENT}serveConfigV2: |"] + [
        f"{BLOCK_INDENT}{line}" if line.strip() else "" for line in text.splitlines()
    ]


def render(manifest_text: str, serve_config: dict[str, Any]) -> str:
    """``manifest_text`` with the lines between the markers replaced by ``serve_config``'s block."""
    lines = manifest_text.splitlines()
    begins = [i for i, line in enumerate(lines) if line.strip().startswith(BEGIN_MARKER)]
    ends = [i for i, line in enumerate(lines) if line.strip().startswith(END_MARKER)]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise RenderError(
            f"rayservice.yaml needs exactly one {BEGIN_MARKER!r} line followed by one {END_MARKER!r} "
            f"line (found {len(begins)} and {len(ends)})"
        )
    rendered = "\n".join([*lines[: begins[0] + 1], *render_block(serve_config), *lines[ends[0] :]]) + "\n"
    differences = serve_config_differences(rayservice_serve_config(rendered), serve_config)
    if differences:  # e.g. the markers sit at the wrong indentation
        raise RenderError("the rendered serveConfigV2 does not parse back: " + "; ".join(differences))
    return rendered


def check(manifest_text: str, serve_config: dict[str, Any]) -> list[str]:
    """Problems of ``manifest_text`` against ``serve_config``; empty when it is up to date."""
    problems = serve_config_differences(rayservice_serve_config(manifest_text), serve_config)
    if not problems and render(manifest_text, serve_config) != manifest_text:
        problems.append("the serveConfigV2 block is not formatted as the script writes it")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if rayservice.yaml is stale")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG, help=argparse.SUPPRESS)
    parser.add_argument("--rayservice", type=Path, default=RAYSERVICE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    serve_config = yaml.safe_load(args.serve_config.read_text())
    manifest_text = args.rayservice.read_text()
    if args.check:
        problems = check(manifest_text, serve_config)
        if problems:
            print(f"{args.rayservice} is stale against {args.serve_config}:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            print(f"run: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{args.rayservice}: serveConfigV2 matches {args.serve_config}")
        return 0
    rendered = render(manifest_text, serve_config)
    if rendered == manifest_text:
        print(f"{args.rayservice}: already up to date")
    else:
        args.rayservice.write_text(rendered)
        print(f"{args.rayservice}: serveConfigV2 rewritten from {args.serve_config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
