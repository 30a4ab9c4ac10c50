#!/bin/sh
# On the GPU machine, after every part* and skit.tar.xz.sha256 are in /tmp/sk: rebuild the archive, check it,
# install the wheels into /tmp/ssite. Prints the exports to eval: eval "$(sh /tmp/sk/reassemble.sh)"
# /tmp/ssite shadows the image's transformers/tokenizers (5.6.0/0.22.2, SGLang's pins) only where it is on PYTHONPATH.
set -eu
cd /tmp/sk
cat part* > skit.tar.xz
sed 's#  .*#  skit.tar.xz#' skit.tar.xz.sha256 | sha256sum -c - >&2
rm -rf whl lib
if command -v xz >/dev/null 2>&1; then xz -dc skit.tar.xz | tar -xf -
else python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open('skit.tar.xz'), sys.stdout.buffer, 1<<20)" | tar -xf -
fi
rm -f skit.tar.xz
rm -rf /tmp/ssite
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ssite /tmp/sk/whl/*.whl >&2
rm -rf /tmp/sk/whl
echo "export PYTHONPATH=/tmp/ssite\${PYTHONPATH:+:\$PYTHONPATH}"
# sgl_kernel's common_ops.so NEEDs libnuma.so.1: use the carried copy only where the image has none.
if ! python3 -c "import ctypes; ctypes.CDLL('libnuma.so.1')" 2>/dev/null; then
  echo "export LD_LIBRARY_PATH=/tmp/sk/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi
echo "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_USE_SGL_FA3_KERNEL=1"
echo "export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1"
