#!/usr/bin/env bash
# The GPU checks in one go, on a CUDA machine where `python` imports detfit:
#   bash benchmarks/gpu_checks.sh PATH/TO/PennFudanPed 2>&1 | tee gpu.log
# CUDA tests (training with and without AMP, resume, predict, 1-GPU torchrun with nccl), the
# scale-out benchmark on one GPU, and the references' loop vs detfit's Trainer on the tutorial's
# model (random init: no COCO file is at hand there), with and without AMP.
set -uo pipefail
data=${1:?give the PennFudanPed folder}
py=${PYTHON:-python3}
status=0
step() { echo; echo "== $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"

step "CUDA tests"
$py -m pytest -q -p no:cacheprovider tests/test_cuda.py || status=1

step "scale-out benchmark, 1 GPU (CPU recipe's model, random backbone)"
$py benchmarks/ddp_scaling.py --data-root "$data" --iters 30 --workers 4 \
  --set weights_backbone=none || status=1

common=(--data-root "$data" --recipe tutorial --model maskrcnn_resnet50_fpn --no-weights
  --device cuda --workers 4 --batch-size 2 --iters 40 --skip 5 --eval-images 20 --rounds 2)
step "references' loop vs detfit, maskrcnn_resnet50_fpn, fp32"
$py benchmarks/vs_references.py "${common[@]}" || status=1
step "references' loop vs detfit, maskrcnn_resnet50_fpn, AMP"
$py benchmarks/vs_references.py "${common[@]}" --amp || status=1
exit $status
