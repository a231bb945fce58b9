# The opening every prepared GPU script shares, sourced as `source benchmarks/gpu_start.sh NAME`:
# OUT (default benchmarks/results/NAME_<date>) made, everything printed teed into $OUT/run.log,
# the carried wheels in use, torch and the GPU named, the commit, and `step` for headings.
OUT=${OUT:-benchmarks/results/$1_$(date +%F)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/run.log") 2>&1
source benchmarks/use_gpu_wheels.sh
py=python3
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
git rev-parse --short HEAD 2>/dev/null || true

step() { echo; echo "=== $1 ($(date +%T))"; }
