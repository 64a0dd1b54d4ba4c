#!/usr/bin/env bash
# Regenerate what is derived from the service YAMLs in deployments/:
#   deployments/serve/NAME.yaml   the Serve config file of deployments/NAME.yaml
#                                 (`mpsserve serve-config`; for `serve deploy FILE`,
#                                 `mpsserve deploy --config FILE`, a `ray job submit` redeploy)
#   deployments/k8s/*.yaml        the RayService's serveConfigV2: the block between
#                                 "# BEGIN serve config: FILE" and "# END serve config"
# Run it after changing a service YAML or mpsserve's Serve config format, and commit the result;
# tests/unit/test_deploy_files.py fails while a committed file differs from what this writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NAMES=(local-cpu gpu-mps gpu-mps-host gpu-no-mps multi-model gpu-mps-k8s)
shopt -s nullglob
MANIFESTS=(deployments/k8s/*.yaml)

for name in "${NAMES[@]}"; do
  "$PYTHON" -m mpsserve.ops.cli serve-config --config "deployments/$name.yaml" \
    >"deployments/serve/$name.yaml.new"
  mv "deployments/serve/$name.yaml.new" "deployments/serve/$name.yaml"
  echo "wrote deployments/serve/$name.yaml"
done

"$PYTHON" - "${MANIFESTS[@]}" <<'PY'
import re
import sys
from pathlib import Path

BLOCK = re.compile(
    r"^(?P<indent>[ ]*)# BEGIN serve config: (?P<src>\S+).*?\n(?P=indent)# END serve config$",
    re.M | re.S,
)


def embed(match: re.Match[str]) -> str:
    indent, src = match["indent"], match["src"]
    body = "".join(indent + line if line.strip() else line
                   for line in Path(src).read_text().splitlines(keepends=True))
    return f"{indent}# BEGIN serve config: {src} (scripts/gen_serve_configs.sh)\n{body}{indent}# END serve config"


for name in sys.argv[1:]:
    path = Path(name)
    text, count = BLOCK.subn(embed, path.read_text())
    if count:
        path.write_text(text)
        print(f"embedded {count} serve config(s) in {path}")
PY
