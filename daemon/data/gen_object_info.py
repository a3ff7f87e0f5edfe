#!/usr/bin/env python3
"""Generate daemon/data/object_info_core.json from the recorded ComfyUI /object_info.

The ComfyUI simulator (`kilnd comfy-sim`) embeds the output with include_str!. It keeps only the
core node classes (drops every `api_node` class), and drops description and tooltip texts, so the
data stays small while input names, types, defaults, ranges, combo choices, output types and
output_node flags stay exactly as the real server reported them.

Rerun from the repository root after replacing the recording:

    python3 daemon/data/gen_object_info.py \
        daemon/tests/comfyui-recordings/06_object_info_full.json \
        daemon/data/object_info_core.json
"""

import json
import sys

DROP_NODE_KEYS = {"description", "output_tooltips"}
DROP_OPTION_KEYS = {"tooltip"}


def strip_spec(spec):
    if isinstance(spec, list) and len(spec) >= 2 and isinstance(spec[1], dict):
        opts = {k: v for k, v in spec[1].items() if k not in DROP_OPTION_KEYS}
        return [spec[0], opts] + spec[2:]
    return spec


def main(src, dst):
    with open(src, encoding="utf-8") as f:
        full = json.load(f)
    out = {}
    for name, node in full.items():
        if node.get("api_node"):
            continue
        node = {k: v for k, v in node.items() if k not in DROP_NODE_KEYS}
        node["input"] = {
            cat: {inp: strip_spec(spec) for inp, spec in specs.items()}
            for cat, specs in node.get("input", {}).items()
        }
        out[name] = node
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
    print(f"{len(out)} classes written to {dst}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: gen_object_info.py RECORDED_OBJECT_INFO_JSON OUTPUT_JSON")
    main(sys.argv[1], sys.argv[2])
