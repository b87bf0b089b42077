#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the CUDA path and the benchmarks' GPU figures.
# The machine has torch but not zarr/open_clip/tyro: they travel as Python 3.12 wheels in .whl/ (not committed;
# see docs/benchmarks.md for the pip download command).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
{
  nvidia-smi -L
  python3 -c "import torch, zarr, open_clip, timm; print('torch', torch.__version__, torch.cuda.get_device_name(), 'zarr', zarr.__version__, 'timm', timm.__version__)"
  echo "== smoke: record on cuda vs cpu, train on cuda =="
  timeout 100 python3 benchmarks/gpu_smoke.py --n-imgs 64 2>&1 | grep -v "^INFO\|it/s\]\|img/s\]\|patch/s"
  echo "== bench_recording (cuda) =="
  timeout 80 python3 benchmarks/bench_recording.py --device cuda --n-imgs 4096 --batch-size 256 --imgs-per-shard 512 --repeats 2 --write-repeats 5 2>&1 | grep -v "^INFO"
  echo "== bench_training (cuda) =="
  timeout 150 python3 benchmarks/bench_training.py --device cuda --d-vit 768 --exp-factor 16 --batch-size 16384 --n-steps 30 --n-imgs 20000 --n-tokens 49 2>&1
  echo "== bench_loader =="
  timeout 60 python3 benchmarks/bench_loader.py --n-imgs 10000 2>&1
} 2>&1 | tee "$log"
