#!/usr/bin/env bash
# One command from a fresh clone: set up ./.venv, build the offline demo data set, train RADAR
# with the unmodified `anomalib` CLI, report test metrics, export to OpenVINO and score a
# defective test image with OpenVINO, writing an overlay PNG.
#   bash scripts/demo.sh [category]      (brick, grass or gravel; default brick)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
category="${1:-brick}"
source "$repo/scripts/setup_env.sh"
cd "$repo"
work="demo_output"
rm -rf "$work"

echo "==> Building the demo data set (CC0 textures bundled with scikit-image, planted defects)"
anomalib-diffusion-demo-data --root datasets/demo --categories "$category"

echo "==> Training and testing RADAR: anomalib train --config configs/radar.yaml --config configs/radar_demo.yaml"
anomalib train --config configs/radar.yaml --config configs/radar_demo.yaml --data.category "$category"
# anomalib writes <root>/RADAR/MVTecAD/<category>/v<N>/weights/lightning/model.ckpt ("latest" is a symlink).
checkpoint="$(find "$work" -name model.ckpt | sort | tail -n 1)"
[ -n "$checkpoint" ] || { echo "anomalib train wrote no checkpoint under $work" >&2; exit 1; }

echo "==> Exporting to OpenVINO: anomalib export --export_type openvino"
anomalib export --model anomalib_diffusion.models.RADAR --ckpt_path "$checkpoint" \
    --export_type openvino --export_root "$work/export"
model_xml="$(find "$work/export" -name model.xml | head -n 1)"

echo "==> OpenVINO inference on a defective test image"
image="$(find "datasets/demo/$category/test" -path '*scratch*' -name '*.png' | sort | head -n 1)"
anomalib-diffusion-predict --model "$model_xml" --input "$image" --output "$work/predictions"
echo "==> Done: metrics above, model at $model_xml, overlay in $work/predictions/"
