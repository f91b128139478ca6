#!/usr/bin/env python3
"""Generate the `config:` part of the chart's values.schema.json from the daemon's own
pydantic models (`refresher.config.Settings`), so Helm refuses what the daemon would.

    python helm/refresher/schema/generate.py           # (re)write values.schema.json
    python helm/refresher/schema/generate.py --check   # exit 1 if values.schema.json is stale

Only `properties.config` and `definitions` are generated; every other chart value in
values.schema.json is written by hand. The output is deterministic (two-space indent,
trailing newline), so tests/test_helm_chart.py can check the committed file is current.

The models' JSON schema is turned into draft-07 (what every Helm 3 and 4 validates):
`$defs` become `definitions`; discriminated unions (`kind:`) become if/then on the tag,
so an error is about the kind given; annotations validators ignore anyway (`title`, the
non-standard formats `path`/`password`) are dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parent.parent
OUTPUT = CHART / "values.schema.json"
sys.path.insert(0, str(CHART.parent.parent))  # the repository root: refresher.config

from refresher.config import Settings  # noqa: E402

REF_PREFIX = "#/definitions/"
DROPPED = {"title", "discriminator"}
NON_STANDARD_FORMATS = {"path", "password"}
CONFIG_DESCRIPTION = (
    "The refresher configuration, rendered into the ConfigMap. Generated from the "
    "daemon's config models (schema/generate.py): unknown keys and wrong types are "
    "refused here, before any pod starts."
)


def _tagged(node: dict[str, Any]) -> dict[str, Any]:
    """pydantic's discriminated union (oneOf + discriminator) as if/then on the tag.

    Same verdicts, but an error names what is wrong with *this* kind instead of listing
    why the value is none of the other kinds either.
    """
    tag = node["discriminator"]["propertyName"]
    mapping = node["discriminator"]["mapping"]
    assert sorted(mapping.values()) == sorted(v["$ref"] for v in node["oneOf"]), node
    return {
        "type": "object",
        "required": [tag],
        "properties": {tag: {"enum": list(mapping)}},
        "allOf": [
            {"if": {"properties": {tag: {"const": value}}}, "then": {"$ref": ref}}
            for value, ref in mapping.items()
        ],
    }


def _clean(node: Any) -> Any:
    """A schema node without the annotations listed in DROPPED / NON_STANDARD_FORMATS."""
    if isinstance(node, list):
        return [_clean(item) for item in node]
    if not isinstance(node, dict):
        return node
    if "discriminator" in node and "oneOf" in node:
        rest = {k: v for k, v in node.items() if k not in ("discriminator", "oneOf")}
        return {**_clean(rest), **_tagged(node)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED or (key == "format" and value in NON_STANDARD_FORMATS):
            continue
        if key == "default" and "$ref" in node:
            continue  # a whole section's defaults: the daemon's, noise next to values.yaml
        if key in ("properties", "definitions"):
            # Names of properties are data, not keywords: never drop a field named "title".
            out[key] = {name: _clean(schema) for name, schema in value.items()}
        elif key in ("default", "const", "enum", "examples"):
            out[key] = value
        else:
            out[key] = _clean(value)
    return out


def config_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema of `config:`, its definitions), from `Settings`."""
    schema = Settings.model_json_schema(ref_template=REF_PREFIX + "{model}")
    definitions = schema.pop("$defs")
    config = _clean(schema)
    config["description"] = CONFIG_DESCRIPTION
    return config, _clean({"definitions": definitions})["definitions"]


def render(current: dict[str, Any]) -> str:
    """values.schema.json with `config` and `definitions` regenerated."""
    values = json.loads(json.dumps(current))
    config, definitions = config_schema()
    values["properties"]["config"] = config
    values["definitions"] = dict(sorted(definitions.items()))
    return json.dumps(values, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the schema file")
    args = parser.parse_args(argv)
    base = args.output if args.output.exists() else OUTPUT
    text = render(json.loads(base.read_text()))
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
