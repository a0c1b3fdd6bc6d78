#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu_session.sh installs on a lent GPU, whose image has CUDA torch and
# Triton but reaches no package index: v4c's runtime dependencies and the transformers oracle (for the e2e
# stages), resolved for the image's Python. Left out: torch and what torch brought (nvidia-*, cuda-*, triton,
# sympy, networkx, jinja2, filelock, fsspec), which the image's own versions must serve.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the lent H100/H200 image's
#
# Then carry the folder: run(..., carry=[".whl"]). .whl/ is ignored by git (.gitignore); its size is printed
# (the device tool carries 64 MiB in all).
set -euo pipefail
pyver="${1:-3.12}"
here="$(cd "$(dirname "$0")/.." && pwd)"
pip="${PIP:-$here/.venv/bin/pip}"
[ -x "$pip" ] || pip="python3 -m pip"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform linux_x86_64)
wanted=("transformers==5.23.*" "accelerate>=1.0" "numpy>=1.26" "safetensors>=0.4.3" "pyyaml>=6" "click>=8.1"
        "pydantic>=2.6" "rich>=13" "tokenizers>=0.19" "cryptography>=42")
report="$(mktemp)" scratch="$(mktemp -d)"
trap 'rm -rf "$report" "$scratch"' EXIT
echo "resolving for Python $pyver (linux x86_64, binary wheels only) ..."
$pip install -q --dry-run --ignore-installed --report "$report" --python-version "$pyver" "${platforms[@]}" \
    --only-binary=:all: --target "$scratch" "${wanted[@]}"
mapfile -t pins < <(python3 - "$report" <<'EOF'
import json, re, sys
SKIP = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|setuptools|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec)$")
for item in json.load(open(sys.argv[1]))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if not SKIP.match(name):
        print(f"{name}=={item['metadata']['version']}")
EOF
)
mkdir -p "$here/.whl"
$pip download -q --no-deps --only-binary=:all: --python-version "$pyver" "${platforms[@]}" -d "$here/.whl" "${pins[@]}"
echo "${#pins[@]} wheels in .whl/ ($(du -sh "$here/.whl" | cut -f1)): ${pins[*]}"
