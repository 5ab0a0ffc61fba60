# Host detection for the shell scripts (sourced by setup_env.sh and demo.sh): one place decides
# GPU or CPU, so tests/test_hardware.py can run it with a fake nvidia-smi on PATH.

# GPUs the driver lists. nvidia-smi can be installed without a working driver (it then exits
# non-zero, e.g. in a CPU container built from a CUDA image): that counts as none.
gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# The decisions, as shell assignments to eval: NGPU, TORCH_SPEC (the CPU wheel pin without a GPU, so
# no dependency pulls a CUDA build of several GB), NPROC (demo ranks: every GPU, else 2 CPU ranks),
# and on CPU DS_ACCELERATOR and OMP_NUM_THREADS (the usable cores split between the ranks; nproc
# honours the affinity mask, and is asked without the OMP variables it would otherwise echo).
host_plan() {
  local ngpu cores ranks
  ngpu=$(gpu_count)
  echo "NGPU=$ngpu"
  if [ "$ngpu" -gt 0 ]; then
    echo "TORCH_SPEC='${TORCH_SPEC:-torch>=2.4,<2.14}'"
    echo "NPROC=${NPROC:-$ngpu}"
  else
    ranks=${NPROC:-2}
    cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
    echo "TORCH_SPEC='${TORCH_SPEC:-torch==2.13.0}'"
    echo "NPROC=$ranks"
    echo "DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}"
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}"
  fi
}
