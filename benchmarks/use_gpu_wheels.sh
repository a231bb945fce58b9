# Sourced by benchmarks/gpu_check.sh and gpu_lunarlander.sh on the H200 test machine: installs the
# py3.12 wheels carried in .whl/ (downloaded by benchmarks/fetch_gpu_wheels.sh) into /tmp/site and
# puts it first on PYTHONPATH. Without .whl/ it does nothing (the machine's own packages are used).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
