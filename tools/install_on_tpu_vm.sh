#!/bin/bash
# Installs the project's Python dependencies on a TPU VM, keeping the image's TPU build
# of TensorFlow. Run from the project root (tools/submit_tpu.py does, on worker 0).
#
# Why not `pip install -r requirements.txt`: its `tensorflow==` line names the PyPI
# wheel, and pip would replace the runtime image's TPU build with it (or, when the
# image ships `tensorflow-tpu`, install a second TensorFlow over it). Why not
# `--no-deps` of requirements.lock: the lock also pins TensorFlow's own dependencies
# (numpy, protobuf, ml-dtypes, ...), which must stay the ones the image's build was
# made with. So: every requirement but TensorFlow itself, resolved by pip against the
# image's TensorFlow and libtpu pinned as constraints; a requirement that needs another
# TensorFlow stops the install with pip's conflict message, and a final check fails
# if anything still changed them.
set -euo pipefail

python="${PYTHON:-python3}"
tpu_build='^(tensorflow|tensorflow-cpu|tensorflow-tpu|libtpu|libtpu-nightly)=='
work="$(mktemp -d)"

"$python" -m pip freeze | grep -iE "$tpu_build" > "$work/image-pins.txt" || true
if ! grep -qiE '^tensorflow(-cpu|-tpu)?==' "$work/image-pins.txt"; then
  echo "install_on_tpu_vm.sh: this image has no TensorFlow; create the TPU with a" \
       "tpu-vm-tf-* runtime version (tools/submit_tpu.py --runtime_version)" >&2
  exit 1
fi
echo "# keeping the image's TPU build: $(tr '\n' ' ' < "$work/image-pins.txt")"

# tf-keras is left to pip too: it must match the image's TensorFlow, not our pin.
grep -viE '^(tensorflow|tf-keras)==' requirements.txt > "$work/requirements.txt"
"$python" -m pip install -r "$work/requirements.txt" -c "$work/image-pins.txt"

"$python" -m pip freeze | grep -iE "$tpu_build" > "$work/after.txt" || true
if ! cmp -s "$work/image-pins.txt" "$work/after.txt"; then
  echo "install_on_tpu_vm.sh: the install changed the image's TensorFlow packages:" >&2
  diff "$work/image-pins.txt" "$work/after.txt" >&2 || true
  exit 1
fi
