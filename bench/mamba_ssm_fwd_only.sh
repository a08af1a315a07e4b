#!/bin/bash
# Like `.gpu/mamba_ssm_gpu.sh build DIR` (DIR holds mamba_ssm-2.3.2.post1.tar.gz), but the selective-scan backward
# kernels are stubs (they raise), which cuts the build to the forward kernels (85 s on an H200 machine instead of
# ~150 s): for forward-only benchmarks (bench/sidecar_profile.py). On failure it exits 1.
# Usage there: bash bench/mamba_ssm_fwd_only.sh .gpu && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
dir=${1:?usage: mamba_ssm_fwd_only.sh DIR}
src=$(mktemp -d)
tar xzf "$dir"/mamba_ssm-"$VERSION".tar.gz -C "$src"
cd "$src"/mamba_ssm-"$VERSION"
python3 - <<'PY'
import re, glob
s = open("setup.py").read()
s = re.sub(r'\n\s*cc_flag\.append\("-gencode"\)', '', s)
s = re.sub(r'cc_flag\.append\("arch=compute_(\d+),code=sm_\1"\)',
           lambda m: 'cc_flag.extend(["-gencode", "arch=compute_90,code=sm_90"])' if m.group(1) == "90" else 'pass', s)
open("setup.py", "w").write(s)
open("csrc/selective_scan/bwd_stub.cuh", "w").write('''#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/cuda/Atomic.cuh>
#include "selective_scan.h"
#include "selective_scan_common.h"
template<typename input_t, typename weight_t>
void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream) {
    TORCH_CHECK(false, "selective_scan_cuda was built forward-only (bench): no backward");
}
''')
for f in glob.glob("csrc/selective_scan/selective_scan_bwd_*.cu"):
    t = open(f).read()
    assert '#include "selective_scan_bwd_kernel.cuh"' in t, f
    open(f, "w").write(t.replace('#include "selective_scan_bwd_kernel.cuh"', '#include "bwd_stub.cuh"'))
PY
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=2 \
  python3 -m pip wheel -q --no-deps --no-build-isolation -w "$src/whl" . > "$src/build.log" 2>&1 \
  || { tail -30 "$src/build.log"; exit 1; }
python3 -m pip install -q --no-deps --no-index --target /tmp/site "$src"/whl/*.whl
echo "mamba_ssm $VERSION built forward-only for sm_90 in $(( $(date +%s) - start )) s -> /tmp/site"
